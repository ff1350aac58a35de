"""File operations, as run inside a file worker (see ``worker``) with the requesting identity's uid and gid.

Each function takes the request fields and returns a :class:`Reply` or raises ``OSError`` /
:class:`~corral.agent.errors.AgentError`. Because the worker process *is* the requesting user, the kernel does
every permission check: nothing here reasons about modes or ownership.

Streams do not pass through the worker: ``open_read`` and ``open_write`` return an open file descriptor (sent
to the agent with ``SCM_RIGHTS``) and the agent moves the bytes. Permission checks happen at open time, which is
also when POSIX does them.

Uploads write to a temporary file created with ``O_EXCL`` next to the target and renamed over it on ``commit``.
The worker keeps the directory open between the two, and creates and renames relative to that directory fd, so
a directory swapped for a symlink in the meantime cannot redirect a root-owned write.
"""

from __future__ import annotations

import contextlib
import os
import stat as st
from typing import Any

from corral.agent.errors import AgentError, from_oserror
from corral.protocol.messages import AgentErrorCode

__all__ = ["OPS", "Reply", "WorkerState", "entry"]

MAX_ENTRIES = 50_000  # a listing bigger than this is refused (too_large) rather than built in memory
BATCH_BYTES = 3 * 1024 * 1024  # JSON bytes per worker reply frame (under the 4 MiB frame payload limit)


class Reply:
    __slots__ = ("batches", "fd", "fields")

    def __init__(
        self, fields: dict[str, Any], *, fd: int | None = None, batches: list[bytes] | None = None
    ) -> None:
        self.fields = fields
        self.fd = fd
        self.batches = batches or []


class WorkerState:
    """What a worker keeps between requests: the open uploads, by token."""

    def __init__(self, home: str) -> None:
        self.home = home
        self.uploads: dict[str, tuple[int, str, str]] = {}  # token -> (dir fd, temp name, target name)


def _path(state: WorkerState, args: dict[str, Any], key: str = "path") -> str:
    path = args[key]
    return path if path.startswith("/") else os.path.join(state.home, path)


def _kind(mode: int) -> str:
    if st.S_ISREG(mode):
        return "file"
    if st.S_ISDIR(mode):
        return "dir"
    if st.S_ISLNK(mode):
        return "symlink"
    return "other"


def entry(path: str, name: str, s: os.stat_result) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "path": path,
        "type": _kind(s.st_mode),
        "size": s.st_size,
        "mode": st.S_IMODE(s.st_mode),
        "mtime": s.st_mtime,
        "uid": s.st_uid,
        "gid": s.st_gid,
    }
    if st.S_ISLNK(s.st_mode):
        try:
            out["target"] = os.readlink(path)
        except OSError:
            out["target"] = None
    return out


def op_stat(state: WorkerState, args: dict[str, Any]) -> Reply:
    path = _path(state, args)
    try:
        s = os.lstat(path)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    return Reply({"entry": entry(path, os.path.basename(path.rstrip("/")) or "/", s)})


def op_list(state: WorkerState, args: dict[str, Any]) -> Reply:
    import json

    path = _path(state, args)
    depth = args.get("depth", 1)
    entries: list[dict[str, Any]] = []

    stack = [(path, 1)]  # iterative: a deep tree must not hit Python's recursion limit
    while stack:
        directory, level = stack.pop()
        try:
            it = os.scandir(directory)
        except OSError as exc:
            if directory == path:
                raise from_oserror(exc, path) from None
            continue  # an unreadable subdirectory is listed, its contents are not
        with it:
            for de in it:
                if len(entries) >= MAX_ENTRIES:
                    raise AgentError(
                        AgentErrorCode.TOO_LARGE,
                        f"{path}: more than {MAX_ENTRIES} entries; list a smaller depth or subtree",
                    )
                try:
                    s = de.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append(entry(de.path, de.name, s))
                if level < depth and st.S_ISDIR(s.st_mode):
                    stack.append((de.path, level + 1))
    entries.sort(key=lambda e: e["path"])
    batches: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for e in entries:
        item = json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode()
        if batch and size + len(item) > BATCH_BYTES:
            batches.append(b"[" + b",".join(batch) + b"]")
            batch, size = [], 0
        batch.append(item)
        size += len(item) + 1
    batches.append(b"[" + b",".join(batch) + b"]")
    return Reply({"count": len(entries)}, batches=batches)


def op_mkdir(state: WorkerState, args: dict[str, Any]) -> Reply:
    path = _path(state, args)
    mode = args.get("mode", 0o755)
    try:
        os.mkdir(path, mode)
        return Reply({"created": True})
    except FileExistsError:
        if os.path.isdir(path):
            return Reply({"created": False})
        raise AgentError(AgentErrorCode.NOT_A_DIRECTORY, f"{path}: exists and is not a directory") from None
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise from_oserror(exc, path) from None
    try:
        os.makedirs(path, mode, exist_ok=True)
    except FileExistsError:
        raise AgentError(AgentErrorCode.NOT_A_DIRECTORY, f"{path}: a file is in the way") from None
    except OSError as exc:
        raise from_oserror(exc, path) from None
    return Reply({"created": True})


def op_remove(state: WorkerState, args: dict[str, Any]) -> Reply:
    path = _path(state, args)
    try:
        s = os.lstat(path)
        if not st.S_ISDIR(s.st_mode):
            os.unlink(path)
        elif args.get("recursive", False):
            import shutil

            failures: list[tuple[str, BaseException]] = []
            shutil.rmtree(path, onerror=lambda fn, p, exc: failures.append((p, exc[1])))
            if failures:
                where, exc = failures[0]
                if isinstance(exc, OSError):
                    err = from_oserror(exc, where)
                    raise AgentError(err.code, f"{path}: could not remove everything ({err.message})")
                raise AgentError(AgentErrorCode.INTERNAL, f"{path}: could not remove {where}")
        else:
            try:
                os.rmdir(path)
            except OSError as exc:
                if exc.errno == 39:  # ENOTEMPTY
                    raise AgentError(
                        AgentErrorCode.INVALID, f"{path}: directory not empty (use recursive to remove it)"
                    ) from None
                raise
    except OSError as exc:
        raise from_oserror(exc, path) from None
    return Reply({})


def op_rename(state: WorkerState, args: dict[str, Any]) -> Reply:
    src = _path(state, args, "src")
    dst = _path(state, args, "dst")
    try:
        os.lstat(src)
    except OSError as exc:
        raise from_oserror(exc, src) from None
    if not args.get("overwrite", False) and os.path.lexists(dst):
        raise AgentError(AgentErrorCode.EXISTS, f"{dst}: already exists")
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno == 18:  # EXDEV: another file system; move it the way mv does
            import shutil

            try:
                shutil.move(src, dst)
            except OSError as exc2:
                raise from_oserror(exc2, dst) from None
            return Reply({})
        if exc.errno in (39, 17):  # ENOTEMPTY, EEXIST: a non-empty directory is in the way
            raise AgentError(AgentErrorCode.EXISTS, f"{dst}: a non-empty directory is in the way") from None
        raise from_oserror(exc, dst if exc.errno in (21, 20) else src) from None
    return Reply({})


def op_open_read(state: WorkerState, args: dict[str, Any]) -> Reply:
    path = _path(state, args)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    try:
        s = os.fstat(fd)
        if st.S_ISDIR(s.st_mode):
            raise AgentError(AgentErrorCode.IS_A_DIRECTORY, f"{path}: is a directory")
        if not st.S_ISREG(s.st_mode):
            raise AgentError(AgentErrorCode.INVALID, f"{path}: not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return Reply({"size": s.st_size}, fd=fd)


def op_open_write(state: WorkerState, args: dict[str, Any]) -> Reply:
    path = _path(state, args)
    directory, name = os.path.split(path)
    directory = directory or "/"
    if not name:
        raise AgentError(AgentErrorCode.IS_A_DIRECTORY, f"{path}: is a directory")
    mode = args.get("mode", 0o644) & 0o7777
    if args.get("parents", True):
        try:
            os.makedirs(directory, exist_ok=True)
        except FileExistsError:
            raise AgentError(AgentErrorCode.NOT_A_DIRECTORY, f"{directory}: not a directory") from None
        except OSError as exc:
            raise from_oserror(exc, directory) from None
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, directory) from None
    try:
        try:
            s = os.stat(name, dir_fd=dfd)
            if st.S_ISDIR(s.st_mode):
                raise AgentError(AgentErrorCode.IS_A_DIRECTORY, f"{path}: is a directory")
        except FileNotFoundError:
            pass
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY
        if args.get("append", False):
            try:
                try:  # a new file gets the requested mode; an existing one keeps its own
                    fd = os.open(name, flags | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
                    os.fchmod(fd, mode)
                except FileExistsError:
                    fd = os.open(name, flags | os.O_APPEND, dir_fd=dfd)
            except OSError as exc:
                raise from_oserror(exc, path) from None
            os.close(dfd)
            return Reply({"token": None}, fd=fd)
        tmp = f".{name[:200]}.{os.urandom(4).hex()}.corral-upload"
        try:
            fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
        except OSError as exc:
            raise from_oserror(exc, path) from None
        try:
            # As the identity, so the kernel applies its rules (a setgid bit for a group the user is not in is
            # dropped); the agent then writes through the fd, whatever the mode.
            os.fchmod(fd, mode)
        except OSError as exc:
            os.close(fd)
            os.unlink(tmp, dir_fd=dfd)
            raise from_oserror(exc, path) from None
    except BaseException:
        os.close(dfd)
        raise
    token = os.urandom(8).hex()
    state.uploads[token] = (dfd, tmp, name)
    return Reply({"token": token}, fd=fd)


def op_commit(state: WorkerState, args: dict[str, Any]) -> Reply:
    dfd, tmp, name = state.uploads.pop(args["token"])
    try:
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise from_oserror(exc, args.get("path")) from None
    finally:
        os.close(dfd)
    return Reply({})


def op_abort(state: WorkerState, args: dict[str, Any]) -> Reply:
    upload = state.uploads.pop(args["token"], None)
    if upload is not None:
        dfd, tmp, _ = upload
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)
    return Reply({})


OPS = {
    "stat": op_stat,
    "list": op_list,
    "mkdir": op_mkdir,
    "remove": op_remove,
    "rename": op_rename,
    "open_read": op_open_read,
    "open_write": op_open_write,
    "commit": op_commit,
    "abort": op_abort,
}
