"""A real agent subprocess and a small synchronous protocol client for the agent tests.

The agent runs as ``sys.executable -m corral.agent`` with ``src`` on its path (stdio by default, or listening on
a unix socket); the client is built on :mod:`corral.protocol.frames` and routes frames by request id, so a test
can keep several requests in flight and wait on any one of them. Every wait has a deadline but no test sleeps to
wait for state: they wait for frames.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import subprocess
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.protocol import TERMINAL_EVENTS, Decoder, Frame, encode

SRC = Path(__file__).resolve().parents[2] / "src"
TIMEOUT = 30.0
USER_UID = 1000


class AgentGone(Exception):
    pass


class Client:
    """One protocol connection to the agent (a pair of fds, or one socket fd twice)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.decoder = Decoder()
        self.frames: dict[Any, deque[Frame]] = defaultdict(deque)
        self.ids = (f"r{i}" for i in itertools.count(1))
        self.eof = False
        hello = self.next_frame(None)
        assert hello.get("ev") == "hello", hello
        self.hello = hello

    # --- raw -------------------------------------------------------------------------------------------------
    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        data = encode(header, payload)
        while data:
            n = os.write(self.wfd, data)
            data = data[n:]

    def send_raw(self, data: bytes) -> None:
        os.write(self.wfd, data)

    def _read(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame from the agent in time")
        ready, _, _ = select.select([self.rfd], [], [], remaining)
        if not ready:
            raise TimeoutError("no frame from the agent in time")
        data = os.read(self.rfd, 1024 * 1024)
        if not data:
            self.eof = True
            raise AgentGone("the agent closed the connection")
        for frame in self.decoder.feed(data):
            self.frames[frame.get("id")].append(frame)

    def next_frame(self, rid: Any, timeout: float = TIMEOUT) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.frames[rid]:
            self._read(deadline)
        return self.frames[rid].popleft()

    def wait_closed(self, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with contextlib.suppress(AgentGone):
            while True:
                self._read(deadline)

    # --- requests --------------------------------------------------------------------------------------------
    def start(self, op: str, payload: bytes = b"", **fields: Any) -> str:
        rid = next(self.ids)
        self.send({"id": rid, "op": op, **fields}, payload)
        return rid

    def collect(self, rid: str, timeout: float = TIMEOUT) -> list[Frame]:
        """All frames of request ``rid`` up to and including its terminal frame."""
        out = []
        while True:
            frame = self.next_frame(rid, timeout)
            out.append(frame)
            if frame.get("ev") in TERMINAL_EVENTS:
                return out

    def call(self, op: str, payload: bytes = b"", **fields: Any) -> Frame:
        """A request answered by one terminal frame (returned, ``error`` included)."""
        frames = self.collect(self.start(op, payload, **fields))
        assert len(frames) == 1, frames
        return frames[0]

    def ok(self, op: str, payload: bytes = b"", **fields: Any) -> dict[str, Any]:
        frame = self.call(op, payload, **fields)
        assert frame.get("ev") == "ok", frame.header
        return frame.header

    def run(self, argv: list[str] | None = None, **fields: Any) -> Result:
        if argv is not None:
            fields["argv"] = argv
        return Result(self.collect(self.start("exec", **fields)))

    def write_file(self, path: str, data: bytes, chunk: int = 128 * 1024, **fields: Any) -> Frame:
        rid = self.start("write", path=path, **fields)
        for i in range(0, len(data), chunk):
            self.send({"id": rid, "op": "data", "eof": False}, data[i : i + chunk])
        self.send({"id": rid, "op": "data", "eof": True})
        frames = self.collect(rid)
        assert len(frames) == 1
        return frames[0]

    def read_file(self, path: str, **fields: Any) -> bytes:
        frames = self.collect(self.start("read", path=path, **fields))
        assert frames[-1].get("ev") == "ok", frames[-1].header
        assert all(f.get("ev") == "chunk" for f in frames[:-1])
        data = b"".join(f.payload for f in frames[:-1])
        assert frames[-1].get("bytes") == len(data)
        return data


class Result:
    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames
        self.end = frames[-1]
        self.stdout = b"".join(f.payload for f in frames if f.get("ev") == "stdout")
        self.stderr = b"".join(f.payload for f in frames if f.get("ev") == "stderr")

    @property
    def started(self) -> Frame:
        assert self.frames[0].get("ev") == "started", self.frames[0].header
        return self.frames[0]

    @property
    def exit_code(self) -> int | None:
        assert self.end.get("ev") == "exit", self.end.header
        code: int | None = self.end.get("exit_code")
        return code


def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "COV_"))}
    env["PYTHONPATH"] = str(SRC)
    return env


class AgentProcess:
    """The agent as a subprocess. Its stderr (the agent log) is kept, and checked for internal errors."""

    def __init__(
        self, tmp: Path, *args: str, prefix: tuple[str, ...] = (), pass_fds: tuple[int, ...] = ()
    ) -> None:
        self.log_path = tmp / f"agent-{os.getpid()}-{id(self)}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-S", "-m", "corral.agent", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=agent_env(),
            cwd="/",
            pass_fds=pass_fds,
        )
        self.pid = self.proc.pid

    def client(self) -> Client:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return Client(self.proc.stdout.fileno(), self.proc.stdin.fileno())

    def memory_kib(self, field: str = "VmHWM") -> int:
        """The agent's (not its children's) peak (``VmHWM``) or current (``VmRSS``) resident memory."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        return code


@pytest.fixture
def agent_proc(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path)
    yield agent
    agent.stop()
    log = agent.log_path.read_text(errors="replace")
    assert "internal error" not in log and "Traceback" not in log, log


@pytest.fixture
def agent(agent_proc: AgentProcess) -> Client:
    return agent_proc.client()


class ListeningAgent:
    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / "agent.sock")
        self.proc = AgentProcess(tmp, "--listen", f"unix:{self.path}")
        self.sockets: list[socket.socket] = []
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(self.path):  # the one poll: nothing else tells us the socket is bound
            assert self.proc.proc.poll() is None, self.proc.log_text()
            assert time.monotonic() < deadline, "agent did not listen"
            time.sleep(0.01)

    def connect(self) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        self.sockets.append(sock)
        return Client(sock.fileno(), sock.fileno())

    def disconnect(self, client: Client) -> None:
        for sock in self.sockets:
            if sock.fileno() == client.rfd:
                self.sockets.remove(sock)
                sock.close()
                return
        raise AssertionError("unknown client")

    def stop(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.proc.proc.terminate()
        self.proc.stop()


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[ListeningAgent]:
    agent = ListeningAgent(tmp_path)
    yield agent
    agent.stop()
    log = agent.proc.log_path.read_text(errors="replace")
    assert "internal error" not in log and "Traceback" not in log, log


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory both root and uid 1000 can use (pytest's tmp_path is root-only)."""
    base = Path("/tmp") / f"corral-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    base.mkdir(mode=0o777)
    base.chmod(0o777)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (switches to uid 1000)")


def pid_exited(pid: int, timeout: float = TIMEOUT) -> bool:
    """Wait (on a pidfd, no polling) until ``pid`` has exited; True if it did within ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)
