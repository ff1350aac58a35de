"""The agent's ``usage`` answer on every runtime is the sandbox's own: its memory rises by what a process in it
allocates (not by what the host does), its CPU seconds by what its processes burn, its disk is the one that
holds its writes. Namespace sandboxes read their memory cgroup (their /proc/meminfo is the host's); gVisor and
microVM sandboxes their own /proc."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from corral.protocol.messages import Op
from corral.runtimes.base import Limits

pytestmark = [pytest.mark.anyio, pytest.mark.root]

MiB = 1024 * 1024
HOLD = (
    "import os, time\n"
    "b = bytearray(150 << 20)\n"
    "b[::4096] = b'x' * (len(b) // 4096)\n"
    "os.write(1, b'held\\n')\n"
    "time.sleep(600)\n"
)
BURN = "import time\nwhile time.process_time() < 1: pass\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _check(sbx: Any) -> None:
    before = await sbx.client.call(Op.USAGE)
    assert before["disk_total"] > 0 and 0 < before["disk_used"] <= before["disk_total"]
    burn = await sbx.run(["python3", "-c", BURN])
    assert burn.exit_code == 0, burn.stderr
    after_burn = await sbx.client.call(Op.USAGE)
    assert after_burn["cpu_seconds"] >= before["cpu_seconds"] + 0.95
    started = await sbx.client.call(
        Op.EXEC, {"argv": ["python3", "-c", HOLD], "user": "user", "background": True}
    )
    assert started.get("process_id"), started
    held = await sbx.client.call(Op.USAGE)
    for _ in range(300):  # the 150 MiB are touched within a second or two (TCG: longer)
        held = await sbx.client.call(Op.USAGE)
        if held["mem_used"] >= before["mem_used"] + 140 * MiB:
            break
        await anyio.sleep(0.1)
    assert held["mem_used"] >= before["mem_used"] + 140 * MiB, (before, held)
    assert held["mem_used"] < before["mem_used"] + 400 * MiB  # the sandbox's, not the host's churn
    await sbx.run(["pkill", "-f", "bytearray"])


@pytest.mark.bwrap
async def test_namespace_usage_is_its_cgroups(ns_sandbox: Any) -> None:
    sbx = await ns_sandbox(limits=Limits(memory_mb=512))
    answer = await sbx.client.call(Op.USAGE)
    assert answer["mem_total"] is None  # the limit is the total: the server knows it
    await _check(sbx)


@pytest.mark.runsc
async def test_gvisor_usage_is_its_own(gvisor_sandbox: Any) -> None:
    await _check(await gvisor_sandbox(limits=Limits(memory_mb=512)))


async def test_microvm_usage_is_the_guests(microvm_sandbox: Any) -> None:
    sbx = await microvm_sandbox()
    answer = await sbx.client.call(Op.USAGE)
    assert 0 < answer["mem_total"] <= 512 * MiB  # the guest kernel's MemTotal
    await _check(sbx)
