"""Ports for API callers: one TCP connection into a sandbox per WebSocket (the SDK's remote ``forward_port``).

Browsers and HTTP clients reach sandbox ports through the proxy (``server/proxy.py``) with a traffic token;
this route is for a tenant's own tools, authenticated by API key like the rest of the API, and carries raw
bytes rather than HTTP: anything that speaks TCP (a database client, ssh, a debugger) can be forwarded.
"""

from __future__ import annotations

import json

import anyio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from corral.core.ports import PortStream
from corral.errors import CorralError
from corral.models import PORT_EOF_MESSAGE
from corral.server.app import _principal, _tenant

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/ports", tags=["ports"])


@router.websocket("/{port}/connect")
async def connect(websocket: WebSocket, sandbox_id: str, port: int) -> None:
    """A TCP connection to ``port`` on the sandbox's loopback, carried by this WebSocket.

    The server's first message is text: ``{"connected": true}``, or an ``{"error": …}`` body followed by
    close code 1011 (1008 for authentication). Then binary messages carry the bytes each way, and the text
    message ``"eof"`` is a half-close (no more bytes from that side). The server closes with 1000 once both
    sides are done, or 1011 if the connection inside breaks.
    """
    await websocket.accept()
    try:
        principal = await _principal(websocket)
        tenant = await _tenant(principal)
        stream = await websocket.app.state.corral.service.open_port(sandbox_id, port, tenant=tenant)
    except CorralError as exc:
        await websocket.send_text(json.dumps(exc.to_wire()))
        await websocket.close(1008 if exc.status in (401, 403) else 1011)
        return
    async with stream:
        await websocket.send_text(json.dumps({"connected": True}))
        outcome = await _relay(websocket, stream)
    if outcome is not None:
        await websocket.close(outcome)


async def _relay(websocket: WebSocket, stream: PortStream) -> int | None:
    """Both directions until both are done; the close code to send, or None when the client already left."""
    outcome: int | None = 1000

    async def inbound() -> None:  # client -> sandbox, until the client's half-close
        nonlocal outcome
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                outcome = None
                tg.cancel_scope.cancel()
                return
            if message.get("bytes"):
                await stream.send(message["bytes"])
            elif message.get("text") == PORT_EOF_MESSAGE:
                await stream.send_eof()
                return

    async def outbound() -> None:  # sandbox -> client, then the half-close
        async for chunk in stream:
            await websocket.send_bytes(chunk)
        await websocket.send_text(PORT_EOF_MESSAGE)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(inbound)
            tg.start_soon(outbound)
    except* (anyio.BrokenResourceError, anyio.ClosedResourceError, CorralError):
        outcome = 1011 if outcome is not None else None
    except* WebSocketDisconnect:
        outcome = None
    return outcome
