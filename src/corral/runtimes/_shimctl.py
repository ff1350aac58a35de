"""Host-side control of a sandbox's shim, shared by every shim-based runtime.

Launch (write ``shim.json``, start the shim detached or hand it to a standby, wait for its one status line), connect to its socket,
observe it (running / exited with ``exit.json`` / missing) and stop it. The shim itself is
:mod:`corral.runtimes._shim`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
from anyio.abc import ByteStream

from corral.errors import AgentUnavailable, RuntimeFailure, Timeout
from corral.protocol.frames import Decoder, encode
from corral.runtimes import _proc
from corral.runtimes._shim import unix_path
from corral.runtimes._shimspec import ShimSpec
from corral.runtimes._unixstream import connect_unix
from corral.runtimes.base import Observed, ObservedState

__all__ = [
    "SHIM_SCRIPT",
    "ShimHandle",
    "ShimLauncher",
    "call",
    "connect",
    "control",
    "launcher",
    "observe",
    "spawn",
    "stop",
    "wait_ready",
]

log = logging.getLogger("corral.runtimes.shim")

SHIM_SCRIPT = Path(__file__).with_name("_shim.py")
STANDBY_NICE = 10  # a standby starts at a low priority; its shim takes the normal one back once assigned
STANDBY_TITLE_ROOM = 512  # bytes of command line a standby keeps to show its state dir once assigned
READY_TIMEOUT = 120.0  # gVisor boots in < 1 s here; a QEMU guest under TCG needs ~12 s; generous for load


class ShimHandle:
    def __init__(self, pid: int, start_ticks: int, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self.proc = proc  # set when this process started the shim (and so must reap it)


def spawn(state_dir: Path, spec: ShimSpec, *, standby: subprocess.Popen[bytes] | None = None) -> ShimHandle:
    """Start the shim for ``state_dir``; returns at once. Follow with :func:`wait_ready`.

    ``standby``: a shim started ahead with ``--standby`` (see :class:`ShimLauncher`) to hand the sandbox to;
    if it is gone, a new one is started as usual. Callers with their own clean-up keep the handle from this
    point on, so a create cancelled while the sandbox boots still knows which shim (and so which sandbox
    processes) to wait for.
    """
    fd = os.open(state_dir / "shim.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # env may be secret
    with os.fdopen(fd, "w") as out:
        out.write(spec.to_json())
    proc = _assign(standby, state_dir) if standby is not None else None
    if proc is None:
        proc = _proc.spawn_detached(
            [sys.executable, "-I", "-S", str(SHIM_SCRIPT), str(state_dir)], log_path=state_dir / "shim.log"
        )
    return ShimHandle(proc.pid, _proc.proc_start_ticks(proc.pid) or 0, proc)


def _assign(standby: subprocess.Popen[bytes], state_dir: Path) -> subprocess.Popen[bytes] | None:
    """Hand ``state_dir`` to a standby shim; None (and the standby reaped) if it is no longer there."""
    assert standby.stdin is not None
    try:
        if standby.poll() is not None:
            raise BrokenPipeError
        standby.stdin.write(f"{state_dir}\n".encode())
        standby.stdin.close()
    except (BrokenPipeError, OSError):
        log.warning("the standby shim %d was gone; starting one the slow way", standby.pid)
        _retire_standby(standby)
        return None
    return standby


def _retire_standby(standby: subprocess.Popen[bytes]) -> None:
    """End an unassigned standby (EOF on stdin is its signal to exit) and reap it."""
    with contextlib.suppress(OSError):
        if standby.stdin is not None:
            standby.stdin.close()
    try:
        standby.wait(timeout=2)
    except subprocess.TimeoutExpired:
        standby.kill()
        standby.wait()


class ShimLauncher:
    """Starts shims, each from a standby shim started ahead of need when there is one.

    A cold create otherwise waits for a new interpreter to start and import the shim (~25 ms here). After
    each sandbox is ready (so its boot has the CPU to itself) a new standby is started, at a low priority,
    for the next create. There is one launcher per process (:data:`launcher`), shared by every runtime
    and service in it: an embedded SDK opens a service per sandbox, and a standby per service would be
    started for nothing. The first create of a process pays full price; creates running at the same time
    share one standby (the others start their shim the slow way). One idle standby costs one sleeping
    Python process (~9 MiB RSS); it exits when this process does (EOF on its stdin) or on :meth:`close`.
    """

    def __init__(self) -> None:
        self._standby: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()  # a forked child must not hand out its parent's standby
        self._lock = threading.Lock()

    def spawn(self, state_dir: Path, spec: ShimSpec) -> ShimHandle:
        with self._lock:
            standby, self._standby = self._take(), None
        return spawn(state_dir, spec, standby=standby)

    def _take(self) -> subprocess.Popen[bytes] | None:
        if self._owner != os.getpid():  # forked: the standby is the parent's
            self._owner = os.getpid()
            self._standby = None
        return self._standby

    async def wait_ready(self, handle: ShimHandle, *, what: str, timeout: float = READY_TIMEOUT) -> None:
        try:
            await wait_ready(handle, what=what, timeout=timeout)
        finally:
            self.refill()

    async def launch(
        self, state_dir: Path, spec: ShimSpec, *, what: str, timeout: float = READY_TIMEOUT
    ) -> ShimHandle:
        handle = self.spawn(state_dir, spec)
        await self.wait_ready(handle, what=what, timeout=timeout)
        return handle

    def refill(self) -> None:
        """Start a standby unless there is one (or the launcher is closed)."""
        with self._lock:
            standby = self._take()
            if standby is not None and standby.poll() is None:
                return
            try:
                self._standby = _proc.spawn_standby(
                    [sys.executable, "-I", "-S", str(SHIM_SCRIPT), "--standby", " " * STANDBY_TITLE_ROOM]
                )
            except OSError as exc:
                log.warning("could not start a standby shim: %s", exc)
                self._standby = None
                return
            with contextlib.suppress(OSError):  # it must not slow the sandbox booting beside it
                os.setpriority(os.PRIO_PROCESS, self._standby.pid, STANDBY_NICE)

    def close(self) -> None:
        """End the standby, if any (the next create starts one again)."""
        with self._lock:
            standby, self._standby = self._take(), None
        if standby is not None:
            _retire_standby(standby)


launcher = ShimLauncher()
atexit.register(launcher.close)


async def wait_ready(handle: ShimHandle, *, what: str, timeout: float = READY_TIMEOUT) -> None:
    """Return once the agent inside said hello.

    On failure or cancellation the shim is stopped (which kills its sandbox) before the error propagates, and
    a RuntimeFailure with a client-safe message is raised; the shim's reason, which may name host paths, goes
    to the log.
    """
    assert handle.proc is not None, "wait_ready needs a handle from spawn()"
    proc = handle.proc
    try:
        line = await _read_status(proc, timeout)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stop(handle)
            await anyio.to_thread.run_sync(proc.wait)
        raise
    if line != "ready":
        log.error("%s: shim reported: %s", what, line)
        with anyio.CancelScope(shield=True):
            await stop(handle)
            await anyio.to_thread.run_sync(proc.wait)
        raise RuntimeFailure(
            f"could not {what}: the sandbox did not start (see the server log)", details={"stage": "boot"}
        )


async def _read_status(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The shim's one status line, read as the pipe becomes readable (no thread)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = b""
    try:
        with anyio.fail_after(timeout):
            while b"\n" not in buf:
                await anyio.wait_readable(fd)
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
    except TimeoutError as exc:
        raise Timeout(f"the sandbox did not become ready within {timeout:g} s") from exc
    finally:
        proc.stdout.close()
    return buf.decode(errors="replace").strip() or "failed shim exited without a status"


async def connect(socket_path: str) -> ByteStream:
    try:
        with unix_path(socket_path) as usable:
            return await connect_unix(usable)  # not anyio.connect_unix: see _unixstream
    except (FileNotFoundError, ConnectionRefusedError, OSError) as exc:
        raise AgentUnavailable("the sandbox is not running (its supervisor is gone)") from exc


def exit_record(state_dir: Path) -> dict[str, object] | None:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        data = json.loads((state_dir / "exit.json").read_text())
        if isinstance(data, dict):
            return data
    return None


def observe(state_dir: Path, handle: ShimHandle) -> Observed:
    """What the host shows of a shim-based sandbox, without talking to it."""
    record = exit_record(state_dir)
    if record is not None:
        code = record.get("exit_code")
        reason = record.get("reason")
        return Observed(
            state=ObservedState.EXITED,
            exit_code=code if isinstance(code, int) else None,
            reason=str(reason) if reason else None,
        )
    if _proc.pid_alive(handle.pid, handle.start_ticks):
        return Observed(state=ObservedState.RUNNING)
    if state_dir.exists():
        return Observed(state=ObservedState.EXITED, reason="crashed")
    return Observed(state=ObservedState.MISSING)


async def stop(handle: ShimHandle, *, grace: float = 10.0) -> None:
    """Ask the shim to kill its sandbox and exit (SIGTERM), then SIGKILL it if it takes longer than ``grace``.

    The shim's own kill path stops the sandbox (its kill_argv, then SIGKILL to the process group).
    """
    if not _proc.kill_pid(handle.pid, handle.start_ticks, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while _proc.pid_alive(handle.pid, handle.start_ticks):
        if time.monotonic() > deadline:
            _proc.kill_pid(handle.pid, handle.start_ticks, signal.SIGKILL)
            break
        await anyio.sleep(0.01)  # polling a pid we do not parent; there is no event to wait on
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(handle.pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks; reaps our own child


CONTROL_TIMEOUT = 30.0  # a control op other than checkpoint/restore answers within ms


async def control(
    control_socket: str,
    agent_socket: str,
    op: str,
    *,
    what: str,
    timeout: float = CONTROL_TIMEOUT,
    **fields: object,
) -> dict[str, object]:
    """One request on the shim's control channel (``deadline``, ``status``, ``checkpoint``, ``restore``).

    A shim started by an older Corral (an instance persisted before the control channel existed) has no
    ``control.sock``; it takes the same request as ``shim.<op>`` on its agent socket instead.
    """
    if await anyio.Path(control_socket).exists() or not await anyio.Path(agent_socket).exists():
        return await call(control_socket, op, what=what, timeout=timeout, **fields)
    return await call(agent_socket, f"shim.{op}", what=what, timeout=timeout, **fields)


async def call(
    socket_path: str, op: str, *, what: str, timeout: float, **fields: object
) -> dict[str, object]:
    """Send one request to the shim on a connection of its own and return the shim's answer header.

    The runtime's own line to the shim: it does not disturb the core's agent connection, which the shim
    keeps across a pause. An ``error`` answer becomes a RuntimeFailure whose message is safe for clients
    (the shim's text goes to the log).
    """
    stream = await connect(socket_path)
    decoder = Decoder()
    try:
        with anyio.fail_after(timeout):
            await stream.send(encode({"id": "rt", "op": op, **fields}))
            while True:
                data = await stream.receive()
                for frame in decoder.feed(data):
                    if frame.get("id") == "rt":
                        header = dict(frame.header)
                        if header.get("ev") != "ok":
                            log.error("%s: shim answered %s", what, header)
                            raise RuntimeFailure(f"could not {what}", details={"stage": op})
                        return header
    except TimeoutError as exc:
        raise Timeout(f"could not {what} within {timeout:g} s") from exc
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        raise RuntimeFailure(f"could not {what}: the sandbox's supervisor went away") from exc
    finally:
        await stream.aclose()
