"""Warm pools: shared by every tenant (a claimed member is re-bound to its new tenant), so admins manage them;
any caller may read their state."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import Field

from corral.models import PoolInfo, PoolParams
from corral.server.app import Caller, State, _principal
from corral.server.routes._stream import NDJSON, ndjson_response, prefetched
from corral.server.schemas import _Strict

router = APIRouter(prefix="/v1/pools", tags=["pools"])

IsolationQ = Annotated[str | None, Query(max_length=64)]


class PoolBody(_Strict):
    template: Annotated[str, Field(min_length=1, max_length=63)]
    size: Annotated[int, Field(ge=0, le=1024)]
    isolation: Annotated[str, Field(max_length=64)] | None = None
    memory_mb: Annotated[int, Field(ge=16, le=1024 * 1024)] | None = None
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None


def _wire(info: PoolInfo) -> dict[str, Any]:
    return info.to_wire()


@router.put("", summary="Create or resize the pool of a template and isolation (admin)")
async def set_pool(body: PoolBody, state: State, _: Caller) -> dict[str, Any]:
    info = await state.service.pools.set(PoolParams(**body.model_dump()))
    return info.to_wire()


@router.get(
    "", summary="Pools with their target, ready and starting members", dependencies=[Depends(_principal)]
)
async def list_pools(state: State) -> dict[str, Any]:
    return {"pools": [p.to_wire() for p in await state.service.pools.list_pools()]}


@router.delete("/{template}", status_code=204, summary="Delete a pool and kill its members (admin)")
async def delete_pool(template: str, state: State, _: Caller, isolation: IsolationQ = None) -> Response:
    await state.service.pools.delete(template, isolation)
    return Response(status_code=204)


@router.post(
    "/{template}/fill",
    summary="Boot missing members now; progress streams as NDJSON (admin)",
    responses={200: {"content": {NDJSON: {}}}},
)
async def fill_pool(
    template: str, state: State, _: Caller, isolation: IsolationQ = None
) -> StreamingResponse:
    return ndjson_response(await prefetched(state.service.pools.fill(template, isolation)), _wire)
