"""envd's Connect wire format as any Connect client sends it, not only the SDK's JSON: binary protobuf unary
and streaming (``application/proto``, ``application/connect+proto`` envelopes), Connect's error bodies."""

from __future__ import annotations

import json
import struct

import httpx

from conftest import Box
from corral.server.e2b.envd._pb import filesystem_pb2, process_pb2


def _headers(box: Box, content_type: str) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": box.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": box.token,
        "Content-Type": content_type,
        "Connect-Protocol-Version": "1",
    }


def _envelopes(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        flags, size = struct.unpack(">BI", data[:5])
        out.append((flags, data[5 : 5 + size]))
        data = data[5 + size :]
    return out


def test_unary_binary_protobuf(box: Box) -> None:
    r = httpx.post(
        f"{box.url}/filesystem.Filesystem/Stat",
        content=filesystem_pb2.StatRequest(path="/tmp").SerializeToString(),
        headers=_headers(box, "application/proto"),
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/proto"
    entry = filesystem_pb2.StatResponse.FromString(r.content).entry
    assert entry.type == filesystem_pb2.FILE_TYPE_DIRECTORY and entry.path == "/tmp"


def test_server_stream_binary_protobuf(box: Box) -> None:
    request = process_pb2.StartRequest(
        process=process_pb2.ProcessConfig(cmd="/bin/sh", args=["-c", "printf hi; exit 4"]), stdin=False
    ).SerializeToString()
    r = httpx.post(
        f"{box.url}/process.Process/Start",
        content=struct.pack(">BI", 0, len(request)) + request,
        headers=_headers(box, "application/connect+proto"),
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/connect+proto"
    frames = _envelopes(r.content)
    assert frames[-1] == (2, b"{}")  # end of stream, no error
    events = [process_pb2.StartResponse.FromString(body).event for flags, body in frames[:-1]]
    assert events[0].WhichOneof("event") == "start" and events[0].start.pid > 0
    out = b"".join(e.data.stdout for e in events if e.WhichOneof("event") == "data")
    assert out == b"hi"
    assert events[-1].end.exit_code == 4 and events[-1].end.exited and events[-1].end.status == "exit status 4"


def test_errors_are_connect_errors(box: Box) -> None:
    r = httpx.post(
        f"{box.url}/filesystem.Filesystem/Stat",
        json={"path": "/no/such/file"},
        headers=_headers(box, "application/json"),
    )
    assert r.status_code == 404 and r.json()["code"] == "not_found" and "/no/such/file" in r.json()["message"]
    r = httpx.post(
        f"{box.url}/process.Process/Start",
        content=b"\x00\x00\x00\x00\x02{}",  # no process.cmd
        headers=_headers(box, "application/connect+json"),
    )
    end = _envelopes(r.content)[-1]
    assert end[0] == 2 and json.loads(end[1])["error"]["code"] == "invalid_argument"
    r = httpx.post(f"{box.url}/process.Process/Nope", json={}, headers=_headers(box, "application/json"))
    assert r.status_code == 404
