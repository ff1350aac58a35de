"""Request bodies of the REST API: strict (unknown fields, wrong types and oversized values are 400s).

Responses reuse the wire dataclasses of :mod:`corral.models`, so the server and the SDK agree by construction.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.models import CreateParams, ExecParams

__all__ = [
    "CreateSandboxBody",
    "ExecBody",
    "KeyBody",
    "MakeDirBody",
    "NetworkBody",
    "QuotasBody",
    "RenameBody",
    "SignalBody",
    "TenantBody",
    "TimeoutBody",
]

Name = Annotated[str, Field(min_length=1, max_length=128)]
Path = Annotated[str, Field(min_length=1, max_length=4096)]
StrMap = dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=32768)]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Rules = Annotated[list[Annotated[str, Field(min_length=1, max_length=300)]], Field(max_length=512)]


class NetworkRules(_Strict):
    allow_out: Rules | None = None
    deny_out: Rules | None = None


NetworkValue = Literal["none", "internet"] | NetworkRules
NETWORK_HELP = (
    'egress policy: "none" (no network, the default), "internet" (public addresses only), or rules: '
    "allow_out / deny_out lists of host names, *.wildcards and CIDRs, each with an optional :port"
)


class NetworkBody(_Strict):
    network: NetworkValue = Field(description=NETWORK_HELP)

    def value(self) -> Any:
        return _network_value(self.network)


def _network_value(value: Any) -> Any:
    if isinstance(value, NetworkRules):
        return value.model_dump(exclude_none=True)
    return value


SecretText = Annotated[str, Field(min_length=1, max_length=8192)]


class SecretSpec(_Strict):
    value: SecretText
    hosts: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=300)]], Field(min_length=1, max_length=64)
        ]
        | None
    ) = None
    body: bool = False


SECRETS_HELP = (
    "name -> value, or {value, hosts, body}: the sandbox's env gets a placeholder; the egress proxy puts the "
    "value into HTTPS requests to the bound hosts (default: the allow_out names) and nowhere else"
)


class CreateSandboxBody(_Strict):
    template: Name | None = None
    isolation: Name | None = None
    timeout: Annotated[float, Field(ge=1)] | None = None
    metadata: StrMap = Field(default_factory=dict)
    env: StrMap = Field(default_factory=dict)
    memory_mb: Annotated[int, Field(ge=16, le=1024 * 1024)] | None = None
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None
    files: dict[Path, Annotated[str, Field(max_length=700_000)]] = Field(
        default_factory=dict,
        description="path -> base64 content, written before create returns",
        max_length=64,
    )
    public_ports: bool = Field(
        default=False,
        description="let anyone reach the sandbox's ports through the proxy; otherwise its traffic token is needed",
    )
    auto_pause: bool = Field(
        default=False, description="at its timeout, pause the sandbox instead of stopping it (resume goes on)"
    )
    network: NetworkValue | None = Field(default=None, description=NETWORK_HELP)
    secrets: dict[Annotated[str, Field(min_length=1, max_length=64)], SecretText | SecretSpec] = Field(
        default_factory=dict, max_length=32, description=SECRETS_HELP
    )

    def params(self) -> CreateParams:
        return CreateParams.from_wire({**self.model_dump(), "network": _network_value(self.network)})


class ExecBody(_Strict):
    cmd: Annotated[str, Field(min_length=1, max_length=131072)] | None = None
    argv: (
        Annotated[list[Annotated[str, Field(max_length=131072)]], Field(min_length=1, max_length=4096)] | None
    ) = None
    env: StrMap = Field(default_factory=dict)
    cwd: Path | None = None
    user: Name | None = None
    timeout: Annotated[float, Field(gt=0)] | None = None
    stdin: bool = False
    background: bool = False
    tag: Name | None = None

    def params(self) -> ExecParams:
        return ExecParams(**self.model_dump())


class SnapshotBody(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    description: Annotated[str, Field(max_length=1024)] = ""


class ForkBody(_Strict):
    count: Annotated[int, Field(ge=1, le=16)] = 1


class TimeoutBody(_Strict):
    timeout: Annotated[float, Field(ge=1)]


class SignalBody(_Strict):
    signal: Annotated[int, Field(ge=1, le=64)]


class MakeDirBody(_Strict):
    path: Path
    user: Name | None = None


class RenameBody(_Strict):
    src: Path
    dst: Path
    overwrite: bool = False
    user: Name | None = None


class QuotasBody(_Strict):
    max_sandboxes: Annotated[int, Field(gt=0)] | None = None
    max_memory_mb: Annotated[int, Field(gt=0)] | None = None
    max_timeout: Annotated[float, Field(gt=0)] | None = None


class TenantBody(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    quotas: QuotasBody = Field(default_factory=QuotasBody)


class KeyBody(_Strict):
    name: Annotated[str, Field(max_length=128)] = ""
    e2b: bool = Field(default=False, description="write the key in E2B's form, e2b_<hex>, for E2B's SDK")


def dump(value: Any) -> Any:
    """A wire dataclass (or list of them) as JSON-ready data."""
    if isinstance(value, list):
        return [dump(v) for v in value]
    return value.to_wire() if hasattr(value, "to_wire") else value
