"""``port.connect`` against a real agent process: relaying, half-close, errors and the flow-control windows.

The agent here runs on the host (no sandbox), so the servers are plain sockets in this test process; the
sandbox-side guarantees (own loopback, host unreachable) are tested with real sandboxes in tests/runtimes.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from corral.protocol.messages import PORT_WINDOW_BYTES, PORT_WINDOW_FRAMES

from .conftest import TIMEOUT, AgentProcess, Client


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(TIMEOUT)
    yield srv
    srv.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(agent: Client, port: int, **fields: object) -> str:
    rid = agent.start("port.connect", port=port, **fields)
    started = agent.next_frame(rid)
    assert started.get("ev") == "started" and started.get("port") == port, started.header
    return rid


def read_until_eof(agent: Client, rid: str) -> bytes:
    """Data frames up to the server's eof, acknowledging each one."""
    out = bytearray()
    while True:
        frame = agent.next_frame(rid)
        assert frame.get("ev") in ("data", "ack"), frame.header
        if frame.get("ev") == "ack":
            continue
        if frame.get("eof"):
            return bytes(out)
        out += frame.payload
        agent.send({"id": rid, "op": "data", "ack_bytes": len(frame.payload), "ack_frames": 1})


def test_echo_both_ways_with_half_close(agent: Client, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            got.append(data)
            conn.sendall(b"echo:" + data)  # after the client's eof: half-close reached the server

    t = threading.Thread(target=serve)
    t.start()
    rid = connect(agent, port)
    agent.send({"id": rid, "op": "data"}, b"hello ")
    agent.send({"id": rid, "op": "data", "eof": True}, b"world")
    assert read_until_eof(agent, rid) == b"echo:hello world"
    end = agent.next_frame(rid)
    assert end.get("ev") == "ok", end.header
    t.join(TIMEOUT)
    assert got == [b"hello world"]


def test_closed_port_is_a_typed_error(agent: Client) -> None:
    frame = agent.call("port.connect", port=free_port())
    assert frame.get("ev") == "error" and frame.get("code") == "port_closed", frame.header
    assert "nothing listens on port" in frame.get("message")


@pytest.mark.parametrize(
    "fields",
    [
        {"port": 0},
        {"port": 70000},
        {"port": "80"},
        {"port": True},
        {"port": 80, "host": "10.0.0.1"},
        {"port": 80, "host": "0.0.0.0"},
        {"port": 80, "host": "example.com"},
        {"port": 80, "host": 127},
    ],
)
def test_bad_targets_are_refused(agent: Client, fields: dict[str, object]) -> None:
    frame = agent.call("port.connect", **fields)
    assert frame.get("ev") == "error" and frame.get("code") == "invalid", frame.header


def test_abort_closes_the_socket(agent: Client, listener: socket.socket) -> None:
    rid = connect(agent, listener.getsockname()[1])
    conn, _ = listener.accept()
    with conn:
        agent.send({"id": rid, "op": "data", "abort": True})
        assert agent.next_frame(rid).get("ev") == "ok"
        assert conn.recv(10) == b""  # the server sees the connection end


def test_server_reset_ends_the_stream_with_an_error(agent: Client, listener: socket.socket) -> None:
    rid = connect(agent, listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()  # linger 0: RST
    frames = agent.collect(rid)
    assert frames[-1].get("ev") == "error" and frames[-1].get("code") == "connection_reset", frames[-1].header


def test_window_bounds_unacknowledged_data(agent_proc: AgentProcess, listener: socket.socket) -> None:
    """A host that does not acknowledge gets at most one window; then TCP pushes back on the server."""
    agent = agent_proc.client()
    total = 20 * 1024 * 1024
    blob = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    sent = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(total // len(blob)):
                conn.sendall(blob)
                digest.update(blob)
        sent.set()

    t = threading.Thread(target=serve)
    t.start()
    rid = connect(agent, listener.getsockname()[1])
    received = hashlib.sha256()
    unacked_bytes = unacked_frames = 0
    peak_bytes = peak_frames = 0
    count = 0
    while True:
        frame = agent.next_frame(rid)
        if frame.get("eof"):
            break
        assert frame.get("ev") == "data", frame.header
        received.update(frame.payload)
        count += len(frame.payload)
        unacked_bytes += len(frame.payload)
        unacked_frames += 1
        peak_bytes, peak_frames = max(peak_bytes, unacked_bytes), max(peak_frames, unacked_frames)
        if unacked_bytes >= PORT_WINDOW_BYTES or unacked_frames >= PORT_WINDOW_FRAMES:
            # the window is used up: a ping round trip gives the agent every chance to overrun it
            assert agent_proc.proc.poll() is None
            agent.ok("ping")
            assert not [f for f in agent.frames[rid] if f.get("ev") == "data" and f.payload]
            agent.send({"id": rid, "op": "data", "ack_bytes": unacked_bytes, "ack_frames": unacked_frames})
            unacked_bytes = unacked_frames = 0
    agent.send({"id": rid, "op": "data", "eof": True})
    assert agent.next_frame(rid).get("ev") == "ok"
    t.join(TIMEOUT)
    assert sent.is_set() and count == total and received.digest() == digest.digest()
    assert peak_bytes <= PORT_WINDOW_BYTES and peak_frames <= PORT_WINDOW_FRAMES
    assert agent_proc.memory_kib("VmHWM") < 64 * 1024  # 20 MiB went through without being held


def test_client_overrunning_its_window_is_cut_off(agent: Client, listener: socket.socket) -> None:
    rid = connect(agent, listener.getsockname()[1])
    conn, _ = listener.accept()  # accepted, never read: the agent's writes back up
    with conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        chunk = b"x" * 65536
        for _ in range(PORT_WINDOW_BYTES // len(chunk) + 64):  # far past the window, ignoring acks
            agent.send({"id": rid, "op": "data"}, chunk)
        frames = agent.collect(rid)
    assert frames[-1].get("ev") == "error" and "window" in frames[-1].get("message"), frames[-1].header
    agent.ok("ping")  # the agent is fine


def test_closing_the_connection_closes_port_sockets(
    agent_proc: AgentProcess, listener: socket.socket
) -> None:
    agent = agent_proc.client()
    connect(agent, listener.getsockname()[1])
    conn, _ = listener.accept()
    with conn:
        agent_proc.stop()  # closes the agent's stdio: the only connection goes, the agent exits
        assert conn.recv(10) == b""


def test_many_concurrent_streams(agent: Client, listener: socket.socket) -> None:
    n = 50
    done = threading.Event()

    def serve() -> None:
        conns = [listener.accept()[0] for _ in range(n)]
        for i, c in enumerate(conns):
            c.sendall(f"conn {i}".encode())
            c.shutdown(socket.SHUT_WR)
        for c in conns:
            assert c.recv(100) == b""
            c.close()
        done.set()

    t = threading.Thread(target=serve)
    t.start()
    rids = [connect(agent, listener.getsockname()[1]) for _ in range(n)]
    texts = {read_until_eof(agent, rid) for rid in rids}
    for rid in rids:
        agent.send({"id": rid, "op": "data", "eof": True})
    for rid in rids:
        assert agent.next_frame(rid).get("ev") == "ok"
    t.join(TIMEOUT)
    assert done.is_set()
    assert texts == {f"conn {i}".encode() for i in range(n)}
