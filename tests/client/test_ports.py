"""Ports of real sandboxes (namespace and gVisor), reached from this machine through the agent.

Servers run inside the sandbox (python3 -m http.server, a line echo server); clients here use plain sockets
and urllib through ``sbx.forward_port`` (the embedded SDK) and ``corral sandbox forward`` (the CLI). Every
wait is on output or a socket, with a bound.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator

import anyio
import pytest

from _sandbox_apps import ECHO_SERVER, cli_forward, recv_until, wait_for_line
from corral import Sandbox
from corral.client._local import AsyncLocalBackend
from corral.core.records import LOCAL_TENANT
from corral.errors import InvalidRequest, NotFound, PortClosed

TIMEOUT = 60.0
BIG = 50 * 1024 * 1024


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("namespace", marks=[pytest.mark.root, pytest.mark.bwrap]),
        pytest.param("gvisor", marks=[pytest.mark.root, pytest.mark.runsc]),
    ],
)
def sbx(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    with Sandbox.create(isolation=request.param, timeout=900) as sandbox:
        sandbox.files.write("/tmp/echo.py", ECHO_SERVER)
        sandbox.files.write("/tmp/www/index.html", "<h1>hello from the sandbox</h1>\n")
        wait_for_line(sandbox.commands.start("python3 -u /tmp/echo.py 7000"), "listening")
        web = sandbox.commands.start("python3 -u -m http.server 8000 --directory /tmp/www")
        wait_for_line(web, "Serving HTTP")
        yield sandbox


def test_http_server_inside_reached_through_a_forward(sbx: Sandbox) -> None:
    with sbx.forward_port(8000) as fwd:
        host, port = fwd
        assert host == "127.0.0.1" and port > 0 and fwd.url == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(fwd.url + "/index.html", timeout=TIMEOUT) as resp:
            assert resp.status == 200
            assert resp.read() == b"<h1>hello from the sandbox</h1>\n"


def test_bidirectional_exchange_and_half_close(sbx: Sandbox) -> None:
    with sbx.forward_port(7000) as fwd, socket.create_connection(tuple(fwd), timeout=TIMEOUT) as sock:
        for i in range(100):  # each answer arrives before the next message is sent: a live two-way stream
            sock.sendall(f"message {i}\n".encode())
            assert recv_until(sock, b"\n") == f"echo: message {i}\n".encode()
        sock.shutdown(socket.SHUT_WR)  # half-close: the server sees eof and still answers
        assert recv_until(sock, b"bye\n") == b"bye\n"
        assert sock.recv(10) == b""  # and then the server's end arrives


def test_50_mib_each_way_checksummed(sbx: Sandbox) -> None:
    sbx.commands.run(f"head -c {BIG} /dev/urandom > /tmp/www/big.bin", check=True, timeout=120)
    inside = sbx.commands.run("sha256sum /tmp/www/big.bin", check=True, timeout=120).stdout.split()[0]
    with sbx.forward_port(8000) as fwd:
        digest = hashlib.sha256()
        total = 0
        with urllib.request.urlopen(fwd.url + "/big.bin", timeout=TIMEOUT) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                total += len(chunk)
        assert total == BIG and digest.hexdigest() == inside

    blob = os.urandom(BIG)
    with sbx.forward_port(7000) as fwd, socket.create_connection(tuple(fwd), timeout=TIMEOUT) as sock:
        sock.sendall(f"RAW {BIG}\n".encode())
        sender = threading.Thread(target=sock.sendall, args=(blob,))
        sender.start()  # both directions at once: the echo comes back while we are still sending
        back = hashlib.sha256()
        got = 0
        while got < BIG:
            chunk = sock.recv(1 << 20)
            assert chunk, f"connection ended after {got} bytes"
            back.update(chunk)
            got += len(chunk)
        sender.join(TIMEOUT)
        assert back.digest() == hashlib.sha256(blob).digest()
    sbx.commands.run("rm /tmp/www/big.bin")


def test_many_concurrent_connections(sbx: Sandbox) -> None:
    def fetch(i: int) -> bytes:
        with urllib.request.urlopen(fwd.url + f"/index.html?{i}", timeout=TIMEOUT) as resp:
            return resp.read()

    def chat(i: int) -> bytes:
        with socket.create_connection(tuple(fwd), timeout=TIMEOUT) as sock:
            sock.sendall(f"client {i}\n".encode())
            return recv_until(sock, b"\n")

    with sbx.forward_port(8000) as fwd, concurrent.futures.ThreadPoolExecutor(32) as pool:
        pages = list(pool.map(fetch, range(64)))
    assert pages == [b"<h1>hello from the sandbox</h1>\n"] * 64
    with sbx.forward_port(7000) as fwd, concurrent.futures.ThreadPoolExecutor(32) as pool:
        socks = list(pool.map(chat, range(64)))
    assert socks == [f"echo: client {i}\n".encode() for i in range(64)]


def test_closed_port(sbx: Sandbox) -> None:
    async def check() -> None:
        backend = AsyncLocalBackend.from_env()
        try:
            with pytest.raises(PortClosed, match=f"port 9 is not open in sandbox {sbx.sandbox_id}"):
                await backend.service.open_port(sbx.sandbox_id, 9, tenant=LOCAL_TENANT)
            with pytest.raises(InvalidRequest):
                await backend.service.open_port(sbx.sandbox_id, 0, tenant=LOCAL_TENANT)
            with pytest.raises(NotFound):
                await backend.service.open_port("sb-0000000000000000", 8000, tenant=LOCAL_TENANT)
            # still works after errors
            stream = await backend.service.open_port(sbx.sandbox_id, 7000, tenant=LOCAL_TENANT)
            async with stream:
                await stream.send(b"after\n")
                assert await stream.receive() == b"echo: after\n"
        finally:
            await backend.aclose()

    anyio.run(check)
    # through a forward, a connection to a closed port is closed at once; the forward keeps listening
    with sbx.forward_port(9) as fwd:
        for _ in range(2):
            with (
                socket.create_connection(tuple(fwd), timeout=TIMEOUT) as sock,
                contextlib.suppress(ConnectionResetError),
            ):
                assert sock.recv(10) == b""


def test_the_hosts_loopback_is_out_of_reach(sbx: Sandbox) -> None:
    """A service on the host's 127.0.0.1 is reachable neither by port.connect nor by code inside."""
    secret = b"host-secret-banner"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    accepted: list[bytes] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(b"x")
            with c:
                c.sendall(secret)

    stop = threading.Event()
    t = threading.Thread(target=serve)
    t.start()
    try:

        async def via_agent() -> None:
            backend = AsyncLocalBackend.from_env()
            try:
                with pytest.raises(PortClosed):
                    await backend.service.open_port(sbx.sandbox_id, port, tenant=LOCAL_TENANT)
            finally:
                await backend.aclose()

        anyio.run(via_agent)
        probe = (
            "import socket\n"
            "for host in ('127.0.0.1', '::1', 'localhost', '0.0.0.0'):\n"
            "    try:\n"
            f"        s = socket.create_connection((host, {port}), timeout=3)\n"
            "        print('CONNECTED', host, s.recv(100))\n"
            "    except OSError as e:\n"
            "        print('refused', host, type(e).__name__)\n"
        )
        out = sbx.commands.run(["python3", "-c", probe], timeout=60)
        assert "CONNECTED" not in out.stdout and out.stdout.count("refused") == 4, out
    finally:
        stop.set()
        srv.close()
        t.join(TIMEOUT)
    assert accepted == []  # the host service never saw a connection from the sandbox


@pytest.mark.root
@pytest.mark.bwrap
def test_cli_forward() -> None:
    with Sandbox.create(isolation="namespace", timeout=300) as box:
        box.files.write("/tmp/site/index.html", "cli forward works\n")
        wait_for_line(box.commands.start("python3 -u -m http.server 8100 --directory /tmp/site"), "Serving")
        with cli_forward(box.sandbox_id, 8100) as local_port:
            url = f"http://127.0.0.1:{local_port}/index.html"
            with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
                assert resp.read() == b"cli forward works\n"
        bad = subprocess.run(
            [sys.executable, "-m", "corral.cli.main", "sandbox", "forward", "sb-0000000000000000", "80"],
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert bad.returncode == 1 and b"not found" in bad.stderr and b"Traceback" not in bad.stderr


def test_a_client_that_goes_away_closes_its_port_connections(sbx: Sandbox) -> None:
    """The shim aborts the port connections of a host client that disconnects without closing them."""
    watcher = sbx.commands.start(
        [
            "python3",
            "-u",
            "-c",
            "import socket\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('127.0.0.1', 7100)); s.listen(1); print('listening')\n"
            "c, _ = s.accept(); print('accepted')\n"
            "print('closed' if c.recv(10) == b'' else 'data')\n",
        ]
    )
    wait_for_line(watcher, "listening")

    async def leave_without_closing() -> None:
        backend = AsyncLocalBackend.from_env()
        stream = await backend.service.open_port(sbx.sandbox_id, 7100, tenant=LOCAL_TENANT)
        assert stream.port == 7100
        await backend.aclose()  # the agent connection goes; the stream is never closed

    anyio.run(leave_without_closing)
    result = watcher.wait()
    assert result.stdout == "listening\naccepted\nclosed\n" and result.exit_code == 0
