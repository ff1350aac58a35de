"""The agent on TCP: every peer proves it holds the sandbox's secret before its hello (protocol.auth)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from corral.protocol import auth
from corral.protocol.frames import encode

from .conftest import TIMEOUT, AgentProcess, Client

SECRET = os.urandom(32)


def _free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def _connect_when_listening(proc: AgentProcess, port: int) -> socket.socket:
    deadline = time.monotonic() + TIMEOUT
    while True:  # nothing announces that the agent has bound its port: retry refused connections
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.settimeout(TIMEOUT)
            return sock
        except ConnectionRefusedError:
            assert time.monotonic() < deadline and proc.proc.poll() is None, proc.log_text()
            time.sleep(0.01)


def _line(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    header: dict[str, Any] = json.loads(data)
    return header


def _closed(sock: socket.socket) -> bool:
    """The agent closed the connection (a reset, too: it may close with our bytes still unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _authenticate(sock: socket.socket, secret: bytes, *, rekey: str | None = None) -> None:
    challenge = _line(sock)
    answer = auth.client_response(secret, challenge, rekey=rekey)
    sock.sendall(encode(answer))
    auth.check_agent_proof(secret, challenge, answer, _line(sock))


class TcpAgent:
    def __init__(self, tmp: Path, secret: bytes = SECRET) -> None:
        self.secret_file = tmp / "secret"
        self.secret_file.write_bytes(secret)
        self.port = _free_port()
        self.proc = AgentProcess(
            tmp, "--listen", f"tcp:127.0.0.1:{self.port}", "--secret-file", str(self.secret_file)
        )
        self.socks: list[socket.socket] = []

    def connect(self) -> socket.socket:
        sock = _connect_when_listening(self.proc, self.port)
        self.socks.append(sock)
        return sock

    def client(self, secret: bytes = SECRET, *, rekey: str | None = None) -> Client:
        sock = self.connect()
        _authenticate(sock, secret, rekey=rekey)
        return Client(sock.fileno(), sock.fileno())

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.proc.proc.terminate()
        self.proc.stop()


@pytest.fixture
def tcp_agent(tmp_path: Path):  # type: ignore[no-untyped-def]
    agent = TcpAgent(tmp_path)
    yield agent
    agent.close()


def test_authenticated_connections_are_served_concurrently(tcp_agent: TcpAgent) -> None:
    a, b = tcp_agent.client(), tcp_agent.client()
    rid = a.start("exec", argv=["cat"], stdin=True)
    process_id = a.next_frame(rid).header["process_id"]
    b.ok("ping")
    a.ok("stdin", b"over tcp", process_id=process_id, eof=True)
    assert b"".join(f.payload for f in a.collect(rid)) == b"over tcp"


def test_the_secret_file_is_removed_once_read(tcp_agent: TcpAgent) -> None:
    tcp_agent.client().ok("ping")
    assert not tcp_agent.secret_file.exists()


def test_a_wrong_secret_is_refused_and_the_connection_closed(tcp_agent: TcpAgent) -> None:
    sock = tcp_agent.connect()
    with pytest.raises(auth.AuthError, match="refused"):
        _authenticate(sock, os.urandom(32))
    assert _closed(sock)
    tcp_agent.client().ok("ping")  # the agent serves on


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(encode({"id": "r1", "op": "exec", "argv": ["id"]}), id="a request instead of auth"),
        pytest.param(encode({"op": "auth", "nonce": "00" * 32, "proof": "11" * 32}), id="a made-up proof"),
        pytest.param(b"not json\n", id="garbage"),
        pytest.param(b"x" * 5000, id="an endless line"),
    ],
)
def test_nothing_but_a_valid_proof_reaches_the_agent(tcp_agent: TcpAgent, first: bytes) -> None:
    sock = tcp_agent.connect()
    assert _line(sock)["ev"] == "auth"
    sock.sendall(first)
    reply = _line(sock)
    assert reply == {"ev": "error", "code": "unauthenticated", "message": "authentication failed"}
    assert _closed(sock)


def test_bytes_sent_before_the_agents_proof_end_the_connection(tcp_agent: TcpAgent) -> None:
    sock = tcp_agent.connect()
    challenge = _line(sock)
    answer = auth.client_response(SECRET, challenge)
    sock.sendall(encode(answer) + encode({"id": "r1", "op": "ping"}))
    assert _line(sock)["code"] == "unauthenticated"


def test_the_client_detects_an_agent_without_the_secret(tmp_path: Path) -> None:
    agent = TcpAgent(tmp_path, secret=os.urandom(32))  # an impostor at the address: it holds another secret
    try:
        sock = agent.connect()
        challenge = _line(sock)
        answer = auth.client_response(SECRET, challenge)
        sock.sendall(encode(answer))
        with pytest.raises(auth.AuthError):
            auth.check_agent_proof(SECRET, challenge, answer, _line(sock))
    finally:
        agent.close()


@pytest.mark.parametrize("secret", [os.urandom(31) + b"\n", b"\n" * 32, os.urandom(1023) + b"\n"])
def test_a_secret_is_its_raw_bytes_whatever_they_are(tmp_path: Path, secret: bytes) -> None:
    """1 random secret in 256 ends in a newline byte; it is the secret like any other (CI: one such bootstrap
    secret made a Kubernetes sandbox's agent refuse to start, "not 31" bytes)."""
    agent = TcpAgent(tmp_path, secret=secret)
    try:
        agent.client(secret).ok("ping")
    finally:
        agent.close()


def test_rekey_replaces_the_secret_for_every_later_connection(tcp_agent: TcpAgent) -> None:
    salt = auth.new_salt()
    tcp_agent.client(rekey=salt).ok("ping")
    with pytest.raises(auth.AuthError):
        _authenticate(tcp_agent.connect(), SECRET)
    tcp_agent.client(auth.derive(SECRET, salt)).ok("ping")


def _refused_at_start(tmp_path: Path, address: str, secret: bytes | None = SECRET) -> str:
    """Start the agent listening on ``address``; it must exit non-zero at once. Returns what it said."""
    args = ["--listen", address]
    if secret is not None:
        (tmp_path / "secret").write_bytes(secret)
        args += ["--secret-file", str(tmp_path / "secret")]
    proc = AgentProcess(tmp_path, *args)
    assert proc.proc.wait(timeout=TIMEOUT) != 0
    log = proc.log_text()
    proc.stop()
    assert "Traceback" not in log, log
    return log


def test_tcp_without_a_secret_file_does_not_start(tmp_path: Path) -> None:
    assert "needs --secret-file" in _refused_at_start(tmp_path, f"tcp:127.0.0.1:{_free_port()}", secret=None)


def test_a_short_secret_is_refused_at_start(tmp_path: Path) -> None:
    log = _refused_at_start(tmp_path, f"tcp:127.0.0.1:{_free_port()}", secret=b"short")
    assert "must be 32..1024 bytes" in log


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("tcp:127.0.0.1:notaport", "--listen wants unix:PATH, tcp:HOST:PORT or vsock:PORT"),
        ("tcp:127.0.0.1:70000", "cannot listen there: bind(): port must be 0-65535"),
        ("tcp:192.0.2.1:7000", "cannot listen there: [Errno 99] Cannot assign requested address"),
    ],
)
def test_an_address_it_cannot_listen_on_is_refused_at_start_without_a_traceback(
    tmp_path: Path, address: str, says: str
) -> None:
    log = _refused_at_start(tmp_path, address)
    assert says in log, log


def test_a_port_in_use_is_refused_at_start(tmp_path: Path) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        log = _refused_at_start(tmp_path, f"tcp:127.0.0.1:{held.getsockname()[1]}")
    finally:
        held.close()
    assert "cannot listen there: [Errno 98] Address already in use" in log, log


@pytest.mark.root
def test_an_agent_running_as_a_user_is_not_dumpable(tmp_path: Path) -> None:
    """Code of the same uid in the sandbox cannot read the secret from the agent's memory."""
    user_dir = Path(tempfile.mkdtemp(prefix="corral-agent-user-"))  # tmp_path's parents are root-only
    os.chmod(user_dir, 0o755)
    os.chown(user_dir, 65534, 65534)
    secret_file = user_dir / "secret"
    secret_file.write_bytes(SECRET)
    os.chown(secret_file, 65534, 65534)
    port = _free_port()
    proc = AgentProcess(
        tmp_path,
        "--listen",
        f"tcp:127.0.0.1:{port}",
        "--secret-file",
        str(secret_file),
        prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
    )
    try:
        sock = _connect_when_listening(proc, port)
        _authenticate(sock, SECRET)
        sock.close()
        # /proc/PID/mem of a non-dumpable process belongs to root, not to the process's own uid
        assert os.stat(f"/proc/{proc.pid}/mem").st_uid == 0
        assert stat.S_IMODE(os.stat(f"/proc/{proc.pid}/mem").st_mode) == 0o600
    finally:
        proc.proc.terminate()
        proc.stop()
        shutil.rmtree(user_dir)
