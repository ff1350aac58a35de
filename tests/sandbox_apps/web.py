"""A web app that proxy tests run INSIDE a sandbox (uploaded, with packages from tests/_sandbox_python.py).

PYTHONPATH=/tmp/site python3 web.py HOST PORT
"""

import asyncio
import hashlib
import socket
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

released = asyncio.Event()


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": dict(request.headers),
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        },
        headers={"x-app": "sandbox-web"},
    )


async def events(request: Request) -> Response:
    """One event now, the rest only after POST /release: a client that sees the first while the response
    is still open proves the proxy streams instead of buffering."""

    async def gen():
        yield b"data: first\n\n"
        await released.wait()
        for i in range(3):
            yield f"data: {i}\n\n".encode()

    return StreamingResponse(gen(), media_type="text/event-stream")


async def release(request: Request) -> Response:
    released.set()
    return JSONResponse({"released": True})


async def blob(request: Request) -> Response:
    size = int(request.query_params["size"])
    pattern = bytes(range(256)) * 256

    async def gen():
        left = size
        while left:
            chunk = pattern[: min(left, len(pattern))]
            left -= len(chunk)
            yield chunk

    return StreamingResponse(gen(), media_type="application/octet-stream")


async def ws_echo(ws: WebSocket) -> None:
    chosen = "echo.v1" if "echo.v1" in ws.scope.get("subprotocols", []) else None
    await ws.accept(subprotocol=chosen)
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "bye":
            await ws.close(4000, "bye")
            return
        if message.get("text") is not None:
            await ws.send_text("echo:" + message["text"])
        else:
            await ws.send_bytes(message["bytes"][::-1])


app = Starlette(
    routes=[
        Route("/echo", echo, methods=["GET", "POST", "PUT", "DELETE", "HEAD"]),
        Route("/events", events),
        Route("/release", release, methods=["POST"]),
        Route("/blob", blob),
        WebSocketRoute("/ws", ws_echo),
    ]
)

if __name__ == "__main__":
    # bound before "ready" is printed, so the test can connect as soon as it reads it
    sock = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    config = uvicorn.Config(app, log_level="warning", ws="websockets")
    uvicorn.Server(config).run(sockets=[sock])
