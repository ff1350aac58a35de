"""envd over HTTP/2. ``corral serve`` runs uvicorn, which speaks HTTP/1.1 only (the SDK's choice on plaintext
anyway: it negotiates HTTP/2 only by TLS ALPN). The same app under an ASGI server that speaks HTTP/2
(hypercorn, cleartext h2 with prior knowledge here) serves envd's unary and streaming RPCs over HTTP/2, with the
SDK's own Connect client (connectrpc on pyqwest, forced to HTTP/2) and both codecs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _e2b_server import E2BServer
from connectrpc.errors import ConnectError
from e2b.envd.client_shared import ENVD_JSON_CODEC
from e2b.envd.filesystem import filesystem_connect, filesystem_pb
from e2b.envd.process import process_connect, process_pb
from pyqwest import HTTPVersion, SyncClient, SyncHTTPTransport

from _corral_server import free_port
from conftest import Box

SERVE = """
import asyncio, sys
from hypercorn.asyncio import serve
from hypercorn.config import Config
from corral.core.settings import Settings
from corral.server.app import create_app
config = Config()
config.bind = [f"127.0.0.1:{sys.argv[1]}"]
config.accesslog = "-"
asyncio.run(serve(create_app(Settings.load(host="127.0.0.1", port=int(sys.argv[1]))), config))
"""


@pytest.fixture(scope="module")
def h2_url(module_env: E2BServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A second server on the E2B server's store (a data directory may be shared by several servers)."""
    port = free_port()
    log = tmp_path_factory.mktemp("h2") / "hypercorn.log"
    env = {**os.environ, "CORRAL_DATA_DIR": str(module_env.data_dir)}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port)], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)  # polling a port with a bound: nothing else says it listens
        yield url, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("codec", [None, ENVD_JSON_CODEC], ids=["proto", "json"])
def test_unary_and_streaming_rpcs_over_http2(box: Box, h2_url: tuple[str, Path], codec: object) -> None:
    url, log = h2_url
    client = SyncClient(SyncHTTPTransport(http_version=HTTPVersion.HTTP2))
    kw = {"codec": codec} if codec is not None else {}
    headers = {"E2b-Sandbox-Id": box.sandbox_id, "X-Access-Token": box.token}
    fs = filesystem_connect.FilesystemClientSync(url, http_client=client, **kw)
    assert fs.stat(filesystem_pb.StatRequest(path="/tmp"), headers=headers).entry.path == "/tmp"
    proc = process_connect.ProcessClientSync(url, http_client=client, **kw)
    start = process_pb.StartRequest(
        process=process_pb.ProcessConfig(cmd="/bin/sh", args=["-c", "echo over-h2"]), stdin=False
    )
    events = [e.event.event for e in proc.start(start, headers=headers)]
    assert [e.field for e in events] == ["start", "data", "end"]
    assert events[1].value.output.value == b"over-h2\n"
    with pytest.raises(ConnectError):
        fs.stat(filesystem_pb.StatRequest(path="/tmp"), headers={**headers, "X-Access-Token": "wrong"})
    assert '"POST /process.Process/Start 2" 200' in log.read_text()  # HTTP/2, as the server saw it
