"""Resource samples of running sandboxes: what each used, over time (``sbx.get_metrics()``, E2B's metrics).

The agent measures (``Op.USAGE``, :mod:`corral.agent.usage`: CPU seconds of the sandbox's processes, memory,
the disk that holds its writes, each as the sandbox sees them); this module turns readings into
:class:`~corral.models.ResourceSample` rows and keeps the recent ones in memory, per sandbox:

- ``cpu_used_pct`` is the CPU time used between two readings as a share of the sandbox's CPU limit over that
  time (0-100). A sandbox's first reading is compared with its start, so it is the average since then; a
  reading compares with the latest one at least :data:`MIN_SPAN` old, so a sample asked for just after the
  periodic one is not the share of a few milliseconds (0 % right after a busy second, as E2B's SDK saw);
- ``mem_total`` is the smaller of what the sandbox sees and its memory limit (a VM's kernel keeps some);
- a server takes a reading of every running sandbox of its node each ``[sandbox] metrics_interval`` seconds
  (:meth:`UsageMeter.run`), and one more whenever metrics are asked for. The last :data:`HISTORY` samples of a
  sandbox are kept until it stops; a paused sandbox keeps its samples and takes none.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from corral.core.agent_client import AgentClient
from corral.core.records import SandboxRecord
from corral.errors import CorralError
from corral.models import ResourceSample, SandboxState
from corral.protocol.messages import Op

__all__ = ["HISTORY", "UsageMeter"]

log = logging.getLogger("corral.core.usage")

HISTORY = 720  # samples kept per sandbox: an hour at the default 5 s interval
READ_TIMEOUT = 10.0
MIN_SPAN = 1.0  # s: the shortest time a CPU share is taken over


@dataclass(frozen=True)
class _Reading:
    at: float
    cpu_seconds: float


class UsageMeter:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._samples: dict[str, deque[ResourceSample]] = {}
        self._readings: dict[str, deque[_Reading]] = {}  # the recent ones, oldest first

    async def take(self, record: SandboxRecord, client: AgentClient) -> ResourceSample:
        """Read the sandbox's usage now, keep the sample, and return it."""
        answer = await client.call(Op.USAGE, timeout=READ_TIMEOUT)
        now = self._clock()
        key = str(record.sandbox_id)
        cpu = float(answer.get("cpu_seconds") or 0.0)
        readings = self._readings.setdefault(
            key, deque([_Reading(at=record.created_at, cpu_seconds=0.0)], maxlen=16)
        )
        before = next((r for r in reversed(readings) if now - r.at >= MIN_SPAN), readings[0])
        cpus = record.limits.cpus
        span = (now - before.at) * cpus
        pct = 0.0 if span <= 0 else min(100.0, max(0.0, (cpu - before.cpu_seconds) / span * 100.0))
        readings.append(_Reading(at=now, cpu_seconds=cpu))
        limit = record.limits.memory_mb * 1024 * 1024
        seen = answer.get("mem_total")
        sample = ResourceSample(
            timestamp=now,
            cpu_count=max(1, math.ceil(cpus)),
            cpu_used_pct=round(pct, 2),
            mem_used=int(answer.get("mem_used") or 0),
            mem_total=min(limit, int(seen)) if isinstance(seen, int) and seen > 0 else limit,
            mem_cache=int(answer.get("mem_cache") or 0),
            disk_used=int(answer.get("disk_used") or 0),
            disk_total=int(answer.get("disk_total") or 0),
        )
        self._samples.setdefault(key, deque(maxlen=HISTORY)).append(sample)
        return sample

    def samples(
        self, sandbox_id: str, start: float | None = None, end: float | None = None
    ) -> list[ResourceSample]:
        """The kept samples of a sandbox taken in ``[start, end]`` (Unix seconds), oldest first."""
        return [
            s
            for s in self._samples.get(sandbox_id, ())
            if (start is None or s.timestamp >= start) and (end is None or s.timestamp <= end)
        ]

    def forget(self, sandbox_id: str) -> None:
        self._samples.pop(sandbox_id, None)
        self._readings.pop(sandbox_id, None)

    async def run(
        self,
        live: Callable[[], Awaitable[list[SandboxRecord]]],
        sample: Callable[[SandboxRecord], Awaitable[object]],
        interval: float,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        """``sample`` every running sandbox of ``live()`` each ``interval`` seconds, forever; forget the
        samples of sandboxes no longer live (paused ones keep theirs)."""
        while True:
            records = await live()
            for record in records:
                if record.state is not SandboxState.RUNNING:
                    continue
                try:
                    await sample(record)
                except (CorralError, TimeoutError) as exc:  # stopped or paused since the listing: next round
                    log.debug("sandbox %s: no usage sample: %s", record.sandbox_id, exc)
            names = {str(r.sandbox_id) for r in records}
            for gone in [k for k in self._samples if k not in names]:
                self.forget(gone)
            await sleep(interval)
