"""The agent proper: agent-wide state and the table from op to handler.

Each handler validates its request, then either answers at once or arranges for the answer: process output is
streamed by subscribers (``process``), file operations go to the identity's worker pool (``worker``) and are
answered from its reply callback, uploads are fed by ``data`` frames. A handler raises
:class:`~corral.agent.errors.AgentError` for anything the client got wrong or the system refused; the dispatcher
turns it into the request's ``error`` frame, and turns any other exception into ``internal`` (logged with its
traceback), so one bad request never takes down the agent.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from corral.agent import usage
from corral.agent.conn import Connection
from corral.agent.errors import AgentError, from_oserror, short_repr
from corral.agent.hello import hello_fields
from corral.agent.loop import Loop, log
from corral.agent.memory import MemoryGuard
from corral.agent.ports import MAX_PORT_STREAMS, PortStream, check_target
from corral.agent.process import Process, ProcessTable
from corral.agent.pty import PtyProcess, check_size, spawn_pty
from corral.agent.spawner import Launcher
from corral.agent.sudo import CLIENT_DIR, SudoService
from corral.agent.users import Identities, Identity
from corral.agent.watch import Watches
from corral.agent.worker import Worker, WorkerPool, WorkerReply
from corral.protocol.frames import MAX_HEADER, Frame
from corral.protocol.messages import CHANNEL, CHUNK_SIZE, AgentErrorCode, Op

__all__ = ["Agent"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UPLOAD_PENDING_LIMIT = 8 * 1024 * 1024  # data that arrived before the target was open; then stop reading
LIST_CHUNK_BYTES = 48 * 1024  # entries per streamed ``chunk`` frame, well under the 64 KiB header limit
HEADER_ROOM = MAX_HEADER - 4096  # what an answer's fields may take, leaving room for id and the rest

Handler = Callable[[Connection, str, Frame], None]


RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): reseed the CRNG from the input pool now (needs CAP_SYS_ADMIN)


def _invalid(message: str) -> AgentError:
    return AgentError(AgentErrorCode.INVALID, message)


def _opt(h: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = h.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _invalid(f"{key!r} has the wrong type")
    return value


def _path(h: dict[str, Any], key: str = "path") -> str:
    path = h.get(key)
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
        raise _invalid(f"{key!r} must be a non-empty path without NUL bytes")
    return path


def _str_dict(value: Any, key: str) -> dict[str, str | None]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str)
        and k
        and "=" not in k
        and "\x00" not in k
        and (v is None or (isinstance(v, str) and "\x00" not in v))
        for k, v in value.items()
    ):
        raise _invalid(f"{key!r} must map variable names to strings")
    return value


class Agent:
    def __init__(self, loop: Loop, identities: Identities, *, sudo: bool = False) -> None:
        self.loop = loop
        self.identities = identities
        self.processes = ProcessTable(loop)
        self.memory = self.processes.memory = MemoryGuard(loop, self.processes.mark_oom)
        self.launcher = Launcher(self.processes)
        self.connections: set[Connection] = set()
        self.pools: dict[str, WorkerPool] = {}
        self.uploads: dict[tuple[Connection, str], Upload] = {}
        self.ports: dict[tuple[Connection, str], PortStream] = {}
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.base_env.setdefault("PATH", DEFAULT_PATH)
        self.default_env: dict[str, str] = {}
        self.default_user = "user"
        self.default_cwd: str | None = None
        self.on_stop: Callable[[], None] = loop.stop
        self.sudo = SudoService.start(loop, self.processes, identities) if sudo else None
        if self.sudo is not None and not self.sudo.on_path:
            self.base_env["PATH"] = f"{CLIENT_DIR}:{self.base_env['PATH']}"
        self.handlers: dict[str, Handler] = {
            Op.HELLO: self.op_hello,
            Op.PING: self.op_ping,
            Op.CONFIGURE: self.op_configure,
            Op.RESTORED: self.op_restored,
            Op.USAGE: self.op_usage,
            Op.EXEC: self.op_exec,
            Op.ATTACH: self.op_attach,
            Op.DETACH: self.op_detach,
            Op.STDIN: self.op_stdin,
            Op.SIGNAL: self.op_signal,
            Op.LIST_PROCESSES: self.op_list_processes,
            Op.READ: self.op_read,
            Op.WRITE: self.op_write,
            Op.LIST: self.op_list,
            Op.STAT: self.op_stat,
            Op.MKDIR: self.op_mkdir,
            Op.REMOVE: self.op_remove,
            Op.RENAME: self.op_rename,
            Op.PORT_CONNECT: self.op_port_connect,
            Op.RESIZE: self.op_resize,
            Op.WATCH: self.op_watch,
        }
        self.watches = Watches(loop)
        loop.add_signal_handler(signal.SIGCHLD, self.processes.reap)
        loop.add_signal_handler(signal.SIGTERM, lambda: self.shutdown("SIGTERM"))
        loop.add_signal_handler(signal.SIGINT, lambda: self.shutdown("SIGINT"))
        loop.add_signal_handler(signal.SIGHUP, lambda: None)

    # --- connections -----------------------------------------------------------------------------------------
    def connect(
        self,
        rfd: int,
        wfd: int,
        name: str,
        *,
        send_hello: bool = True,
        on_close: Callable[[Connection], None] | None = None,
    ) -> Connection:
        def closed(conn: Connection) -> None:
            self._connection_closed(conn)
            if on_close is not None:
                on_close(conn)

        conn = Connection(
            self.loop, rfd, wfd, name, self.on_frame, closed, on_channel_close=self._connection_closed
        )
        self.connections.add(conn)
        if send_hello:
            conn.send({"ev": "hello", **hello_fields()})
        return conn

    def _connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.processes.connection_closed(conn)
        self.watches.connection_closed(conn)
        for key in [k for k in self.uploads if k[0] is conn]:
            self._drop_upload(self.uploads[key])

    def shutdown(self, reason: str) -> None:
        log(f"stopping ({reason}): killing {len(self.processes.by_pid)} running processes")
        self.memory.close()
        self.processes.kill_all()
        self.launcher.close()
        if self.sudo is not None:
            self.sudo.close()
        for pool in self.pools.values():
            pool.close()
        for conn in list(self.connections):
            conn.close("agent stopping")
        self.on_stop()

    # --- dispatch --------------------------------------------------------------------------------------------
    def on_frame(self, conn: Connection, frame: Frame) -> None:
        h = frame.header
        op = h.get("op")
        rid = h.get("id")
        if CHANNEL in h:  # relayed for one of several clients (see agent.conn): that client's channel
            name = h[CHANNEL]
            if not isinstance(name, str) or not 0 < len(name) <= 64:
                conn.error(rid if isinstance(rid, str) else "", AgentErrorCode.INVALID, "bad channel name")
                return
            if op == Op.CHANNEL_CLOSE:
                conn.close_channel(name)
                return
            try:
                conn = conn.channel(name)
            except OverflowError as exc:
                conn.error(rid if isinstance(rid, str) else "", AgentErrorCode.INVALID, str(exc))
                return
        if op == Op.DATA:
            self.on_data(conn, frame)
            return
        if op == Op.CANCEL:
            self.on_cancel(conn, rid)
            return
        if not isinstance(rid, str):
            conn.send(
                {
                    "id": rid,
                    "ev": "error",
                    "code": AgentErrorCode.INVALID,
                    "message": "a request needs a string 'id'",
                }
            )
            return
        if rid in conn.inflight:
            conn.send(
                {
                    "id": rid,
                    "ev": "error",
                    "code": AgentErrorCode.INVALID,
                    "message": f"request id {rid!r} is already in flight on this connection",
                }
            )
            return
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            conn.error(rid, AgentErrorCode.UNKNOWN_OP, f"unknown op {short_repr(op)}")
            return
        conn.inflight.add(rid)
        try:
            handler(conn, rid, frame)
        except AgentError as exc:
            conn.error(rid, exc.code, exc.message)
        except Exception as exc:  # a bug answers one request, it does not stop the agent
            import traceback

            log(f"internal error in {op}:\n" + traceback.format_exc().rstrip())
            conn.error(rid, AgentErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")

    # --- agent-wide ------------------------------------------------------------------------------------------
    def op_hello(self, conn: Connection, rid: str, frame: Frame) -> None:
        conn.finish(rid, {"ev": "ok", **hello_fields()})

    def op_ping(self, conn: Connection, rid: str, frame: Frame) -> None:
        conn.finish(rid, {"ev": "ok"})

    def op_usage(self, conn: Connection, rid: str, frame: Frame) -> None:
        conn.finish(rid, {"ev": "ok", **usage.sample()})

    def op_restored(self, conn: Connection, rid: str, frame: Frame) -> None:
        """This agent's machine was just restored from a memory image (a fork, a golden image): mix ``seed``
        into the kernel's entropy pool and reseed its CRNG at once (every copy of one image would otherwise
        draw the same "random" numbers), and set the clock to the host's ``time`` (it stood still in the
        image). Answers which of the two it could do: only where the agent owns its kernel (a VM's root);
        the other runtimes share the host's RNG and clock, and are refused both."""
        seed = _opt(frame.header, "seed", str, "")
        now = _opt(frame.header, "time", (int, float), None)
        try:
            data = bytes.fromhex(seed)
        except ValueError:
            raise _invalid("seed must be hex") from None
        if not 16 <= len(data) <= 512:
            raise _invalid("seed must be 16 to 512 bytes")
        reseeded = False
        try:
            fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, data)
                import fcntl

                fcntl.ioctl(fd, RNDRESEEDCRNG)
                reseeded = True
            finally:
                os.close(fd)
        except OSError:
            pass
        clock_set = False
        if now is not None and not isinstance(now, bool):
            try:
                time.clock_settime(time.CLOCK_REALTIME, float(now))
                clock_set = True
            except (OSError, ValueError, OverflowError):
                pass
        conn.finish(rid, {"ev": "ok", "reseeded": reseeded, "clock_set": clock_set})

    def op_configure(self, conn: Connection, rid: str, frame: Frame) -> None:
        h = frame.header
        env = _str_dict(h.get("env"), "env")
        user = _opt(h, "user", str)
        if user is not None:
            self._identity(user)
        cwd = _opt(h, "cwd", str)
        for key, value in env.items():
            if value is None:
                self.default_env.pop(key, None)
            else:
                self.default_env[key] = value
        if user is not None:
            self.default_user = user
        if cwd is not None:
            self.default_cwd = cwd or None
        conn.finish(rid, {"ev": "ok"})

    def _identity(self, name: object) -> Identity:
        identity = self.identities.get(name)
        if identity is None:
            raise _invalid(f"user must be 'root' or 'user', not {short_repr(name)}")
        return identity

    # --- processes -------------------------------------------------------------------------------------------
    def op_exec(self, conn: Connection, rid: str, frame: Frame) -> None:
        h = frame.header
        argv, cmd = h.get("argv"), h.get("cmd")
        pty = h.get("pty")
        if pty is not None and not isinstance(pty, dict):
            raise _invalid("'pty' must be an object with 'cols' and 'rows'")
        if (argv is None) == (cmd is None) and not (pty is not None and argv is None):
            raise _invalid(
                "exec needs exactly one of 'argv' and 'cmd'" + (" (or neither, with 'pty')" if pty else "")
            )
        identity = self._identity(h.get("user") or self.default_user)
        env = {**self.base_env, **identity.env(), **self.default_env}
        for key, value in _str_dict(h.get("env"), "env").items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        if pty is not None and argv is None and cmd is None:  # a login shell
            bash = _which("bash", env.get("PATH", DEFAULT_PATH))
            argv = [bash, "-l"] if bash is not None else ["/bin/sh", "-l"]
        if argv is not None:
            if (
                not isinstance(argv, list)
                or not argv
                or not all(isinstance(a, str) and "\x00" not in a for a in argv)
            ):
                raise _invalid("'argv' must be a non-empty list of strings")
        else:
            if not isinstance(cmd, str) or "\x00" in cmd:
                raise _invalid("'cmd' must be a string")
            argv = ["/bin/sh", "-c", cmd]
            if h.get("shell") == "bash":
                bash = _which("bash", env.get("PATH", DEFAULT_PATH))
                if bash is not None:
                    argv = [bash, "-lc", cmd]
        cwd = _opt(h, "cwd", str) or self.default_cwd or identity.home
        if not cwd.startswith("/"):
            cwd = os.path.join(identity.home, cwd)
        timeout = _opt(h, "timeout", (int, float))
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
            raise _invalid("'timeout' must be a positive number of seconds")
        background = bool(_opt(h, "background", bool, False))
        tag = _opt(h, "tag", str)
        if pty is not None:
            cols, rows = check_size(pty.get("cols"), pty.get("rows"))
            if "TERM" not in (h.get("env") or {}):  # the terminal's type, not whatever the agent inherited
                env["TERM"] = "xterm-256color"
            env.setdefault("LANG", "C.UTF-8")
            term = spawn_pty(
                self.processes,
                argv,
                env=env,
                cwd=cwd,
                identity=identity,
                cols=cols,
                rows=rows,
                timeout=timeout,
                tag=tag,
            )
            conn.send({"id": rid, "ev": "started", "process_id": term.process_id, "pid": term.pid})
            if background:
                conn.finish(rid, {"ev": "ok", "process_id": term.process_id, "pid": term.pid})
            else:  # streams like a foreground exec, but the terminal outlives this request and connection
                term.add_subscriber(conn, rid, 0)
            return

        def started(result: Process | AgentError) -> None:  # now, or once a spawner has started it
            if isinstance(result, AgentError):
                conn.error(rid, result.code, result.message)
                return
            proc = result
            if conn.closed:  # it left while a spawner was starting the process
                if not background:
                    proc.kill_group(signal.SIGKILL)
                return
            conn.send({"id": rid, "ev": "started", "process_id": proc.process_id, "pid": proc.pid})
            if background:
                conn.finish(rid, {"ev": "ok", "process_id": proc.process_id, "pid": proc.pid})
            else:
                proc.add_subscriber(conn, rid, 0)

        self.launcher.start(
            argv,
            env=env,
            cwd=cwd,
            identity=identity,
            stdin=bool(_opt(h, "stdin", bool, False)),
            timeout=timeout,
            tag=tag,
            owner=None if background else conn,
            done=started,
        )

    def op_attach(self, conn: Connection, rid: str, frame: Frame) -> None:
        proc = self.processes.get(frame.get("process_id"))
        replay = bool(_opt(frame.header, "replay", bool, True))
        ring = proc.ring
        pos = ring.start if replay else (ring.end if proc.exit_pos is None else proc.exit_pos)
        conn.send(
            {
                "id": rid,
                "ev": "started",
                "process_id": proc.process_id,
                "pid": proc.pid,
                "dropped": ring.dropped,
            }
        )
        proc.add_subscriber(conn, rid, pos)

    def op_detach(self, conn: Connection, rid: str, frame: Frame) -> None:
        self.processes.get(frame.get("process_id")).detach()
        conn.finish(rid, {"ev": "ok"})

    def op_stdin(self, conn: Connection, rid: str, frame: Frame) -> None:
        proc = self.processes.get(frame.get("process_id"))
        proc.write_stdin(conn, rid, frame.payload, bool(_opt(frame.header, "eof", bool, False)))

    def op_signal(self, conn: Connection, rid: str, frame: Frame) -> None:
        proc = self.processes.get(frame.get("process_id"))
        sig = _opt(frame.header, "signal", int, int(signal.SIGTERM))
        if not 0 <= sig < signal.NSIG:
            raise _invalid(f"no signal {sig}")
        delivered = proc.kill_group(sig)
        conn.finish(rid, {"ev": "ok", "delivered": delivered})

    def op_list_processes(self, conn: Connection, rid: str, frame: Frame) -> None:
        processes = self.processes.listing()
        truncated = False
        if _json_size(processes) > HEADER_ROOM:
            truncated = True
            for info in processes:
                info["argv"] = [a[:256] for a in info["argv"][:16]]
                if info["tag"] is not None:
                    info["tag"] = info["tag"][:256]
                info["cwd"] = info["cwd"][:1024]
            size = _json_size(processes)
            while size > HEADER_ROOM and processes:
                drop = next((i for i, p in enumerate(processes) if not p["running"]), 0)
                size -= _json_size(processes.pop(drop)) + 1
        conn.finish(rid, {"ev": "ok", "processes": processes, **({"truncated": True} if truncated else {})})

    def op_resize(self, conn: Connection, rid: str, frame: Frame) -> None:
        proc = self.processes.get(frame.get("process_id"))
        if not isinstance(proc, PtyProcess):
            raise _invalid(f"process {proc.process_id} has no terminal to resize")
        cols, rows = check_size(frame.get("cols"), frame.get("rows"))
        proc.resize(cols, rows)
        conn.finish(rid, {"ev": "ok"})

    def on_cancel(self, conn: Connection, rid: object) -> None:
        """``cancel`` ends the long-lived request ``rid`` (a watch or an attach) with ``ok``; no answer of its own."""
        if not isinstance(rid, str) or self.watches.cancel(conn, rid):
            return
        for proc in self.processes.by_id.values():
            for sub in proc.subscribers:
                if sub.conn is conn and sub.rid == rid:
                    sub.end({"ev": "ok", "cancelled": True})
                    return

    def op_watch(self, conn: Connection, rid: str, frame: Frame) -> None:
        h = frame.header
        identity = self._identity(h.get("user") or "user")
        path = _path(h)
        if not path.startswith("/"):
            path = os.path.join(identity.home, path)
        self.watches.start(conn, rid, path, identity, bool(_opt(h, "recursive", bool, False)))

    # --- files -----------------------------------------------------------------------------------------------
    def _pool(self, h: dict[str, Any]) -> WorkerPool:
        identity = self._identity(h.get("user") or "user")
        pool = self.pools.get(identity.name)
        if pool is None:
            pool = self.pools[identity.name] = WorkerPool(self.loop, identity, self._worker_forked)
        return pool

    def _worker_forked(self, worker: Worker) -> None:
        self.processes.other_children[worker.pid] = worker.reaped

    def _file_call(
        self,
        conn: Connection,
        rid: str,
        h: dict[str, Any],
        op: str,
        args: dict[str, Any],
        answer: Callable[[WorkerReply], dict[str, Any]],
    ) -> Worker:
        def done(reply: WorkerReply) -> None:
            if reply.fd is not None:
                os.close(reply.fd)
            if conn.closed:
                return
            try:
                reply.check()
                fields = answer(reply)
            except AgentError as exc:
                conn.error(rid, exc.code, exc.message)
                return
            conn.finish(rid, {"ev": "ok", **fields})

        return self._pool(h).submit(op, args, done)

    def op_stat(self, conn: Connection, rid: str, frame: Frame) -> None:
        h = frame.header
        self._file_call(conn, rid, h, "stat", {"path": _path(h)}, lambda r: {"entry": r.fields["entry"]})

    def op_mkdir(self, conn: Connection, rid: str, frame: Frame) -> None:
        h = frame.header
        args: dict[str, Any] = {"path": _path(h)}
        mode = _opt(h, "mode", int)
        if mode is not None:
            args["mode"] = mode & 0o7777
        self._file_call(conn, rid, h, "mkdir", args, lambda r: {"created": bool(r.fields.get("created"))})

    def op_remove(self, conn: Connection, rid: str, frame: Frame) -> None:
        h = frame.header
        args = {"path": _path(h), "recursive": bool(_opt(h, "recursive", bool, False))}
        self._file_call(conn, rid, h, "remove", args, lambda r: {})

    def op_rename(self, conn: Connection, rid: str, frame: Frame) -> None:
        h = frame.header
        args = {
            "src": _path(h, "src"),
            "dst": _path(h, "dst"),
            "overwrite": bool(_opt(h, "overwrite", bool, False)),
        }
        self._file_call(conn, rid, h, "rename", args, lambda r: {})

    def op_list(self, conn: Connection, rid: str, frame: Frame) -> None:
        h = frame.header
        path = _path(h)
        depth = _opt(h, "depth", int, 1)
        if depth < 1:
            raise _invalid("'depth' must be at least 1")
        stream = bool(_opt(h, "stream", bool, False))

        def done(reply: WorkerReply) -> None:
            if conn.closed:
                return
            try:
                reply.check()
                if not stream and sum(len(b) for b in reply.batches) > HEADER_ROOM:
                    raise AgentError(
                        AgentErrorCode.TOO_LARGE,
                        f"{path}: {reply.fields.get('count')} entries do not fit in one answer; "
                        "list a smaller depth or subtree, or pass stream:true",
                    )
                entries: list[Any] = []
                for batch in reply.batches:
                    entries.extend(json.loads(batch))
            except AgentError as exc:
                conn.error(rid, exc.code, exc.message)
                return
            except ValueError:
                conn.error(rid, AgentErrorCode.INTERNAL, "the file worker sent a malformed listing")
                return
            if stream:
                conn.add_producer(ListProducer(conn, rid, entries))
            else:
                conn.finish(rid, {"ev": "ok", "entries": entries})

        self._pool(h).submit("list", {"path": path, "depth": min(depth, 4096)}, done)

    def op_read(self, conn: Connection, rid: str, frame: Frame) -> None:
        h = frame.header
        path = _path(h)
        offset = _opt(h, "offset", int, 0)
        length = _opt(h, "length", int)
        if offset < 0 or (length is not None and length < 0):
            raise _invalid("'offset' and 'length' must not be negative")

        def opened(reply: WorkerReply) -> None:
            fd = reply.fd
            if conn.closed:
                if fd is not None:
                    os.close(fd)
                return
            try:
                reply.check()
                if fd is None:
                    raise AgentError(AgentErrorCode.INTERNAL, "the file worker sent no file")
            except AgentError as exc:
                if fd is not None:
                    os.close(fd)
                conn.error(rid, exc.code, exc.message)
                return
            conn.add_producer(FileReader(conn, rid, path, fd, offset, length))

        self._pool(h).submit("open_read", {"path": path}, opened)

    def op_write(self, conn: Connection, rid: str, frame: Frame) -> None:
        h = frame.header
        path = _path(h)
        mode = _opt(h, "mode", int, 0o644) & 0o7777
        args = {
            "path": path,
            "mode": mode,
            "append": bool(_opt(h, "append", bool, False)),
            "parents": bool(_opt(h, "parents", bool, True)),
        }
        upload = Upload(self, conn, rid, path, mode, args["append"])
        self.uploads[(conn, rid)] = upload
        upload.worker = self._pool(h).submit("open_write", args, upload.opened)

    def on_data(self, conn: Connection, frame: Frame) -> None:
        port = self.ports.get((conn, frame.get("id")))
        if port is not None:
            port.on_data(frame)
            return
        upload = self.uploads.get((conn, frame.get("id")))
        if upload is None:
            return  # the upload already failed (and said so) or never existed: nothing to answer
        if frame.get("abort"):
            upload.fail(AgentError(AgentErrorCode.INVALID, f"{upload.path}: upload aborted by the client"))
            return
        upload.data(frame.payload, bool(frame.get("eof")))

    def _drop_upload(self, upload: Upload) -> None:
        upload.fail(None)

    # --- ports -----------------------------------------------------------------------------------------------
    def op_port_connect(self, conn: Connection, rid: str, frame: Frame) -> None:
        host, port = check_target(frame.header)
        if len(self.ports) >= MAX_PORT_STREAMS:
            raise AgentError(AgentErrorCode.BUSY, f"more than {MAX_PORT_STREAMS} open port connections")
        key = (conn, rid)

        def done(_: PortStream) -> None:
            self.ports.pop(key, None)

        stream = PortStream(self.loop, conn, rid, host, port, done)
        if not stream.done:  # a refused loopback connect ends (and answers) inside the constructor
            self.ports[key] = stream


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def _which(name: str, path: str) -> str | None:
    for d in path.split(":"):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class FileReader:
    """Streams a file (an fd opened by a worker) as ``chunk`` frames, one per ``produce``."""

    __slots__ = ("conn", "fd", "path", "pos", "remaining", "rid", "sent")

    def __init__(
        self, conn: Connection, rid: str, path: str, fd: int, offset: int, length: int | None
    ) -> None:
        self.conn = conn
        self.rid = rid
        self.path = path
        self.fd = fd
        self.pos = offset
        self.remaining = length
        self.sent = 0

    def produce(self) -> bool:
        want = CHUNK_SIZE if self.remaining is None else min(CHUNK_SIZE, self.remaining)
        try:
            data = os.pread(self.fd, want, self.pos) if want else b""
        except OSError as exc:
            self._end()
            err = from_oserror(exc, self.path)
            self.conn.error(self.rid, err.code, err.message)
            return False
        if not data:
            self._end()
            self.conn.finish(self.rid, {"ev": "ok", "bytes": self.sent})
            return False
        self.pos += len(data)
        self.sent += len(data)
        if self.remaining is not None:
            self.remaining -= len(data)
        self.conn.send({"id": self.rid, "ev": "chunk"}, data)
        return True

    def _end(self) -> None:
        self.conn.remove_producer(self)
        self.cancel()

    def cancel(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ListProducer:
    """Streams a long listing as ``chunk`` frames carrying ``entries``, then ``ok`` with the ``count``."""

    __slots__ = ("conn", "entries", "index", "rid")

    def __init__(self, conn: Connection, rid: str, entries: list[Any]) -> None:
        self.conn = conn
        self.rid = rid
        self.entries = entries
        self.index = 0

    def produce(self) -> bool:
        if self.index >= len(self.entries):
            self.conn.remove_producer(self)
            self.conn.finish(self.rid, {"ev": "ok", "count": len(self.entries)})
            return False
        batch: list[Any] = []
        size = 0
        while self.index < len(self.entries) and (not batch or size < LIST_CHUNK_BYTES):
            entry = self.entries[self.index]
            n = _json_size(entry)
            if batch and size + n > LIST_CHUNK_BYTES:
                break
            batch.append(entry)
            size += n + 1
            self.index += 1
        self.conn.send({"id": self.rid, "ev": "chunk", "entries": batch})
        return True

    def cancel(self) -> None:
        self.entries = []


class Upload:
    """One ``write``: data frames go to a temp file opened by a worker, renamed over the target on eof."""

    def __init__(self, agent: Agent, conn: Connection, rid: str, path: str, mode: int, append: bool) -> None:
        self.agent = agent
        self.conn = conn
        self.rid = rid
        self.path = path
        self.mode = mode
        self.append = append
        self.worker: Worker | None = None
        self.fd: int | None = None
        self.token: str | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.paused = False
        self.eof = False
        self.written = 0
        self.done = False
        self.opening = True  # the worker has not answered open_write yet
        self.deferred: AgentError | None = None  # an error to answer once the worker has opened and aborted

    def opened(self, reply: WorkerReply) -> None:
        self.opening = False
        if self.done:  # failed or the connection closed while the worker was opening
            if reply.fd is not None:
                os.close(reply.fd)
            token = reply.fields.get("token")
            error, self.deferred = self.deferred, None
            conn, rid = self.conn, self.rid

            def answer(_: WorkerReply | None = None) -> None:
                if error is not None:
                    conn.error(rid, error.code, error.message)

            if token and reply.fields.get("ok") and self.worker is not None:
                self.worker.submit("abort", {"token": token}, answer)
            else:
                answer()
            return
        try:
            reply.check()
            if reply.fd is None:
                raise AgentError(AgentErrorCode.INTERNAL, "the file worker sent no file")
        except AgentError as exc:
            self.fail(exc)
            return
        self.fd = reply.fd
        self.token = reply.fields.get("token")
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        self._resume()
        for data in pending:
            if not self._write(data):
                return
        if self.eof:
            self._complete()

    def data(self, payload: bytes, eof: bool) -> None:
        if self.eof:
            return  # data after eof: ignore
        if self.fd is None:
            if payload:
                self.pending.append(payload)
                self.pending_bytes += len(payload)
                if self.pending_bytes > UPLOAD_PENDING_LIMIT and not self.paused:
                    self.paused = True
                    self.conn.pause_reading()
            self.eof = eof
            return
        if payload and not self._write(payload):
            return
        if eof:
            self.eof = True
            self._complete()

    def _write(self, data: bytes) -> bool:
        assert self.fd is not None
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.written += n
        except OSError as exc:
            self.fail(from_oserror(exc, self.path))
            return False
        return True

    def _complete(self) -> None:
        assert self.fd is not None
        fd, self.fd = self.fd, None
        try:
            os.close(fd)
        except OSError as exc:
            self.fail(from_oserror(exc, self.path))
            return
        if self.token is None:  # append: written in place
            self._finish({"ev": "ok", "bytes": self.written})
            return
        token, self.token = self.token, None

        def committed(reply: WorkerReply) -> None:
            try:
                reply.check()
            except AgentError as exc:
                self._finish({"ev": "error", "code": str(exc.code), "message": exc.message})
                return
            self._finish({"ev": "ok", "bytes": self.written})

        assert self.worker is not None
        self.worker.submit("commit", {"token": token, "path": self.path}, committed)

    def _finish(self, header: dict[str, Any]) -> None:
        self.done = True
        self.agent.uploads.pop((self.conn, self.rid), None)
        self.conn.finish(self.rid, header)

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            self.conn.resume_reading()

    def fail(self, exc: AgentError | None) -> None:
        """Abandon the upload (removing the temp file); answer ``exc`` unless the connection is gone."""
        if self.done:
            return
        self.done = True
        self.agent.uploads.pop((self.conn, self.rid), None)
        self._resume()
        self.pending = []
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.opening:  # the temp file may be being created: answer after opened() has removed it
            self.deferred = exc
            return
        conn, rid = self.conn, self.rid

        def answer(reply: WorkerReply | None = None) -> None:
            if exc is not None:
                conn.error(rid, exc.code, exc.message)

        if self.token is not None and self.worker is not None:
            # answer once the temp file is gone, so a client that saw the error never sees the temp file
            self.worker.submit("abort", {"token": self.token}, answer)
            self.token = None
        else:
            answer()
