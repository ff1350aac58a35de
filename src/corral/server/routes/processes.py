"""Processes: start (output as NDJSON, or a WebSocket for interactive use), list, re-attach, stdin, signal."""

from __future__ import annotations

import json
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response, StreamingResponse

from corral.errors import CorralError, InvalidRequest
from corral.models import EventKind, ProcessEvent
from corral.server.app import State, TenantCaller, _principal, _tenant
from corral.server.routes._stream import NDJSON, ndjson_response, prefetched
from corral.server.schemas import ExecBody, SignalBody

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/processes", tags=["processes"])

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {NDJSON: {}}, "description": "One JSON process event per line"}
}
MAX_STDIN_CHUNK = 4 * 1024 * 1024


def _wire(event: ProcessEvent) -> dict[str, Any]:
    return event.to_wire()


@router.post("", summary="Start a process; its events stream back as NDJSON", responses=_STREAM_DOC)
async def start(sandbox_id: str, body: ExecBody, state: State, tenant: TenantCaller) -> StreamingResponse:
    params = body.params()
    events = await prefetched(await state.service.exec(sandbox_id, params, tenant=tenant))
    state.metrics.execs.inc()
    return ndjson_response(events, _wire)


@router.get("", summary="Processes running (or kept) in the sandbox")
async def list_processes(sandbox_id: str, state: State, tenant: TenantCaller) -> dict[str, Any]:
    procs = await state.service.list_processes(sandbox_id, tenant=tenant)
    return {"processes": [p.to_wire() for p in procs]}


@router.get("/{process_id}/events", summary="Re-attach: kept output, then live events", responses=_STREAM_DOC)
async def attach(sandbox_id: str, process_id: str, state: State, tenant: TenantCaller) -> StreamingResponse:
    events = await prefetched(await state.service.attach(sandbox_id, process_id, tenant=tenant))
    return ndjson_response(events, _wire)


@router.post(
    "/{process_id}/stdin", status_code=204, summary="Write the raw request body to the process's stdin"
)
async def stdin(
    sandbox_id: str,
    process_id: str,
    request: Request,
    state: State,
    tenant: TenantCaller,
    eof: Annotated[bool, Query(description="close stdin after writing")] = False,
) -> Response:
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_STDIN_CHUNK:
            raise InvalidRequest(f"send stdin in pieces of at most {MAX_STDIN_CHUNK} bytes")
    await state.service.send_stdin(sandbox_id, process_id, data, eof=eof, tenant=tenant)
    return Response(status_code=204)


@router.post("/{process_id}/signal", status_code=204, summary="Send a signal (9 = SIGKILL)")
async def signal(
    sandbox_id: str, process_id: str, body: SignalBody, state: State, tenant: TenantCaller
) -> Response:
    await state.service.signal(sandbox_id, process_id, body.signal, tenant=tenant)
    return Response(status_code=204)


@router.websocket("/ws")
async def interactive(websocket: WebSocket, sandbox_id: str) -> None:
    """One process over one WebSocket, for interactive use.

    The client sends the start request (the same JSON as ``POST …/processes``) as its first text message, then
    any of ``{"stdin": "<latin-1 text>"}``, ``{"eof": true}``, ``{"signal": N}``. The server sends each
    process event as a JSON text message, then closes (1000) after ``exit``; errors arrive as one
    ``{"error": …}`` message and close code 1011 (1008 for authentication).
    """
    await websocket.accept()
    try:
        principal = await _principal(websocket)
        tenant = await _tenant(principal)
        state = websocket.app.state.corral
        params = ExecBody.model_validate_json(await websocket.receive_text()).params()
        events = await state.service.exec(sandbox_id, params, tenant=tenant)
    except CorralError as exc:
        await websocket.send_text(json.dumps(exc.to_wire()))
        await websocket.close(1008 if exc.status in (401, 403) else 1011)
        return
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        await websocket.send_text(json.dumps(InvalidRequest(f"bad start message: {exc}").to_wire()))
        await websocket.close(1011)
        return
    process_id: str | None = None

    async def pump_input() -> None:
        while True:
            message = json.loads(await websocket.receive_text())
            if not isinstance(message, dict) or process_id is None:
                continue
            if "stdin" in message or message.get("eof"):
                data = str(message.get("stdin", "")).encode("latin-1", errors="replace")
                await state.service.send_stdin(
                    sandbox_id, process_id, data, eof=bool(message.get("eof")), tenant=tenant
                )
            elif isinstance(message.get("signal"), int):
                await state.service.signal(sandbox_id, process_id, message["signal"], tenant=tenant)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump_input)
            async for event in events:
                if event.kind is EventKind.STARTED:
                    process_id = event.process_id
                await websocket.send_text(json.dumps(event.to_wire(), ensure_ascii=False))
                if event.kind in (EventKind.EXIT, EventKind.DETACHED):
                    break
            tg.cancel_scope.cancel()
        await websocket.close(1000)
    except WebSocketDisconnect:
        pass  # the client left: closing ``events`` below kills a foreground process
    except CorralError as exc:
        await websocket.send_text(json.dumps(exc.to_wire()))
        await websocket.close(1011)
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
