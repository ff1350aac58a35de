"""Sandbox traffic of E2B's SDK: which sandbox and port a request is for, who may reach it, and where it goes.

A request is E2B sandbox traffic when it carries ``E2b-Sandbox-Id`` (single-URL mode, ``E2B_SANDBOX_URL``:
every request goes to one address; the SDK names the sandbox and port in ``E2b-Sandbox-Id`` and
``E2b-Sandbox-Port``), or when its host is ``{port}-{sandbox_id}.{domain}`` for port 49983 or 49999 (domain
mode, ``E2B_DOMAIN`` and wildcard DNS). A sandbox host name decides over the headers (as at E2B's edge): a
request for ``49983-{a}.{domain}`` goes to sandbox ``a`` whatever ``E2b-Sandbox-Id`` says.

With ``[e2b] domain`` set (``Settings.e2b_domain``), every name under that domain is E2B's: ``api.{domain}``
is the API, ``sandbox.{domain}`` is routed by the headers, ``{port}-{id}.{domain}`` by its name for any port,
and any other name under it routes nowhere (404, E2B's edge body). Without it, ``{port}-{id}`` names under
any domain are recognised for ports 49983 and 49999 only. By port:

- 49983 → envd (:func:`~corral.server.e2b.envd.serve_envd`), 49999 → the code interpreter. Both need the
  sandbox's envd access token in ``X-Access-Token`` (or, for ``/files``, a URL signed with it). The code
  interpreter's context calls, which the SDK sends without it, need what its other ports need: the traffic
  token in ``E2B-Traffic-Access-Token``, or nothing for a sandbox with public ports; running code always
  needs the access token. A wrong token, another tenant's sandbox, an unknown or stopped one all get the
  same answer.
- Any other port → Corral's port proxy (``E2B-Traffic-Access-Token`` standing in for
  ``Corral-Traffic-Token``).

A signed ``/files`` URL formed in single-URL mode names no sandbox (``{E2B_SANDBOX_URL}/files?path=…&signature=…``,
what ``download_url``/``upload_url`` return there): the sandbox is the one whose secret signs it.

Refusals are the JSON of E2B's edge proxy, ``{"sandboxId", "message", "code": 502}`` with status 502, worded
as the SDK expects: "… was not found" (it raises ``SandboxNotRunningException``) and "… port is not open"
(``SandboxUnreachableException``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.core.service import SandboxService
from corral.errors import CorralError, NotFound, PortClosed
from corral.models import SandboxState
from corral.server.e2b.envd import SandboxAccess, SandboxCall, Watchers, serve_envd, serve_interpreter
from corral.server.e2b.envd._access import signature_check
from corral.server.metrics import Metrics
from corral.server.proxy import TOKEN_HEADER, PortProxy, Target

__all__ = ["ENVD_PORT", "INTERPRETER_PORT", "E2BSandboxHost", "e2b_target"]

access_log = logging.getLogger("corral.server.access")

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
ID_HEADER = b"e2b-sandbox-id"
PORT_HEADER = b"e2b-sandbox-port"
ACCESS_HEADER = b"x-access-token"
TRAFFIC_HEADER = b"e2b-traffic-access-token"
_HOST = re.compile(r"(49983|49999)-([a-z0-9-]{1,64})")
_DOMAIN_HOST = re.compile(r"([0-9]{1,5})-([a-z0-9-]{1,64})")  # any port, under the E2B domain
MAX_SIGNED_SCAN = 10_000  # live sandboxes checked for an unnamed signed URL


@dataclass(frozen=True, kw_only=True)
class E2BTarget:
    sandbox_id: str  # "" for a signed /files URL that names no sandbox
    port: int


NO_ROUTE = 0  # E2BTarget.port of a name under the E2B domain that names no sandbox


def _host_name(scope: Scope) -> str:
    raw: bytes = dict(scope["headers"]).get(b"host", b"")
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host  # an IPv6 literal names no sandbox
    return host.rsplit(":", 1)[0].rstrip(".")


def e2b_target(scope: Scope, domain: str | None = None) -> E2BTarget | None:
    """The sandbox and port a request is for, or None for the API (``domain``: ``Settings.e2b_domain``)."""
    name = _host_name(scope)
    base = domain.rsplit(":", 1)[0] if domain else None
    if base is not None and name.endswith("." + base):
        label = name[: -len(base) - 1]
        match = _DOMAIN_HOST.fullmatch(label)
        if match is not None:
            return E2BTarget(sandbox_id=match[2], port=int(match[1]))
        if label not in ("api", "sandbox"):
            return E2BTarget(sandbox_id="", port=NO_ROUTE)
    else:
        match = _HOST.fullmatch(name.split(".", 1)[0])
        if match is not None:
            return E2BTarget(sandbox_id=match[2], port=int(match[1]))
    headers = dict(scope["headers"])
    sandbox_id = headers.get(ID_HEADER)
    if sandbox_id is not None:
        port = headers.get(PORT_HEADER, b"").strip()
        return E2BTarget(
            sandbox_id=sandbox_id.decode("latin-1").strip(), port=int(port) if port.isdigit() else ENVD_PORT
        )
    if scope["path"] == "/files" and b"signature=" in scope.get("query_string", b""):
        return E2BTarget(sandbox_id="", port=ENVD_PORT)
    return None


async def send_refusal(send: Send, sandbox_id: str, exc: CorralError) -> None:
    """E2B's edge-proxy error body; NotFound and PortClosed in the words the SDK looks for."""
    if isinstance(exc, NotFound):
        status, message = 502, f"The sandbox {sandbox_id} was not found"
    elif isinstance(exc, PortClosed):
        status, message = 502, f"The sandbox {sandbox_id} is running but port is not open"
    else:
        status, message = exc.status, exc.message
    await send_edge_error(send, sandbox_id, status, message)


async def send_edge_error(send: Send, sandbox_id: str, status: int, message: str) -> None:
    body = json.dumps({"sandboxId": sandbox_id, "message": message, "code": status}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class E2BSandboxHost:
    """Outermost ASGI middleware: E2B sandbox traffic is answered here, everything else goes to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        service: SandboxService,
        watchers: Watchers,
        metrics: Callable[[], Metrics | None],
        domain: str | None = None,
    ) -> None:
        self.app = app
        self.domain = domain
        self.service = service
        self.access = SandboxAccess(service)
        self.proxy = PortProxy(app, service=service, metrics=metrics)
        self.watchers = watchers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = e2b_target(scope, self.domain) if scope["type"] in ("http", "websocket") else None
        if target is None:
            await self.app(scope, receive, send)
            return
        if target.port == NO_ROUTE:
            await self._no_route(scope, send)
            return
        if target.port not in (ENVD_PORT, INTERPRETER_PORT):
            await self._proxy(scope, receive, send, target)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008, "reason": "envd speaks HTTP, not WebSocket"})
            return
        started = time.perf_counter()
        status = 0
        tenant = None

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                call = await self._authorize(scope, target)
            except CorralError as exc:
                await send_refusal(sending, target.sandbox_id, exc)
                return
            tenant = call.tenant
            if target.port == ENVD_PORT:
                await serve_envd(call, self.watchers, scope, receive, sending)
            else:
                await serve_interpreter(call, scope, receive, sending)
        finally:
            access_log.info(
                "e2b sandbox request",
                extra={
                    "method": scope["method"],
                    "route": scope["path"][:200],
                    "sandbox_id": target.sandbox_id,
                    "port": target.port,
                    "status": status,
                    "http_version": scope.get("http_version"),  # "2": HTTP/2 (corral serve --http2)
                    "tenant_id": tenant,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )

    async def _no_route(self, scope: Scope, send: Send) -> None:
        name = _host_name(scope)[:253]
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "no sandbox at this host name"})
            return
        message = f"no sandbox is served at {name}: sandbox hosts are {{port}}-{{sandbox_id}}.{self.domain}"
        await send_edge_error(send, "", 404, message)

    async def _authorize(self, scope: Scope, target: E2BTarget) -> SandboxCall:
        headers = dict(scope["headers"])
        token = headers.get(ACCESS_HEADER)
        if token is not None and target.sandbox_id:
            return await self.access.call(target.sandbox_id, token.decode("latin-1").strip())
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if target.port == ENVD_PORT and scope["path"] == "/files" and "signature" in query:
            return await self._signed(target.sandbox_id, query, scope["method"])
        if target.port == INTERPRETER_PORT and target.sandbox_id and scope["path"] != "/execute":
            traffic = headers.get(TRAFFIC_HEADER)
            return await self.access.port_call(
                target.sandbox_id, traffic.decode("latin-1").strip() if traffic is not None else None
            )
        raise NotFound(f"sandbox {target.sandbox_id} was not found")

    async def _signed(self, sandbox_id: str, query: dict[str, str], method: str) -> SandboxCall:
        if sandbox_id:
            return await self.access.signed_call(sandbox_id, query, method)
        # A URL from single-URL mode names no sandbox: it is the one whose token signed it. One listing and a
        # hash per running sandbox (no store read each), so an unsigned caller cannot make the server work much.
        proves = signature_check(query, method)
        records = await self.service.store.list_sandboxes(states=frozenset({SandboxState.RUNNING}))
        for record in records[:MAX_SIGNED_SCAN]:
            if record.envd_access_token and proves(record.envd_access_token):
                return await self.access.signed_call(str(record.sandbox_id), query, method)
        raise NotFound("no sandbox was found for this signed URL")

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, target: E2BTarget) -> None:
        headers = dict(scope["headers"])
        token = headers.get(TOKEN_HEADER) or headers.get(TRAFFIC_HEADER)
        proxied = Target(
            sandbox_id=target.sandbox_id, port=target.port, token=token.decode("latin-1") if token else None
        )

        async def refuse(send: Send, exc: CorralError) -> None:
            await send_refusal(send, target.sandbox_id, exc)

        await self.proxy.relay(scope, receive, send, proxied, refuse=refuse)
