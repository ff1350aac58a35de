"""Corral's MCP server: sandboxes as tools for any MCP client (Claude Desktop, IDE agents, …).

Built on the official ``mcp`` SDK (the ``[mcp]`` extra) and on Corral's own SDK, never on the core: it sits
beside the CLI, above ``client`` (``.importlinter``). ``corral mcp`` serves on stdio (what MCP clients spawn);
``corral mcp --http`` serves streamable HTTP at ``http://127.0.0.1:PORT/mcp``. The tools are in
:mod:`corral.mcp.server`.

For HTTP the listening socket is bound before the server starts, so ``--port 0`` works (a free port) and the
``listening on`` line on stderr is printed only once connections can be made.
"""

from __future__ import annotations

import socket
import sys

from corral.errors import Conflict
from corral.mcp.server import Session, build_server

__all__ = ["DEFAULT_HTTP_PORT", "Session", "build_server", "serve"]

DEFAULT_HTTP_PORT = 8765


async def serve(*, http: bool = False, host: str = "127.0.0.1", port: int = DEFAULT_HTTP_PORT) -> None:
    """Run the MCP server until its client goes away (stdio) or it is interrupted (HTTP)."""
    async with Session.open() as session:
        server = build_server(session)
        if not http:
            await server.run_stdio_async()
            return
        import uvicorn

        sock = _bind(host, port)
        bound = sock.getsockname()
        app = server.streamable_http_app(host=host)
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        print(f"corral mcp: listening on http://{url_host}:{bound[1]}/mcp", file=sys.stderr, flush=True)
        await uvicorn.Server(config).serve(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Conflict(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from exc
    sock.listen(128)
    return sock
