"""envd's Connect wire format as any Connect client sends it, not only the SDK's JSON: binary protobuf unary
and streaming (``application/proto``, ``application/connect+proto`` envelopes), Connect's error bodies."""

from __future__ import annotations

import json
import struct
import time

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
    assert (
        events[-1].end.exit_code == 4 and events[-1].end.exited and events[-1].end.status == "exit status 4"
    )


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


def test_domain_mode_routes_by_host_name(box: Box) -> None:
    """``E2B_DOMAIN`` mode: the SDK calls ``https://49983-{id}.{domain}``; the wildcard name alone routes it."""
    host = {"Host": f"49983-{box.sandbox_id}.sandbox.example.test", "X-Access-Token": box.token}
    r = httpx.post(f"{box.url}/filesystem.Filesystem/Stat", json={"path": "/"}, headers=host)
    assert r.status_code == 200 and r.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"
    assert httpx.get(f"{box.url}/health", headers=host).status_code == 204
    wrong = {**host, "X-Access-Token": "wrong"}
    r = httpx.get(f"{box.url}/health", headers=wrong)
    assert r.status_code == 502 and r.json()["message"] == f"The sandbox {box.sandbox_id} was not found"


def test_envs_and_init(box: Box) -> None:
    headers = {"E2b-Sandbox-Id": box.sandbox_id, "X-Access-Token": box.token}
    r = httpx.post(
        f"{box.url}/init",
        json={"envVars": {"FROM_INIT": "yes"}, "defaultWorkdir": "/tmp"},
        headers=headers,
    )
    assert r.status_code == 204, r.text
    assert httpx.get(f"{box.url}/envs", headers=headers).json()["FROM_INIT"] == "yes"
    assert box.e2b().commands.run('echo "$FROM_INIT"; pwd').stdout == "yes\n/tmp\n"
    r = httpx.post(f"{box.url}/init", json={"defaultUser": "admin"}, headers=headers)
    assert r.status_code == 400


def test_other_ports_go_to_the_port_proxy(box: Box) -> None:
    sbx = box.e2b()
    sbx.commands.run("mkdir -p /tmp/www && echo served > /tmp/www/x.txt")
    server = sbx.commands.run(
        "cd /tmp/www && exec python3 -m http.server 8123 --bind 127.0.0.1", background=True
    )
    headers = {"E2b-Sandbox-Id": box.sandbox_id, "E2b-Sandbox-Port": "8123"}
    if box.sandbox.traffic_access_token:
        headers["E2B-Traffic-Access-Token"] = box.sandbox.traffic_access_token
    try:
        deadline = time.monotonic() + 30
        while True:  # until the server in the sandbox listens (the only signal is its answer)
            r = httpx.get(f"{box.url}/x.txt", headers=headers)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200 and r.text == "served\n"
        closed = httpx.get(f"{box.url}/x.txt", headers={**headers, "E2b-Sandbox-Port": "8124"})
        assert closed.status_code == 502 and "port is not open" in closed.json()["message"]
    finally:
        server.kill()
