"""Terminals (PTY) and directory watches.

A terminal is a process: its output comes through the processes' ``…/events`` stream (``pty`` events), its
input through ``…/stdin`` and its end through ``…/signal``; this module adds opening one and resizing it. A
watch is a long NDJSON stream of file-system events; closing the request ends the watch in the sandbox.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import Field

from corral.models import FilesystemEvent, PtyParams
from corral.server.app import State, TenantCaller
from corral.server.routes._stream import NDJSON, ndjson_response, prefetched
from corral.server.schemas import _Strict

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["terminals and watches"])

Size = Annotated[int, Field(ge=1, le=1000)]


class PtyBody(_Strict):
    cols: Size = 80
    rows: Size = 24
    cmd: Annotated[str, Field(min_length=1, max_length=131072)] | None = None
    argv: (
        Annotated[list[Annotated[str, Field(max_length=131072)]], Field(min_length=1, max_length=4096)] | None
    ) = None
    env: dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=32768)]] = Field(
        default_factory=dict
    )
    cwd: Annotated[str, Field(max_length=4096)] | None = None
    user: Annotated[str, Field(max_length=64)] | None = None
    timeout: Annotated[float, Field(gt=0)] | None = None
    tag: Annotated[str, Field(max_length=128)] | None = None


class ResizeBody(_Strict):
    cols: Size
    rows: Size


@router.post("/pty", status_code=201, summary="Open a terminal; returns its started event (process id, pid)")
async def create_pty(sandbox_id: str, body: PtyBody, state: State, tenant: TenantCaller) -> dict[str, Any]:
    started = await state.service.create_pty(sandbox_id, PtyParams(**body.model_dump()), tenant=tenant)
    return started.to_wire()


@router.post("/processes/{process_id}/resize", status_code=204, summary="Resize a terminal")
async def resize_pty(
    sandbox_id: str, process_id: str, body: ResizeBody, state: State, tenant: TenantCaller
) -> Response:
    await state.service.resize_pty(sandbox_id, process_id, body.cols, body.rows, tenant=tenant)
    return Response(status_code=204)


@router.get(
    "/files/watch",
    summary="Watch a directory: file-system events as NDJSON until the request is closed",
    responses={200: {"content": {NDJSON: {}}}},
)
async def watch_dir(
    sandbox_id: str,
    path: Annotated[str, Query(min_length=1, max_length=4096)],
    state: State,
    tenant: TenantCaller,
    recursive: bool = False,
    user: Annotated[str | None, Query(max_length=64)] = None,
) -> StreamingResponse:
    events = await state.service.watch_dir(sandbox_id, path, recursive=recursive, user=user, tenant=tenant)

    def wire(event: FilesystemEvent) -> dict[str, Any]:
        return event.to_wire()

    return ndjson_response(await prefetched(events), wire)
