"""Starting the processes of a switched identity without forking the agent: one vfork-ing spawner per identity.

Why. CPython's ``_posixsubprocess`` starts a child with ``vfork`` (the page tables are not copied; the parent
waits until the exec) unless the child must change its uid, gid or groups: glibc's set*id calls are unsafe in a
vfork child, so with ``user=``/``group=``/``extra_groups=`` it forks. For the agent that fork was most of an
exec round trip of ``user``, the default identity: ~0.85 ms in a namespace sandbox (measured: ~480 more page
faults per exec, the agent's copy-on-write faults after each fork) and ~15 ms under gVisor's ptrace platform.

How. The processes of an identity the agent must switch to are started by that identity's *spawner*: a child
forked from the agent once, which drops to the identity exactly as a file worker does (``setgroups``,
``setresgid``, ``setresuid``; it is then not dumpable, so the identity's processes cannot ptrace it) and then
starts each process with a ``Popen`` that changes no identity, so CPython vforks. The agent creates the pipes
and keeps its ends; the child's ends travel with the request (``SCM_RIGHTS``). The spawner is the processes'
parent: it reaps them and reports each exit status. The agent is their reaper of last resort (a child
subreaper), so if the spawner dies, they are re-parented to the agent and reaped there like its own children.

The first process of an identity is started the old way (fork) and the spawner is forked for the second: a
one-time cost of ~3 ms that the first command of a new sandbox (create → first output) does not pay.

Wire: a ``SOCK_SEQPACKET`` socketpair, one JSON message per datagram.
  agent → spawner  ``{"argv", "env", "cwd"}`` with fds [stdout, stderr] or [stdout, stderr, stdin];
  spawner → agent  ``{"pid"}`` or ``{"errno", "strerror", "filename"}`` (or ``{"invalid"}``), in request order;
  spawner → agent  ``{"exited": pid, "status": wait status}``, unsolicited, once it reaped a process.

Trust. The spawner runs as the identity, so the identity's processes may kill or stop it (``kill -9 -1``).
The agent treats it as untrusted: exits are accepted only for pids it reported starting, a spawner that does
not answer in ``REPLY_TIMEOUT`` is killed, and so is a stopped one (``kill -STOP``: it would neither start nor
reap; checked every ``WATCH_INTERVAL`` while it has processes), whose exited processes then go to the agent.
A stopped spawner is retired rather than killed outright: the agent shuts its request side, continues it and
gives it one more ``WATCH_INTERVAL`` to answer what it owes, report what it reaped and exit. The process that
stopped it may be one it started and had not reported yet, which would otherwise run on untracked, or one
whose exit it had reaped and not reported. If it does not exit in time it is killed; requests still in flight
then fail with ``busy``, and a process it reaped without reporting is recorded as killed. The next request
forks a new spawner. One case is left: a process killing its spawner (``kill -9``) before the spawner reported
starting that very process. Its request fails with ``busy`` while it runs on, re-parented to the agent and
reaped there, untracked like any daemon the identity's processes leave behind; killing the sandbox ends it.

Behaviour kept: the working directory is entered with the identity's rights here, where the fork path entered
it as root before switching; a directory the identity cannot enter is therefore retried the old way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
from collections import deque
from collections.abc import Callable
from typing import Any

from corral.agent.conn import Connection
from corral.agent.errors import AgentError
from corral.agent.loop import Timer, log
from corral.agent.memory import prefer_self_for_oom
from corral.agent.process import Process, ProcessTable, Spawned, _spawn_error, new_process_id
from corral.agent.users import Identity, fork_helper
from corral.protocol.messages import AgentErrorCode

__all__ = ["Launcher", "Spawner"]

REPLY_TIMEOUT = 30.0  # seconds for one start (a loaded gVisor sandbox takes tens of ms); then it is killed
WATCH_INTERVAL = 1.0  # seconds between checks that a spawner with running processes is not stopped
MESSAGE_SIZE = 1024 * 1024  # requests hold one exec header (≤ 64 KiB) plus the environment
PR_SET_CHILD_SUBREAPER = 36

Started = Callable[[Process | AgentError], None]
Reply = Callable[[dict[str, Any] | None], None]  # None: the spawner is gone


class Spawner:
    """The agent's side of one identity's spawner process."""

    def __init__(self, table: ProcessTable, identity: Identity) -> None:
        self.table = table
        self.loop = table.loop
        self.identity = identity
        self.pid, self.sock = fork_helper(_spawner_main, identity, socket.SOCK_SEQPACKET)
        self.alive = True
        self.pending: deque[tuple[Reply, Timer]] = deque()
        self.started: set[int] = set()  # pids it reported starting and not yet reported exited
        self._watch: Timer | None = None
        self._retiring = False  # found stopped: takes no more requests and exits once it answered
        table.other_children[self.pid] = self._reaped
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    @property
    def usable(self) -> bool:
        """Takes requests: alive and not retiring (a retiring one stays alive until it has answered)."""
        return self.alive and not self._retiring

    def submit(self, request: dict[str, Any], fds: list[int], reply: Reply) -> bool:
        """Send a start request; False if this spawner cannot take it (then nothing was sent)."""
        if not self.usable:
            return False
        try:
            socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
        except (BlockingIOError, InterruptedError):
            return False  # its queue is full: start this one another way
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                return False  # a huge environment: the fork path takes any size
            self._gone(f"send failed: {exc}")
            return False
        timer = self.loop.call_later(REPLY_TIMEOUT, lambda: self.kill("it did not answer in time"))
        self.pending.append((reply, timer))
        self._arm_watch()
        return True

    def _arm_watch(self) -> None:
        if self._watch is None:
            self._watch = self.loop.call_later(WATCH_INTERVAL, self._check_not_stopped)

    def _on_readable(self) -> None:
        while self.alive:
            try:
                data = self.sock.recv(MESSAGE_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._gone(f"receive failed: {exc}")
                return
            if not data:
                self._gone("it exited")
                return
            try:
                msg = json.loads(data)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.kill("it sent a malformed message")
                return
            if "exited" in msg:
                pid, status = msg.get("exited"), msg.get("status")
                if not isinstance(pid, int) or not isinstance(status, int) or pid not in self.started:
                    self.kill("it reported the exit of a process it did not start")
                    return
                self.started.discard(pid)
                self.table.child_exited(pid, status)
            elif self.pending:
                reply, timer = self.pending.popleft()
                timer.cancel()
                pid = msg.get("pid")
                if isinstance(pid, int):
                    self.started.add(pid)
                    self._arm_watch()
                self.loop.run_callback(reply, msg)
            else:
                self.kill("it answered a request nobody made")
                return

    def _check_not_stopped(self) -> None:
        self._watch = None
        if not self.alive or not (self.started or self.pending):
            return
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            state = b"?"
        if state in (b"T", b"t"):
            self._retire("it was stopped")
            return
        self._arm_watch()

    def _retire(self, reason: str) -> None:
        """Let it answer the requests it holds, report the exits it reaped and exit (on EOF); kill it if not."""
        if self._retiring:
            return
        self._retiring = True
        log(f"process spawner {self.pid} ({self.identity.name}) retired: {reason}")
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
        self._watch = self.loop.call_later(WATCH_INTERVAL, lambda: self.kill(f"{reason}; it did not exit"))

    def kill(self, reason: str) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._gone(reason)

    def _gone(self, reason: str) -> None:
        """Stop using it; requests in flight fail. Its processes are settled once it is reaped."""
        if not self.alive:
            return
        self.alive = False
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        log(f"process spawner {self.pid} ({self.identity.name}) gone: {reason}")
        self.loop.forget(self.sock.fileno())
        self.sock.close()
        pending, self.pending = self.pending, deque()
        for reply, timer in pending:
            timer.cancel()
            self.loop.run_callback(reply, None)

    def _reaped(self, status: int) -> None:
        """It exited and its children are now the agent's (subreaper): those still running will be reaped
        by the agent; a process it reaped but did not report is gone, and is recorded as killed."""
        self._on_readable()  # what it said before it exited may still be queued: exits it reaped, say
        self._gone(f"exit status {os.waitstatus_to_exitcode(status)}")
        for pid in sorted(self.started):
            proc = self.table.by_pid.get(pid)
            if proc is None or not isinstance(proc.popen, Spawned):
                continue  # already reaped by the agent (re-parented, exited first)
            try:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except (
                ChildProcessError
            ):  # not the agent's child: the spawner reaped it and died before saying so
                self.table.child_exited(pid, signal.SIGKILL)  # the wait status of a SIGKILL
        self.started.clear()


class Launcher:
    """Starts processes: through the identity's spawner when it has one, else with ``Popen`` (forking)."""

    def __init__(self, table: ProcessTable) -> None:
        self.table = table
        self.spawners: dict[str, Spawner] = {}
        self._seen: set[str] = set()  # identities that started a process (their next one gets a spawner)
        self._retiring: list[Spawner] = []  # replaced spawners still answering what they owe
        self._usable: bool | None = None  # can the agent be its spawners' children's reaper?

    def start(
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
        done: Started,
    ) -> None:
        """Start a process and call ``done`` with it (or with the error), now or once the spawner answered."""
        kwargs: dict[str, Any] = {
            "env": env,
            "cwd": cwd,
            "identity": identity,
            "stdin": stdin,
            "timeout": timeout,
            "tag": tag,
            "owner": owner,
        }

        def fork_path() -> None:
            try:
                proc = self.table.spawn(argv, **kwargs)
            except AgentError as exc:
                done(exc)
                return
            done(proc)

        spawner = self._spawner(identity)
        if spawner is None:
            fork_path()
            return
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if stdin else (-1, -1)
        child_fds = [out_w, err_w] + ([in_r] if stdin else [])
        parent_fds = [out_r, err_r] + ([in_w] if stdin else [])

        def reply(msg: dict[str, Any] | None) -> None:
            pid = msg.get("pid") if msg is not None else None
            if not isinstance(pid, int):
                for fd in parent_fds:
                    os.close(fd)
                if msg is None:
                    done(AgentError(AgentErrorCode.BUSY, f"cannot start {argv[0]!r} now; try again"))
                elif msg.get("errno") == errno.EACCES and msg.get("filename") == cwd:
                    fork_path()  # entered as root before switching identity, as always
                elif isinstance(msg.get("errno"), int):
                    exc = OSError(msg["errno"], str(msg.get("strerror")), msg.get("filename"))
                    done(_spawn_error(exc, argv, cwd, env.get("PATH", "")))
                else:
                    done(
                        AgentError(AgentErrorCode.INVALID, f"cannot start {argv[0]!r}: {msg.get('invalid')}")
                    )
                return
            child = Spawned(
                pid,
                stdout=open(out_r, "rb", buffering=0),  # noqa: SIM115 - the Process owns and closes them
                stderr=open(err_r, "rb", buffering=0),  # noqa: SIM115
                stdin=open(in_w, "wb", buffering=0) if stdin else None,  # noqa: SIM115
            )
            proc = Process(
                self.table, new_process_id(), child, argv, user=identity.name, cwd=cwd, tag=tag, owner=owner
            )
            done(self.table.register(proc, timeout))

        sent = spawner.submit({"argv": argv, "env": env, "cwd": cwd}, child_fds, reply)
        for fd in child_fds:
            os.close(fd)  # the spawner has its own copies now (or nothing was sent)
        if not sent:
            for fd in parent_fds:
                os.close(fd)
            fork_path()

    def _spawner(self, identity: Identity) -> Spawner | None:
        if not identity.switch:
            return None  # Popen changes no identity for it: it vforks already
        spawner = self.spawners.get(identity.name)
        if spawner is not None and spawner.usable:
            return spawner
        if identity.name not in self._seen:
            self._seen.add(identity.name)
            return None
        if not self._can_reap_orphans():
            return None
        if spawner is not None and spawner.alive:
            self._retiring.append(spawner)  # still finishing: replaced now, killed if the agent stops first
        self._retiring = [old for old in self._retiring if old.alive]
        spawner = self.spawners[identity.name] = Spawner(self.table, identity)
        return spawner

    def _can_reap_orphans(self) -> bool:
        """The agent must inherit a dead spawner's children. PID 1 does; otherwise become a subreaper."""
        if self._usable is None:
            self._usable = os.getpid() == 1
            if not self._usable:
                try:
                    import ctypes

                    libc = ctypes.CDLL(None, use_errno=True)
                    self._usable = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
                except (ImportError, OSError, AttributeError):
                    self._usable = False
                if not self._usable:
                    log("cannot become a child subreaper: processes of other users are started by forking")
        return self._usable

    def close(self) -> None:
        for spawner in [*self.spawners.values(), *self._retiring]:
            spawner.kill("agent stopping")


# --- the spawner process ------------------------------------------------------------------------------------
def _spawner_main(fd: int, identity: Identity) -> None:
    """Start processes as ``identity`` on request until the agent closes its end; report their exits."""
    from corral.agent.worker import become

    prefer_self_for_oom()  # its processes are born with it (corral.agent.memory); before it is not dumpable
    fd = become(identity, fd)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd)
    sock.setblocking(True)
    children: dict[int, subprocess.Popen[bytes]] = {}  # kept until reaped, so Popen never reaps them itself
    while True:
        try:
            ready, _, _ = select.select([fd, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
            # reaped before new requests: an exit is reported after the start that made it
            if not _report_exits(sock, children):
                return  # the agent is gone
        if fd in ready:
            data, fds, _flags, _addr = socket.recv_fds(sock, MESSAGE_SIZE, 3)
            if not data:  # the agent is gone, stopping or retiring this spawner
                if _report_exits(sock, children):
                    for popen in children.values():
                        popen.returncode = -1  # left to the agent: Popen.__del__ must not reap them
                return
            try:
                sock.send(json.dumps(_start(data, fds, children)).encode())
            except OSError:
                return  # the agent is gone
            finally:
                for received in fds:
                    with contextlib.suppress(OSError):
                        os.close(received)


def _report_exits(sock: socket.socket, children: dict[int, subprocess.Popen[bytes]]) -> bool:
    """Reap the exited children and report each; False if the agent is gone."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return True
        popen = children.pop(pid, None)
        if popen is not None:
            popen.returncode = os.waitstatus_to_exitcode(status)
        try:
            sock.send(json.dumps({"exited": pid, "status": status}).encode())
        except OSError:
            return False


def _start(data: bytes, fds: list[int], children: dict[int, subprocess.Popen[bytes]]) -> dict[str, Any]:
    try:
        request = json.loads(data)
        if len(fds) not in (2, 3):
            raise ValueError("expected 2 or 3 descriptors")
        popen = subprocess.Popen(
            request["argv"],
            stdin=fds[2] if len(fds) == 3 else subprocess.DEVNULL,
            stdout=fds[0],
            stderr=fds[1],
            cwd=request["cwd"],
            env=request["env"],
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        return {"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
    except (ValueError, TypeError, KeyError, subprocess.SubprocessError) as exc:
        return {"invalid": f"{type(exc).__name__}: {exc}"}
    children[popen.pid] = popen
    return {"pid": popen.pid}
