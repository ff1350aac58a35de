"""What happens, as it happens: the live change stream, and one sandbox's audit entries.

``GET /v1/events`` is a long NDJSON stream fed by the service's own record writes (core/events.py), scoped to
the caller when it subscribes. A tenant key gets ``{"type": "snapshot", "sandboxes": […]}`` (its live
sandboxes, taken after subscribing, so no change falls between the two), then ``{"type": "sandbox",
"sandbox": {…}, "removed": bool}`` per change. An admin key gets the warm pools the same way (``snapshot``
with ``pools``, then ``{"type": "pools", "pools": […]}`` whenever a member changes). While nothing happens a
``{"type": "ping"}`` goes out every :data:`HEARTBEAT` seconds, and the key is checked again: a key revoked
meanwhile ends the stream with its ``{"error": …}`` line. ``{"type": "lagged"}`` ends a stream whose reader
fell too far behind: list again and reconnect.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from corral.core.auth import Principal
from corral.core.events import SandboxChange
from corral.errors import CorralError
from corral.models import SandboxState
from corral.server.app import AppState, State, TenantCaller, _principal
from corral.server.routes._stream import NDJSON
from corral.server.routes.unary import present as sandbox_wire

router = APIRouter(prefix="/v1", tags=["events"])

HEARTBEAT = 15.0
_LIVE = frozenset({SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED})


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


async def _pools(state: AppState) -> list[dict[str, Any]]:
    return [p.to_wire() for p in await state.service.pools.list_pools()]


async def _snapshot(state: AppState, principal: Principal) -> dict[str, Any]:
    if principal.tenant_id is None:
        return {"type": "snapshot", "pools": await _pools(state)}
    found = await state.service.list_sandboxes(tenant=principal.tenant_id, states=_LIVE)
    found.sort(key=lambda i: (i.created_at, i.sandbox_id))
    return {"type": "snapshot", "sandboxes": [sandbox_wire(state, i) for i in found]}


async def _event(state: AppState, principal: Principal, change: SandboxChange) -> dict[str, Any]:
    if principal.tenant_id is None:
        return {"type": "pools", "pools": await _pools(state)}
    info = sandbox_wire(state, change.record.info())
    return {"type": "sandbox", "sandbox": info, "removed": change.removed}


@router.get(
    "/events",
    summary="Live changes as NDJSON: your sandboxes (tenant keys) or the warm pools (admin keys)",
    responses={200: {"content": {NDJSON: {}}}},
)
async def events(
    request: Request, state: State, principal: Annotated[Principal, Depends(_principal)]
) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        with state.service.events.subscribe(principal.tenant_id) as changes:
            try:
                yield _line(await _snapshot(state, principal))
                while True:
                    change: SandboxChange | None = None
                    ended = False
                    with anyio.move_on_after(HEARTBEAT) as idle:
                        try:
                            change = await changes.receive()
                        except anyio.EndOfStream:
                            ended = True
                    if ended or (change is None and not idle.cancelled_caught):
                        yield _line({"type": "lagged"})  # dropped for falling behind: list again
                        return
                    if change is None:
                        await _principal(request)  # a key revoked since the stream opened ends it
                        yield _line({"type": "ping"})
                        continue
                    yield _line(await _event(state, principal, change))
            except CorralError as exc:
                yield _line(exc.to_wire())

    return StreamingResponse(
        lines(), media_type=NDJSON, headers={"cache-control": "no-store", "x-accel-buffering": "no"}
    )


@router.get(
    "/sandboxes/{sandbox_id}/audit", summary="Audit entries about one of your sandboxes, oldest first"
)
async def sandbox_audit(
    sandbox_id: str,
    state: State,
    tenant: TenantCaller,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> dict[str, Any]:
    entries = await state.service.sandbox_audit(sandbox_id, tenant=tenant, limit=limit)
    return {"entries": [e.to_wire() for e in entries]}
