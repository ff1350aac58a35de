"""``python -m corral.mcp [--http [--host H] [--port P]]``: the same server as ``corral mcp``."""

from __future__ import annotations

import argparse

import anyio

from corral.mcp import DEFAULT_HTTP_PORT, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m corral.mcp", description="Corral's MCP server.")
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT)
    args = parser.parse_args(argv)
    anyio.run(lambda: serve(http=args.http, host=args.host, port=args.port))


if __name__ == "__main__":
    main()
