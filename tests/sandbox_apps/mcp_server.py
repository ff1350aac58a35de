"""An MCP server (the official ``mcp`` SDK, streamable HTTP) that tests run INSIDE a sandbox.

PYTHONPATH=/tmp/site python3 mcp_server.py PORT
"""

import os
import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer("inside-sandbox")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def whereami() -> dict[str, object]:
    """Where this server runs: host name, user id, and whether the host's /work tree is visible."""
    return {"hostname": socket.gethostname(), "uid": os.getuid(), "sees_host_work": os.path.exists("/work")}


if __name__ == "__main__":
    sock = socket.create_server(("127.0.0.1", int(sys.argv[1])))  # bound before "ready"
    print("ready", flush=True)
    config = uvicorn.Config(server.streamable_http_app(host="127.0.0.1"), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
