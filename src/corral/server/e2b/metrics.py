"""E2B's sandbox metrics: Corral's resource samples (:mod:`corral.core.usage`) in E2B's ``SandboxMetric`` shape.

``start``/``end`` are Unix seconds, as the SDK sends them; without them, every sample the server kept. A
running sandbox takes a fresh sample first, so the answer is never empty while it runs.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any

from fastapi import Query

from corral.models import ResourceSample
from corral.server.app import State, TenantCaller
from corral.server.e2b._wire import e2b_router, visible

__all__ = ["router"]

router = e2b_router()


def _metric(sample: ResourceSample) -> dict[str, Any]:
    when = datetime.datetime.fromtimestamp(sample.timestamp, datetime.UTC)
    return {
        "timestamp": when.isoformat().replace("+00:00", "Z"),
        "timestampUnix": int(sample.timestamp),
        "cpuCount": sample.cpu_count,
        "cpuUsedPct": sample.cpu_used_pct,
        "memUsed": sample.mem_used,
        "memTotal": sample.mem_total,
        "memCache": sample.mem_cache,
        "diskUsed": sample.disk_used,
        "diskTotal": sample.disk_total,
    }


@router.get("/sandboxes/{sandbox_id}/metrics", summary="E2B: CPU, memory and disk use over time")
async def metrics(
    sandbox_id: str,
    state: State,
    tenant: TenantCaller,
    start: Annotated[int | None, Query(ge=0)] = None,
    end: Annotated[int | None, Query(ge=0)] = None,
) -> list[dict[str, Any]]:
    visible(await state.service.get(sandbox_id, tenant=tenant))
    found = await state.service.metrics(
        sandbox_id,
        tenant=tenant,
        start=start,
        end=None if end is None else end + 1,  # whole seconds: a sample within the last one counts
    )
    return [_metric(s) for s in found]
