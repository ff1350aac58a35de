"""``corral serve --http2``: the real server (hypercorn, server/run.py) speaks HTTP/2 and HTTP/1.1 on one port.

In the clear by prior knowledge (h2c: httpx with ``http1=False, http2=True``), with TLS by ALPN (``h2``); the SDK
creates a sandbox and runs a command over HTTP/2; WebSockets (the interactive process endpoint, port forwarding)
work as before. Both servers (uvicorn without the flag, hypercorn with it) write the same lifecycle lines, end
gracefully on SIGTERM (the process then ends by that signal, as uvicorn makes it) and exit 3 with one error line
when the port is taken.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from _corral_server import Server, check_ws_process_stdin, free_port, new_key
from _sandbox_apps import wait_for_line
from corral import Sandbox
from corral.client._sync.remote import RemoteBackend
from corral.server.certs import make_certs
from corral.server.run import GRACEFUL_SECONDS

CORRAL = [sys.executable, "-m", "corral.cli.main"]
LIFECYCLE = [  # uvicorn's lines, in order; server/run.py writes the same under hypercorn
    "Started server process",
    "Waiting for application startup.",
    "Application startup complete.",
    "Shutting down",
    "Waiting for application shutdown.",
    "Application shutdown complete.",
    "Finished server process",
]
DOMAIN = "h2.test"


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "CORRAL_DATA_DIR": str(tmp_path / "data")}


def _records(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def h2_server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(_env(tmp_path), tmp_path / "server.log", args=("--http2",))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_h2c_by_prior_knowledge_and_http1_on_the_same_port(h2_server: Server) -> None:
    with httpx.Client(base_url=h2_server.url, http1=False, http2=True) as h2:
        resp = h2.get("/healthz")
        assert (resp.http_version, resp.status_code) == ("HTTP/2", 200)
        assert h2.get("/v1/sandboxes").status_code == 401  # the whole app, not just a health check
    with httpx.Client(base_url=h2_server.url) as h1:
        resp = h1.get("/healthz")
        assert (resp.http_version, resp.status_code) == ("HTTP/1.1", 200)
    access = [r for r in _records(h2_server.log) if r["logger"] == "corral.server.access"]
    assert [r["http_version"] for r in access if r["route"] == "/healthz"][-2:] == ["2", "1.1"], access
    assert "(HTTP/2 and HTTP/1.1; data:" in h2_server.log.read_text().replace("\n", "")


def test_without_the_flag_uvicorn_speaks_http1_only(tmp_path: Path) -> None:
    srv = Server(_env(tmp_path), tmp_path / "server.log")
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, http1=False, http2=True) as h2, pytest.raises(httpx.HTTPError):
            h2.get("/healthz")  # uvicorn does not speak HTTP/2: the prior-knowledge preface is refused
        assert httpx.get(srv.url + "/healthz").http_version == "HTTP/1.1"
    finally:
        srv.stop()


def test_tls_offers_h2_by_alpn(tmp_path: Path) -> None:
    certs = make_certs(DOMAIN, tmp_path / "certs")
    env = {**_env(tmp_path), "CORRAL_TLS_CERT": str(certs.cert), "CORRAL_TLS_KEY": str(certs.key)}
    health = ssl.create_default_context(cafile=str(certs.ca_cert))
    health.check_hostname = False  # /healthz by address; the chain is still verified
    srv = Server(env, tmp_path / "server.log", tls=health, args=("--http2",))
    srv.start()
    try:
        trust = ssl.create_default_context(cafile=str(certs.ca_cert))
        sni = {"sni_hostname": DOMAIN}  # the certificate's name, checked, on 127.0.0.1
        with httpx.Client(base_url=srv.url, verify=trust, http2=True) as client:  # offers h2 and http/1.1
            resp = client.get("/healthz", extensions=sni)
            assert (resp.http_version, resp.status_code) == ("HTTP/2", 200)
        with httpx.Client(base_url=srv.url, verify=trust) as h1:  # offers http/1.1 only
            assert h1.get("/healthz", extensions=sni).http_version == "HTTP/1.1"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
            trust.set_alpn_protocols(["h2", "http/1.1"])
            with trust.wrap_socket(raw, server_hostname=DOMAIN) as tls:
                assert tls.selected_alpn_protocol() == "h2"
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("http2", "stream_h2"),
    [(False, False), (True, False), (True, True)],
    ids=["uvicorn", "hypercorn-h1-stream", "hypercorn-h2-stream"],
)
def test_sigterm_ends_it_gracefully_with_the_lifecycle_lines(
    tmp_path: Path, http2: bool, stream_h2: bool
) -> None:
    env = _env(tmp_path)
    key = new_key(env, "--tenant", "g")
    srv = Server(env, tmp_path / "server.log", args=("--http2",) if http2 else ())
    srv.start()
    assert srv.proc is not None
    # an open stream (GET /v1/events never ends by itself) gets the grace period, then the server ends anyway
    with (
        httpx.Client(
            base_url=srv.url, headers={"X-API-Key": key}, http1=not stream_h2, http2=stream_h2
        ) as client,
        client.stream("GET", "/v1/events", timeout=60) as stream,
    ):
        assert stream.http_version == ("HTTP/2" if stream_h2 else "HTTP/1.1")
        lines = stream.iter_lines()
        assert json.loads(next(lines))["type"] == "snapshot"
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == -signal.SIGTERM  # the signal raised again once all is closed
        assert time.monotonic() - started < GRACEFUL_SECONDS + 10
    records = _records(srv.log)
    server_logger = "hypercorn.error" if http2 else "uvicorn.error"
    lines = [str(r["message"]) for r in records if r["logger"] == server_logger]
    seen = [want for want in LIFECYCLE for line in lines if line.startswith(want)]
    assert seen == LIFECYCLE, lines
    assert f"[{srv.proc.pid}]" in lines[0] and f"[{srv.proc.pid}]" in lines[-1], lines
    if http2:  # uvicorn logs the cancelled stream's traceback ("Exception in ASGI application"): its own way
        assert "Traceback" not in srv.log.read_text()


@pytest.mark.parametrize("http2", [False, True], ids=["uvicorn", "hypercorn"])
def test_sigint_stops_it_gracefully_and_exits_0(tmp_path: Path, http2: bool) -> None:
    """Ctrl-C: uvicorn.run swallows the KeyboardInterrupt it raises again after its shutdown; hypercorn's path
    does the same."""
    srv = Server(_env(tmp_path), tmp_path / "server.log", args=("--http2",) if http2 else ())
    # the child gets SIG_DFL for SIGINT (a Python handler is reset at exec), whatever this process inherited
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        srv.start()
    finally:
        signal.signal(signal.SIGINT, before)
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(timeout=30) == 0
    lines = [str(r["message"]) for r in _records(srv.log) if str(r["logger"]).endswith(".error")]
    assert "Shutting down" in lines and lines[-1].startswith("Finished server process"), lines
    assert "Traceback" not in srv.log.read_text()


@pytest.mark.parametrize("http2", [False, True], ids=["uvicorn", "hypercorn"])
def test_a_port_in_use_is_one_error_line_and_exit_3(tmp_path: Path, http2: bool) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        made = subprocess.run(
            [*CORRAL, "serve", "--port", str(port), *(["--http2"] if http2 else [])],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert made.returncode == 3, made.stderr
    assert "Traceback" not in made.stderr, made.stderr
    records = [json.loads(line) for line in made.stderr.splitlines() if line.startswith("{")]
    errors = [r for r in records if r["level"] == "ERROR"]
    assert len(errors) == 1, made.stderr
    assert "address already in use" in str(errors[0]["message"]) and str(port) in str(errors[0]["message"])


def test_the_config_file_turns_it_on(tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text("[server]\nhttp2 = true\n")
    port = free_port()
    proc = subprocess.Popen(
        [*CORRAL, "serve", "--port", str(port), "--config", str(config)],
        env=_env(tmp_path),
        stderr=subprocess.PIPE,
    )
    try:
        with closing(httpx.Client(http1=False, http2=True, timeout=5)) as h2:
            for _ in range(600):
                try:
                    assert h2.get(f"http://127.0.0.1:{port}/healthz").http_version == "HTTP/2"
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, "corral serve exited"
                    time.sleep(0.1)  # polling a port with a bound: nothing else says it listens
            else:
                pytest.fail("corral serve did not start")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.root
@pytest.mark.bwrap
def test_sdk_sandbox_command_and_websockets_under_http2(tmp_path: Path, corral_data_dir: Path) -> None:
    # own data dir under the session's (the leak check covers it), short: sandboxes put sockets below it
    env = {**os.environ, "CORRAL_DATA_DIR": str(corral_data_dir / f"h2-{os.getpid()}")}
    key = new_key(env, "--tenant", "h2")
    srv = Server(env, tmp_path / "server.log", args=("--http2",))
    srv.start()
    versions: list[str] = []
    http = httpx.Client(
        base_url=srv.url,
        headers={"X-API-Key": key},
        http1=False,
        http2=True,
        timeout=120,
        event_hooks={"response": [lambda r: versions.append(r.http_version)]},
    )
    try:
        with closing(RemoteBackend(srv.url, api_key=key, http=http)) as api:
            box = Sandbox.create(isolation="namespace", timeout=300, backend=api)
            try:
                result = box.commands.run("echo over-h2; echo err >&2", timeout=60)
                assert (result.exit_code, result.stdout, result.stderr) == (0, "over-h2\n", "err\n")
                box.files.write("/tmp/www/index.html", "hello over a forward\n")
                assert set(versions) == {"HTTP/2"}, versions  # create, exec's NDJSON stream, the upload

                # WebSockets (HTTP/1.1 Upgrade) under hypercorn: the interactive process endpoint ...
                check_ws_process_stdin(srv.url, box.sandbox_id, key)

                # ... and port forwarding (a WebSocket per forwarded connection)
                web = box.commands.start("python3 -u -m http.server 8000 --directory /tmp/www")
                wait_for_line(web, "Serving HTTP")
                with box.forward_port(8000) as fwd, urllib.request.urlopen(fwd.url + "/index.html") as r:
                    assert r.read() == b"hello over a forward\n"
            finally:
                box.kill()
    finally:
        srv.stop()
