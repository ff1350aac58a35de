"""Processes: spawning, output kept in a ring, streaming to subscribers, reaping, timeouts and signals.

Output model. Each process has one :class:`~corral.agent.ring.Ring` holding its stdout and stderr interleaved
as read (addressed by absolute byte offset), at most ``RING_BYTES`` bytes. Every stream that
shows the output (the ``exec`` request itself, each ``attach``) is a :class:`Subscriber`: a cursor into the
ring and a :class:`~corral.agent.conn.Producer` on its connection. Replay and live output are then the same
thing (an ``attach`` with replay starts its cursor at the oldest kept byte), and nothing is copied per
subscriber.

Back-pressure. When any subscriber falls more than ``LAG_LIMIT`` bytes behind the newest output, the agent stops
reading the process's pipes; the kernel pipe fills and the process blocks in ``write``, exactly as it would
writing to a slow terminal. Reading resumes when every subscriber is within half of that. Since
``LAG_LIMIT`` is far below ``RING_BYTES``, a subscriber never loses output it has not been sent. A process
nobody watches (background) is read continuously, the ring dropping its oldest bytes (counted as ``dropped``).

Exit. On SIGCHLD the agent reaps with ``waitpid(-1)`` (so it also reaps orphans re-parented to it when it is
PID 1), drains what the process left in its pipes (bounded), and marks the end of its output. Descendants that
outlive it and still hold the pipes (``server &``) are read to EOF but their output is discarded, so they never
get SIGPIPE and never push the process's own output out of the ring. Signals and timeouts go to the process
group (every process is a session leader), and only while the process is unreaped: after that its pid, hence
its group id, may belong to someone else.
"""

from __future__ import annotations

import contextlib
import os
import signal as _signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

from corral.agent.conn import Connection
from corral.agent.errors import AgentError, short_repr
from corral.agent.loop import Loop, Timer, log
from corral.agent.memory import MemoryGuard, children_preferred_for_oom
from corral.agent.ring import Ring
from corral.agent.users import Identity
from corral.protocol.messages import CHUNK_SIZE, AgentErrorCode

__all__ = ["Process", "ProcessTable", "Spawned", "Subscriber", "new_process_id"]

READ_SIZE = 64 * 1024  # one default pipe buffer
LAG_LIMIT = 1024 * 1024  # a subscriber this far behind pauses reading the pipes (<< RING_BYTES: nothing lost)
DRAIN_LIMIT = 1024 * 1024  # per pipe, read at exit: what the process left, not an endless grandchild stream
EXITED_KEPT = 256  # exited processes whose record is kept, from the spec
EXITED_OUTPUT_BUDGET = 64 * 1024 * 1024  # 256 x 8 MiB would be 2 GiB: older exited rings are released first
STDIN_LIMIT = 8 * 1024 * 1024  # stdin bytes accepted but not yet taken by the process


class Subscriber:
    """One stream of a process's output to one request (``exec`` or ``attach``) on one connection."""

    __slots__ = ("conn", "pos", "proc", "rid")

    def __init__(self, proc: Process, conn: Connection, rid: str, pos: int) -> None:
        self.proc = proc
        self.conn = conn
        self.rid = rid
        self.pos = pos

    def produce(self) -> bool:
        proc = self.proc
        ring = proc.ring
        self.pos = max(self.pos, ring.start)
        stop = ring.end if proc.exit_pos is None else proc.exit_pos
        if self.pos < stop:
            stream, data = ring.read(self.pos, CHUNK_SIZE, stop)
            self.pos += len(data)
            self.conn.send({"id": self.rid, "ev": stream}, data)
            proc.subscriber_advanced()
            return self.pos < stop or proc.exit_pos is not None  # more output, or the exit frame
        if proc.exit_pos is not None:
            self.end({"ev": "exit", **proc.exit_fields()})
        return False

    def end(self, header: dict[str, Any]) -> None:
        self.conn.remove_producer(self)
        self.proc.remove_subscriber(self)
        self.conn.finish(self.rid, header)

    def cancel(self) -> None:
        self.proc.remove_subscriber(self)


class Spawned:
    """A child started by a spawner (``spawner.py``): what :class:`Process` uses of a ``Popen``."""

    __slots__ = ("pid", "returncode", "stderr", "stdin", "stdout")

    def __init__(self, pid: int, *, stdout: IO[bytes], stderr: IO[bytes], stdin: IO[bytes] | None) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout
        self.stderr: IO[bytes] | None = stderr
        self.stdin = stdin
        self.returncode: int | None = None


class Process:
    def __init__(
        self,
        table: ProcessTable,
        process_id: str,
        popen: subprocess.Popen[bytes] | Spawned,
        argv: list[str],
        *,
        user: str,
        cwd: str,
        tag: str | None,
        owner: Connection | None,
        outputs: list[tuple[IO[bytes], str]] | None = None,
        stdin_file: IO[bytes] | None = None,
    ) -> None:
        """``outputs``/``stdin_file`` default to the Popen pipes; a terminal passes its master side instead."""
        self.table = table
        self.process_id = process_id
        self.popen = popen
        self.pid = popen.pid
        self.argv = argv
        self.user = user
        self.cwd = cwd
        self.tag = tag
        self.owner = owner  # the connection whose closing kills it; None for background/detached
        self.started_at = time.time()
        self.ring = Ring()
        self.subscribers: list[Subscriber] = []
        self.running = True
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.timed_out = False
        self.oom_killed = False  # SIGKILLed for memory (see corral.agent.memory)
        self.exit_pos: int | None = None
        self.timer: Timer | None = None
        self._paused = False
        self._pipes: dict[int, str] = {}  # open output pipes: fd -> stream name
        self._files: dict[int, IO[bytes]] = {}  # their file objects, which own the fds
        loop = table.loop
        if outputs is None:
            assert popen.stdout is not None and popen.stderr is not None
            outputs = [(popen.stdout, "stdout"), (popen.stderr, "stderr")]
        for f, stream in outputs:
            fd = f.fileno()
            os.set_blocking(fd, False)
            self._pipes[fd] = stream
            self._files[fd] = f
            loop.add_reader(fd, self._reader(fd))
        self._stdin_file = stdin_file if stdin_file is not None else popen.stdin
        self._stdin_fd = -1
        if self._stdin_file is not None:
            self._stdin_fd = self._stdin_file.fileno()
            os.set_blocking(self._stdin_fd, False)
        self._stdin_eof = self._stdin_file is None
        self._stdin_queue: deque[tuple[memoryview, bool, Connection, str]] = deque()
        self._stdin_pending = 0

    # --- output ----------------------------------------------------------------------------------------------
    def _reader(self, fd: int) -> Callable[[], None]:
        return lambda: self._on_readable(fd)

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_pipe(fd)
            return
        if self.exit_pos is not None:
            return  # a descendant that outlived the process: read so it never blocks or gets SIGPIPE
        self.ring.append(self._pipes[fd], data)
        self._output_added()

    def _output_added(self) -> None:
        end = self.ring.end
        lagging = False
        for sub in self.subscribers:
            sub.conn.wake(sub)
            if end - sub.pos > LAG_LIMIT:
                lagging = True
        if lagging and not self._paused and self.exit_pos is None:
            self._paused = True
            for fd in self._pipes:
                self.table.loop.remove_reader(fd)

    def subscriber_advanced(self) -> None:
        if self._paused:
            end = self.ring.end
            if all(end - sub.pos <= LAG_LIMIT // 2 for sub in self.subscribers):
                self._resume()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            for fd in self._pipes:
                self.table.loop.add_reader(fd, self._reader(fd))

    def _close_pipe(self, fd: int) -> None:
        self.table.loop.forget(fd)
        self._pipes.pop(fd, None)
        f = self._files.pop(fd, None)
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def add_subscriber(self, conn: Connection, rid: str, pos: int) -> Subscriber:
        sub = Subscriber(self, conn, rid, pos)
        self.subscribers.append(sub)
        conn.add_producer(sub)
        return sub

    def remove_subscriber(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
            self.subscriber_advanced()

    # --- exit ------------------------------------------------------------------------------------------------
    def on_exit(self, status: int) -> None:
        self.running = False
        code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = code  # so Popen never tries to reap this pid itself
        if code < 0:
            self.signal = -code
        else:
            self.exit_code = code
        guard = self.table.memory
        if not self.oom_killed and guard is not None:
            self.oom_killed = guard.killed_by_kernel(self.exit_code, self.signal)
        if self.timer is not None:
            self.timer.cancel()
        for fd in list(self._pipes):
            drained = 0
            while drained < DRAIN_LIMIT and fd in self._pipes:
                try:
                    data = os.read(fd, READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    data = b""
                if not data:
                    self._close_pipe(fd)
                    break
                self.ring.append(self._pipes[fd], data)
                drained += len(data)
        self.exit_pos = self.ring.end
        self._resume()
        self._close_stdin("the process has exited")
        for sub in list(self.subscribers):
            sub.conn.wake(sub)

    def exit_fields(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "timed_out": self.timed_out,
            "oom_killed": self.oom_killed,
        }

    def kill_group(self, sig: int) -> bool:
        """Signal the process group; False if the process was already reaped."""
        if not self.running:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)
        return True

    def on_timeout(self) -> None:
        if self.running:
            self.timed_out = True
            self.kill_group(_signal.SIGKILL)

    def detach(self) -> None:
        self.owner = None
        for sub in list(self.subscribers):
            sub.end({"ev": "ok", "detached": True})

    # --- stdin -----------------------------------------------------------------------------------------------
    def write_stdin(self, conn: Connection, rid: str, data: bytes, eof: bool) -> None:
        if self._stdin_eof:
            why = "was closed" if self._stdin_file is not None else "was not kept open (exec with stdin:true)"
            raise AgentError(AgentErrorCode.INVALID, f"stdin of process {self.process_id} {why}")
        if self._stdin_pending + len(data) > STDIN_LIMIT:
            raise AgentError(
                AgentErrorCode.BUSY,
                f"process {self.process_id} is not reading its stdin; wait for earlier writes",
            )
        self._stdin_eof = eof
        self._stdin_queue.append((memoryview(data), eof, conn, rid))
        self._stdin_pending += len(data)
        self._flush_stdin()

    def _flush_stdin(self) -> None:
        loop = self.table.loop
        while self._stdin_queue:
            data, eof, conn, rid = self._stdin_queue[0]
            if data:
                try:
                    n = os.write(self._stdin_fd, data)
                except (BlockingIOError, InterruptedError):
                    loop.add_writer(self._stdin_fd, self._flush_stdin)
                    return
                except OSError:
                    self._close_stdin("the process closed its stdin")
                    return
                self._stdin_pending -= n
                if n < len(data):
                    self._stdin_queue[0] = (data[n:], eof, conn, rid)
                    continue
            self._stdin_queue.popleft()
            conn.finish(rid, {"ev": "ok"})
            if eof:
                self._close_stdin("stdin was closed")
                return
        loop.remove_writer(self._stdin_fd)

    def _close_stdin(self, reason: str) -> None:
        self._stdin_eof = True
        while self._stdin_queue:
            _, _, conn, rid = self._stdin_queue.popleft()
            conn.error(rid, AgentErrorCode.INVALID, f"stdin of process {self.process_id}: {reason}")
        self._stdin_pending = 0
        if self._stdin_fd >= 0:
            self.table.loop.forget(self._stdin_fd)
            assert self._stdin_file is not None
            with contextlib.suppress(OSError):
                self._stdin_file.close()
            self._stdin_fd = -1

    def info(self) -> dict[str, Any]:
        return {
            "process_id": self.process_id,
            "pid": self.pid,
            "argv": self.argv,
            "tag": self.tag,
            "running": self.running,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "started_at": self.started_at,
            "user": self.user,
            "cwd": self.cwd,
        }


class ProcessTable:
    """All processes the agent started, by id and pid, plus the records of the recently exited."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.by_id: dict[str, Process] = {}
        self.by_pid: dict[int, Process] = {}
        self._exited: deque[Process] = deque()
        self.other_children: dict[int, Callable[[int], None]] = {}  # e.g. file workers
        self.memory: MemoryGuard | None = None  # set by the agent

    def spawn(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: str,
        identity: Identity,
        stdin: bool,
        timeout: float | None,
        tag: str | None,
        owner: Connection | None,
    ) -> Process:
        kwargs: dict[str, Any] = {}
        if identity.switch:
            kwargs = {"user": identity.uid, "group": identity.gid, "extra_groups": list(identity.groups)}
        try:
            with children_preferred_for_oom():
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                    bufsize=0,
                    **kwargs,
                )
        except OSError as exc:
            raise _spawn_error(exc, argv, cwd, env.get("PATH", "")) from None
        except (ValueError, subprocess.SubprocessError) as exc:
            raise AgentError(AgentErrorCode.INVALID, f"cannot start {argv[0]!r}: {exc}") from None
        proc = Process(self, new_process_id(), popen, argv, user=identity.name, cwd=cwd, tag=tag, owner=owner)
        return self.register(proc, timeout)

    def register(self, proc: Process, timeout: float | None) -> Process:
        """Track a started process (by id and pid) and arm its timeout."""
        self.by_id[proc.process_id] = proc
        self.by_pid[proc.pid] = proc
        if timeout is not None:
            proc.timer = self.loop.call_later(timeout, proc.on_timeout)
        return proc

    def mark_oom(self, pid: int) -> None:
        """``pid`` (a process, or the process group of one we started) was SIGKILLed for memory."""
        proc = self.by_pid.get(pid)
        if proc is not None:
            proc.oom_killed = True

    def get(self, process_id: object) -> Process:
        proc = self.by_id.get(process_id) if isinstance(process_id, str) else None
        if proc is None:
            raise AgentError(AgentErrorCode.NOT_FOUND, f"no process {short_repr(process_id)} in the sandbox")
        return proc

    def reap(self) -> None:
        """SIGCHLD: collect every exited child (ours, file workers, orphans when we are PID 1)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            self.child_exited(pid, status)

    def child_exited(self, pid: int, status: int) -> None:
        """``pid`` ended with wait status ``status``: reaped here, or by a spawner that reported it."""
        proc = self.by_pid.pop(pid, None)
        if proc is not None:
            proc.on_exit(status)
            self._record_exit(proc)
            return
        other = self.other_children.pop(pid, None)
        if other is not None:
            other(status)

    def _record_exit(self, proc: Process) -> None:
        self._exited.append(proc)
        while len(self._exited) > EXITED_KEPT:
            old = self._exited.popleft()
            self.by_id.pop(old.process_id, None)
            if not old.subscribers:
                old.ring.clear()
        kept = sum(p.ring.size for p in self._exited)
        for old in self._exited:
            if kept <= EXITED_OUTPUT_BUDGET:
                break
            if not old.subscribers and old.ring.size:
                kept -= old.ring.size
                old.ring.clear()

    def connection_closed(self, conn: Connection) -> None:
        for proc in self.by_pid.values():
            if proc.owner is conn:
                log(f"killing {proc.process_id} (pid {proc.pid}): its connection closed")
                proc.kill_group(_signal.SIGKILL)

    def kill_all(self) -> None:
        for proc in self.by_pid.values():
            proc.kill_group(_signal.SIGKILL)

    def listing(self) -> list[dict[str, Any]]:
        return [proc.info() for proc in self.by_id.values()]


def new_process_id() -> str:
    return "p-" + os.urandom(6).hex()


def _spawn_error(exc: OSError, argv: list[str], cwd: str, path: str) -> AgentError:
    import errno

    name = argv[0]
    if (
        "/" not in name
        and exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR)
        and exc.filename != cwd
        and not any(os.path.exists(os.path.join(d or ".", name)) for d in path.split(":"))
    ):
        # execvp reports EACCES when some PATH directory is not searchable, even if the command is nowhere
        return AgentError(AgentErrorCode.NOT_FOUND, f"command {name!r} not found in the sandbox")

    if exc.filename == cwd and exc.errno in (errno.EPERM, errno.EINVAL):
        # Popen reports failures before exec (setsid, setgroups, setresgid, setresuid) as if from chdir
        return AgentError(
            AgentErrorCode.PERMISSION_DENIED, f"cannot start {name!r} as the requested user: {exc.strerror}"
        )
    if exc.filename == cwd and exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
        code = {
            errno.ENOENT: AgentErrorCode.NOT_FOUND,
            errno.ENOTDIR: AgentErrorCode.NOT_A_DIRECTORY,
            errno.EACCES: AgentErrorCode.PERMISSION_DENIED,
        }[exc.errno]
        return AgentError(code, f"cannot use {cwd!r} as the working directory: {exc.strerror}")
    if exc.errno == errno.ENOENT:
        return AgentError(AgentErrorCode.NOT_FOUND, f"command {argv[0]!r} not found in the sandbox")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AgentError(AgentErrorCode.PERMISSION_DENIED, f"cannot execute {argv[0]!r}: {exc.strerror}")
    if exc.errno in (errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return AgentError(AgentErrorCode.BUSY, f"cannot start {argv[0]!r}: {exc.strerror}")
    return AgentError(AgentErrorCode.INVALID, f"cannot execute {argv[0]!r}: {exc.strerror}")
