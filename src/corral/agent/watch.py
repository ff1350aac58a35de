"""Directory watches: inotify (through ``ctypes``, standard library only) streamed as ``fs_event`` frames.

One ``watch`` request owns one inotify instance, so watches never see each other's events and closing one
releases everything it holds. The request lives until the client sends ``cancel`` for it (answered ``ok``),
its connection closes, the watched directory goes away (``ok`` after a final ``remove`` event) or a limit is
hit (``error``).

Events. inotify masks map to E2B's five types: ``IN_CREATE``/``IN_MOVED_TO`` → ``create``, ``IN_MODIFY`` →
``write``, ``IN_DELETE`` → ``remove``, ``IN_MOVED_FROM`` → ``rename`` (the old name; the new name is a
``create``), ``IN_ATTRIB`` → ``chmod``. Each carries ``name``, the path relative to the watched directory.

Recursive watches add a watch for every directory already there (walked in bounded slices between other
work, then ``started`` is sent: every change after ``started`` is reported) and for every directory created or
moved in later. A directory can fill before its watch exists (``mkdir -p a/b/c``, ``tar x``), so a new
directory is listed right after its watch is added and a ``create`` is reported for each entry found: a
create is never lost to that race, at the cost of a possible duplicate. Symlinks are never followed.

Limits. At most ``MAX_DIRS`` watched directories per request (more: ``error``/``too_large``, so a watch of
``/`` or ``/proc`` costs a bounded walk, never a hang) and ``MAX_WATCHES`` requests per agent. Events wait in
a queue of at most ``QUEUE_EVENTS``; while it is full the agent stops reading the inotify fd, the kernel queue
fills and inotify reports an overflow, which is sent as an ``overflow`` event (events were lost; rescan). The
client is never left believing it saw everything.

Permissions. The agent runs as root but a watch runs for an identity: a directory is watched only if that
identity could list it (mode bits; ACLs are not consulted) — directories it could not read are skipped, as
``find`` would.
"""

from __future__ import annotations

import errno
import os
import stat as _stat
import struct
from collections import deque
from typing import Any

from corral.agent.conn import Connection
from corral.agent.errors import AgentError, from_oserror
from corral.agent.loop import Loop
from corral.agent.users import Identity
from corral.protocol.messages import AgentErrorCode

__all__ = ["MAX_DIRS", "MAX_WATCHES", "QUEUE_EVENTS", "Watch", "Watches"]

MAX_DIRS = 8192  # directories per watch; the kernel's default max_user_watches is 8192 on small machines
MAX_WATCHES = 64  # requests per agent (each is an inotify instance; the kernel allows 128 per user)
QUEUE_EVENTS = 16384  # events waiting for the client; as many as the kernel's own default queue
BATCH_EVENTS = 256  # events per frame (~20 KiB of header, under the 64 KiB limit)
WALK_SLICE = 64  # directories listed per loop turn while walking a tree, so other requests keep flowing
READ_SIZE = 64 * 1024

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_DONT_FOLLOW = 0x2000000
IN_EXCL_UNLINK = 0x4000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
_TYPES: tuple[tuple[int, str], ...] = (
    (IN_CREATE | IN_MOVED_TO, "create"),
    (IN_MODIFY, "write"),
    (IN_DELETE, "remove"),
    (IN_MOVED_FROM, "rename"),
    (IN_ATTRIB, "chmod"),
)

_libc: Any = None


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def _inotify() -> Any:
    """libc's inotify calls, loaded on first use: importing ctypes costs the agent's start-up ~1.5 ms."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc, whichever it is
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return _libc


def may_list(st: os.stat_result, identity: Identity) -> bool:
    """Could ``identity`` read and search this directory (owner, group or other bits)?"""
    if identity.uid == 0 or not identity.switch:
        return True
    if st.st_uid == identity.uid:
        bits = st.st_mode >> 6
    elif st.st_gid == identity.gid or st.st_gid in identity.groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & 0o5 == 0o5


def may_reach(path: str, identity: Identity) -> bool:
    """Could ``identity`` search every directory above ``path`` (a resolved absolute path)?"""
    if identity.uid == 0 or not identity.switch:
        return True
    parent = os.path.dirname(path)
    while True:
        try:
            st = os.stat(parent)
        except OSError:
            return False
        if st.st_uid == identity.uid:
            bits = st.st_mode >> 6
        elif st.st_gid == identity.gid or st.st_gid in identity.groups:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        if not bits & 0o1:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


class Watch:
    """One ``watch`` request: an inotify instance, its directories (by wd) and the events not yet sent."""

    def __init__(
        self, watches: Watches, conn: Connection, rid: str, path: str, identity: Identity, recursive: bool
    ) -> None:
        self.watches = watches
        self.loop = watches.loop
        self.conn = conn
        self.rid = rid
        self.root = os.path.realpath(path)  # events name paths below it; symlinks above are resolved once
        self.identity = identity
        self.recursive = recursive
        self.dirs: dict[int, str] = {}  # wd -> path relative to the root ("" for the root)
        self.queue: deque[dict[str, Any]] = deque()
        self.pending_walk: deque[str] = deque()
        self.started = False
        self.reading = False
        self.done = False
        self.done_after_queue = False  # the root went away: end with ``ok`` once the queue is sent
        fd = _inotify().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise from_oserror(OSError(_errno(), "inotify_init1"), path)
        self.fd = fd

    # --- setting up --------------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Watch the root (errors answer the request), then walk the tree if recursive, then ``started``."""
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise from_oserror(exc, self.root) from None
        if not _stat.S_ISDIR(st.st_mode):
            raise AgentError(AgentErrorCode.NOT_A_DIRECTORY, f"{self.root} is not a directory")
        if not may_list(st, self.identity) or not may_reach(self.root, self.identity):
            raise AgentError(AgentErrorCode.PERMISSION_DENIED, f"{self.root}: permission denied")
        self._add("", required=True)
        self._set_reading(True)
        if self.recursive:
            self.pending_walk.append("")
            self.loop.call_soon(self._walk_slice)
        else:
            self._start()

    def _start(self) -> None:
        self.started = True
        self.conn.send({"id": self.rid, "ev": "started", "path": self.root, "dirs": len(self.dirs)})
        self.conn.add_producer(self)

    def _abs(self, rel: str) -> str:
        if not rel:
            return self.root
        return f"{self.root}/{rel}" if self.root != "/" else f"/{rel}"

    def _add(self, rel: str, *, required: bool = False) -> bool:
        if len(self.dirs) >= MAX_DIRS:
            self.fail(
                AgentError(
                    AgentErrorCode.TOO_LARGE,
                    f"{self.root} has more than {MAX_DIRS} directories to watch; watch a smaller subtree "
                    "or without recursive",
                )
            )
            return False
        path = self._abs(rel)
        wd = _inotify().inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            err = _errno()
            if required:
                raise from_oserror(OSError(err, os.strerror(err)), path)
            if err == errno.ENOSPC:  # the kernel's per-user watch limit
                self.fail(AgentError(AgentErrorCode.BUSY, f"no inotify watches left to watch {path}"))
                return False
            return True  # gone already, or not a directory any more: nothing to watch
        self.dirs[wd] = rel
        return True

    def _walk_slice(self) -> None:
        for _ in range(WALK_SLICE):
            if self.done or not self.pending_walk:
                break
            if not self._list(self.pending_walk.popleft(), report=self.started):
                return
        if self.done:
            return
        if self.started and self.queue:
            self.conn.wake(self)  # creates found by listing a new directory: no inotify read will wake us
        if self.pending_walk:
            self.loop.call_soon(self._walk_slice)
        elif not self.started:
            self._start()

    def _list(self, rel: str, *, report: bool) -> bool:
        """Watch the subdirectories of ``rel`` (queued for walking); with ``report``, a create per entry."""
        try:
            with os.scandir(self._abs(rel)) as it:
                entries = list(it)
        except OSError:
            return True  # removed meanwhile, or unreadable: nothing to add
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if report:
                self._queue("create", child)
            try:
                if not entry.is_dir(follow_symlinks=False) or not may_list(
                    entry.stat(follow_symlinks=False), self.identity
                ):
                    continue
            except OSError:
                continue
            if not self._add(child):
                return False
            self.pending_walk.append(child)
        return True

    # --- events ------------------------------------------------------------------------------------------------
    def _set_reading(self, on: bool) -> None:
        if on and not self.reading and not self.done:
            self.loop.add_reader(self.fd, self._on_readable)
        elif not on and self.reading:
            self.loop.remove_reader(self.fd)
        self.reading = on and not self.done

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(from_oserror(exc, self.root))
            return
        pos = 0
        while pos + _HEADER.size <= len(data) and not self.done:
            wd, mask, _cookie, length = _HEADER.unpack_from(data, pos)
            raw = data[pos + _HEADER.size : pos + _HEADER.size + length].split(b"\0", 1)[0]
            pos += _HEADER.size + length
            self._event(wd, mask, raw.decode(errors="replace"))
        if len(self.queue) >= QUEUE_EVENTS:
            self._set_reading(
                False
            )  # the kernel queues (then reports an overflow) until the client catches up
        if self.started:
            self.conn.wake(self)

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self._queue("overflow", "")
            return
        rel = self.dirs.get(wd)
        if rel is None:
            return
        if mask & IN_IGNORED:
            del self.dirs[wd]
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
            if not rel:  # the watched directory itself is gone: nothing more can come
                self._queue("remove", "")
                self.done_after_queue = True
                self.conn.wake(self)
            return
        child = f"{rel}/{name}" if rel else name
        for bits, kind in _TYPES:
            if mask & bits:
                self._queue(kind, child)
        if self.recursive and mask & IN_ISDIR:
            if mask & (IN_CREATE | IN_MOVED_TO):
                try:
                    st = os.stat(self._abs(child), follow_symlinks=False)
                except OSError:
                    return
                if _stat.S_ISDIR(st.st_mode) and may_list(st, self.identity) and self._add(child):
                    self.pending_walk.append(child)
                    self.loop.call_soon(self._walk_slice)
            elif mask & IN_MOVED_FROM:  # its watches now describe paths outside; drop them
                prefix = child + "/"
                for stale, sub in list(self.dirs.items()):
                    if sub == child or sub.startswith(prefix):
                        _inotify().inotify_rm_watch(self.fd, stale)
                        self.dirs.pop(stale, None)

    def _queue(self, kind: str, name: str) -> None:
        if len(self.queue) >= QUEUE_EVENTS:
            if not self.queue or self.queue[-1]["type"] != "overflow":
                self.queue.append({"type": "overflow", "name": ""})
            return
        self.queue.append({"type": kind, "name": name})

    # --- producer ----------------------------------------------------------------------------------------------
    def produce(self) -> bool:
        if self.done:
            return False
        if self.queue:
            n = min(BATCH_EVENTS, len(self.queue))
            batch = [self.queue.popleft() for _ in range(n)]
            self.conn.send({"id": self.rid, "ev": "fs_event", "events": batch})
            if len(self.queue) < QUEUE_EVENTS // 2:
                self._set_reading(True)
            return bool(self.queue) or self.done_after_queue
        if self.done_after_queue:
            self.finish({"ev": "ok", "reason": "removed"})
        return False

    def cancel(self) -> None:
        """The connection closed."""
        self._close()

    # --- ending ------------------------------------------------------------------------------------------------
    def finish(self, header: dict[str, Any]) -> None:
        if self.done:
            return
        self._close()
        self.conn.finish(self.rid, header)

    def fail(self, exc: AgentError) -> None:
        self.finish({"ev": "error", "code": str(exc.code), "message": exc.message})

    def _close(self) -> None:
        if self.done:
            return
        self._set_reading(False)
        self.done = True
        self.conn.remove_producer(self)
        self.loop.forget(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.queue.clear()
        self.pending_walk.clear()
        self.watches.by_key.pop((self.conn, self.rid), None)


class Watches:
    """Every live watch of the agent, by (connection, request id)."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.by_key: dict[tuple[Connection, str], Watch] = {}

    def start(self, conn: Connection, rid: str, path: str, identity: Identity, recursive: bool) -> None:
        if len(self.by_key) >= MAX_WATCHES:
            raise AgentError(AgentErrorCode.BUSY, f"at most {MAX_WATCHES} directory watches at a time")
        watch = Watch(self, conn, rid, path, identity, recursive)
        self.by_key[(conn, rid)] = watch
        try:
            watch.begin()
        except BaseException:
            watch._close()
            raise

    def cancel(self, conn: Connection, rid: str) -> bool:
        watch = self.by_key.get((conn, rid))
        if watch is None:
            return False
        watch.finish({"ev": "ok", "reason": "cancelled"})
        return True

    def connection_closed(self, conn: Connection) -> None:
        for key in [k for k in self.by_key if k[0] is conn]:
            self.by_key[key]._close()
