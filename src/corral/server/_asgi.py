"""Plain ASGI answers shared by the middlewares (which run outside FastAPI's exception handlers)."""

from __future__ import annotations

import json

from starlette.types import Send

__all__ = ["send_error"]


async def send_error(send: Send, status: int, code: str, message: str, *, websocket: bool = False) -> None:
    """A JSON error body, ``{"error": {"code", "message", "details"}}``, as every API error has.

    ``websocket``: refuse a WebSocket handshake with this HTTP answer (the ASGI "websocket.http.response"
    extension), instead of answering an HTTP request.
    """
    body = json.dumps({"error": {"code": code, "message": message, "details": {}}}).encode()
    prefix = "websocket.http.response" if websocket else "http.response"
    await send(
        {
            "type": f"{prefix}.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": f"{prefix}.body", "body": body})
