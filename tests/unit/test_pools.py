"""Warm pools over the fake runtime (real agent and shim, no isolation): reconcile, claims, late binding.

Time moves by stepping an injected clock; nothing sleeps. Every test deletes its pools, and the autouse check
fails it if a member's state dir is left behind.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from corral.core.records import LOCAL_TENANT, POOL_TENANT, SandboxRecord
from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.errors import InvalidRequest, NotFound, PermissionDenied, RuntimeFailure
from corral.ids import PoolId, SandboxId, TenantId
from corral.models import CreateParams, EventKind, ExecParams, PoolInfo, PoolParams, SandboxState
from corral.runtimes.base import Instance, Runtime, RuntimeConfig, SandboxSpec
from corral.runtimes.fake import FakeRuntime
from corral.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class FailingRuntime(FakeRuntime):
    async def create(self, spec: SandboxSpec) -> Instance:
        raise RuntimeFailure("could not start the sandbox")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", default_isolation="fake", enabled_runtimes=("fake",))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_service(
    settings: Settings, clock: Clock, runtime_cls: type[FakeRuntime] = FakeRuntime, store: object = None
) -> SandboxService:
    runtime = runtime_cls(
        RuntimeConfig(state_root=settings.state_root, cache_root=settings.cache_root, node=settings.node)
    )

    def runtime_for(name: str) -> Runtime:
        if name != "fake":
            raise InvalidRequest(f"unknown isolation {name!r}; choose one of: fake")
        return runtime

    return SandboxService(
        settings=settings,
        store=store or SqliteStore(settings.db_path),  # type: ignore[arg-type]
        runtime_for=runtime_for,
        clock=clock,
    )


async def close(svc: SandboxService) -> None:
    for pool in await svc.pools.list_pools():
        await svc.pools.delete(pool.template, pool.isolation)
    live = frozenset({SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED})
    for record in await svc.store.list_sandboxes(states=live):  # every tenant's
        await svc.kill(record.sandbox_id, tenant=record.tenant_id)
    await svc.aclose()
    await svc.store.aclose()


@pytest.fixture
async def service(settings: Settings, clock: Clock) -> AsyncIterator[SandboxService]:
    svc = make_service(settings, clock)
    yield svc
    await close(svc)


def state_dirs(settings: Settings) -> list[str]:
    return sorted(os.listdir(settings.state_root)) if settings.state_root.exists() else []


@pytest.fixture(autouse=True)
def _no_leaked_members(settings: Settings) -> Iterator[None]:
    yield
    assert state_dirs(settings) == [], "pool members left behind"


async def fill(svc: SandboxService, template: str = "base") -> list[PoolInfo]:
    return [info async for info in svc.pools.fill(template, "fake")]


async def run(svc: SandboxService, sandbox_id: str, cmd: str, tenant: TenantId = LOCAL_TENANT) -> str:
    out = []
    async for ev in await svc.exec(sandbox_id, ExecParams(cmd=cmd), tenant=tenant):
        if ev.kind is EventKind.STDOUT:
            out.append(ev.data)
    return b"".join(out).decode()


async def members(svc: SandboxService) -> list[SandboxRecord]:
    return await svc.store.list_pool_members()


async def kill_shim(record: SandboxRecord) -> None:
    assert record.instance is not None
    fd = os.pidfd_open(record.instance.extra["shim_pid"])
    os.kill(record.instance.extra["shim_pid"], signal.SIGKILL)
    with anyio.fail_after(10):
        await anyio.wait_readable(fd)  # readable once it has exited
    os.close(fd)


async def test_fill_reports_progress_and_boots_members_no_user_can_see(
    service: SandboxService, settings: Settings
) -> None:
    await service.pools.set(PoolParams(template="base", size=3))
    progress = await fill(service)
    assert progress[0].ready == 0 and progress[-1].ready == 3 and progress[-1].target == 3
    assert [p.ready for p in progress] == sorted(p.ready for p in progress)  # it only goes up
    assert len(state_dirs(settings)) == 3
    found = await members(service)
    assert len(found) == 3 and all(
        m.tenant_id == POOL_TENANT and m.state is SandboxState.RUNNING for m in found
    )
    assert await service.list_sandboxes() == []  # members belong to no user
    with pytest.raises(NotFound):
        await service.get(found[0].sandbox_id)
    assert [
        (p.template, p.isolation, p.target, p.ready, p.starting) for p in await service.pools.list_pools()
    ] == [("base", "fake", 3, 3, 0)]


async def test_claim_late_binds_the_request_and_leaves_the_pool_one_short(
    service: SandboxService, clock: Clock
) -> None:
    await service.pools.set(PoolParams(template="base", size=2))
    await fill(service)
    pooled_tokens = {m.traffic_token for m in await members(service)}
    tenant = TenantId.new()
    info = await service.create(
        CreateParams(
            metadata={"task": "t-1"},
            env={"GREETING": "hello"},
            timeout=60,
            files={"notes/a.txt": b"from the request\n"},
            public_ports=True,
        ),
        tenant=tenant,
    )
    assert info.from_pool and info.state is SandboxState.RUNNING
    # port access is the request's, with a token the member never had while it waited in the pool
    assert info.public_ports and info.traffic_token and info.traffic_token not in pooled_tokens
    assert info.metadata == {"task": "t-1"} and info.expires_at == pytest.approx(clock.now + 60)
    assert (
        await run(service, info.sandbox_id, "echo $GREETING; cat notes/a.txt", tenant)
        == "hello\nfrom the request\n"
    )
    assert [i.sandbox_id for i in await service.list_sandboxes(tenant=tenant)] == [info.sandbox_id]
    assert await service.list_sandboxes() == []  # another tenant sees nothing of it
    assert (await service.pools.get("base", "fake")).ready == 1  # one short until the next pass
    await service.pools.reconcile()
    assert (await service.pools.get("base", "fake")).ready == 2
    # the user's deadline applies (the member had only the pool's safety deadline)
    clock.now += 61
    await service.reap()
    assert (await service.get(info.sandbox_id, tenant=tenant)).state is SandboxState.STOPPED
    # a stopped claimed sandbox never returns to the pool
    assert all(m.sandbox_id != SandboxId(info.sandbox_id) for m in await members(service))


async def test_cold_start_when_the_pool_is_empty_or_does_not_match(service: SandboxService) -> None:
    await service.pools.set(PoolParams(template="base", size=1, memory_mb=256))
    await fill(service)
    other_limits = await service.create(CreateParams())  # default 512 MB: not this pool's members
    assert not other_limits.from_pool
    first = await service.create(CreateParams(memory_mb=256))
    second = await service.create(CreateParams(memory_mb=256))  # pool now empty: cold, and still works
    assert first.from_pool and not second.from_pool
    assert first.memory_mb == second.memory_mb == 256


async def test_two_concurrent_creates_never_get_the_same_member(
    settings: Settings, clock: Clock, service: SandboxService
) -> None:
    """Both claimers read the member list before either writes: the record's CAS lets exactly one win."""

    class Barrier(SqliteStore):
        listed = 0
        both = anyio.Event()

        async def list_pool_members(self, pool_id: PoolId | None = None) -> list[SandboxRecord]:
            found = await super().list_pool_members(pool_id)
            Barrier.listed += 1
            if Barrier.listed == 2:
                Barrier.both.set()
            with anyio.fail_after(10):
                await Barrier.both.wait()
            return found

    await service.pools.set(PoolParams(template="base", size=1))
    await fill(service)
    (member,) = await members(service)
    one = make_service(settings, clock, store=Barrier(settings.db_path))  # two "processes", one database
    two = make_service(settings, clock, store=Barrier(settings.db_path))
    results = []
    try:
        async with anyio.create_task_group() as tg:

            async def create(svc: SandboxService) -> None:
                results.append(await svc.create(CreateParams()))

            tg.start_soon(create, one)
            tg.start_soon(create, two)
        assert len({r.sandbox_id for r in results}) == 2
        assert sorted(r.from_pool for r in results) == [False, True]
        assert [r.sandbox_id for r in results if r.from_pool] == [member.sandbox_id]
    finally:
        for svc in (one, two):
            await svc.aclose()
            await svc.store.aclose()


async def test_many_concurrent_creates_each_get_a_distinct_sandbox(service: SandboxService) -> None:
    await service.pools.set(PoolParams(template="base", size=3))
    await fill(service)
    results = []
    async with anyio.create_task_group() as tg:
        for _ in range(5):

            async def create() -> None:
                results.append(await service.create(CreateParams()))

            tg.start_soon(create)
    assert len({r.sandbox_id for r in results}) == 5
    assert sum(r.from_pool for r in results) == 3


async def test_a_dead_member_is_skipped_at_claim_and_replaced_by_reconcile(
    service: SandboxService, settings: Settings
) -> None:
    await service.pools.set(PoolParams(template="base", size=1))
    await fill(service)
    (dead,) = await members(service)
    await kill_shim(dead)
    info = await service.create(CreateParams(env={"X": "1"}))
    assert not info.from_pool  # the claim found the member broken and fell back to a cold start
    assert await run(service, info.sandbox_id, "echo $X") == "1\n"
    assert await service.store.get_sandbox(dead.sandbox_id) is None  # and took it away
    await service.pools.reconcile()
    (fresh,) = await members(service)
    await kill_shim(fresh)
    await service.pools.reconcile()  # noticed dead between claims too
    (again,) = await members(service)
    assert again.sandbox_id not in (dead.sandbox_id, fresh.sandbox_id)
    assert len(state_dirs(settings)) == 2  # the claimed sandbox and the live member


async def test_a_request_that_fails_late_binding_is_an_error_and_leaves_nothing(
    service: SandboxService, settings: Settings
) -> None:
    await service.pools.set(PoolParams(template="base", size=1))
    await fill(service)
    with pytest.raises(PermissionDenied):
        await service.create(CreateParams(files={"/.corral/x": b"no"}))  # refused before any claim
    assert len(await members(service)) == 1
    with pytest.raises(InvalidRequest):
        await service.create(CreateParams(files={"a": "text"}))  # type: ignore[dict-item]
    assert len(await members(service)) == 1


async def test_shrink_and_delete_kill_members(service: SandboxService, settings: Settings) -> None:
    await service.pools.set(PoolParams(template="base", size=3))
    await fill(service)
    oldest = (await members(service))[0]
    await service.pools.set(PoolParams(template="base", size=1))
    await service.pools.reconcile()
    remaining = await members(service)
    assert len(remaining) == 1 and remaining[0].sandbox_id != oldest.sandbox_id  # the oldest go first
    assert len(state_dirs(settings)) == 1
    await service.pools.delete("base", "fake")
    assert state_dirs(settings) == [] and await members(service) == []
    assert await service.pools.list_pools() == []
    with pytest.raises(NotFound, match="no warm pool"):
        await service.pools.delete("base", "fake")


async def test_new_limits_make_a_new_generation_and_orphan_the_old(
    service: SandboxService, settings: Settings
) -> None:
    await service.pools.set(PoolParams(template="base", size=1))
    await fill(service)
    (old,) = await members(service)
    await service.pools.set(PoolParams(template="base", size=1, memory_mb=256))
    await service.pools.reconcile()
    (new,) = await members(service)
    assert new.sandbox_id != old.sandbox_id and new.limits.memory_mb == 256
    assert len(state_dirs(settings)) == 1


async def test_reconcile_repairs_what_a_crash_left(
    service: SandboxService, settings: Settings, clock: Clock
) -> None:
    await service.pools.set(PoolParams(template="base", size=2))
    await fill(service)
    a, b = await members(service)
    # crash after a removal's CAS (member out of the pool) but before the destroy
    await service.store.put_sandbox(
        dataclasses.replace(a, pool_id=None, deadline=clock.now), expect_version=a.version
    )
    # crash while booting: a record still "creating" whose booter is gone, with a live sandbox
    runtime = FakeRuntime(RuntimeConfig(state_root=settings.state_root, cache_root=settings.cache_root))
    stray_id = SandboxId.new()
    instance = await runtime.create(
        SandboxSpec(sandbox_id=stray_id, rootfs=await service.templates.resolve("base"))
    )
    await service.store.put_sandbox(
        dataclasses.replace(
            b, sandbox_id=stray_id, state=SandboxState.CREATING, instance=instance, created_at=clock.now
        ),
        expect_version=None,
    )
    await service.pools.reconcile()
    assert {m.sandbox_id for m in await members(service)} >= {b.sandbox_id, stray_id}  # still booting: kept
    assert await service.store.get_sandbox(a.sandbox_id) is None
    clock.now += 301  # the booter is presumed dead
    await service.pools.reconcile()
    now = await members(service)
    assert stray_id not in {m.sandbox_id for m in now}
    assert len(now) == 2 and all(m.state is SandboxState.RUNNING for m in now)
    assert len(state_dirs(settings)) == 2
    # crash between deleting a pool and removing its members
    await service.store.delete_pool("base", "fake")
    await service.pools.reconcile()
    assert await members(service) == [] and state_dirs(settings) == []


async def test_members_are_replaced_before_their_safety_deadline(
    service: SandboxService, settings: Settings, clock: Clock
) -> None:
    await service.pools.set(PoolParams(template="base", size=1))
    await fill(service)
    (old,) = await members(service)
    assert old.deadline == pytest.approx(clock.now + settings.pool_member_max_age)
    clock.now += settings.pool_member_max_age * 0.5
    await service.pools.reconcile()
    assert [m.sandbox_id for m in await members(service)] == [old.sandbox_id]
    clock.now += settings.pool_member_max_age * 0.45
    await service.pools.reconcile()
    (new,) = await members(service)
    assert new.sandbox_id != old.sandbox_id and len(state_dirs(settings)) == 1


async def test_bad_pool_requests_are_refused_and_change_nothing(service: SandboxService) -> None:
    for size in (-1, 65, 1.5, True):
        with pytest.raises(InvalidRequest, match="pool size"):
            await service.pools.set(PoolParams(template="base", size=size))  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="template 'nope' not found"):
        await service.pools.set(PoolParams(template="nope", size=1))
    with pytest.raises(InvalidRequest, match="unknown isolation 'quantum'"):
        await service.pools.set(PoolParams(template="base", size=1, isolation="quantum"))
    with pytest.raises(NotFound, match="no warm pool"):
        await service.pools.get("base", "fake")
    assert await service.pools.list_pools() == []


async def test_fill_raises_the_boot_error_and_leaves_nothing(settings: Settings, clock: Clock) -> None:
    svc = make_service(settings, clock, FailingRuntime)
    try:
        await svc.pools.set(PoolParams(template="base", size=2))
        with pytest.raises(RuntimeFailure, match="could not start"):
            await fill(svc)
        assert await members(svc) == []
        # and a create still works out (here it fails the way the runtime does, not for the pool's sake)
        with pytest.raises(RuntimeFailure):
            await svc.create(CreateParams())
    finally:
        await close(svc)


async def test_run_refills_after_a_claim(service: SandboxService) -> None:
    await service.pools.set(PoolParams(template="base", size=1))
    await fill(service)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service.pools.run)
        claimed = await service.create(CreateParams())
        assert claimed.from_pool
        with anyio.fail_after(30):
            await service.pools.wait_for_pass()  # the claim woke the loop; this pass refilled
        assert (await service.pools.get("base", "fake")).ready == 1
        tg.cancel_scope.cancel()


def test_pool_and_create_params_round_trip_through_json() -> None:
    import json

    params = CreateParams(
        template="base", files={"/tmp/bin": bytes(range(256)), "a.txt": b"hi\n"}, env={"A": "1"}
    )
    wire = json.loads(json.dumps(params.to_wire()))  # what an HTTP body carries
    assert CreateParams.from_wire(wire) == params
    assert CreateParams.from_wire({"template": "base"}).files == {}
    for bad in ({"x": "not base64!"}, ["x"], {"x": 1}):
        with pytest.raises(InvalidRequest, match="base64"):
            CreateParams.from_wire({"files": bad})
    pool = PoolParams(template="base", size=3, isolation="gvisor", memory_mb=256)
    assert PoolParams.from_wire(json.loads(json.dumps(pool.to_wire()))) == pool
    info = PoolInfo(
        template="base", isolation="gvisor", target=3, ready=1, starting=2, memory_mb=256, cpus=1.0
    )
    assert PoolInfo.from_wire(json.loads(json.dumps(info.to_wire()))) == info
