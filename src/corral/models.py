"""Wire value types shared by the server, the SDK and the CLI.

Frozen, keyword-only dataclasses with ``to_wire()`` / ``from_wire()`` for their JSON form. They carry no
behaviour beyond (de)serialisation and small derived properties, so the SDK can use them without any of the
server's dependencies.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

from corral.errors import InvalidRequest

__all__ = [
    "CommandResult",
    "CreateParams",
    "EntryInfo",
    "EntryType",
    "EventKind",
    "ExecParams",
    "PoolInfo",
    "PoolParams",
    "ProcessEvent",
    "ProcessInfo",
    "SandboxInfo",
    "SandboxState",
    "StopReason",
    "TemplateInfo",
]


class SandboxState(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class StopReason(StrEnum):
    KILLED = "killed"  # someone asked for it
    TIMEOUT = "timeout"  # its deadline passed
    CRASHED = "crashed"  # the sandbox or its agent died on its own (OOM, runtime failure)


class EventKind(StrEnum):
    """Process event names, identical from the agent to the CLI (DESIGN §4)."""

    STARTED = "started"
    STDOUT = "stdout"
    STDERR = "stderr"
    EXIT = "exit"
    DETACHED = "detached"  # the stream ended but the process keeps running in the background


class EntryType(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"


class _Wire:
    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True, kw_only=True)
class SandboxInfo(_Wire):
    sandbox_id: str
    template: str
    isolation: str
    state: SandboxState
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    expires_at: float | None = None  # None while paused (the deadline is suspended) and once stopped
    stop_reason: StopReason | None = None
    memory_mb: int = 0
    cpus: float = 0.0
    from_pool: bool = False  # served by claiming a pre-booted warm-pool member, not by a cold start

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> SandboxInfo:
        info = super().from_wire(data)
        return dataclasses.replace(
            info,
            state=SandboxState(info.state),
            stop_reason=StopReason(info.stop_reason) if info.stop_reason else None,
        )


@dataclass(frozen=True, kw_only=True)
class CreateParams(_Wire):
    """What to create: every field optional; the server's settings fill in the defaults."""

    template: str | None = None
    isolation: str | None = None
    timeout: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    memory_mb: int | None = None
    cpus: float | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # path -> content, written before create returns

    def to_wire(self) -> dict[str, Any]:
        out = super().to_wire()
        out["files"] = {path: base64.b64encode(data).decode() for path, data in self.files.items()}
        return out

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CreateParams:
        files = data.get("files") or {}
        try:
            decoded = {path: base64.b64decode(content, validate=True) for path, content in files.items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise InvalidRequest("files must map sandbox paths to base64-encoded contents") from exc
        return super().from_wire({**data, "files": decoded})


@dataclass(frozen=True, kw_only=True)
class ExecParams(_Wire):
    """A command to run. Exactly one of ``cmd`` (shell string) and ``argv``."""

    cmd: str | None = None
    argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None  # "user" (default) or "root"
    timeout: float | None = None
    stdin: bool = False
    background: bool = False
    tag: str | None = None

    def agent_fields(self) -> dict[str, Any]:
        """The ``exec`` request fields of the agent protocol (unset options left out)."""
        out: dict[str, Any] = {}
        for key, value in self.to_wire().items():
            if value is None or value == {} or value is False:
                continue
            out[key] = value
        return out


@dataclass(frozen=True, kw_only=True)
class ProcessEvent(_Wire):
    kind: EventKind
    data: bytes = b""
    process_id: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def to_wire(self) -> dict[str, Any]:
        out = {k: v for k, v in super().to_wire().items() if v not in (None, False, b"")}
        if self.data:
            out["data"] = self.data.decode("latin-1")  # JSON transports; raw framing elsewhere
        return out

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ProcessEvent:
        raw = data.get("data", b"")
        payload = raw.encode("latin-1") if isinstance(raw, str) else bytes(raw)
        ev = super().from_wire({**data, "data": payload})
        return dataclasses.replace(ev, kind=EventKind(ev.kind))


@dataclass(frozen=True, kw_only=True)
class ProcessInfo(_Wire):
    process_id: str
    pid: int
    argv: list[str]
    running: bool
    tag: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    started_at: float = 0.0
    user: str | None = None
    cwd: str | None = None


@dataclass(frozen=True, kw_only=True)
class EntryInfo(_Wire):
    name: str
    path: str
    type: EntryType
    size: int = 0
    mode: int = 0
    mtime: float = 0.0
    uid: int = 0
    gid: int = 0
    target: str | None = None

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> EntryInfo:
        entry = super().from_wire(data)
        return dataclasses.replace(entry, type=EntryType(entry.type))


@dataclass(frozen=True, kw_only=True)
class CommandResult:
    """Outcome of a finished command. A non-zero exit code is a result, not an error."""

    stdout: str
    stderr: str
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    process_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, kw_only=True)
class TemplateInfo(_Wire):
    name: str
    kind: str  # "host", "directory", "tarball"
    description: str = ""
    created_at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class PoolParams(_Wire):
    """A warm pool to keep: ``size`` booted sandboxes of ``template`` under ``isolation``, ready to claim.

    Unset fields take the server's defaults, exactly as :class:`CreateParams` does; a create is served from the
    pool when its template, isolation and resulting limits are the pool's.
    """

    template: str
    size: int
    isolation: str | None = None
    memory_mb: int | None = None
    cpus: float | None = None


@dataclass(frozen=True, kw_only=True)
class PoolInfo(_Wire):
    template: str
    isolation: str
    target: int  # members the pool keeps
    ready: int  # booted and claimable now
    starting: int  # booting
    memory_mb: int = 0
    cpus: float = 0.0
