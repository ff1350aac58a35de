"""Sandboxes: create, get, list (metadata filters, pagination), kill, timeout, network, pause, resume."""

from __future__ import annotations

import base64
import dataclasses
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query

from corral.errors import InvalidRequest
from corral.models import SandboxInfo, SandboxState
from corral.server.app import AppState, State, TenantCaller
from corral.server.schemas import CreateSandboxBody, ForkBody, NetworkBody, SnapshotBody, TimeoutBody

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])

MAX_PAGE = 1000


@router.post("", status_code=201, summary="Create a sandbox")
async def create(body: CreateSandboxBody, state: State, tenant: TenantCaller) -> dict[str, Any]:
    params = body.params()
    started = time.perf_counter()
    info = await state.service.create(params, tenant=tenant)
    state.metrics.create_seconds.labels(info.isolation).observe(time.perf_counter() - started)
    return _wire(state, info)


def _wire(state: AppState, info: SandboxInfo) -> dict[str, Any]:
    """A sandbox as the API shows it: with the domain its ports are served under by this server."""
    return dataclasses.replace(info, domain=state.settings.ports_domain).to_wire()


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
        "sandboxes": [_wire(state, i) for i in page],
        "next_cursor": _cursor(page[-1]) if len(found) > limit else None,
    }


@router.get("/{sandbox_id}", summary="Get one sandbox")
async def get(sandbox_id: str, state: State, tenant: TenantCaller) -> dict[str, Any]:
    return _wire(state, await state.service.get(sandbox_id, tenant=tenant))


@router.delete("/{sandbox_id}", summary="Kill a sandbox (idempotent)")
async def kill(sandbox_id: str, state: State, tenant: TenantCaller) -> dict[str, Any]:
    return _wire(state, await state.service.kill(sandbox_id, tenant=tenant))


@router.post("/{sandbox_id}/timeout", summary="Give the sandbox this many seconds more life, from now")
async def set_timeout(
    sandbox_id: str, body: TimeoutBody, state: State, tenant: TenantCaller
) -> dict[str, Any]:
    return _wire(state, await state.service.set_timeout(sandbox_id, body.timeout, tenant=tenant))


@router.put(
    "/{sandbox_id}/network",
    summary="Replace the sandbox's egress policy in place; open connections it now denies are cut",
)
async def update_network(
    sandbox_id: str, body: NetworkBody, state: State, tenant: TenantCaller
) -> dict[str, Any]:
    return _wire(state, await state.service.update_network(sandbox_id, body.value(), tenant=tenant))


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


@router.get("/{sandbox_id}/network", summary="The sandbox's egress policy and its decision counts")
async def network_status(sandbox_id: str, state: State, tenant: TenantCaller) -> dict[str, Any]:
    return (await state.service.network_status(sandbox_id, tenant=tenant)).to_wire()


@router.post("/{sandbox_id}/pause", summary="Pause (its deadline is suspended)")
async def pause(sandbox_id: str, state: State, tenant: TenantCaller) -> dict[str, Any]:
    return _wire(state, await state.service.pause(sandbox_id, tenant=tenant))


@router.post("/{sandbox_id}/resume", summary="Resume a paused sandbox")
async def resume(sandbox_id: str, state: State, tenant: TenantCaller) -> dict[str, Any]:
    return _wire(state, await state.service.resume(sandbox_id, tenant=tenant))


@router.post(
    "/{sandbox_id}/snapshot", status_code=201, summary="Save the sandbox as a template only you can use"
)
async def snapshot(sandbox_id: str, body: SnapshotBody, state: State, tenant: TenantCaller) -> dict[str, Any]:
    info = await state.service.snapshot(sandbox_id, body.name, description=body.description, tenant=tenant)
    return info.to_wire()


@router.post(
    "/{sandbox_id}/fork", status_code=201, summary="Make count independent copies of a running sandbox"
)
async def fork(sandbox_id: str, body: ForkBody, state: State, tenant: TenantCaller) -> dict[str, Any]:
    made = await state.service.fork(sandbox_id, body.count, tenant=tenant)
    return {"sandboxes": [_wire(state, i) for i in made]}
