"""envd over HTTP/2, under the real ``corral serve --http2`` (hypercorn, server/run.py), on the E2B server's store.

The SDK's own Connect client (connectrpc on pyqwest, forced to HTTP/2: h2c by prior knowledge) runs envd's
unary and streaming RPCs with both codecs; unchanged SDK code (``Sandbox.create``, ``commands.run``) works
against it too (the SDK negotiates HTTP/2 only by TLS ALPN, so in the clear it speaks HTTP/1.1 to the same
port). Without ``--http2`` (uvicorn), the forced-HTTP/2 client is refused: the flag is what makes it work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _e2b_server import E2BServer
from connectrpc.errors import ConnectError
from e2b.envd.client_shared import ENVD_JSON_CODEC
from e2b.envd.filesystem import filesystem_connect, filesystem_pb
from e2b.envd.process import process_connect, process_pb
from pyqwest import HTTPVersion, SyncClient, SyncHTTPTransport

from _corral_server import Server
from conftest import Box
from e2b import Sandbox as E2BSandbox


@pytest.fixture(scope="module")
def h2_url(module_env: E2BServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A second server on the E2B server's store (a data directory may be shared by several servers)."""
    log = tmp_path_factory.mktemp("h2") / "server.log"
    srv = Server({**os.environ, "CORRAL_DATA_DIR": str(module_env.data_dir)}, log, args=("--http2",))
    srv.start()
    try:
        yield srv.url, log
    finally:
        srv.stop()


def _records(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


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
    envd = [r for r in _records(log) if r.get("message") == "e2b sandbox request"]
    assert {r["route"]: r["http_version"] for r in envd}[
        "/process.Process/Start"
    ] == "2"  # as the server saw it


def test_uvicorn_refuses_the_forced_http2_client(box: Box) -> None:
    """The same call to the plain ``corral serve`` (uvicorn, HTTP/1.1 only) fails: the test above needs --http2."""
    client = SyncClient(SyncHTTPTransport(http_version=HTTPVersion.HTTP2))
    headers = {"E2b-Sandbox-Id": box.sandbox_id, "X-Access-Token": box.token}
    fs = filesystem_connect.FilesystemClientSync(box.url, http_client=client)
    with pytest.raises(ConnectError):
        fs.stat(filesystem_pb.StatRequest(path="/tmp"), headers=headers)


def test_unchanged_sdk_code_against_the_http2_server(module_env: E2BServer, h2_url: tuple[str, Path]) -> None:
    url, log = h2_url
    before = len(_records(log))
    sandbox = E2BSandbox.create(timeout=300, api_url=url, sandbox_url=url)
    try:
        result = sandbox.commands.run("echo through-hypercorn; echo err >&2")
        assert (result.exit_code, result.stdout, result.stderr) == (0, "through-hypercorn\n", "err\n")
        sandbox.files.write("/tmp/h2.txt", "written")
        assert sandbox.files.read("/tmp/h2.txt") == "written"
    finally:
        sandbox.kill()
    served = [r for r in _records(log)[before:] if r.get("logger") == "corral.server.access"]
    routes = {str(r["route"]) for r in served}
    assert {"/v2/sandboxes", "/process.Process/Start"} <= routes, routes  # the API and envd, both through it
    assert {r["http_version"] for r in served} == {"1.1"}, served  # the SDK's choice in the clear
