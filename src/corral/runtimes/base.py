"""The Runtime protocol: what an isolation backend must do, and nothing more.

A runtime builds, pauses, resumes and tears down an isolation boundary, and hands back a byte stream to the agent
that runs inside it. Everything a user does *in* a sandbox goes through that agent, so every runtime gets the same
semantics and one conformance suite (:func:`corral.testing.check_runtime`) tests them all.

Runtimes never decide policy (states, deadlines, tenants): the core does. They declare what they can do in
:class:`Capabilities`, and the core checks those instead of testing a runtime's name.

The contract, in short (DESIGN §9):

- :class:`Instance` is a *reference* (``sandbox_id``, ``runtime``, ``node``, ``ref``, ``extra``), never host
  fields: a state dir, a VM id or a ``namespace/name`` of a Kubernetes object is the runtime's ``ref``. The core
  persists it and acts on it only from its ``node`` when ``Capabilities.node_local`` says it must.
- A root file system is a *source* (:class:`HostLayers`, :class:`OciImage`, :class:`DiskImage`); a runtime
  lists the kinds it takes in ``Capabilities.rootfs`` and the template registry hands over one of those.
- A snapshot is a set of :class:`Artifact` references (kinds in ``Capabilities.snapshot``), which the core
  stores and passes back (``SandboxSpec.upper_seed``/``restore_from``) without looking inside, and ends with
  :meth:`Runtime.discard`.
- The hard deadline travels core → runtime (:meth:`Runtime.set_deadline`).
- A runtime is made by the registry as ``cls(config, options)``: :class:`RuntimeConfig` (roots, node) plus its
  own typed ``Options`` parsed from the ``[runtime.<name>]`` settings table.

The local runtimes (namespace, gvisor, fake, microVMs) share one skeleton, :mod:`corral.runtimes._local`: a
state dir and a host-side **shim** per sandbox (:mod:`corral.runtimes._shim`, the containerd-shim/conmon role)
that owns the agent's stdio, relays the agent protocol over a Unix socket, answers its own control channel,
enforces the hard deadline and records the exit status. The shim outlives the process that created the
sandbox, so a CLI call or a restarted server can re-attach with :meth:`Runtime.connect`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable
from urllib.parse import unquote

from anyio.abc import ByteStream

from corral.ids import SandboxId
from corral.netpolicy import NetworkPolicy
from corral.runtimes._net.config import EgressConfig

__all__ = [
    "LEGACY_NODE",
    "Artifact",
    "ArtifactKind",
    "Bind",
    "ByteStream",
    "Capabilities",
    "DiskImage",
    "HostLayers",
    "Instance",
    "Isolation",
    "LayerExporter",
    "Limits",
    "NetworkController",
    "NoOptions",
    "Observed",
    "ObservedState",
    "OciImage",
    "RootfsKind",
    "RootfsSource",
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


class RootfsKind(StrEnum):
    """The forms a template's root file system can be handed to a runtime in (``Capabilities.rootfs``)."""

    HOST_LAYERS = "host_layers"  # :class:`HostLayers`: read-only directories on this host, overlay order
    OCI_IMAGE = "oci_image"  # :class:`OciImage`: an image reference a runtime pulls (a Pod, a VM builder)
    DISK_IMAGE = "disk_image"  # :class:`DiskImage`: a file-system image file (erofs, ext4) for a VM disk


@dataclass(frozen=True, kw_only=True)
class HostLayers:
    """A root file system as read-only host directories.

    ``lower`` are read-only layers shared by every sandbox of the template (topmost first, overlayfs order).
    The runtime adds a per-sandbox writable layer on top and removes it with the sandbox. ``binds`` are host
    directories mounted read-only at a path inside (the host template's ``/usr``).
    """

    kind: ClassVar[RootfsKind] = RootfsKind.HOST_LAYERS
    lower: tuple[Path, ...]
    binds: tuple[Bind, ...] = ()


@dataclass(frozen=True, kw_only=True)
class OciImage:
    """A root file system as an OCI image: ``reference`` (``registry/repo:tag`` or ``@sha256:…``), resolved
    by the runtime itself (a kubelet, a VM image builder)."""

    kind: ClassVar[RootfsKind] = RootfsKind.OCI_IMAGE
    reference: str
    digest: str | None = None  # the manifest digest the template was built from, when known


@dataclass(frozen=True, kw_only=True)
class DiskImage:
    """A root file system as one image file (read-only; the runtime adds its own writable disk)."""

    kind: ClassVar[RootfsKind] = RootfsKind.DISK_IMAGE
    path: Path
    fstype: str  # "erofs", "ext4", "squashfs"


RootfsSource = HostLayers | OciImage | DiskImage


class ArtifactKind(StrEnum):
    """What a captured artifact holds (``Capabilities.snapshot`` / ``Capabilities.restore``)."""

    LAYER = "layer"  # a file tree in the in-sandbox ownership convention: a template layer or an upper seed
    DISK = "disk"  # a writable disk image (a VM's upper disk)
    MEMORY = "memory"  # processes and memory: restorable only by the runtime that made it


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A reference to something a runtime captured, which the core stores and hands back without looking in.

    ``uri`` says where it is: ``file:///…`` for a host path (local runtimes), any other scheme for what a
    remote backend keeps (a VolumeSnapshot, an object-store key). ``runtime`` is the runtime that made it;
    a ``MEMORY`` artifact is restorable only by that one.
    """

    kind: ArtifactKind
    uri: str
    runtime: str

    @classmethod
    def at(cls, kind: ArtifactKind, path: Path, *, runtime: str) -> Artifact:
        return cls(kind=kind, uri=path.absolute().as_uri(), runtime=runtime)

    @property
    def path(self) -> Path:
        """The host path of a ``file://`` artifact; InvalidRequest for any other scheme."""
        from corral.errors import InvalidRequest

        if not self.uri.startswith("file://"):
            raise InvalidRequest(f"a {self.kind} artifact of {self.runtime} is not a file on this host")
        return Path(unquote(self.uri[len("file://") :]))

    def to_dict(self) -> dict[str, str]:
        return {"kind": str(self.kind), "uri": self.uri, "runtime": self.runtime}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Artifact:
        return cls(kind=ArtifactKind(data["kind"]), uri=str(data["uri"]), runtime=str(data["runtime"]))


@dataclass(frozen=True, kw_only=True)
class SandboxSpec:
    sandbox_id: SandboxId
    rootfs: RootfsSource  # one of the kinds in the runtime's Capabilities.rootfs
    limits: Limits = field(default_factory=Limits)
    # egress (corral.netpolicy): "none" is loopback only; any other policy needs Capabilities.network_policy
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    # secrets for the egress proxy (corral.core.secrets.EgressSecrets.to_wire: CA and bindings), in memory
    # only: the runtime hands them to its egress path and writes them nowhere
    egress_secrets: Mapping[str, Any] | None = field(default=None, repr=False)
    env: Mapping[str, str] = field(default_factory=dict)  # defaults for every process, set in the agent
    hostname: str = "sandbox"
    # the isolation level asked for; a runtime serving several (kubernetes: one RuntimeClass each) picks by it
    isolation: str = ""
    deadline: float | None = None  # Unix time; the runtime kills the sandbox then even if no server runs
    # Start from a captured state (:meth:`Runtime.snapshot`) instead of from scratch: ``upper_seed`` (a LAYER
    # or DISK artifact) becomes the new sandbox's own copy of its writable layer (a fork diverges from its
    # parent from then on); ``restore_from`` (a MEMORY artifact of this runtime) is restored instead of booting.
    # The core passes only kinds the runtime declares in ``Capabilities.restore``.
    upper_seed: Artifact | None = None
    restore_from: Artifact | None = None


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    pause: bool = False  # stop all CPU use and resume later (freezer, runsc checkpoint, QMP stop)
    pause_refusal: str = ""  # with pause False: why, in words for the error a pause request gets
    checkpoint: bool = False  # pause keeps memory on disk: nothing of a paused sandbox stays in RAM
    snapshot_fs: bool = False  # snapshot() captures the writable layer (a template layer / a fork's seed)
    network_policy: bool = (
        False  # egress by policy (SandboxSpec.network); such a runtime is a NetworkController
    )
    # with network_policy: host name and *.wildcard rules are enforced too (False: address rules only, and a
    # policy naming hosts is refused, Unsupported)
    network_names: bool = True
    # with network_policy: secrets (SandboxSpec.egress_secrets) are put into requests by the egress proxy
    # (False: a create with secrets is refused, Unsupported: their placeholders would reach the hosts as is)
    egress_secrets: bool = True
    # with network (a policy but "none"): pause keeps it / snapshot and fork work (False: refused, Unsupported)
    pause_network: bool = True
    snapshot_network: bool = True
    resource_limits: bool = True
    pids_limit: bool = True  # Limits.pids holds too (False: only memory and CPU are enforced per sandbox)
    # what create() accepts as SandboxSpec.rootfs, best first
    rootfs: tuple[RootfsKind, ...] = (RootfsKind.HOST_LAYERS,)
    # what snapshot() produces and SandboxSpec.upper_seed / restore_from accept (empty: no snapshots, no forks)
    snapshot: frozenset[ArtifactKind] = frozenset()
    # True: an instance is reachable only from the node that made it (host processes, host paths)
    node_local: bool = True


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """What :meth:`Runtime.snapshot` captured: ``files`` (the writable layer: a LAYER artifact, usable as a
    read-only template layer, or a DISK one) and, where the runtime can, ``memory`` (a MEMORY artifact)."""

    files: Artifact
    memory: Artifact | None = None


LEGACY_NODE = ""  # the node of instances persisted before nodes existed: adopted by the first node to see it


@dataclass(frozen=True, kw_only=True)
class Instance:
    """A reference to one sandbox, enough for its runtime to find it again from any process of its node.

    Persisted by the core as JSON (:meth:`to_json`). ``node`` is the Corral node that owns it (only that node
    reconciles it); ``ref`` is the runtime's own handle (a state dir, a VM id, ``namespace/name`` of a
    Sandbox object); ``extra`` holds more runtime-specific facts (pids, sockets, cgroup paths). Only the
    runtime that made an instance reads ``ref`` and ``extra``.
    """

    sandbox_id: SandboxId
    runtime: str
    node: str
    ref: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["extra"] = dict(self.extra)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Instance:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Instance:
        """Also reads the first format (host fields ``state_dir``, ``shim_pid``, ``shim_start_ticks``,
        ``socket_path`` at the top, no node): those move into ``ref`` and ``extra``, the node is
        :data:`LEGACY_NODE`."""
        data = dict(data)
        extra = dict(data.pop("extra", None) or {})
        if "state_dir" in data:  # format 1 (before nodes): a local runtime's host fields
            data["ref"] = data.pop("state_dir")
            extra["shim_pid"] = data.pop("shim_pid")
            extra["shim_start_ticks"] = data.pop("shim_start_ticks")
            data.pop("socket_path", None)  # always STATE_DIR/agent.sock, which the runtime derives from ref
        return cls(
            sandbox_id=SandboxId(data["sandbox_id"]),
            runtime=str(data["runtime"]),
            node=str(data.get("node", LEGACY_NODE)),
            ref=str(data["ref"]),
            extra=extra,
        )


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
    """What every runtime gets from the server's Settings, besides its own ``[runtime.<name>]`` options."""

    state_root: Path  # per-sandbox state dirs of the local runtimes live below this
    cache_root: Path  # built artifacts shared by sandboxes (the agent bundle, template skeletons, snapshots)
    node: str = "local"  # this Corral node's id, stamped on every Instance the runtime makes
    egress: EgressConfig = field(default_factory=EgressConfig)  # where sandbox traffic leaves, and its caps


@dataclass(frozen=True, kw_only=True)
class NoOptions:
    """The options of a runtime that has none (its ``[runtime.<name>]`` table must be empty)."""


@runtime_checkable
class Runtime(Protocol):
    """An isolation backend.

    Made by the registry as ``cls(config, options)``: ``options`` is an instance of the class's ``Options``
    (a frozen dataclass, :class:`NoOptions` when there are none) built from its ``[runtime.<name>]`` table.
    Every method that takes an :class:`Instance` works from any process of the instance's node.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    Options: ClassVar[type[Any]]

    async def check(self) -> None:
        """Raise :class:`~corral.errors.RuntimeUnavailable` (with the command that fixes it) if this runtime
        cannot run on this host."""

    async def create(self, spec: SandboxSpec) -> Instance:
        """Boot a sandbox and return once its agent accepts connections.

        On any failure everything created so far is removed before the error propagates.
        """

    async def connect(self, instance: Instance) -> ByteStream:
        """Open a byte stream to the sandbox's agent. The agent's ``hello`` frame is the first thing read."""

    async def set_deadline(self, instance: Instance, deadline: float | None) -> None:
        """Move the hard deadline (Unix time; None: none) at which the runtime itself ends the sandbox, even
        with no Corral process running. The core keeps its own copy and reaps on it too."""

    async def pause(self, instance: Instance) -> None: ...

    async def resume(self, instance: Instance) -> None: ...

    async def destroy(self, instance: Instance) -> None:
        """Kill the sandbox and remove everything it owned. Idempotent."""

    async def snapshot(self, instance: Instance, key: str) -> Snapshot:
        """Capture a running sandbox under ``key`` (unique per call) and let it run on.

        The kinds captured are those in ``Capabilities.snapshot``: the writable layer (a LAYER artifact in the
        in-sandbox ownership convention, or a DISK), and a MEMORY artifact where the runtime can. On failure
        nothing of it is left; on success the caller owns it and ends it with :meth:`discard`.
        """

    async def discard(self, snapshot: Snapshot) -> None:
        """Remove what :meth:`snapshot` captured. Idempotent."""

    async def inspect(self, instance: Instance) -> Observed: ...


@runtime_checkable
class LayerExporter(Protocol):
    """Runtimes whose writable layer can become a template layer (``ArtifactKind.LAYER`` in
    ``Capabilities.snapshot``)."""

    async def export_layer(self, instance: Instance, dest: Path) -> None:
        """Copy the sandbox's writable layer into ``dest`` (an empty host directory) as a read-only layer in
        the in-sandbox ownership convention. Pause the sandbox first: its files must hold still."""


@runtime_checkable
class TeardownFinisher(Protocol):
    """Runtimes whose teardown can outlast a kill (the kernel still reaping the sandbox's tasks): they finish
    it later, and the reaper calls this on every pass so nothing stays behind."""

    async def finish_teardowns(self) -> int:
        """Retry each pending teardown once; returns how many are still pending."""
        ...


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
