"""``corral mcp``: run Corral's MCP server (stdio by default, ``--http`` for streamable HTTP).

The MCP package sits beside the CLI in the layer contract (both are thin layers over the SDK, neither imports
the other), so it is loaded by name when the command runs, as runtimes are: this also keeps the ``mcp``
dependency (the ``[mcp]`` extra) optional for every other command.
"""

from __future__ import annotations

import importlib

import anyio
import click

from corral.errors import Unsupported

__all__ = ["mcp"]


@click.command()
@click.option(
    "--http", is_flag=True, help="Serve streamable HTTP (at http://HOST:PORT/mcp) instead of stdio."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address for --http.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="Port for --http (0: any free port).",
)
def mcp(http: bool, host: str, port: int) -> None:
    """Run Corral's MCP server: sandboxes as tools for MCP clients (Claude Desktop, IDE agents).

    Example MCP client config: {"command": "corral", "args": ["mcp"]}
    """
    try:
        server = importlib.import_module("corral.mcp")
    except ModuleNotFoundError as exc:
        raise Unsupported("the MCP server needs the mcp package: pip install 'corral[mcp]'") from exc
    anyio.run(lambda: server.serve(http=http, host=host, port=port))
