"""The Runtime protocol: what an isolation backend must do, and nothing more.

A runtime builds, pauses, resumes and tears down an isolation boundary, and hands back a byte stream to the agent
that runs inside it. Everything a user does *in* a sandbox goes through that agent, so every runtime gets the same
semantics and one conformance suite (:func:`corral.testing.check_runtime`) tests them all.

Runtimes never decide policy (states, deadlines, tenants): the core does. They declare what they can do in
:class:`Capabilities`, and the core checks those instead of testing a runtime's name.

Process model shared by the local runtimes (namespace, gvisor, qemu): each sandbox has a host-side **shim**
(:mod:`corral.runtimes._shim`, the containerd-shim/conmon role) that owns the sandbox's stdio pipes, relays the
agent protocol over a Unix socket in the sandbox's state directory, enforces the hard deadline, and records the
exit status. The shim outlives the process that created the sandbox, so a CLI call or a restarted server can
re-attach with :meth:`Runtime.connect`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from anyio.abc import ByteStream

from corral.ids import SandboxId
from corral.netpolicy import NetworkPolicy
from corral.runtimes._net.config import EgressConfig

__all__ = [
    "Bind",
    "ByteStream",
    "Capabilities",
    "Instance",
    "Isolation",
    "LayerExporter",
    "Limits",
    "NetworkController",
    "Observed",
    "ObservedState",
    "RootfsSpec",
    "Runtime",
    "RuntimeConfig",
    "SandboxSpec",
    "Snapshot",
]


class Isolation(StrEnum):
    NAMESPACE = "namespace"
    GVISOR = "gvisor"
    QEMU = "qemu"
    FIRECRACKER = "firecracker"
    KUBERNETES = "kubernetes"
    FAKE = "fake"


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Resource limits. Defaults suit an agent's scratch sandbox on a small host."""

    memory_mb: int = 512
    cpus: float = 1.0
    pids: int = 256  # processes/threads the sandbox may hold; a fork bomb stops here
    disk_mb: int | None = None  # writable layer size; None = bounded only by the host disk

    def __post_init__(self) -> None:
        from corral.errors import InvalidRequest

        if not 16 <= self.memory_mb <= 1024 * 1024:
            raise InvalidRequest("memory_mb must be between 16 and 1048576")
        if not 0.05 <= self.cpus <= 256:
            raise InvalidRequest("cpus must be between 0.05 and 256")
        if not 8 <= self.pids <= 1_000_000:
            raise InvalidRequest("pids must be between 8 and 1000000")
        if self.disk_mb is not None and not 1 <= self.disk_mb <= 16 * 1024 * 1024:
            raise InvalidRequest("disk_mb must be between 1 and 16777216")


@dataclass(frozen=True, kw_only=True)
class Bind:
    """A host path made visible read-only inside the sandbox at ``target``."""

    source: Path
    target: str


@dataclass(frozen=True, kw_only=True)
class RootfsSpec:
    """The root file system of one sandbox.

    ``lower`` are read-only layers shared by every sandbox of the template (topmost first, overlayfs order).
    The runtime adds a per-sandbox writable layer on top and removes it with the sandbox. ``binds`` are host
    directories mounted read-only at a path inside (the host template's ``/usr``).
    """

    lower: tuple[Path, ...]
    binds: tuple[Bind, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SandboxSpec:
    sandbox_id: SandboxId
    rootfs: RootfsSpec
    limits: Limits = field(default_factory=Limits)
    # egress (corral.netpolicy): "none" is loopback only; any other policy needs Capabilities.network_policy
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    env: Mapping[str, str] = field(default_factory=dict)  # defaults for every process, set in the agent
    hostname: str = "sandbox"
    deadline: float | None = None  # Unix time; the shim kills the sandbox then even if no server is running
    # Start from a captured state (:meth:`Runtime.snapshot`) instead of from scratch: ``upper_seed`` is copied
    # into the new writable layer (a fork's own copy of its parent's changes); ``restore_from`` is a memory
    # image to restore instead of booting (only given to runtimes with ``Capabilities.checkpoint``).
    upper_seed: Path | None = None
    restore_from: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    pause: bool = False  # stop all CPU use and resume later (freezer, runsc pause)
    checkpoint: bool = False  # save processes and memory to disk and restore them (runsc checkpoint, CRIU)
    snapshot_fs: bool = False  # copy the writable layer into a new template
    # checkpoint=True also means: pause keeps memory on disk (nothing of the sandbox runs or stays in RAM),
    # snapshot() captures memory, and a SandboxSpec.restore_from starts a sandbox (a fork) from it
    network_policy: bool = (
        False  # egress by policy (SandboxSpec.network); such a runtime is a NetworkController
    )
    resource_limits: bool = True


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """What :meth:`Runtime.snapshot` captured: ``layer`` (the writable layer, usable as a read-only template
    layer or as a new sandbox's ``upper_seed``) and, where the runtime can, ``memory`` (a ``restore_from``)."""

    layer: Path
    memory: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Instance:
    """What a runtime needs to find a sandbox again, even from another process or after a restart.

    Persisted by the core as JSON (:meth:`to_json`). ``extra`` holds runtime-specific facts (cgroup paths,
    runsc root, container id); only the runtime that made the instance reads it.
    """

    sandbox_id: SandboxId
    runtime: str
    state_dir: str
    shim_pid: int
    shim_start_ticks: int  # /proc/PID/stat starttime: guards against a recycled pid
    socket_path: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["extra"] = dict(self.extra)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Instance:
        data = json.loads(text)
        data["sandbox_id"] = SandboxId(data["sandbox_id"])
        return cls(**data)


class ObservedState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"  # the sandbox's processes are gone; the state dir may still need cleaning
    MISSING = "missing"  # nothing of it is left on this host


@dataclass(frozen=True, kw_only=True)
class Observed:
    state: ObservedState
    exit_code: int | None = None
    reason: str | None = None  # "deadline", "oom", "killed", "crashed", …


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Host-side settings every local runtime gets (a slice of the server's Settings)."""

    state_root: Path  # per-sandbox state dirs live below this
    cache_root: Path  # built artifacts shared by sandboxes (the agent bundle, template skeletons)
    egress: EgressConfig = field(default_factory=EgressConfig)  # where sandbox traffic leaves, and its caps


@runtime_checkable
class Runtime(Protocol):
    """An isolation backend. All methods are safe to call from any process that can see ``state_root``."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    async def check(self) -> None:
        """Raise :class:`~corral.errors.RuntimeUnavailable` (with the command that fixes it) if this runtime
        cannot run on this host."""

    async def create(self, spec: SandboxSpec) -> Instance:
        """Boot a sandbox and return once its agent accepts connections.

        On any failure everything created so far is removed before the error propagates.
        """

    async def connect(self, instance: Instance) -> ByteStream:
        """Open a byte stream to the sandbox's agent. The agent's ``hello`` frame is the first thing read."""

    async def pause(self, instance: Instance) -> None: ...

    async def resume(self, instance: Instance) -> None: ...

    async def destroy(self, instance: Instance) -> None:
        """Kill the sandbox and remove everything it owned on the host. Idempotent."""

    async def snapshot(self, instance: Instance, dest: Path) -> Snapshot:
        """Capture a running sandbox into the new directory ``dest`` and let it run on.

        Always its writable layer (``Capabilities.snapshot_fs``), as a tree whose owners are the uids seen
        inside the sandbox (a template layer); with ``Capabilities.checkpoint`` also its memory. Everything
        lands below ``dest``; the caller owns it (and removes it on failure).
        """

    async def inspect(self, instance: Instance) -> Observed: ...


@runtime_checkable
class LayerExporter(Protocol):
    """Runtimes whose writable layer can become a template layer (``Capabilities.snapshot_fs``)."""

    async def export_layer(self, instance: Instance, dest: Path) -> None:
        """Copy the sandbox's writable layer into ``dest`` (an empty host directory) as a read-only layer in
        the in-sandbox ownership convention. Pause the sandbox first: its files must hold still."""


@runtime_checkable
class NetworkController(Protocol):
    """Runtimes that enforce egress policies (``Capabilities.network_policy``)."""

    async def update_network(self, instance: Instance, policy: NetworkPolicy) -> int:
        """Apply ``policy`` to the running sandbox in place (from ``none`` too, and back); returns how many
        open connections it cut. Connections the new policy denies are cut."""

    async def network_stats(self, instance: Instance) -> dict[str, Any]:
        """Decision counts (``totals``, ``decisions``) and packets dropped before the proxy (``dropped``)."""

    async def network_decisions(self, instance: Instance, offset: int) -> tuple[list[dict[str, Any]], int]:
        """The sandbox's decision feed (for the audit log) from ``offset`` on, and the next offset."""
