"""The shim relays each client as a channel of the agent's one connection: when a client hangs up, the agent
ends what that client owned (its foreground processes), and only that, by its own connection rules."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from corral.core.agent_client import AgentClient
from corral.core.processes import attach, exec_stream, list_processes
from corral.ids import SandboxId
from corral.models import EventKind, ExecParams
from corral.runtimes.base import HostLayers, Instance, RuntimeConfig, SandboxSpec
from corral.runtimes.fake import FakeRuntime

pytestmark = pytest.mark.anyio


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[tuple[FakeRuntime, Instance]]:
    runtime = FakeRuntime(RuntimeConfig(state_root=tmp_path / "s", cache_root=tmp_path / "c"))
    spec = SandboxSpec(sandbox_id=SandboxId.new(), rootfs=HostLayers(lower=()), deadline=time.time() + 120)
    instance = await runtime.create(spec)
    try:
        yield runtime, instance
    finally:
        await runtime.destroy(instance)


async def _client(runtime: FakeRuntime, instance: Instance) -> AgentClient:
    return await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)


async def test_a_clients_foreground_process_dies_when_it_hangs_up(
    sandbox: tuple[FakeRuntime, Instance],
) -> None:
    runtime, instance = sandbox
    a, b = await _client(runtime, instance), await _client(runtime, instance)
    try:
        stream = exec_stream(a, ExecParams(cmd="sleep 300"))
        first = await stream.__anext__()
        assert first.kind is EventKind.STARTED and first.process_id
        own = exec_stream(b, ExecParams(cmd="sleep 300"))  # b's own foreground process: not a's to end
        mine = (await own.__anext__()).process_id
        watch = attach(b, first.process_id, replay=False)
        assert (await watch.__anext__()).kind is EventKind.STARTED
        await a.aclose()  # the client hangs up; the shim closes its channel
        with anyio.fail_after(30):
            end = [e async for e in watch][-1]
        assert end.kind is EventKind.EXIT and end.signal == 9, end
        running = {p.process_id for p in await list_processes(b) if p.running}
        assert mine in running and first.process_id not in running
    finally:
        await a.aclose()
        await b.aclose()
