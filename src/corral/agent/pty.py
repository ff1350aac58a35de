"""Interactive terminals: a process whose stdin, stdout and stderr are the slave side of a pseudo-terminal.

A terminal is an ordinary :class:`~corral.agent.process.Process` whose only output "pipe" is the pty master
(stream name ``pty``) and whose stdin is a second descriptor of that master. Everything else is the process
machinery unchanged: the output ring (smaller here, ``PTY_RING_BYTES``: a terminal re-attach replays recent
screen output, not a log), subscribers for ``attach`` with replay, back-pressure (a client that stops reading
stops the agent reading the master; the pty fills and the program blocks writing, as on a slow terminal),
the timeout, and the exited-records table.

Set-up. The child becomes a session leader (``setsid``) and takes the slave as its controlling terminal
(``TIOCSCTTY``) after switching user, so job control, ``^C`` and ``SIGWINCH`` work as in a real terminal. The
master descriptors are close-on-exec; the program sees only fds 0-2.

Exit. The kernel makes output written just before ``exit`` readable on the master only a little later (the
tty flip buffer is pushed by a worker), and reading the master fails with EIO only once every holder of the
slave has closed it and everything was read. So the exit is recorded when the master reaches EIO, or after
``EXIT_GRACE`` if something (a background job) still holds the slave. Then the master is closed: the terminal
is hung up, like an SSH session whose shell ended, and what is left in it gets EIO on the tty.

Kill. A shell with job control runs each job in its own process group, so SIGKILL to the shell's group would
leave the jobs. SIGKILL to a terminal goes to every process of its session (found in ``/proc``). A process
that left the session with ``setsid`` is no longer the terminal's; it loses the terminal at hang-up and dies
with the sandbox.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal as _signal
import struct
import subprocess
import termios
from typing import IO, Any

from corral.agent.conn import Connection
from corral.agent.errors import AgentError
from corral.agent.loop import Timer
from corral.agent.memory import children_preferred_for_oom
from corral.agent.process import Process, ProcessTable, _spawn_error, new_process_id
from corral.agent.ring import Ring
from corral.agent.users import Identity
from corral.protocol.messages import AgentErrorCode

__all__ = ["EXIT_GRACE", "PTY_RING_BYTES", "PtyProcess", "check_size", "spawn_pty"]

PTY_RING_BYTES = 1024 * 1024  # replayed on re-attach: many screens of output, cheap to send
EXIT_GRACE = 0.5  # seconds after the leader's exit to wait for the master's EIO (background jobs hold it)
MAX_DIMENSION = 10_000  # columns or rows; the kernel takes 16 bits, nobody needs more


def check_size(cols: object, rows: object) -> tuple[int, int]:
    for name, value in (("cols", cols), ("rows", rows)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIMENSION:
            raise AgentError(AgentErrorCode.INVALID, f"{name!r} must be an integer from 1 to {MAX_DIMENSION}")
    return cols, rows  # type: ignore[return-value]


def _set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_terminal() -> None:  # pragma: no cover - runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyProcess(Process):
    def __init__(
        self,
        table: ProcessTable,
        popen: subprocess.Popen[bytes],
        master: IO[bytes],
        writer: IO[bytes],
        **kw: Any,
    ) -> None:
        super().__init__(table, new_process_id(), popen, outputs=[(master, "pty")], stdin_file=writer, **kw)
        self.ring = Ring(limit=PTY_RING_BYTES)
        self.master_fd = master.fileno()
        self._exit_status: int | None = None
        self._grace: Timer | None = None

    def resize(self, cols: int, rows: int) -> None:
        if self.master_fd not in self._pipes:
            raise AgentError(AgentErrorCode.INVALID, f"the terminal of {self.process_id} was closed")
        _set_size(self.master_fd, cols, rows)  # the kernel sends SIGWINCH to the foreground job

    def write_stdin(self, conn: Connection, rid: str, data: bytes, eof: bool) -> None:
        if eof:
            raise AgentError(
                AgentErrorCode.INVALID,
                "a terminal has no end of input to close; send Ctrl-D (b'\\x04') instead",
            )
        super().write_stdin(conn, rid, data, eof)

    # --- exit: wait for the master's EIO (bounded), then hang up -----------------------------------------------
    def on_exit(self, status: int) -> None:
        if self.master_fd in self._pipes and self._exit_status is None:
            self.running = False  # reaped: the pid (hence the group) may be reused from now on
            self._exit_status = status
            self._grace = self.table.loop.call_later(EXIT_GRACE, self._finish_exit)
            return
        self._exit_status = status
        self._finish_exit()

    def _close_pipe(self, fd: int) -> None:
        super()._close_pipe(fd)
        if fd == self.master_fd and self._exit_status is not None and self.exit_pos is None:
            self._finish_exit()

    def _finish_exit(self) -> None:
        if self.exit_pos is not None or self._exit_status is None:
            return
        if self._grace is not None:
            self._grace.cancel()
        super().on_exit(self._exit_status)  # drains what is readable, marks the end, closes stdin
        with contextlib.suppress(OSError):
            self._close_pipe(self.master_fd)  # hang up

    def kill_group(self, sig: int) -> bool:
        if not self.running:
            return False
        if sig == _signal.SIGKILL:
            for pid in _session_members(self.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        return super().kill_group(sig)


def _session_members(sid: int) -> list[int]:
    """Pids whose session id is ``sid``, from ``/proc/<pid>/stat`` (the field after the command name)."""
    out: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 3 and fields[3] == str(sid).encode():
            out.append(int(name))
    return out


def spawn_pty(
    table: ProcessTable,
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    identity: Identity,
    cols: int,
    rows: int,
    timeout: float | None,
    tag: str | None,
) -> PtyProcess:
    """Start ``argv`` on a new terminal of ``cols`` x ``rows``; it outlives the connection that asked for it."""
    master, slave = os.openpty()  # both close-on-exec; the slave reaches the child only as fds 0-2
    try:
        _set_size(master, cols, rows)
        attrs = termios.tcgetattr(slave)
        attrs[0] |= getattr(termios, "IUTF8", 0)  # erase whole UTF-8 characters in canonical mode
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        kwargs: dict[str, Any] = {}
        if identity.switch:
            kwargs = {"user": identity.uid, "group": identity.gid, "extra_groups": list(identity.groups)}
        try:
            with children_preferred_for_oom():
                popen = subprocess.Popen(
                    argv,
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_take_terminal,  # safe: the agent is single-threaded
                    close_fds=True,
                    bufsize=0,
                    **kwargs,
                )
        except OSError as exc:
            raise _spawn_error(exc, argv, cwd, env.get("PATH", "")) from None
        except (ValueError, subprocess.SubprocessError) as exc:
            raise AgentError(AgentErrorCode.INVALID, f"cannot start {argv[0]!r}: {exc}") from None
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    reader = os.fdopen(master, "rb", buffering=0)
    writer = os.fdopen(os.dup(master), "wb", buffering=0)
    proc = PtyProcess(
        table, popen, reader, writer, argv=argv, user=identity.name, cwd=cwd, tag=tag, owner=None
    )
    table.register(proc, timeout)
    return proc
