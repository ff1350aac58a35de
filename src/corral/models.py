"""Wire value types shared by the server, the SDK and the CLI.

Frozen, keyword-only dataclasses with ``to_wire()`` / ``from_wire()`` for their JSON form. They carry no
behaviour beyond (de)serialisation and small derived properties, so the SDK can use them without any of the
server's dependencies.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

from corral.errors import InvalidRequest
from corral.netpolicy import NetworkPolicy
from corral.secrets import check_shape

__all__ = [
    "BuildEvent",
    "BuildEventKind",
    "BuildParams",
    "CodeContext",
    "CodeEvent",
    "CodeEventKind",
    "CommandResult",
    "CreateParams",
    "EntryInfo",
    "EntryType",
    "EventKind",
    "ExecParams",
    "Execution",
    "ExecutionError",
    "FilesystemEvent",
    "FilesystemEventType",
    "Logs",
    "NetworkPolicy",
    "NetworkStatus",
    "OutputMessage",
    "PoolInfo",
    "PoolParams",
    "PortForward",
    "ProcessEvent",
    "ProcessInfo",
    "PtyParams",
    "ResourceSample",
    "Result",
    "RunCodeParams",
    "SandboxInfo",
    "SandboxState",
    "StopReason",
    "TemplateInfo",
    "check_port",
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
    MISSING = (
        "missing"  # its runtime no longer has it and did not end it (a Pod deleted behind Corral's back)
    )


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
    from_pool: bool = False  # served by claiming a pre-booted warm-pool member, not by a cold start
    # Ports through a server's proxy (``{port}-{sandbox_id}.{domain}``): open to anyone when ``public_ports``,
    # otherwise only to requests carrying ``traffic_token`` (header ``Corral-Traffic-Token``). ``domain`` is
    # set by a server; None in embedded mode, which has no proxy.
    public_ports: bool = False
    traffic_token: str | None = None
    domain: str | None = None
    # The credential of the sandbox's E2B-compatible in-sandbox API (``X-Access-Token``), shown to its owner.
    envd_access_token: str | None = field(default=None, repr=False)
    auto_pause: bool = False  # at its timeout it is paused instead of stopped
    # egress policy (corral.netpolicy): "none", "internet" or {"allow_out": [...], "deny_out": [...]}
    network: str | dict[str, Any] = "none"
    secrets: list[str] = field(default_factory=list)  # names only: values never leave the server

    @property
    def network_policy(self) -> NetworkPolicy:
        return NetworkPolicy.parse(self.network)

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
    public_ports: bool = False  # True: the server's port proxy lets anyone in, with no traffic token
    auto_pause: bool = False  # at its timeout, pause the sandbox (resume it to go on) instead of stopping it
    idempotency_key: str | None = None  # a retried create with the same key gets the same (live) sandbox
    # egress: None/"none" (no network, the default), "internet" (public addresses only) or
    # {"allow_out": [names, *.wildcards, CIDR[:port]], "deny_out": [...]}; see corral.netpolicy
    network: str | dict[str, Any] | None = None
    # name -> value, or {"value": ..., "hosts": [...], "body": False}: the sandbox sees a placeholder, the
    # egress proxy puts the value into requests to the bound hosts (default: allow_out's names); corral.secrets
    secrets: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.network is not None:  # refuse a bad policy where it is written, with the rule it names
            object.__setattr__(self, "network", NetworkPolicy.parse(self.network).to_wire())
        object.__setattr__(self, "secrets", check_shape(self.secrets))

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
    oom_killed: bool = False  # SIGKILLed for memory: the sandbox's limit was reached (see CommandResult)

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def to_wire(self) -> dict[str, Any]:
        # Identity, not equality: exit_code 0 == False must stay in.
        out = {k: v for k, v in super().to_wire().items() if v is not None and v is not False and v != b""}
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
    # Killed (SIGKILL) because the sandbox ran out of memory and it was the process chosen to free it, by the
    # sandbox's own OOM killer or the kernel's; the sandbox and its other processes go on. A shell running
    # the process reports it as exit code 137; ``signal`` is then None, this still says why.
    oom_killed: bool = False

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


# --- code interpreter (names and shapes of the e2b-code-interpreter SDK) ------------------------------------


class CodeEventKind(StrEnum):
    """What a running cell reports, in order: output and results as they happen, then ``end``."""

    STDOUT = "stdout"
    STDERR = "stderr"
    RESULT = "result"
    ERROR = "error"
    EXECUTION_COUNT = "execution_count"
    END = "end"


@dataclass(frozen=True, kw_only=True)
class CodeContext(_Wire):
    """A stateful interpreter (a kernel) of one language; variables live as long as it does."""

    id: str
    language: str  # "python", "javascript" or "bash"
    cwd: str


@dataclass(frozen=True, kw_only=True)
class Result(_Wire):
    """One rich output of a cell: the value of its last expression (``is_main_result``) or a ``display()``.

    Each field is one MIME representation; binary ones (``png``, ``jpeg``, ``pdf``) are base64 text as in
    Jupyter. ``data`` is structured data (a pandas DataFrame as ``{"columns", "index", "data"}``); MIME types
    without a field of their own are in ``extra``.
    """

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    data: Any = None
    chart: Any = None
    is_main_result: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def formats(self) -> list[str]:
        """The representations this result has (``"png"``, ``"html"``, …, and the ``extra`` MIME types)."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in ("is_main_result", "extra")]
        return [n for n in names if getattr(self, n) is not None] + list(self.extra)

    def __str__(self) -> str:
        return self.text or ""


@dataclass(frozen=True, kw_only=True)
class ExecutionError(_Wire):
    """An error raised by a cell: the exception's class name, its message, and the formatted traceback."""

    name: str
    value: str
    traceback: str = ""


@dataclass(frozen=True, kw_only=True)
class OutputMessage:
    """A piece of a cell's stdout or stderr, as given to ``on_stdout``/``on_stderr``."""

    line: str
    timestamp: float = 0.0
    error: bool = False

    def __str__(self) -> str:
        return self.line


@dataclass(frozen=True, kw_only=True)
class Logs:
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Execution:
    """Everything one ``run_code`` produced. ``error`` is set when the cell raised (or timed out)."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    timed_out: bool = False

    @property
    def text(self) -> str | None:
        """The text of the main result (the last expression's value), if there is one."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None


@dataclass(frozen=True, kw_only=True)
class RunCodeParams(_Wire):
    """A cell to run: in ``context_id``, or in the default context of ``language`` (python if neither)."""

    code: str
    language: str | None = None
    context_id: str | None = None
    envs: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None


@dataclass(frozen=True, kw_only=True)
class CodeEvent(_Wire):
    """One event of a running cell, the same from the sandbox's driver to the SDK (and over HTTP as JSON)."""

    kind: CodeEventKind
    text: str = ""
    result: Result | None = None
    error: ExecutionError | None = None
    execution_count: int | None = None
    timed_out: bool = False
    timestamp: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_wire().items() if v is not None and v is not False and v != ""}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CodeEvent:
        event = super().from_wire(data)
        result = data.get("result")
        error = data.get("error")
        return dataclasses.replace(
            event,
            kind=CodeEventKind(event.kind),
            result=Result.from_wire(result) if isinstance(result, Mapping) else None,
            error=ExecutionError.from_wire(error) if isinstance(error, Mapping) else None,
        )


# The port-forward WebSocket (/v1/sandboxes/{id}/ports/{port}/connect): binary messages carry the bytes, this
# text message a half-close, in either direction.
PORT_EOF_MESSAGE = "eof"


def check_port(port: object, *, name: str = "port", allow_zero: bool = False) -> int:
    """A TCP port number, or InvalidRequest saying what one is."""
    low = 0 if allow_zero else 1
    if not isinstance(port, int) or isinstance(port, bool) or not low <= port <= 65535:
        what = "from 0 (any free port) to 65535" if allow_zero else "from 1 to 65535"
        raise InvalidRequest(f"{name} must be a TCP port number {what}")
    return port


@dataclass(frozen=True, kw_only=True)
class PortForward(_Wire):
    """A port of a sandbox reachable at ``host:local_port`` on this machine (``forward_port``).

    Unpacks as ``(host, local_port)``: ``async with sbx.forward_port(8000) as (host, port): ...``.
    """

    sandbox_id: str
    port: int  # inside the sandbox
    host: str  # where the forward listens here (127.0.0.1 by default)
    local_port: int

    @property
    def url(self) -> str:
        """``http://host:local_port``: for a web server inside the sandbox."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.local_port}"

    def __iter__(self) -> Iterator[Any]:
        return iter((self.host, self.local_port))


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


@dataclass(frozen=True, kw_only=True)
class NetworkStatus(_Wire):
    """A sandbox's egress policy and what it decided so far (``sbx.network.status()``).

    ``totals``: counts by ``{dns,tcp}_{allowed,denied}``; ``decisions``: one row per (kind, destination, port,
    verdict, rule) with its exact count; ``dropped``: packets the kernel dropped before the proxy, by kind
    (``udp_denied``, ``ipv6_denied``, ``other_denied``); ``connections``: TCP connections open now.
    """

    sandbox_id: str
    network: str | dict[str, Any] = "none"
    connections: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ResourceSample(_Wire):
    """What a sandbox used at ``timestamp`` (Unix time), as it sees it (``sbx.get_metrics()``).

    ``cpu_used_pct``: CPU time used since the sample before, as a share of the sandbox's ``cpu_count`` CPUs
    (100 = all of them busy); ``mem_used``: bytes in use, not counting page cache that can be dropped
    (``mem_cache``), of ``mem_total`` (its memory limit); ``disk_used`` / ``disk_total``: bytes of the file
    system that holds the sandbox's writes, as ``df /`` shows it inside.
    """

    timestamp: float
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int
