"""Snapshots and forks: a running sandbox captured into a template, or copied into new sandboxes.

What is captured depends on the runtime's ``Capabilities.snapshot`` (artifact kinds), never on its name:

- ``LAYER``: the sandbox's writable layer. A snapshot template is that layer stacked on the sandbox's
  own template (``TemplateRecord.parent``), so nothing of the parent is copied and chains of snapshots are
  chains of layers. A fork gets its *own copy* of the layer as its writable upper dir, so forks and their
  parent diverge independently from the moment of the fork.
- ``MEMORY``: memory and processes too (gVisor's checkpoint image). Sandboxes created from such a
  template, and forks, are restored from the image instead of booted: a counter keeps counting, a Python
  variable keeps its value. Without it, forks start fresh processes on the copied files (say so to users:
  ``TemplateInfo.memory`` is False).

What a runtime captured is a :class:`~corral.runtimes.base.Snapshot` of artifact references, which the core
stores and hands back without looking inside: a snapshot template keeps its files artifact as its top layer
(a LAYER artifact) or, for a VM, its disk image (a DISK artifact, which only the runtime that made it
can start from: a sandbox of such a template is created the way a fork is) and its memory artifact with the runtime that made
it; a fork's capture is discarded (:meth:`Runtime.discard`) once every fork has its copy. The local runtimes
keep both under ``cache_root/snapshots/KEY/``, mounted nowhere but as read-only overlay layers.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from corral.core import network as _network
from corral.core.records import TemplateRecord
from corral.core.state import Action, require_state
from corral.core.templates import check_template_name
from corral.errors import InvalidRequest, Unsupported
from corral.ids import TenantId
from corral.models import CreateParams, SandboxInfo, SandboxState, TemplateInfo
from corral.runtimes.base import ArtifactKind, Runtime, Snapshot

if TYPE_CHECKING:
    from corral.core.service import SandboxService

__all__ = ["MAX_FORKS", "fork", "snapshot"]

MAX_FORKS = 16  # per call; each fork is a full sandbox (a gVisor restore takes ~0.3 s and ~20 MiB here)


def template_info(record: TemplateRecord) -> TemplateInfo:
    return TemplateInfo(
        name=record.name,
        kind=record.kind,
        description=record.description,
        created_at=record.created_at,
        memory=record.memory is not None,
    )


async def _capture(
    service: SandboxService, sandbox_id: str, tenant: TenantId, action: Action, key: str
) -> tuple[Snapshot, Runtime, str, str]:
    """Capture a running sandbox under ``key``. Returns the snapshot, its runtime, isolation and template."""
    record = await service._reconciled(await service._record(sandbox_id, tenant))
    require_state(record.state, action, SandboxState.RUNNING, sandbox_id=sandbox_id)
    runtime = service._require_reachable(record)
    if not runtime.capabilities.snapshot:
        raise Unsupported(f"{record.isolation} sandboxes cannot be snapshotted or forked")
    _network.require_with_network(record, runtime.capabilities.snapshot_network, "snapshotted or forked")
    assert record.instance is not None
    snap = await runtime.snapshot(record.instance, key)
    return snap, runtime, record.isolation, record.template


async def snapshot(
    service: SandboxService,
    sandbox_id: str,
    name: str,
    *,
    description: str = "",
    tenant: TenantId,
) -> TemplateInfo:
    """Capture a running sandbox into a new template ``name`` (it keeps running)."""
    check_template_name(name)
    await service.templates.check_new(name)  # fail before the sandbox is disturbed
    key = f"{name}-{secrets.token_hex(4)}"
    snap, runtime, isolation, parent = await _capture(service, sandbox_id, tenant, Action.SNAPSHOT, key)
    try:
        disk = snap.files.kind is ArtifactKind.DISK  # a VM's disk: only its runtime starts from it
        if not disk and snap.files.kind is not ArtifactKind.LAYER:
            raise Unsupported(f"{isolation} snapshots cannot become templates ({snap.files.kind})")
        record = await service.templates.add(
            TemplateRecord(
                name=name,
                kind="snapshot",
                rootfs=str(snap.files.path),
                created_at=time.time(),
                description=description or f"snapshot of {sandbox_id} ({isolation})",
                parent=parent,
                memory=str(snap.memory.path) if snap.memory is not None else None,
                memory_runtime=snap.memory.runtime if snap.memory is not None else None,
                disk_runtime=snap.files.runtime if disk else None,
                owner=str(tenant),  # a snapshot is the tenant's own data: no other tenant may start from it
                source=sandbox_id,
            )
        )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await runtime.discard(snap)
        raise
    return template_info(record)


async def fork(
    service: SandboxService, sandbox_id: str, count: int, *, tenant: TenantId
) -> list[SandboxInfo]:
    """``count`` new sandboxes, each a copy of the running sandbox ``sandbox_id`` (which keeps running).

    All or nothing: if one fork fails, the ones already made are killed before the error propagates.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORKS:
        raise InvalidRequest(f"count must be a whole number from 1 to {MAX_FORKS}")
    parent = await service._record(sandbox_id, tenant)
    made: list[SandboxInfo] = []
    snap, runtime, isolation, template = await _capture(
        service, sandbox_id, tenant, Action.FORK, f"fork-{secrets.token_hex(8)}"
    )
    try:
        for _ in range(count):
            params = CreateParams(
                template=template,
                isolation=isolation,
                timeout=parent.timeout,
                metadata=dict(parent.metadata),
                env=dict(parent.env),
                memory_mb=parent.limits.memory_mb,
                cpus=parent.limits.cpus,
            )
            made.append(await service.create(params, tenant=tenant, start_from=snap))
    except BaseException:
        with anyio.CancelScope(shield=True):
            for info in made:
                await service.kill(info.sandbox_id, tenant=tenant)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await runtime.discard(snap)
    return made
