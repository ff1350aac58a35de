"""Warm pools: booted sandboxes kept ready per (template, isolation), claimed by ``SandboxService.create``.

Desired state is a :class:`PoolRecord` (target size, limits) in the Store. Membership is a FIELD of the sandbox
record (``pool_id``, DESIGN §4), never a state: a member is an ordinary sandbox record owned by
:data:`POOL_TENANT`, so no user can list or reach it before it is claimed.

Claim
    One compare-and-swap on a ready member's record moves it to the caller's tenant and clears ``pool_id``
    (plus metadata, timeout/deadline, env). Two creates racing for one member: one CAS wins, the loser tries
    the next member, and with none left the create falls back to a cold start; a pool never makes a create
    fail. Then the request is *late-bound* into the claimed sandbox: the shim gets the user's deadline, the
    agent its env (``configure``), and the files are written, so one pool serves every tenant. A claimed
    sandbox never goes back to a pool, so no member carries state from an earlier user.

Reconcile
    :meth:`PoolManager.reconcile` is level-triggered: each pass reads every pool and every member and repairs
    the difference: finishes removals a crash interrupted, removes members of deleted (or re-made) pools,
    members that died, that are stale or that boot too long, and surplus ready ones, then boots the missing
    ones (at most ``pool_start_concurrency`` at a time). Removal is CAS-first (clear ``pool_id`` and expire
    the record, then destroy), so a member being claimed at that moment is never destroyed under its new
    owner, and a pass that dies halfway leaves records the next pass (or the reaper) finishes.

Nodes: each Corral node keeps its own members (``target`` per node) and reconciles, claims and removes only
those; a pool deleted on one node leaves the others' members orphaned, and their nodes remove them.

Servers own :meth:`PoolManager.run` in their task group; a claim wakes it. Embedded mode has no background
task: ``corral pool set`` fills synchronously through :meth:`PoolManager.fill`, and a claim leaves the pool one
short until the next pass. Members carry no user deadline, but the shim holds a safety deadline
(``pool_member_max_age``) so a pool nobody reconciles any more cannot keep sandboxes forever; reconcile
replaces members before they reach it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio

from corral.core import files as _files
from corral.core.records import POOL_TENANT, PoolRecord, SandboxRecord
from corral.core.state import transition
from corral.core.store import Store
from corral.errors import (
    AgentUnavailable,
    Conflict,
    CorralError,
    InvalidRequest,
    NotFound,
    RuntimeFailure,
    Timeout,
)
from corral.ids import PoolId, SandboxId, TenantId, new_envd_access_token, new_traffic_token
from corral.models import PoolInfo, PoolParams, SandboxState, StopReason
from corral.protocol import Op
from corral.runtimes.base import Limits, ObservedState, SandboxSpec

if TYPE_CHECKING:
    from corral.core.service import SandboxService

__all__ = ["PoolManager"]

log = logging.getLogger("corral.core.pools")

_LIVE = frozenset({SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED})
# A member that fails this way is broken, not the request: the create falls back to a cold start.
_MEMBER_FAILURES = (AgentUnavailable, RuntimeFailure, Timeout, Conflict)
STALE_FRACTION = 0.1  # replace members in the last 10% of pool_member_max_age, before the shim kills them
BOOT_ABANDONED_AFTER = 300.0  # a member still booting after this lost its booter (as the service's creates)


class PoolManager:
    """Warm pools of one :class:`SandboxService` (which owns it, as ``service.pools``)."""

    def __init__(self, service: SandboxService) -> None:
        self._svc = service
        self._limiter: anyio.CapacityLimiter | None = None
        self._wake: anyio.Event | None = None
        self._passes_started = 0
        self._passes_done = 0
        self._pass_done: anyio.Event | None = None

    @property
    def _store(self) -> Store:
        return self._svc.store

    def _now(self) -> float:
        return self._svc._clock()

    # -- desired state ---------------------------------------------------------------------------------------
    async def set(self, params: PoolParams) -> PoolInfo:
        """Create or resize the pool of (template, isolation). Does not boot anything: see fill/reconcile."""
        settings = self._svc.settings
        size = params.size
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= settings.max_pool_size:
            raise InvalidRequest(f"a pool size must be a whole number from 0 to {settings.max_pool_size}")
        isolation = params.isolation or settings.default_isolation
        runtime = self._svc._runtime(isolation)
        base = settings.default_limits
        limits = Limits(
            memory_mb=params.memory_mb or base.memory_mb,
            cpus=params.cpus or base.cpus,
            pids=base.pids,
            disk_mb=base.disk_mb,
        )
        await self._svc.templates.resolve(params.template)  # NotFound names the templates there are
        await runtime.check()
        while True:
            old = await self._store.get_pool(params.template, isolation)
            if old is not None and old.limits == limits:
                new = dataclasses.replace(old, target=size)
            else:  # new, or other limits: a new generation; the old one's members are orphans now
                new = PoolRecord(
                    pool_id=PoolId.new(),
                    template=params.template,
                    isolation=isolation,
                    target=size,
                    limits=limits,
                    created_at=self._now(),
                )
            try:
                pool = await self._store.put_pool(new, expect_version=old.version if old else None)
            except Conflict:
                continue  # another process changed it first: apply ours to what it wrote
            self.wake()
            return await self._info(pool)

    async def delete(self, template: str, isolation: str | None = None) -> None:
        """Forget the pool and kill its members now (a crash halfway is finished by the next pass)."""
        pool = await self._pool(template, isolation)
        await self._store.delete_pool(pool.template, pool.isolation)
        for member in await self._members(pool.pool_id):
            await self._retire(member)
        self.wake()

    async def list_pools(self) -> list[PoolInfo]:
        return [await self._info(pool) for pool in await self._store.list_pools()]

    async def get(self, template: str, isolation: str | None = None) -> PoolInfo:
        return await self._info(await self._pool(template, isolation))

    # -- claim -----------------------------------------------------------------------------------------------
    async def claim(
        self,
        *,
        template: str,
        isolation: str,
        limits: Limits,
        tenant: TenantId,
        metadata: dict[str, str],
        timeout: float,
        env: dict[str, str],
        files: dict[str, bytes],
        public_ports: bool = False,
    ) -> SandboxRecord | None:
        """Take a ready member for ``tenant`` and bind the request into it; None if none could be had."""
        pool = await self._store.get_pool(template, isolation)
        if pool is None or pool.limits != limits:
            return None
        for member in await self._members(pool.pool_id):
            if member.state is not SandboxState.RUNNING or member.instance is None:
                continue
            now = self._now()
            try:
                record = await self._store.put_sandbox(
                    dataclasses.replace(
                        member,
                        tenant_id=tenant,
                        pool_id=None,
                        from_pool=True,
                        metadata=metadata,
                        env=env,
                        created_at=now,
                        timeout=timeout,
                        deadline=now + timeout,
                        public_ports=public_ports,
                        traffic_token=new_traffic_token(),  # never the ones it had while pooled
                        envd_access_token=new_envd_access_token(),
                    ),
                    expect_version=member.version,
                )
            except Conflict:
                continue  # someone else claimed (or removed) it first
            self.wake()
            try:
                await self._bind(record, env, files)
            except _MEMBER_FAILURES as exc:
                log.warning("claimed pool member %s is broken (%s); trying another", record.sandbox_id, exc)
                await self._discard(record, StopReason.CRASHED)
                continue
            except BaseException:  # the request's own fault (a file it may not write, say), or cancelled
                with anyio.CancelScope(shield=True):
                    await self._discard(record, StopReason.KILLED)
                raise
            return record
        return None

    async def _bind(self, record: SandboxRecord, env: dict[str, str], files: dict[str, bytes]) -> None:
        """Late binding: what a cold start sets at boot, applied to an already booted sandbox."""
        client = await self._svc._agent(record)
        await self._svc._set_deadline(record, record.deadline)
        if env:
            await client.call(Op.CONFIGURE, {"env": env})
        await _files.write_all(client, files, max_bytes=self._svc.settings.max_file_bytes)

    async def _discard(self, record: SandboxRecord, reason: StopReason) -> None:
        """Remove a claimed member the caller never saw: stop it and drop its record."""
        await self._svc._stop(record, reason)
        await self._store.delete_sandbox(record.sandbox_id)

    # -- reconcile -------------------------------------------------------------------------------------------
    async def reconcile(self) -> list[PoolInfo]:
        """One level-triggered pass over every pool and member (see the module docstring)."""
        pools = {p.pool_id: p for p in await self._store.list_pools()}
        members = [
            m
            for m in await self._store.list_sandboxes(tenant_id=POOL_TENANT, states=_LIVE)
            if self._svc.owns(m)
        ]
        for member in members:
            if member.pool_id is None:  # a removal interrupted after its CAS: finish it
                await self._discard(member, StopReason.KILLED)
            elif member.pool_id not in pools:  # its pool was deleted or re-made
                await self._retire(member)
        out = []
        for pool in pools.values():
            info, _failures = await self._reconcile_pool(pool)
            out.append(info)
        return out

    async def run(self) -> None:
        """Reconcile forever: after each claim or change, and every ``pool_interval`` seconds. For a task group."""
        while True:
            wake = self._wake = anyio.Event()  # before the pass: a wake during it triggers the next one
            self._passes_started += 1
            try:
                await self.reconcile()
            except CorralError:
                log.exception("pool reconcile pass failed; retrying")
            self._passes_done = self._passes_started
            done, self._pass_done = self._pass_done, None
            if done is not None:
                done.set()
            with anyio.move_on_after(self._svc.settings.pool_interval):
                await wake.wait()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def wait_for_pass(self) -> None:
        """Wait until :meth:`run` has completed a pass that began after this call (so it saw what came before)."""
        wanted = self._passes_started + 1
        while self._passes_done < wanted:
            if self._pass_done is None:
                self._pass_done = anyio.Event()
            await self._pass_done.wait()

    async def fill(self, template: str, isolation: str | None = None) -> AsyncIterator[PoolInfo]:
        """Reconcile one pool until it holds its target of ready members, yielding progress as it goes.

        Embedded mode's way to a full pool (``corral pool set``). Each step boots up to
        ``pool_start_concurrency`` members. Raises the runtime's error if a member fails to boot, rather than
        retrying forever. Members another process is booting count as on their way: the last progress
        shows them as ``starting`` (there is nothing to wait on for another process's boots).
        """
        pool = await self._pool(template, isolation)
        yield await self._info(pool)
        while True:
            info, failures = await self._reconcile_pool(
                pool, max_starts=self._svc.settings.pool_start_concurrency
            )
            yield info
            if failures:
                raise failures[-1]
            if info.ready + info.starting >= pool.target:
                return
            pool = await self._pool(pool.template, pool.isolation)

    async def _reconcile_pool(
        self, pool: PoolRecord, *, max_starts: int | None = None
    ) -> tuple[PoolInfo, list[CorralError]]:
        now = self._now()
        max_age = self._svc.settings.pool_member_max_age
        ready: list[SandboxRecord] = []
        starting: list[SandboxRecord] = []
        for member in await self._members(pool.pool_id):
            if member.state is SandboxState.CREATING:
                if now - member.created_at > BOOT_ABANDONED_AFTER:
                    await self._retire(member)  # its booter died; the record alone is left
                else:
                    starting.append(member)
            elif member.deadline is not None and member.deadline - now < max_age * STALE_FRACTION:
                await self._retire(member)
            elif not await self._alive(member):
                await self._retire(member, StopReason.CRASHED)
            else:
                ready.append(member)
        surplus = len(ready) + len(starting) - pool.target
        for member in ready[: max(0, surplus)]:  # oldest first: they are nearest to going stale
            await self._retire(member)
        missing = pool.target - len(ready) - len(starting)
        if max_starts is not None:
            missing = min(missing, max_starts)
        failures: list[CorralError] = []
        if missing > 0:
            if self._limiter is None:
                self._limiter = anyio.CapacityLimiter(self._svc.settings.pool_start_concurrency)
            limiter = self._limiter

            async def start_one() -> None:
                async with limiter:
                    try:
                        await self._start_member(pool)
                    except CorralError as exc:
                        log.warning("could not start a member of pool %s: %s", pool.key, exc)
                        failures.append(exc)

            async with anyio.create_task_group() as tg:
                for _ in range(missing):
                    tg.start_soon(start_one)
        return await self._info(pool), failures

    async def _alive(self, member: SandboxRecord) -> bool:
        assert member.instance is not None
        observed = await self._svc._runtime(member.isolation).inspect(member.instance)
        return observed.state not in (ObservedState.EXITED, ObservedState.MISSING)

    async def _start_member(self, pool: PoolRecord) -> None:
        runtime = self._svc._runtime(pool.isolation)
        rootfs = await self._svc.templates.resolve(pool.template, accepts=runtime.capabilities.rootfs)
        now = self._now()
        max_age = self._svc.settings.pool_member_max_age
        record = await self._store.put_sandbox(
            SandboxRecord(
                sandbox_id=SandboxId.new(),
                tenant_id=POOL_TENANT,
                isolation=pool.isolation,
                template=pool.template,
                state=SandboxState.CREATING,
                limits=pool.limits,
                created_at=now,
                timeout=max_age,
                deadline=now + max_age,
                pool_id=pool.pool_id,
                node=self._svc.node,
            ),
            expect_version=None,
        )
        instance = None
        try:
            instance = await runtime.create(
                SandboxSpec(
                    sandbox_id=record.sandbox_id,
                    rootfs=rootfs,
                    limits=pool.limits,
                    deadline=record.deadline,
                    isolation=pool.isolation,
                )
            )
            record = await self._store.put_sandbox(
                dataclasses.replace(record, instance=instance), expect_version=record.version
            )
            await self._svc._agent(record)  # its hello: and the connection stays open for the claim
            await self._store.put_sandbox(
                dataclasses.replace(record, state=transition(record.state, SandboxState.RUNNING)),
                expect_version=record.version,
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._svc._drop_agent(record.sandbox_id)
                if instance is not None:
                    try:
                        await runtime.destroy(instance)
                    except CorralError:
                        log.exception("cleanup of failed pool member %s failed", record.sandbox_id)
                await self._store.delete_sandbox(record.sandbox_id)
            raise

    async def _retire(self, member: SandboxRecord, reason: StopReason = StopReason.KILLED) -> None:
        """Remove an unclaimed member: take it out of the pool by CAS first, so a claim and a removal never
        both win; then destroy it. If the CAS loses, the member was claimed (or changed) meanwhile: leave it."""
        try:
            record = await self._store.put_sandbox(
                dataclasses.replace(member, pool_id=None, deadline=self._now()), expect_version=member.version
            )
        except Conflict:
            return
        await self._discard(record, reason)

    # -- helpers ---------------------------------------------------------------------------------------------
    async def _members(self, pool_id: PoolId) -> list[SandboxRecord]:
        """This node's members of the pool: each node keeps its own ``target`` members (a claim needs a
        member this node can reach) and leaves other nodes' members to them."""
        return [m for m in await self._store.list_pool_members(pool_id) if self._svc.owns(m)]

    async def _pool(self, template: str, isolation: str | None) -> PoolRecord:
        isolation = isolation or self._svc.settings.default_isolation
        pool = await self._store.get_pool(template, isolation)
        if pool is None:
            raise NotFound(f"no warm pool for template {template!r} with {isolation} isolation")
        return pool

    async def _info(self, pool: PoolRecord) -> PoolInfo:
        members = await self._members(pool.pool_id)
        return PoolInfo(
            template=pool.template,
            isolation=pool.isolation,
            target=pool.target,
            ready=sum(m.state is SandboxState.RUNNING for m in members),
            starting=sum(m.state is SandboxState.CREATING for m in members),
            memory_mb=pool.limits.memory_mb,
            cpus=pool.limits.cpus,
        )
