"""``corral mcp`` driven by a real MCP client session from the ``mcp`` SDK, over stdio and streamable HTTP.

Each test lists the tools, creates a namespace sandbox, runs a command, writes and reads a file, reaches a
server inside through get_port_url, sees Corral errors as tool errors (message, no traceback), kills the
sandbox, and checks it is gone. The stdio test also checks that sandboxes left running are killed when the
server stops.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from corral import Sandbox, SandboxState

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.anyio]

TOOLS = {
    "create_sandbox",
    "run_command",
    "read_file",
    "write_file",
    "list_files",
    "get_port_url",
    "kill_sandbox",
    "list_sandboxes",
    "run_code",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def text_of(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def call(session: ClientSession, name: str, **arguments: Any) -> Any:
    result = await session.call_tool(name, arguments)
    assert not result.is_error, text_of(result)
    return result.structured_content


async def exercise(session: ClientSession, server_url: str | None = None) -> str:
    """The whole tour; returns the id of a second sandbox it leaves running."""
    await session.initialize()
    tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) >= TOOLS
    assert tools["run_command"].description and "exit code" in tools["run_command"].description
    props = tools["create_sandbox"].input_schema["properties"]
    assert "isolation" in props and "gvisor" in str(props["isolation"])
    assert set(tools["run_command"].input_schema["required"]) == {"sandbox_id", "command"}

    info = await call(session, "create_sandbox", isolation="namespace", timeout=300)
    sid = info["sandbox_id"]
    assert sid.startswith("sb-") and info["state"] == "running"
    try:
        ran = await call(session, "run_command", sandbox_id=sid, command="echo hi; echo err >&2; exit 3")
        assert ran["stdout"] == "hi\n" and ran["stderr"] == "err\n" and ran["exit_code"] == 3

        wrote = await call(
            session, "write_file", sandbox_id=sid, path="/home/user/a/b.txt", content="héllo\n"
        )
        assert wrote["bytes_written"] == len("héllo\n".encode())
        read = await session.call_tool("read_file", {"sandbox_id": sid, "path": "/home/user/a/b.txt"})
        assert not read.is_error and text_of(read) == "héllo\n"
        listed = await call(session, "list_files", sandbox_id=sid, path="/home/user/a")
        entries = listed["result"] if isinstance(listed, dict) else listed
        assert {"path": "/home/user/a/b.txt", "type": "file", "size": 7} in entries

        await call(
            session,
            "run_command",
            sandbox_id=sid,
            command="cd /home/user/a && nohup python3 -m http.server 8000 >/dev/null 2>&1 &",
        )
        await call(
            session,
            "run_command",
            sandbox_id=sid,  # wait inside the sandbox until the server accepts
            command="python3 -c \"import socket,time\nfor _ in range(200):\n try: socket.create_connection(('127.0.0.1',8000)); break\n except OSError: time.sleep(0.05)\"",
        )
        port = await call(session, "get_port_url", sandbox_id=sid, port=8000)
        if server_url is None:  # embedded: a forward on this machine
            body = await anyio.to_thread.run_sync(
                lambda: urllib.request.urlopen(port["url"] + "/b.txt", timeout=30).read()
            )
        else:  # the server's proxy, by the URL's host name, with the sandbox's token
            assert port["url"] == f"http://{port['host']}" and port["headers"]["Corral-Traffic-Token"]
            async with httpx.AsyncClient(base_url=server_url, timeout=30) as http:
                body = (await http.get("/b.txt", headers={"Host": port["host"], **port["headers"]})).content
        assert body == "héllo\n".encode()

        # Corral errors are tool errors with Corral's message, never a traceback
        missing = await session.call_tool("read_file", {"sandbox_id": sid, "path": "/nope"})
        assert missing.is_error and "/nope" in text_of(missing) and "Traceback" not in text_of(missing)
        unknown = await session.call_tool(
            "run_command", {"sandbox_id": "sb-0000000000000000", "command": "true"}
        )
        assert unknown.is_error and "not found" in text_of(unknown)
        closed = await session.call_tool("get_port_url", {"sandbox_id": sid, "port": 0})
        assert closed.is_error  # schema validation: ports are 1-65535
        bad = await session.call_tool("create_sandbox", {"isolation": "vm"})
        assert bad.is_error and "Traceback" not in text_of(bad)

        listed_sandboxes = await call(session, "list_sandboxes")
        ids = [s["sandbox_id"] for s in listed_sandboxes["result"]]
        assert sid in ids
    finally:
        killed = await call(session, "kill_sandbox", sandbox_id=sid)
    assert killed["state"] == "stopped"
    after = await session.call_tool("run_command", {"sandbox_id": sid, "command": "true"})
    assert after.is_error and "no longer running" in text_of(after)

    left = await call(session, "create_sandbox", isolation="namespace", timeout=300)
    return str(left["sandbox_id"])


def assert_stopped(sandbox_id: str) -> None:
    states = {i.sandbox_id: i.state for i in Sandbox.list(include_stopped=True)}
    assert states.get(sandbox_id) is SandboxState.STOPPED, states.get(sandbox_id)


async def test_stdio() -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "corral.cli.main", "mcp"], env=dict(os.environ)
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        left = await exercise(session)
    assert_stopped(left)  # the server killed what it created when its client went away


async def test_stdio_through_a_corral_server(corral_server) -> None:  # type: ignore[no-untyped-def]
    """``corral mcp`` in remote mode: the same tools, and get_port_url answers with the proxy's URL."""
    remote = {"CORRAL_URL": corral_server.url, "CORRAL_API_KEY": corral_server.api_key}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "corral.cli.main", "mcp"], env={**os.environ, **remote}
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        left = await exercise(session, server_url=corral_server.url)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in remote.items():
            mp.setenv(key, value)
        assert_stopped(left)


@asynccontextmanager
async def http_server() -> AsyncIterator[str]:
    proc = await anyio.open_process(
        [sys.executable, "-m", "corral.cli.main", "mcp", "--http", "--port", "0"], stdout=None
    )
    try:
        assert proc.stderr is not None
        line = b""
        with anyio.fail_after(60):
            while b"\n" not in line:  # the server prints this line once it listens
                line += await proc.stderr.receive()
        match = re.search(rb"listening on (http://127\.0\.0\.1:\d+/mcp)", line)
        assert match, line
        yield match.group(1).decode()
    finally:
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(60):
            code = await proc.wait()
        assert code in (0, 130), code  # 130: interrupted, as a shell reports SIGINT


async def test_streamable_http() -> None:
    async with http_server() as url:
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
            left = await exercise(session)
        # a new session sees the sandbox the first one left running
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            ids = [s["sandbox_id"] for s in (await call(session, "list_sandboxes"))["result"]]
            assert left in ids
    assert_stopped(left)  # killed when the server stopped
