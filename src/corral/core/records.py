"""Persistent records: what the core decided about each sandbox and template.

A record is frozen; changes go through ``dataclasses.replace`` and :meth:`Store.put` with the version read,
so two processes (a CLI call and a server, say) cannot overwrite each other's changes unnoticed.

Records written by older versions keep loading (``from_json`` migrates them): a sandbox record without a
``node`` belongs to :data:`~corral.runtimes.base.LEGACY_NODE` (the first node to reconcile it adopts it), an
instance in the first format moves its host fields into ``ref``/``extra`` (:meth:`Instance.from_dict`), and a
snapshot template with memory but no ``memory_runtime`` was made by gVisor, the only runtime that could.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.ids import PoolId, SandboxId, TenantId, new_envd_access_token, new_traffic_token
from corral.models import SandboxInfo, SandboxState, StopReason
from corral.runtimes.base import LEGACY_NODE, Artifact, ArtifactKind, Instance, Limits

__all__ = ["LOCAL_TENANT", "POOL_TENANT", "PoolRecord", "SandboxRecord", "TemplateRecord", "pool_key"]

LOCAL_TENANT = TenantId("tn-" + "local" + "a" * 11)  # the single tenant of embedded mode
# Owner of unclaimed warm-pool members: no user's tenant, so no user can see or reach them before a claim.
POOL_TENANT = TenantId("tn-" + "pool" + "a" * 12)


@dataclass(frozen=True, kw_only=True)
class SandboxRecord:
    sandbox_id: SandboxId
    tenant_id: TenantId
    isolation: str
    template: str
    state: SandboxState
    limits: Limits
    created_at: float
    timeout: float  # seconds of life granted by the last create / set_timeout
    deadline: float | None  # Unix time; None while paused (remaining time kept in paused_remaining)
    metadata: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    instance: Instance | None = None
    stop_reason: StopReason | None = None
    stopped_at: float | None = None
    paused_remaining: float | None = None
    version: int = 0
    # Warm pools (DESIGN §4: membership is a field, not a state). ``pool_id`` is set while the sandbox is an
    # unclaimed member of that pool and cleared by the claim; ``from_pool`` records that it was claimed.
    pool_id: PoolId | None = None
    from_pool: bool = False
    # The port proxy's access rule (server/proxy.py): public, or callers presenting this sandbox's token.
    public_ports: bool = False
    traffic_token: str = field(default_factory=new_traffic_token)
    # egress policy in its wire form (corral.netpolicy), and how far the runtime's decision feed has been
    # copied into the audit log (so a restarted server neither drops nor repeats an entry)
    network: Any = "none"
    network_audit_offset: int = 0
    # secrets (corral.secrets): their names, and the bindings sealed under the server's key (core/secrets.py)
    secrets: list[str] = field(default_factory=list)
    secrets_sealed: str | None = field(default=None, repr=False)
    # The Corral node that owns the sandbox (Settings.node): only it reconciles the record and reaches the
    # instance of a node-local runtime. Set when the record is made, before the instance exists.
    node: str = LEGACY_NODE
    # At the deadline: paused (its shim then holds no deadline; the reaper pauses it), not stopped
    auto_pause: bool = False
    idempotency_key: str | None = None  # the create that made it, for retries of that create (service.create)
    # The credential of the sandbox's E2B-compatible in-sandbox API (server/e2b/envd): whoever holds it acts on
    # this one sandbox as its tenant, without an API key. "" (records older than the field) matches nothing.
    envd_access_token: str = field(default_factory=new_envd_access_token, repr=False)

    def info(self) -> SandboxInfo:
        return SandboxInfo(
            sandbox_id=str(self.sandbox_id),
            template=self.template,
            isolation=self.isolation,
            state=self.state,
            metadata=dict(self.metadata),
            created_at=self.created_at,
            expires_at=self.deadline if self.state in (SandboxState.RUNNING, SandboxState.CREATING) else None,
            stop_reason=self.stop_reason,
            memory_mb=self.limits.memory_mb,
            cpus=self.limits.cpus,
            from_pool=self.from_pool,
            public_ports=self.public_ports,
            network=self.network,
            secrets=list(self.secrets),
            traffic_token=self.traffic_token,
            envd_access_token=self.envd_access_token,
            auto_pause=self.auto_pause,
        )

    def to_json(self) -> str:
        data: dict[str, Any] = dataclasses.asdict(self)
        data["instance"] = json.loads(self.instance.to_json()) if self.instance else None
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SandboxRecord:
        data = json.loads(text)
        data["sandbox_id"] = SandboxId(data["sandbox_id"])
        data["tenant_id"] = TenantId(data["tenant_id"])
        data["state"] = SandboxState(data["state"])
        data["limits"] = Limits(**data["limits"])
        data["stop_reason"] = StopReason(data["stop_reason"]) if data.get("stop_reason") else None
        data["instance"] = Instance.from_dict(data["instance"]) if data.get("instance") else None
        data["pool_id"] = PoolId(data["pool_id"]) if data.get("pool_id") else None
        data.setdefault("envd_access_token", "")  # never a fresh random one per read
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class TemplateRecord:
    """A named root file system sandboxes can start from.

    ``kind`` says where it came from ("host", "directory", "tarball"); ``rootfs`` is the host path of the
    read-only lower layer the runtimes mount (for "host", a skeleton plus read-only binds).
    """

    name: str
    kind: str
    rootfs: str
    created_at: float
    env: dict[str, str] = field(default_factory=dict)
    description: str = ""
    version: int = 0
    # kind "snapshot" (core.snapshots): ``rootfs`` is the captured layer, stacked on the template ``parent``;
    # ``memory`` is a runtime's memory image of the sandbox (None: file system only)
    parent: str | None = None
    memory: str | None = None
    memory_runtime: str | None = None  # the runtime that captured ``memory``: the only one that restores it
    # kind "snapshot" whose files are a runtime's writable disk image (a microVM's), not a layer: ``rootfs`` is
    # that image, restorable only by ``disk_runtime``, on top of ``parent``'s rootfs; None: a layer
    disk_runtime: str | None = None
    # built templates (corral.images): every read-only layer, topmost first (``rootfs`` is then the top one),
    # their layer-store keys, and what sandboxes start with (workdir, user, cmd, start_cmd, ready_cmd)
    layers: list[str] = field(default_factory=list)
    layer_keys: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    # the only tenant that may use it (a snapshot holds that tenant's files and memory); None: every tenant
    owner: str | None = None
    source: str | None = None  # kind "snapshot": the id of the sandbox it was captured from
    # the OCI reference of a template built from an image with no steps: runtimes that run images themselves
    # (a kubelet pulls it) take it as is (``RootfsKind.OCI_IMAGE``); None: only host layers are offered
    image: str | None = None

    def usable_by(self, tenant: str) -> bool:
        return self.owner is None or self.owner == tenant

    def memory_artifact(self) -> Artifact | None:
        if self.memory is None or self.memory_runtime is None:
            return None
        return Artifact.at(ArtifactKind.MEMORY, Path(self.memory), runtime=self.memory_runtime)

    def disk_artifact(self) -> Artifact | None:
        if self.disk_runtime is None:
            return None
        return Artifact.at(ArtifactKind.DISK, Path(self.rootfs), runtime=self.disk_runtime)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TemplateRecord:
        data = json.loads(text)
        if data.get("memory") and not data.get("memory_runtime"):
            data["memory_runtime"] = "gvisor"  # format 1: gVisor was the only runtime that captured memory
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class PoolRecord:
    """A warm pool: keep ``target`` booted sandboxes of (template, isolation) with ``limits``, ready to claim.

    The natural key is (template, isolation): one pool each. ``pool_id`` names this generation of it; members
    carry it, so members of a deleted (or re-made) pool are recognisably orphans and get removed.
    """

    pool_id: PoolId
    template: str
    isolation: str
    target: int
    limits: Limits
    created_at: float
    version: int = 0

    @property
    def key(self) -> str:
        return pool_key(self.template, self.isolation)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PoolRecord:
        data = json.loads(text)
        data["pool_id"] = PoolId(data["pool_id"])
        data["limits"] = Limits(**data["limits"])
        return cls(**data)


def pool_key(template: str, isolation: str) -> str:
    """The Store key of a pool (template names never contain '/')."""
    return f"{template}/{isolation}"
