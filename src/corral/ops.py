"""The op table: one row per unary REST operation (request -> one answer), shared by every transport.

A row names the service function (``SandboxService.<name>``), the HTTP method and path, the request body model
(by its name in ``corral.server.schemas``; the server validates it), the answer's wire type and the success
status. The server registers its route from the row (``server/routes/unary.py``), the remote client sends it
(``AsyncRemoteBackend.call``) and the embedded client calls the same service function (``AsyncLocalBackend.call``).
Streaming operations (exec, attach, watch, files up/download, events, builds) keep their own routes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from corral.models import NetworkStatus, SandboxInfo, TemplateInfo

__all__ = ["OPS", "Op"]

T = TypeVar("T")


@dataclass(frozen=True)
class Op(Generic[T]):
    name: str  # the service function, and the route's name (the OpenAPI operationId is made from it)
    method: str
    path: str  # a template: {sandbox_id}, ...
    summary: str
    answer: Any = None  # the wire class of the answer (its from_wire/to_wire); None: 204, no body
    many: str | None = None  # the answer is a list, sent as {many: [...]}
    body: str | None = None  # the request model's class name in corral.server.schemas
    whole: str | None = (
        None  # the service argument the whole body becomes (body.params()); else fields spread
    )
    rename: tuple[tuple[str, str], ...] = ()  # (service argument, body field) where the names differ
    status: int = 200
    tag: str = "sandboxes"

    @property
    def path_args(self) -> tuple[str, ...]:
        return tuple(re.findall(r"{(\w+)}", self.path))

    def url(self, args: dict[str, Any]) -> str:
        return self.path.format(**{k: quote(str(args.pop(k)), safe="") for k in self.path_args})

    def wire_body(self, args: dict[str, Any]) -> dict[str, Any] | None:
        """The JSON body of a call, from its remaining (non-path) arguments; None fields left out."""
        if self.body is None:
            return None
        if self.whole is not None:
            return {k: v for k, v in args[self.whole].to_wire().items() if v is not None}
        names = dict(self.rename)
        return {names.get(k, k): v for k, v in args.items() if v is not None}

    def service_args(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The service's keyword arguments from a validated body's fields (the inverse of :meth:`wire_body`)."""
        names = {wire: arg for arg, wire in self.rename}
        return {names.get(k, k): v for k, v in fields.items()}

    def decode(self, data: Any) -> T:
        if self.answer is None:
            return None  # type: ignore[return-value]
        if self.many is not None:
            return [self.answer.from_wire(x) for x in data[self.many]]  # type: ignore[return-value]
        return self.answer.from_wire(data)  # type: ignore[no-any-return]


_ONE = "/v1/sandboxes/{sandbox_id}"

GET: Op[SandboxInfo] = Op("get", "GET", _ONE, "Get one sandbox", SandboxInfo)
KILL: Op[SandboxInfo] = Op("kill", "DELETE", _ONE, "Kill a sandbox (idempotent)", SandboxInfo)
SET_TIMEOUT: Op[SandboxInfo] = Op(
    "set_timeout",
    "POST",
    _ONE + "/timeout",
    "Give the sandbox this many seconds more life, from now",
    SandboxInfo,
    body="TimeoutBody",
    rename=(("seconds", "timeout"),),
)
UPDATE_NETWORK: Op[SandboxInfo] = Op(
    "update_network",
    "PUT",
    _ONE + "/network",
    "Replace the sandbox's egress policy in place; open connections it now denies are cut",
    SandboxInfo,
    body="NetworkBody",
)
NETWORK_STATUS: Op[NetworkStatus] = Op(
    "network_status",
    "GET",
    _ONE + "/network",
    "The sandbox's egress policy and its decision counts",
    NetworkStatus,
)
PAUSE: Op[SandboxInfo] = Op(
    "pause", "POST", _ONE + "/pause", "Pause (its deadline is suspended)", SandboxInfo
)
RESUME: Op[SandboxInfo] = Op("resume", "POST", _ONE + "/resume", "Resume a paused sandbox", SandboxInfo)
SNAPSHOT: Op[TemplateInfo] = Op(
    "snapshot",
    "POST",
    _ONE + "/snapshot",
    "Save the sandbox as a template only you can use",
    TemplateInfo,
    body="SnapshotBody",
    status=201,
)
FORK: Op[list[SandboxInfo]] = Op(
    "fork",
    "POST",
    _ONE + "/fork",
    "Make count independent copies of a running sandbox",
    SandboxInfo,
    many="sandboxes",
    body="ForkBody",
    status=201,
)

OPS: tuple[Op[Any], ...] = (
    GET,
    KILL,
    SET_TIMEOUT,
    UPDATE_NETWORK,
    NETWORK_STATUS,
    PAUSE,
    RESUME,
    SNAPSHOT,
    FORK,
)
