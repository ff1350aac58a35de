"""Wire value types shared by the server, the SDK and the CLI.

Frozen, keyword-only dataclasses with ``to_wire()`` / ``from_wire()`` for their JSON form. They carry no
behaviour beyond (de)serialisation and small derived properties, so the SDK can use them without any of the
server's dependencies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

__all__ = [
    "BuildEvent",
    "BuildEventKind",
    "BuildParams",
    "CommandResult",
    "CreateParams",
    "EntryInfo",
    "EntryType",
    "EventKind",
    "ExecParams",
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
    kind: str  # "host", "directory", "tarball", "snapshot"
    description: str = ""
    created_at: float = 0.0
    memory: bool = False  # a snapshot that also holds memory: sandboxes of it resume where it was taken


# --- template builds (appended; see corral.images) ------------------------------------------------------


class BuildEventKind(StrEnum):
    """Progress of a template build, in order: pull (the manifest), layer (one per layer, cached or made),
    step (a --run step starts), log (its output), done (the template exists)."""

    PULL = "pull"
    LAYER = "layer"
    STEP = "step"
    LOG = "log"
    DONE = "done"


@dataclass(frozen=True, kw_only=True)
class BuildParams(_Wire):
    """What to build a template from. ``source`` is an image reference (``127.0.0.1:5000/app:1``,
    ``http://127.0.0.1:5000/app``), a local directory or tarball path (starting with ``/`` or ``.``), or
    ``debootstrap:SUITE``. ``steps`` are shell commands run in order, with no network, on top of it."""

    name: str
    source: str
    steps: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None  # "root" or "user"; default: the image's (root when it names none)
    start_cmd: str | None = None
    ready_cmd: str | None = None
    registry_username: str | None = None
    registry_password: str | None = None
    registry_token: str | None = None
    insecure_registry: bool = False
    isolation: str | None = None  # which runtime runs the steps
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class BuildEvent(_Wire):
    kind: BuildEventKind
    message: str = ""
    layer: str | None = None  # the layer's store key (sha256-…, step-…)
    cached: bool = False  # the layer was already in the store: nothing pulled, unpacked or run
    step: int | None = None  # 1-based index of the --run step
    total_steps: int = 0
    data: str = ""  # LOG: a chunk of the step's output

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> BuildEvent:
        event = super().from_wire(data)
        return dataclasses.replace(event, kind=BuildEventKind(event.kind))
