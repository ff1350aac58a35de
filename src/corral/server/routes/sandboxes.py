"""Sandboxes: create, list (metadata filters, pagination) and metrics; the unary rest are rows of corral/ops.py."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query

from corral.errors import InvalidRequest
from corral.models import SandboxInfo, SandboxState
from corral.server.app import State, TenantCaller
from corral.server.routes.unary import present
from corral.server.schemas import CreateSandboxBody

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])

MAX_PAGE = 1000


@router.post("", status_code=201, summary="Create a sandbox")
async def create(body: CreateSandboxBody, state: State, tenant: TenantCaller) -> dict[str, Any]:
    params = body.params()
    started = time.perf_counter()
    info = await state.service.create(params, tenant=tenant)
    state.metrics.create_seconds.labels(info.isolation).observe(time.perf_counter() - started)
    return present(state, info)


def _metadata_filter(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"metadata filter {pair!r} must look like key=value")
        out[key] = value
    return out


def _cursor(info: SandboxInfo) -> str:
    return base64.urlsafe_b64encode(f"{info.created_at!r}|{info.sandbox_id}".encode()).decode()


def _after(cursor: str) -> tuple[float, str]:
    try:
        created, _, sandbox_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return float(created), sandbox_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest("cursor is not one this server returned; start again without it") from exc


@router.get("", summary="List sandboxes (oldest first), filtered by metadata and state, one page at a time")
async def list_sandboxes(
    state: State,
    tenant: TenantCaller,
    metadata: Annotated[list[str], Query(description="key=value; repeat to require several")] = [],  # noqa: B006
    state_: Annotated[list[SandboxState], Query(alias="state")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> dict[str, Any]:
    found = await state.service.list_sandboxes(
        tenant=tenant, metadata=_metadata_filter(metadata), states=frozenset(state_) if state_ else None
    )
    found.sort(key=lambda i: (i.created_at, i.sandbox_id))
    if cursor is not None:
        after = _after(cursor)
        found = [i for i in found if (i.created_at, i.sandbox_id) > after]
    page = found[:limit]
    return {
        "sandboxes": [present(state, i) for i in page],
        "next_cursor": _cursor(page[-1]) if len(found) > limit else None,
    }


@router.get("/{sandbox_id}/metrics", summary="The sandbox's CPU, memory and disk use over time, oldest first")
async def metrics(
    sandbox_id: str,
    state: State,
    tenant: TenantCaller,
    start: Annotated[float | None, Query(description="Unix seconds")] = None,
    end: Annotated[float | None, Query(description="Unix seconds")] = None,
) -> list[dict[str, Any]]:
    found = await state.service.metrics(sandbox_id, tenant=tenant, start=start, end=end)
    return [s.to_wire() for s in found]
