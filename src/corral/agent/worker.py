"""File workers: forked helper processes that perform file operations with a given identity's uid and gid.

Why a process per identity, and not checks in the agent: the spec requires that ``user`` can never write where
uid 1000 could not. Re-implementing the kernel's permission logic (modes, ACLs, sticky directories, read-only
mounts, capabilities, LSMs) in the agent is a losing game; letting the kernel check is exact. ``setfsuid`` would
do that per thread, but only through ``ctypes``, and credentials set with it are easy to leak into the
processes the agent forks. A fork per request costs ~1 ms; so instead each identity has a small pool of
long-lived workers, forked once from the agent (no exec: ~1 ms), which ``setresgid``/``setgroups``/``setresuid``
to the identity and then serve requests one at a time over a ``socketpair``, framed with the protocol codec.
A request round trip costs tens of microseconds. Root-identity requests use workers too: that keeps slow file
system calls (a large ``rmtree``, a deep listing) off the agent's event loop, where they would stall every
stream.

Opened files come back as file descriptors (``SCM_RIGHTS``), so bulk data is moved by the agent, never copied
through the worker. A worker runs as the sandbox user and so may be killed by that user's processes; the agent
treats it as untrusted (bounded frames, at most one fd per reply) and fails its pending requests if it dies,
forking a fresh one for the next request. Having changed credentials, a worker is not dumpable, so the user's
processes cannot ptrace it.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import signal
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from corral.agent.errors import AgentError, from_oserror
from corral.agent.loop import Loop, log
from corral.agent.users import Identity, fork_helper
from corral.protocol.frames import Decoder, ProtocolError, encode
from corral.protocol.messages import AgentErrorCode

__all__ = ["WorkerPool", "WorkerReply", "become"]

MAX_WORKERS = 4  # per identity: concurrency for slow file operations without unbounded forking
RECV_SIZE = 256 * 1024


class WorkerReply:
    __slots__ = ("batches", "fd", "fields")

    def __init__(self, fields: dict[str, Any], batches: list[bytes], fd: int | None) -> None:
        self.fields = fields
        self.batches = batches
        self.fd = fd

    def check(self) -> None:
        """Raise the worker's error, if it answered with one."""
        if not self.fields.get("ok"):
            try:
                code = AgentErrorCode(str(self.fields.get("code")))
            except ValueError:
                code = AgentErrorCode.INTERNAL
            raise AgentError(code, str(self.fields.get("message", "file operation failed")))


ReplyCallback = Callable[[WorkerReply], None]


class Worker:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.pid, self.sock = fork_helper(_worker_main, pool.identity, socket.SOCK_STREAM)
        self.decoder = Decoder()
        self.queue: deque[tuple[str, dict[str, Any], ReplyCallback]] = deque()
        self.current: ReplyCallback | None = None
        self.batches: list[bytes] = []
        self.fd: int | None = None
        self.alive = True
        pool.loop.add_reader(self.sock.fileno(), self._on_readable)

    @property
    def load(self) -> int:
        return len(self.queue) + (self.current is not None)

    def submit(self, op: str, args: dict[str, Any], callback: ReplyCallback) -> None:
        if not self.alive:
            callback(_died())
            return
        self.queue.append((op, args, callback))
        if self.current is None:
            self._next()

    def _next(self) -> None:
        while self.queue and self.current is None and self.alive:
            op, args, callback = self.queue.popleft()
            try:
                self.sock.sendall(
                    encode({"op": op, **args})
                )  # requests are small; the socket buffer holds them
            except OSError as exc:
                self.die(f"send failed: {exc}")
                callback(_died())
                return
            self.current = callback

    def _on_readable(self) -> None:
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(RECV_SIZE, socket.CMSG_SPACE(4 * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.die(f"receive failed: {exc}")
            return
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                for fd in fds:
                    if self.fd is None and self.current is not None:
                        self.fd = fd
                    else:
                        os.close(fd)
        if not data:
            self.die("worker exited")
            return
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            self.die(f"bad reply: {exc}")
            return
        for frame in frames:
            if self.current is None:
                self.die("reply without a request")
                return
            if frame.get("more"):
                self.batches.append(frame.payload)
                continue
            self.batches.append(frame.payload)
            callback, self.current = self.current, None
            reply = WorkerReply(frame.header, [b for b in self.batches if b], self.fd)
            self.batches, self.fd = [], None
            self.pool.loop.run_callback(callback, reply)
        self._next()

    def die(self, reason: str) -> None:
        if not self.alive:
            return
        self.alive = False
        log(f"file worker {self.pid} ({self.pool.identity.name}) gone: {reason}")
        self.pool.loop.forget(self.sock.fileno())
        self.sock.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.pool.workers.remove(self)
        pending = [cb for _, _, cb in self.queue]
        if self.current is not None:
            pending.insert(0, self.current)
        self.queue.clear()
        self.current = None
        for callback in pending:
            self.pool.loop.run_callback(callback, _died())

    def finish(self, timeout: float) -> None:
        """Blocking, for shutdown: send the queued requests, close our end, wait for the worker to exit."""
        if not self.alive:
            return
        try:
            self.sock.setblocking(True)
            for op, args, _ in self.queue:
                self.sock.sendall(encode({"op": op, **args}))
            self.sock.shutdown(socket.SHUT_WR)
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            pidfd = -1
        if pidfd >= 0:
            with contextlib.suppress(OSError):
                select.select([pidfd], [], [], timeout)
            os.close(pidfd)
        self.queue.clear()
        self.current = None
        self.die("agent stopping")

    def reaped(self, status: int) -> None:
        self.die(f"exit status {os.waitstatus_to_exitcode(status)}")


def _died() -> WorkerReply:
    return WorkerReply(
        {
            "ok": False,
            "code": AgentErrorCode.INTERNAL,
            "message": "the file worker stopped during the operation",
        },
        [],
        None,
    )


class WorkerPool:
    """The workers of one identity. Requests go to an idle worker, else a new one, else the least loaded."""

    def __init__(self, loop: Loop, identity: Identity, on_fork: Callable[[Worker], None]) -> None:
        self.loop = loop
        self.identity = identity
        self.workers: list[Worker] = []
        self._on_fork = on_fork

    def pick(self) -> Worker:
        idle = [w for w in self.workers if w.load == 0]
        if idle:
            return idle[0]
        if len(self.workers) < MAX_WORKERS:
            worker = Worker(self)
            self.workers.append(worker)
            self._on_fork(worker)
            return worker
        return min(self.workers, key=lambda w: w.load)

    def submit(self, op: str, args: dict[str, Any], callback: ReplyCallback) -> Worker:
        worker = self.pick()
        worker.submit(op, args, callback)
        return worker

    def close(self, timeout: float = 2.0) -> None:
        """Stop the workers, letting each finish what was sent or queued to it (aborts remove temp files)."""
        for worker in list(self.workers):
            worker.finish(timeout)


# --- the worker process ------------------------------------------------------------------------------------
def become(identity: Identity, fd: int) -> int:
    """In a child forked from the agent: keep only ``fd`` (returned, maybe moved above stderr) and stdio, and
    switch to ``identity`` for good (the process is then not dumpable: that identity's processes cannot ptrace
    it). Shared by file workers and process spawners. Import what the child needs first: the interpreter's
    files may not be readable by the identity."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    # Close everything inherited from the agent: process pipes (a kept stdin write end would hide EOF from a
    # process), client connections, the event loop's epoll fd.
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if fd < 3:
        fd2 = os.dup(fd)
        os.close(fd)
        fd = fd2
    try:  # the fds actually open: closerange up to a high limit is a loop of close() where close_range is missing
        inherited = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        inherited = list(range(3, 65536))
    for other in inherited:
        if other > 2 and other != fd:
            with contextlib.suppress(OSError):
                os.close(other)
    os.set_inheritable(fd, False)
    if identity.switch and os.geteuid() == 0:
        os.setgroups(list(identity.groups))
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    os.umask(0o022)
    try:
        os.chdir(identity.home)
    except OSError:
        os.chdir("/")
    return fd


def _worker_main(fd: int, identity: Identity) -> None:
    """Serve requests on ``fd`` as ``identity`` until the agent closes its end."""
    # Import what file operations need while still root: the interpreter's files may not be readable by the
    # identity (they are not when a root-only Python runs the agent, as in tests).
    import json  # noqa: F401
    import shutil  # noqa: F401

    from corral.agent import files

    fd = become(identity, fd)
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    state = files.WorkerState(identity.home)
    decoder = Decoder()
    while True:
        data = sock.recv(RECV_SIZE)
        if not data:  # the agent is gone or stopping: uploads it did not commit must not leave temp files
            for token in list(state.uploads):
                files.op_abort(state, {"token": token})
            return
        for frame in decoder.feed(data):
            header = dict(frame.header)
            op = header.pop("op", None)
            reply: files.Reply | None = None
            try:
                handler = files.OPS[op]
                reply = handler(state, header)
                out: dict[str, Any] = {"ok": True, **reply.fields}
            except AgentError as exc:
                out = {"ok": False, "code": str(exc.code), "message": exc.message}
            except OSError as exc:
                err = from_oserror(exc, header.get("path"))
                out = {"ok": False, "code": str(err.code), "message": err.message}
            except Exception as exc:  # report, keep serving
                out = {"ok": False, "code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            batches = reply.batches if reply is not None else []
            for batch in batches[:-1]:
                sock.sendall(encode({"more": True}, batch))
            last = encode(out, batches[-1] if batches else b"")
            if reply is not None and reply.fd is not None:
                fds = array.array("i", [reply.fd])
                n = sock.sendmsg([last], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
                os.close(reply.fd)
                if n < len(last):
                    sock.sendall(last[n:])
            else:
                sock.sendall(last)
