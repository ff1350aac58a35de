"""SandboxService over the fake runtime (real agent, real shim, no isolation): lifecycle, deadlines, errors.

Deadlines are tested by stepping an injected clock, never by sleeping.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from corral.core.records import LOCAL_TENANT
from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.errors import InvalidRequest, InvalidState, NotFound, RuntimeFailure
from corral.ids import SandboxId, TenantId
from corral.models import CreateParams, EventKind, ExecParams, SandboxState, StopReason
from corral.runtimes.base import Instance, Runtime, RuntimeConfig, SandboxSpec
from corral.runtimes.fake import FakeRuntime
from corral.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class FailingRuntime(FakeRuntime):
    """Boots nothing: create fails the way a broken runtime would."""

    async def create(self, spec: SandboxSpec) -> Instance:
        raise RuntimeFailure("could not start the sandbox")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", default_isolation="fake", enabled_runtimes=("fake",))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_service(
    settings: Settings, clock: Clock, runtime_cls: type[FakeRuntime] = FakeRuntime
) -> SandboxService:
    runtime = runtime_cls(
        RuntimeConfig(state_root=settings.state_root, cache_root=settings.cache_root, node=settings.node)
    )

    def runtime_for(name: str) -> Runtime:
        if name != "fake":
            raise InvalidRequest(f"unknown isolation {name!r}; choose one of: fake")
        return runtime

    return SandboxService(
        settings=settings, store=SqliteStore(settings.db_path), runtime_for=runtime_for, clock=clock
    )


@pytest.fixture
async def service(settings: Settings, clock: Clock) -> AsyncIterator[SandboxService]:
    svc = make_service(settings, clock)
    yield svc
    for info in await svc.list_sandboxes(tenant=LOCAL_TENANT):
        await svc.kill(info.sandbox_id, tenant=LOCAL_TENANT)
    await svc.aclose()
    await svc.store.aclose()


async def run(svc: SandboxService, sandbox_id: str, cmd: str) -> tuple[str, int | None]:
    out = []
    code = None
    async for ev in await svc.exec(sandbox_id, ExecParams(cmd=cmd), tenant=LOCAL_TENANT):
        if ev.kind is EventKind.STDOUT:
            out.append(ev.data)
        elif ev.kind is EventKind.EXIT:
            code = ev.exit_code
    return b"".join(out).decode(), code


def state_dirs(settings: Settings) -> list[str]:
    return sorted(os.listdir(settings.state_root)) if settings.state_root.exists() else []


async def test_create_exec_files_kill(service: SandboxService, settings: Settings) -> None:
    info = await service.create(
        CreateParams(metadata={"team": "a"}, env={"GREETING": "hello"}), tenant=LOCAL_TENANT
    )
    assert info.state is SandboxState.RUNNING and info.isolation == "fake"
    assert await run(service, info.sandbox_id, "echo $GREETING; exit 4") == ("hello\n", 4)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a,b\n"
        yield b"1,2\n"

    path = f"{settings.state_root}/{info.sandbox_id}/home/data.csv"
    # the fake runtime has no root file system of its own: act as root on a host path
    assert await service.write_file(info.sandbox_id, path, chunks(), user="root", tenant=LOCAL_TENANT) == 8
    assert (
        b"".join(
            [
                c
                async for c in await service.read_file(
                    info.sandbox_id, path, user="root", tenant=LOCAL_TENANT
                )
            ]
        )
        == b"a,b\n1,2\n"
    )

    assert [
        i.sandbox_id for i in await service.list_sandboxes(metadata={"team": "a"}, tenant=LOCAL_TENANT)
    ] == [info.sandbox_id]
    assert await service.list_sandboxes(metadata={"team": "b"}, tenant=LOCAL_TENANT) == []

    killed = await service.kill(info.sandbox_id, tenant=LOCAL_TENANT)
    assert killed.state is SandboxState.STOPPED and killed.stop_reason is StopReason.KILLED
    assert state_dirs(settings) == []
    assert await service.list_sandboxes(tenant=LOCAL_TENANT) == []
    with pytest.raises(InvalidState, match="stopped"):
        await service.exec(info.sandbox_id, ExecParams(cmd="true"), tenant=LOCAL_TENANT)
    assert (
        await service.kill(info.sandbox_id, tenant=LOCAL_TENANT)
    ).state is SandboxState.STOPPED  # idempotent


async def test_deadline_kills_on_time_and_set_timeout_moves_it(
    service: SandboxService, clock: Clock, settings: Settings
) -> None:
    info = await service.create(CreateParams(timeout=60), tenant=LOCAL_TENANT)
    clock.now += 50
    await service.reap()
    assert (await service.get(info.sandbox_id, tenant=LOCAL_TENANT)).state is SandboxState.RUNNING
    await service.set_timeout(
        info.sandbox_id, 60, tenant=LOCAL_TENANT
    )  # 60 s from *now*, not added to the old deadline
    clock.now += 50
    await service.reap()
    assert (await service.get(info.sandbox_id, tenant=LOCAL_TENANT)).state is SandboxState.RUNNING
    clock.now += 11
    await service.reap()
    stopped = await service.get(info.sandbox_id, tenant=LOCAL_TENANT)
    assert stopped.state is SandboxState.STOPPED and stopped.stop_reason is StopReason.TIMEOUT
    assert state_dirs(settings) == []


class CountingRuntime(FakeRuntime):
    """Counts its teardowns; each one takes a moment, as a real one does, so concurrent callers overlap."""

    destroys = 0

    async def destroy(self, instance: Instance) -> None:
        type(self).destroys += 1
        await anyio.sleep(0.2)
        await super().destroy(instance)


async def test_an_expired_sandbox_is_stopped_once_however_many_callers_find_it(
    settings: Settings, clock: Clock
) -> None:
    """The reaper, a read and a kill can all find a sandbox past its deadline at once (CI: the reaper and an
    SDK's get_info tore the same sandbox down together, and one of them failed). One stops it; all succeed."""
    svc = make_service(settings, clock, CountingRuntime)
    try:
        info = await svc.create(CreateParams(timeout=60), tenant=LOCAL_TENANT)
        clock.now += 61
        got: list[object] = []

        async def call(fn: object) -> None:
            got.append(await fn())  # type: ignore[operator]

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, svc.reap)
            for _ in range(3):
                tg.start_soon(call, lambda: svc.get(info.sandbox_id, tenant=LOCAL_TENANT))
            tg.start_soon(call, lambda: svc.kill(info.sandbox_id, tenant=LOCAL_TENANT))
        assert CountingRuntime.destroys == 1 and len(got) == 5
        stopped = await svc.get(info.sandbox_id, tenant=LOCAL_TENANT)
        assert stopped.state is SandboxState.STOPPED and stopped.stop_reason is StopReason.TIMEOUT
        assert state_dirs(settings) == []
        audit = await svc.sandbox_audit(info.sandbox_id, tenant=LOCAL_TENANT)
        assert [e.action for e in audit] == ["sandbox.create", "sandbox.expire"]  # the kill came too late
    finally:
        await svc.aclose()
        await svc.store.aclose()


async def test_concurrent_kills_stop_it_once_and_audit_one_kill(settings: Settings, clock: Clock) -> None:
    svc = make_service(settings, clock, CountingRuntime)
    CountingRuntime.destroys = 0
    try:
        info = await svc.create(CreateParams(), tenant=LOCAL_TENANT)
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(lambda: svc.kill(info.sandbox_id, tenant=LOCAL_TENANT))
        assert CountingRuntime.destroys == 1
        audit = await svc.sandbox_audit(info.sandbox_id, tenant=LOCAL_TENANT)
        assert [e.action for e in audit] == ["sandbox.create", "sandbox.kill"]
        assert (await svc.kill(info.sandbox_id, tenant=LOCAL_TENANT)).state is SandboxState.STOPPED
        assert len(await svc.sandbox_audit(info.sandbox_id, tenant=LOCAL_TENANT)) == 2  # a no-op kill
    finally:
        await svc.aclose()
        await svc.store.aclose()


async def test_a_dead_sandbox_is_noticed_and_cleaned(service: SandboxService, settings: Settings) -> None:
    info = await service.create(CreateParams(), tenant=LOCAL_TENANT)
    record = await service.store.get_sandbox(SandboxId(info.sandbox_id))
    assert record is not None and record.instance is not None
    shim_fd = os.pidfd_open(record.instance.extra["shim_pid"])
    os.kill(record.instance.extra["shim_pid"], signal.SIGKILL)  # the supervisor dies (OOM killer, admin, bug)
    with anyio.fail_after(10):
        await anyio.wait_readable(shim_fd)  # readable once the process has exited
    os.close(shim_fd)
    gone = await service.get(info.sandbox_id, tenant=LOCAL_TENANT)
    assert gone.state is SandboxState.STOPPED and gone.stop_reason is StopReason.CRASHED
    assert state_dirs(settings) == []


async def test_bad_input_creates_nothing(service: SandboxService, settings: Settings) -> None:
    with pytest.raises(InvalidRequest, match="unknown isolation 'quantum'"):
        await service.create(CreateParams(isolation="quantum"), tenant=LOCAL_TENANT)
    with pytest.raises(NotFound, match="template 'nope' not found; available templates: base"):
        await service.create(CreateParams(template="nope"), tenant=LOCAL_TENANT)
    with pytest.raises(InvalidRequest, match="timeout"):
        await service.create(CreateParams(timeout=-1), tenant=LOCAL_TENANT)
    with pytest.raises(InvalidRequest, match="metadata"):
        await service.create(CreateParams(metadata={"k": 1}), tenant=LOCAL_TENANT)  # type: ignore[dict-item]
    assert await service.store.list_sandboxes() == []
    assert state_dirs(settings) == []


async def test_runtime_failure_leaves_no_record(settings: Settings, clock: Clock) -> None:
    svc = make_service(settings, clock, FailingRuntime)
    try:
        with pytest.raises(RuntimeFailure):
            await svc.create(CreateParams(), tenant=LOCAL_TENANT)
        assert await svc.store.list_sandboxes() == []
    finally:
        await svc.aclose()
        await svc.store.aclose()


async def test_tenants_cannot_see_each_other(service: SandboxService) -> None:
    info = await service.create(CreateParams(), tenant=LOCAL_TENANT)
    stranger = TenantId.new()
    with pytest.raises(NotFound):
        await service.get(info.sandbox_id, tenant=stranger)
    with pytest.raises(NotFound):
        await service.kill(info.sandbox_id, tenant=stranger)
    assert await service.list_sandboxes(tenant=stranger) == []
    assert (await service.get(info.sandbox_id, tenant=LOCAL_TENANT)).state is SandboxState.RUNNING


async def test_bad_ids_are_not_found(service: SandboxService) -> None:
    for bad in ("", "sb-", "../../etc", "sb-AAAAAAAAAAAAAAAA", "sb-aaaaaaaaaaaaaaaa\n"):
        with pytest.raises(NotFound):
            await service.get(bad, tenant=LOCAL_TENANT)


async def test_another_process_reattaches(service: SandboxService, settings: Settings, clock: Clock) -> None:
    info = await service.create(CreateParams(), tenant=LOCAL_TENANT)
    bg = [
        ev
        async for ev in await service.exec(
            info.sandbox_id, ExecParams(cmd="echo started; sleep 30", background=True), tenant=LOCAL_TENANT
        )
    ]
    process_id = bg[0].process_id
    assert process_id and bg[-1].kind is EventKind.DETACHED
    other = make_service(settings, clock)  # a second process sharing the data dir, e.g. a CLI call
    try:
        assert await run(other, info.sandbox_id, "echo from-other") == ("from-other\n", 0)
        procs = await other.list_processes(info.sandbox_id, tenant=LOCAL_TENANT)
        assert any(p.process_id == process_id and p.running for p in procs)
        replay = []
        async for ev in await other.attach(info.sandbox_id, process_id, tenant=LOCAL_TENANT):
            replay.append(ev)
            if ev.kind is EventKind.STDOUT:
                break
        assert b"started\n" in b"".join(e.data for e in replay)
    finally:
        await other.aclose()
        await other.store.aclose()


@pytest.fixture(autouse=True)
def _no_leaked_shims(settings: Settings) -> Iterator[None]:
    yield
    leftovers = state_dirs(settings)
    assert leftovers == [], f"sandbox state dirs left behind: {leftovers}"


class PausableFake(FakeRuntime):
    """The fake runtime, claiming pause: the core's auto-pause decisions, with a stepped clock."""

    capabilities = dataclasses.replace(FakeRuntime.capabilities, pause=True)

    def __init__(self, config: RuntimeConfig) -> None:
        super().__init__(config)
        self.calls: list[str] = []

    async def pause(self, instance: Instance) -> None:
        self.calls.append("pause")

    async def resume(self, instance: Instance) -> None:
        self.calls.append("resume")


async def test_auto_pause_pauses_at_the_deadline_and_resume_can_extend(
    settings: Settings, clock: Clock
) -> None:
    svc = make_service(settings, clock, PausableFake)
    try:
        info = await svc.create(CreateParams(timeout=60, auto_pause=True), tenant=LOCAL_TENANT)
        assert info.auto_pause
        clock.now += 61
        await svc.reap()
        paused = await svc.get(info.sandbox_id, tenant=LOCAL_TENANT)
        assert paused.state is SandboxState.PAUSED and paused.stop_reason is None
        # resumed with the time it had left (none) or at least what the caller asks for
        resumed = await svc.resume(info.sandbox_id, at_least=30, tenant=LOCAL_TENANT)
        assert resumed.state is SandboxState.RUNNING and resumed.expires_at == clock.now + 30
        clock.now += 10
        await svc.pause(info.sandbox_id, tenant=LOCAL_TENANT)
        again = await svc.resume(info.sandbox_id, at_least=5, tenant=LOCAL_TENANT)  # 20 s were left: kept
        assert again.expires_at == clock.now + 20
        clock.now += 21
        assert (await svc.get(info.sandbox_id, tenant=LOCAL_TENANT)).state is SandboxState.PAUSED
        runtime = svc._runtime("fake")
        assert runtime.calls == ["pause", "resume", "pause", "resume", "pause"]  # type: ignore[attr-defined]
        with pytest.raises(InvalidRequest):
            await svc.resume(info.sandbox_id, at_least=10**9, tenant=LOCAL_TENANT)
    finally:
        for live in await svc.list_sandboxes(tenant=LOCAL_TENANT):
            await svc.kill(live.sandbox_id, tenant=LOCAL_TENANT)
        await svc.aclose()
        await svc.store.aclose()


async def test_auto_pause_needs_a_runtime_that_pauses(service: SandboxService) -> None:
    with pytest.raises(InvalidRequest, match="cannot pause at their timeout"):
        await service.create(CreateParams(auto_pause=True), tenant=LOCAL_TENANT)
    assert await service.list_sandboxes(tenant=LOCAL_TENANT) == []
