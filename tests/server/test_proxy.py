"""Sandbox ports from outside, through a real ``corral serve``: the HTTP/WebSocket port proxy (``get_url``),
and port forwarding in remote mode (one WebSocket per connection).

The servers run inside real sandboxes: a Starlette app (HTTP, server-sent events, WebSockets), an MCP server
on the official ``mcp`` SDK, and a raw TCP echo server. Their Python packages come from this virtualenv
(``tests/_sandbox_apps.py``). Clients here are httpx, httpx-ws, the ``mcp`` client, curl and plain sockets.
Every wait is on output, a response or a socket, with a bound.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator

import anyio
import httpx
import pytest
from httpx_ws import WebSocketUpgradeError, connect_ws
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from _sandbox_apps import ECHO_SERVER, cli_forward, recv_until, start_python_app, wait_for_line
from corral import Sandbox
from corral.errors import InvalidState, NotFound, Unsupported

pytestmark = [pytest.mark.root, pytest.mark.bwrap]

TIMEOUT = 60.0
WEB_PACKAGES = ("starlette", "uvicorn", "websockets")
WEB = 8000


@pytest.fixture(scope="module")
def remote(corral_server) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """The SDK in remote mode, configured the way users do it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORRAL_URL", corral_server.url)
        mp.setenv("CORRAL_API_KEY", corral_server.api_key)
        yield corral_server


@pytest.fixture(scope="module")
def web(remote: object) -> Iterator[Sandbox]:
    """A private-ports sandbox running the web app on 127.0.0.1:8000 (inside) and the echo server on 7000."""
    with Sandbox.create(isolation="namespace", timeout=900) as sbx:
        start_python_app(sbx, "web.py", "127.0.0.1", str(WEB), packages=WEB_PACKAGES)
        sbx.files.write("/tmp/echo.py", ECHO_SERVER)
        wait_for_line(sbx.commands.start("python3 -u /tmp/echo.py 7000"), "listening")
        yield sbx


def by_host(sbx: Sandbox, server_url: str, port: int = WEB, **headers: str) -> httpx.Client:
    """A client for ``sbx.get_url(port)``: it connects to the server and sends the wildcard host name, which
    is what DNS for ``*.domain`` (or ``*.localhost``) would make of it."""
    assert sbx.get_url(port) == f"http://{sbx.get_host(port)}"
    return httpx.Client(base_url=server_url, headers={"Host": sbx.get_host(port), **headers}, timeout=TIMEOUT)


def token_of(sbx: Sandbox) -> dict[str, str]:
    assert sbx.traffic_token
    return {"Corral-Traffic-Token": sbx.traffic_token}


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()["error"]
    return response.status_code, body["code"], body["message"]


def test_get_url_routes_by_host_name_with_the_token(web: Sandbox, remote) -> None:  # type: ignore[no-untyped-def]
    host = web.get_host(WEB)
    assert re.fullmatch(rf"{WEB}-{web.sandbox_id}\.localhost:\d+", host), host
    with by_host(web, remote.url, **token_of(web)) as client:
        r = client.get("/echo", params={"q": "1"}, headers={"X-Custom": "kept", "Cookie": "a=b"})
    assert r.status_code == 200 and r.headers["x-app"] == "sandbox-web"
    seen = r.json()
    assert seen["method"] == "GET" and seen["path"] == "/echo" and seen["query"] == "q=1"
    inside = seen["headers"]
    # the server inside sees a loopback Host (dev and MCP servers check it) and the original one forwarded
    assert inside["host"] == f"localhost:{WEB}" and inside["x-forwarded-host"] == host
    assert inside["x-forwarded-proto"] == "http" and inside["x-forwarded-for"] == "127.0.0.1"
    assert inside["x-custom"] == "kept" and inside["cookie"] == "a=b"
    # Corral's own headers never reach the sandbox: its code must not learn the token
    assert not {k for k in inside if k.startswith("corral-")}
    assert web.traffic_token not in str(inside)


def test_curl_resolves_the_url_itself(web: Sandbox) -> None:
    """curl maps *.localhost to the loopback address, so ``get_url`` works as printed."""
    token = web.traffic_token
    out = subprocess.run(
        ["curl", "-sS", "-H", f"Corral-Traffic-Token: {token}", web.get_url(WEB, "/echo?via=curl")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert '"query":"via=curl"' in out.stdout.replace(" ", "")


def test_header_routing_reaches_the_same_server(web: Sandbox, remote) -> None:  # type: ignore[no-untyped-def]
    headers = web.port_headers(WEB)
    assert headers["Corral-Sandbox-Id"] == web.sandbox_id and headers["Corral-Traffic-Token"]
    r = httpx.post(remote.url + "/echo", content=b"x" * 1000, headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["size"] == 1000
    # without the routing headers the same path is the API's (and unknown there)
    assert httpx.get(remote.url + "/echo", timeout=TIMEOUT).status_code == 404


def test_private_ports_need_the_sandbox_token(web: Sandbox, remote) -> None:  # type: ignore[no-untyped-def]
    with by_host(web, remote.url) as anonymous:
        status, code, message = error_of(anonymous.get("/echo"))
        assert (status, code) == (401, "unauthenticated") and "Corral-Traffic-Token" in message
        status, code, _ = error_of(anonymous.get("/echo", headers={"Corral-Traffic-Token": "guess"}))
        assert (status, code) == (403, "permission_denied")
        # an API key is not a traffic token (and is not passed on to the sandbox either)
        status, _, _ = error_of(anonymous.get("/echo", headers={"Authorization": f"Bearer {remote.api_key}"}))
        assert status == 401
    with (  # one sandbox's token opens no other
        Sandbox.create(isolation="namespace", timeout=300) as other,
        by_host(other, remote.url, **token_of(web)) as client,
    ):
        assert error_of(client.get("/"))[:2] == (403, "permission_denied")


def test_public_ports_need_no_token(remote) -> None:  # type: ignore[no-untyped-def]
    with Sandbox.create(isolation="namespace", timeout=300, public_ports=True) as sbx:
        assert sbx.traffic_token is None and "Corral-Traffic-Token" not in sbx.port_headers(WEB)
        sbx.files.write("/tmp/www/index.html", "public page\n")
        wait_for_line(sbx.commands.start("python3 -u -m http.server 8000 --directory /tmp/www"), "Serving")
        with by_host(sbx, remote.url) as anonymous:
            r = anonymous.get("/index.html")
        assert r.status_code == 200 and r.text == "public page\n"


def test_unknown_sandbox_closed_port_and_paused_sandbox_are_told_apart(
    web: Sandbox,
    remote,  # type: ignore[no-untyped-def]
) -> None:
    with httpx.Client(base_url=remote.url, timeout=TIMEOUT) as client:
        r = client.get("/", headers={"Host": f"{WEB}-sb-aaaaaaaaaaaaaaaa.localhost"})
        assert error_of(r) == (404, "not_found", "sandbox sb-aaaaaaaaaaaaaaaa was not found")
        r = client.get("/", headers={"Host": web.get_host(9), **token_of(web)})
        assert error_of(r) == (
            502,
            "port_closed",
            f"port 9 is not open in sandbox {web.sandbox_id}: nothing listens on it",
        )
        r = client.get("/", headers={"Corral-Sandbox-Id": web.sandbox_id, "Corral-Sandbox-Port": "99999"})
        assert error_of(r)[:2] == (400, "invalid_request")
    with Sandbox.create(isolation="namespace", timeout=300) as sbx:
        sbx.pause()
        with by_host(sbx, remote.url, **token_of(sbx)) as client:
            status, code, message = error_of(client.get("/"))
        assert (status, code) == (409, "invalid_state") and "paused" in message
        sbx.resume()
        with by_host(sbx, remote.url, **token_of(sbx)) as client:
            assert error_of(client.get("/"))[:2] == (502, "port_closed")
    with by_host(sbx, remote.url, **token_of(sbx)) as client:  # killed: gone, like an unknown one
        assert error_of(client.get("/"))[:2] == (404, "not_found")


def test_request_and_response_bodies_stream_through(web: Sandbox, remote) -> None:  # type: ignore[no-untyped-def]
    blob = os.urandom(3 * 1024 * 1024 + 17)

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked, relayed chunked
        for i in range(0, len(blob), 100_000):
            yield blob[i : i + 100_000]

    with by_host(web, remote.url, **token_of(web)) as client:
        seen = client.put("/echo", content=chunks()).json()
        assert seen["size"] == len(blob) and seen["sha256"] == hashlib.sha256(blob).hexdigest()
        assert seen["headers"].get("transfer-encoding") == "chunked"
        size = 20 * 1024 * 1024 + 5
        digest, total = hashlib.sha256(), 0
        with client.stream("GET", "/blob", params={"size": size}) as r:
            for chunk in r.iter_bytes():
                digest.update(chunk)
                total += len(chunk)
        expected = hashlib.sha256()
        pattern = bytes(range(256)) * 256
        for offset in range(0, size, len(pattern)):
            expected.update(pattern[: min(len(pattern), size - offset)])
        assert total == size and digest.hexdigest() == expected.hexdigest()
        assert client.head("/echo").status_code == 200


def test_server_sent_events_arrive_before_the_response_ends(web: Sandbox, remote) -> None:  # type: ignore[no-untyped-def]
    with by_host(web, remote.url, **token_of(web)) as client, client.stream("GET", "/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "data: first"  # the app holds the rest until /release: nothing was buffered
        assert client.post("/release").json() == {"released": True}
        rest = [line for line in lines if line]
    assert rest == ["data: 0", "data: 1", "data: 2"]


def test_websockets_through_the_proxy(web: Sandbox, remote) -> None:  # type: ignore[no-untyped-def]
    with (
        httpx.Client(base_url=remote.url, headers={"Host": web.get_host(WEB), **token_of(web)}) as client,
        connect_ws("/ws", client, subprotocols=["echo.v1"]) as ws,
    ):
        assert ws.subprotocol == "echo.v1"
        for i in range(50):
            ws.send_text(f"hello {i}")
            assert ws.receive_text() == f"echo:hello {i}"
        big = os.urandom(1024 * 1024)
        ws.send_bytes(big)
        assert ws.receive_bytes() == big[::-1]
        ws.send_text("bye")  # the app closes with its own code, which reaches us
        with pytest.raises(Exception) as closed:
            ws.receive_text()
        assert getattr(closed.value, "code", None) == 4000
    with (
        httpx.Client(base_url=remote.url, headers={"Host": web.get_host(WEB)}) as client,
        pytest.raises(WebSocketUpgradeError) as refused,
        connect_ws("/ws", client),
    ):
        pass
    assert refused.value.response.status_code == 401  # no token: refused before the upgrade


@pytest.mark.parametrize("isolation", ["namespace", pytest.param("gvisor", marks=[pytest.mark.runsc])])
def test_an_mcp_server_inside_lists_its_tools_through_the_proxy(remote, isolation: str) -> None:  # type: ignore[no-untyped-def]
    """The issue's example: an MCP server (streamable HTTP, official SDK) in a sandbox, used from outside."""
    with Sandbox.create(isolation=isolation, timeout=600) as sbx:
        start_python_app(sbx, "mcp_server.py", "9000", packages=("mcp",))

        async def use() -> dict[str, object]:
            async with (
                httpx.AsyncClient(headers=sbx.port_headers(9000), timeout=TIMEOUT) as http,
                streamable_http_client(remote.url + "/mcp", http_client=http) as (read, write, *_),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                tools = {t.name for t in (await session.list_tools()).tools}
                assert tools == {"add", "whereami"}
                added = await session.call_tool("add", {"a": 40, "b": 2})
                assert not added.is_error and added.structured_content == {"result": 42}
                where = await session.call_tool("whereami", {})
                assert not where.is_error and where.structured_content is not None
                return where.structured_content

        where = anyio.run(use)
    assert where["sees_host_work"] is False  # it ran in the sandbox, not on this host


HOSTILE_SERVER = r"""
import socket, sys, threading
srv = socket.create_server(("127.0.0.1", 8500))
print("listening", flush=True)
ANSWERS = {
    b"/garbage": b"SSH-2.0-not-http\r\n\r\n",
    b"/huge": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
    b"/short": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-this",
    b"/hangup": b"",
}
def serve(c):
    with c:
        head = c.recv(65536).split(b" ")[1]
        c.sendall(ANSWERS[head])
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def test_a_hostile_server_inside_gets_a_502_not_a_crash(web: Sandbox, remote) -> None:  # type: ignore[no-untyped-def]
    """What answers inside is untrusted: non-HTTP, oversized or malformed answers become clean errors."""
    web.files.write("/tmp/hostile.py", HOSTILE_SERVER)
    wait_for_line(web.commands.start("python3 -u /tmp/hostile.py"), "listening")
    with by_host(web, remote.url, port=8500, **token_of(web)) as client:
        for path in ("/garbage", "/huge", "/hangup"):
            r = client.get(path)
            assert error_of(r)[:2] == (502, "bad_upstream"), (path, r.text[:200])
        with pytest.raises(httpx.RemoteProtocolError):  # cut mid-body: the client sees a broken response
            client.get("/short")
        assert client.get("/echo", headers={"Host": web.get_host(WEB)}).status_code == 200  # still serving


def test_embedded_mode_has_no_urls() -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CORRAL_URL", raising=False)
        with (
            Sandbox.create(isolation="namespace", timeout=120) as sbx,
            pytest.raises(Unsupported, match="forward_port"),
        ):
            sbx.get_url(8000)


# -- port forwarding in remote mode --------------------------------------------------------------------------


def test_remote_forward_two_way_half_close_and_big_transfers(web: Sandbox) -> None:
    with web.forward_port(7000) as fwd, socket.create_connection(tuple(fwd), timeout=TIMEOUT) as sock:
        for i in range(50):
            sock.sendall(f"message {i}\n".encode())
            assert recv_until(sock, b"\n") == f"echo: message {i}\n".encode()
        big = os.urandom(16 * 1024 * 1024)
        sock.sendall(f"RAW {len(big)}\n".encode())
        sender = threading.Thread(target=sock.sendall, args=(big,))
        sender.start()  # both directions at once
        back, got = hashlib.sha256(), 0
        while got < len(big):
            chunk = sock.recv(1 << 20)
            assert chunk, f"connection ended after {got} bytes"
            back.update(chunk)
            got += len(chunk)
        sender.join(TIMEOUT)
        assert back.digest() == hashlib.sha256(big).digest()
        sock.shutdown(socket.SHUT_WR)  # half-close travels as "eof"; the server still answers
        assert recv_until(sock, b"bye\n") == b"bye\n"
        assert sock.recv(10) == b""


def test_remote_forward_errors(web: Sandbox) -> None:
    # a closed port: that connection is closed at once, the forward keeps serving the others
    with web.forward_port(9) as closed, socket.create_connection(tuple(closed), timeout=TIMEOUT) as sock:
        assert sock.recv(10) == b""
    sbx = Sandbox.create(isolation="namespace", timeout=120)
    try:
        sbx.pause()
        with pytest.raises(InvalidState, match="paused"), sbx.forward_port(80):
            pass
    finally:
        sbx.kill()
    with pytest.raises((InvalidState, NotFound)), sbx.forward_port(80):  # killed: refused up front
        pass


def test_cli_forward_in_remote_mode(web: Sandbox) -> None:
    with cli_forward(web.sandbox_id, WEB) as local_port:
        r = httpx.get(f"http://127.0.0.1:{local_port}/echo?via=forward", timeout=TIMEOUT)
        assert r.json()["query"] == "via=forward"
