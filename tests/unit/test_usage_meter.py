"""The CPU share of a resource sample is taken over at least MIN_SPAN, whoever asked for the sample."""

from __future__ import annotations

from typing import Any

import pytest

from corral.core.records import LOCAL_TENANT, SandboxRecord
from corral.core.usage import MIN_SPAN, UsageMeter
from corral.ids import SandboxId
from corral.models import SandboxState
from corral.runtimes.base import Limits

pytestmark = pytest.mark.anyio


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class Agent:
    """What the agent's usage answer carries that the meter reads: CPU seconds so far."""

    cpu_seconds = 0.0

    async def call(self, op: str, fields: Any = None, *, timeout: float | None = None) -> dict[str, Any]:
        return {"cpu_seconds": self.cpu_seconds, "mem_used": 1, "mem_total": 1 << 30}


def _record(created_at: float) -> SandboxRecord:
    return SandboxRecord(
        sandbox_id=SandboxId.new(), tenant_id=LOCAL_TENANT, isolation="fake", template="base",
        state=SandboxState.RUNNING, limits=Limits(cpus=1), created_at=created_at, timeout=60.0, deadline=None,
    )  # fmt: skip


async def test_a_sample_just_after_the_periodic_one_still_shows_the_busy_second_before() -> None:
    clock, agent = Clock(), Agent()
    meter = UsageMeter(clock)
    rec = _record(created_at=clock.now)
    clock.now += 5
    assert (await meter.take(rec, agent)).cpu_used_pct == 0.0  # type: ignore[arg-type]  # idle since start
    clock.now += 4
    agent.cpu_seconds = 4.0  # 4 s of one busy CPU
    assert (await meter.take(rec, agent)).cpu_used_pct == 100.0  # type: ignore[arg-type]  # the periodic one
    clock.now += 0.05  # then the caller's own, 50 ms later, with nothing used in between
    asked = await meter.take(rec, agent)  # type: ignore[arg-type]
    assert asked.cpu_used_pct == pytest.approx(4.0 / 4.05 * 100, abs=0.01)  # over the last 4.05 s, not 50 ms
    clock.now += MIN_SPAN + 1  # a whole idle interval later it is idle again
    assert (await meter.take(rec, agent)).cpu_used_pct == 0.0  # type: ignore[arg-type]
    assert [s.timestamp for s in meter.samples(str(rec.sandbox_id))] == [1005.0, 1009.0, 1009.05, 1011.05]
