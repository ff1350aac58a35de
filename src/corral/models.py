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
    "CommandResult",
    "CreateParams",
    "EntryInfo",
    "EntryType",
    "EventKind",
    "ExecParams",
    "FilesystemEvent",
    "FilesystemEventType",
    "ProcessEvent",
    "ProcessInfo",
    "PtyParams",
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
    PTY = "pty"  # output of a terminal (``sbx.pty``): one stream, raw bytes


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
    kind: str  # "host", "directory", "tarball"
    description: str = ""
    created_at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class PtyParams(_Wire):
    """A terminal to open. Neither ``cmd`` nor ``argv``: a login shell (``bash -l``, else ``/bin/sh -l``)."""

    cols: int = 80
    rows: int = 24
    cmd: str | None = None
    argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    timeout: float | None = None  # seconds; then the terminal's session is killed
    tag: str | None = None

    def agent_fields(self) -> dict[str, Any]:
        """The agent's ``exec`` fields: a background process on a terminal of this size."""
        out: dict[str, Any] = {"pty": {"cols": self.cols, "rows": self.rows}, "background": True}
        for key in ("cmd", "argv", "env", "cwd", "user", "timeout", "tag"):
            value = getattr(self, key)
            if value is not None and value != {}:
                out[key] = value
        return out


class FilesystemEventType(StrEnum):
    """What happened to a path in a watched directory (E2B's names, plus Corral's two stream markers)."""

    CREATE = "create"
    WRITE = "write"
    REMOVE = "remove"
    RENAME = "rename"  # the old name of a move; the new name comes as CREATE
    CHMOD = "chmod"
    OVERFLOW = "overflow"  # events were lost (the reader was too slow): rescan the directory
    STARTED = "started"  # first event of a watch stream: changes from here on are reported (the SDK eats it)


@dataclass(frozen=True, kw_only=True)
class FilesystemEvent(_Wire):
    """One change, ``name`` relative to the watched directory (empty for the directory itself)."""

    name: str
    type: FilesystemEventType

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> FilesystemEvent:
        event = super().from_wire(data)
        return dataclasses.replace(event, type=FilesystemEventType(event.type))
