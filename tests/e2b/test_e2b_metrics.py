"""Sandbox metrics through the real ``e2b`` SDK (``get_metrics``, sync and async) and Corral's own SDK
(``sbx.get_metrics()``), against ``corral serve``: the numbers move with what the sandbox does."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from _e2b_server import E2BServer
from e2b.exceptions import NotFoundException

import corral
from e2b import AsyncSandbox, Sandbox

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024
# touches every page of 200 MiB and keeps it: resident memory the sandbox really uses
HOLD = "python3 -c 'import time; b = bytearray(200 << 20); b[::4096] = b\"x\" * (len(b) // 4096); time.sleep(600)'"
SPIN = "timeout 4 python3 -c 'while True: pass' || true"


def test_memory_and_cpu_rise_with_use(e2b_env: E2BServer, monkeypatch: pytest.MonkeyPatch) -> None:
    sbx = Sandbox.create(timeout=180)
    try:
        first = sbx.get_metrics()
        assert first, "a running sandbox always has a fresh sample"
        idle = first[-1]
        assert idle.cpu_count == 1 and idle.mem_total == 512 * MiB
        assert 0 < idle.mem_used < 150 * MiB, idle
        assert 0 < idle.disk_used <= idle.disk_total
        assert abs(idle.timestamp - datetime.now(UTC)) < timedelta(seconds=30)

        sbx.commands.run(HOLD, background=True)
        deadline = time.monotonic() + 60
        while (now := sbx.get_metrics()[-1]).mem_used < idle.mem_used + 180 * MiB:
            assert time.monotonic() < deadline, f"memory never rose: {idle} -> {now}"
            time.sleep(0.5)
        assert now.mem_used <= now.mem_total

        sbx.commands.run(SPIN, timeout=30)  # 4 s of one busy CPU, then a sample right after
        busy = sbx.get_metrics()[-1]
        assert busy.cpu_used_pct > 20, busy

        time.sleep(6)  # longer than the server's metrics_interval (5 s), asking nothing meanwhile
        everything = sbx.get_metrics()
        stamps = [m.timestamp for m in everything]
        between = [t for t in stamps if busy.timestamp < t < stamps[-1]]
        assert between, "the server samples running sandboxes on its own"
        assert stamps == sorted(stamps) and len(everything) >= 4
        later = Sandbox.get_metrics(sbx.sandbox_id, start=stamps[-1] - timedelta(seconds=0.5))
        assert 1 <= len(later) < len(everything)  # start narrows the series

        # Corral's own SDK on the same server and tenant: the same samples, in Corral's names
        monkeypatch.setenv("CORRAL_URL", e2b_env.url)
        monkeypatch.setenv("CORRAL_API_KEY", e2b_env.corral_key_a)
        mine = corral.Sandbox.connect(sbx.sandbox_id)
        try:
            samples = mine.get_metrics()
            assert samples[-1].mem_used >= idle.mem_used + 180 * MiB
            assert samples[-1].timestamp >= stamps[-1].timestamp()
        finally:
            mine.close()
    finally:
        sbx.kill()
    with pytest.raises(NotFoundException):
        Sandbox.get_metrics(sbx.sandbox_id)  # a killed sandbox is gone, its metrics with it


def test_another_tenants_metrics_do_not_exist(e2b_server: E2BServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("E2B_API_URL", e2b_server.url), ("E2B_SANDBOX_URL", e2b_server.url)):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("E2B_API_KEY", e2b_server.key_a)
    sbx = Sandbox.create(timeout=60)
    try:
        monkeypatch.setenv("E2B_API_KEY", e2b_server.key_b)
        with pytest.raises(NotFoundException):
            Sandbox.get_metrics(sbx.sandbox_id)
    finally:
        monkeypatch.setenv("E2B_API_KEY", e2b_server.key_a)
        sbx.kill()


@pytest.mark.anyio
async def test_async_get_metrics(e2b_env: E2BServer) -> None:
    sbx = await AsyncSandbox.create(timeout=60)
    try:
        metrics = await sbx.get_metrics()
        assert metrics and metrics[-1].mem_total == 512 * MiB and metrics[-1].mem_used > 0
    finally:
        await sbx.kill()
