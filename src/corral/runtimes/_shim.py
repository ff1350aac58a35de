"""Per-sandbox host supervisor (the containerd-shim / conmon role). Standard library + corral.protocol only.

Run as ``python -I -S _shim.py STATE_DIR`` by a local runtime, in its own session. It reads
``STATE_DIR/shim.json`` (:class:`ShimSpec` fields), then:

1. listens on ``socket`` (mode 0600) for the host side of the agent protocol;
2. forks the sandbox command with its stdin/stdout connected to pipes (the agent's stdio) and its stderr to
   ``sandbox.log``; before exec, the child joins the sandbox's cgroups, enters a private mount namespace and
   makes the sandbox's mounts there (so they vanish with the sandbox: nothing to leak in the host mount
   table), and optionally enters a user namespace mapped to an unprivileged uid range;
3. prints ``ready`` on stdout once the agent's ``hello`` frame arrived (``failed <reason>`` otherwise), which
   is what the runtime's ``create`` waits for;
4. relays whole frames between the agent and its clients (each is first sent the agent's cached ``hello``),
   applying back-pressure instead of buffering without bound. Each client is a *channel* of the agent's one
   stdio connection: its request ids reach the agent as ``<client>:<id>`` and every frame of it carries
   ``ch: <client>``; when it disconnects the shim sends ``channel.close``, and the agent ends what that client
   owned (foreground processes, uploads, attaches, watches) by its own connection rules. The shim knows no op
   but its own control ops: it never reads a relayed request to decide anything;
5. kills the sandbox at ``deadline`` (moved at run time through the control channel) or on SIGTERM,
   records ``exit.json`` and exits when the sandbox is gone.

Run as ``python -I -S _shim.py --standby BLANK`` it starts ahead of need (at a low priority) and waits for its
state dir on stdin, so a cold create does not wait for an interpreter to start and import this module
(~25 ms); it then shows the command line of a shim started for that state dir (BLANK, spaces, makes room).

The **control channel** is a socket of its own (``control``, mode 0600), separate from the agent's stream:
every frame there is a request to the shim, never relayed. Ops: ``deadline`` {deadline: Unix time | null},
``status``, and for runtimes that can checkpoint (``checkpoint_argv``): ``checkpoint`` (save the sandbox to
disk; its command exits, the shim stays, paused, and keeps its clients: requests to the agent are refused
while paused) and ``restore`` (start ``restore_argv`` with new stdio pipes; answered once the restored agent
answers a ping, so the connection a client held before the pause works again). Frames on the agent socket
all go to the agent.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import selectors
import signal
import socket
import sys
import time
from types import SimpleNamespace

if __name__ == "__main__":  # run as a script with -I -S: make corral.protocol importable, nothing else
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))

from corral.protocol.frames import Decoder, Frame, ProtocolError, encode

# Start-up: this runs as a new process on every cold create, before the sandbox's own boot can begin, so it
# imports only what it needs (no dataclasses, pathlib, typing; subprocess where used): ~25 ms less here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from corral.runtimes._shimspec import FdFile, Mount, ShimSpec, UserNs

__all__ = ["load_spec", "unix_path"]

HIGH_WATER = 4 * 1024 * 1024  # bytes queued towards a slow peer before we stop reading from the other side
READ_SIZE = 256 * 1024

# --- Linux constants (x86_64 / aarch64 share the generic numbers used here) ------------------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000


def load_spec(text: str) -> ShimSpec:
    """``shim.json`` (written by :meth:`ShimSpec.to_json`, every field present) as attribute objects."""
    data = json.loads(text)
    data["mounts"] = [SimpleNamespace(**m) for m in data["mounts"]]
    data["userns"] = SimpleNamespace(**data["userns"]) if data["userns"] else None
    data["files"] = [SimpleNamespace(**f) for f in data["files"]]
    data["restore_files"] = [SimpleNamespace(**f) for f in data.get("restore_files", [])]
    return SimpleNamespace(**data)  # type: ignore[return-value]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, data: str | bytes) -> None:
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


@contextlib.contextmanager
def unix_path(path: str) -> Iterator[str]:
    """A name for the Unix socket ``path`` that fits AF_UNIX's 108-byte limit.

    Long paths (a deep data directory) are reached through ``/proc/self/fd/<dir fd>/<name>``, which the kernel
    resolves to the same directory; the fd is closed when the block ends.
    """
    if len(os.fsencode(path)) < 100:
        yield path
        return
    directory, _, name = path.rpartition("/")
    fd = os.open(directory or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


# --- namespace and mount set-up, run in the forked child before exec ----------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _read_only_recursive(target: str) -> None:
    """Make ``target`` and every mount below it read-only, nosuid and nodev (a plain remount only covers the
    top mount of a recursive bind)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    _check(
        _libc.syscall(
            SYS_MOUNT_SETATTR,
            AT_FDCWD,
            target.encode(),
            AT_RECURSIVE,
            ctypes.byref(attr),
            ctypes.sizeof(attr),
        ),
        f"mount_setattr {target}",
    )


def _idmapped_clone(source: str, target: str, userns_fd: int, ro: bool) -> None:
    fd = _check(
        _libc.syscall(
            SYS_OPEN_TREE, AT_FDCWD, source.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
        ),
        f"open_tree {source}",
    )
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if ro else 0), 0, 0, userns_fd)
        _check(
            _libc.syscall(
                SYS_MOUNT_SETATTR,
                fd,
                b"",
                AT_EMPTY_PATH | AT_RECURSIVE,
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            f"mount_setattr {source}",
        )
        _check(
            _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
            f"move_mount {target}",
        )
    finally:
        os.close(fd)


LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
LOOP_MAJOR = 7


class _LoopConfig(ctypes.Structure):  # struct loop_config, with struct loop_info64 inlined
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_char * 64),
        ("lo_crypt_name", ctypes.c_char * 64),
        ("lo_encrypt_key", ctypes.c_char * 32),
        ("lo_init", ctypes.c_uint64 * 2),
        ("reserved", ctypes.c_uint64 * 8),
    ]


def _mount_loop(m: Mount) -> None:
    """Attach ``m.source`` to a free loop device (autoclear) and mount it. The device goes away by itself when
    the mount does, i.e. when the sandbox's mount namespace dies: there is no detach step to forget."""
    backing = os.open(m.source, os.O_RDWR | os.O_CLOEXEC)
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(64):  # another process may take the free device between GET_FREE and CONFIGURE
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            path = f"/dev/loop{n}"
            if not os.path.exists(path):  # a static /dev (containers) only has the first few nodes
                with contextlib.suppress(FileExistsError):
                    os.mknod(path, 0o660 | 0o060000, os.makedev(LOOP_MAJOR, n))
            dev = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                config = _LoopConfig(fd=backing, lo_flags=LO_FLAGS_AUTOCLEAR)
                try:
                    fcntl.ioctl(dev, LOOP_CONFIGURE, bytes(config))
                except OSError as exc:
                    if exc.errno == errno.EBUSY:
                        continue
                    raise
                _mount(path, m.target, m.fstype, MS_NOSUID | MS_NODEV | (MS_RDONLY if m.ro else 0), m.options)
                return
            finally:
                os.close(dev)  # the mount holds the device now (or nothing does, and autoclear frees it)
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(ctl)
        os.close(backing)


def _write_id_maps(pid: int, userns: UserNs) -> None:
    _write(f"/proc/{pid}/uid_map", f"0 {userns.base} {userns.size}\n")
    _write(f"/proc/{pid}/gid_map", f"0 {userns.base} {userns.size}\n")


def _mapping_userns_fd(userns: UserNs) -> int:
    """An fd for a user namespace with the sandbox's mapping, used to idmap mounts.

    A throw-away child unshares a user namespace; we write its maps, open its ns file, and let it exit.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(w)
            _check(_libc.unshare(CLONE_NEWUSER), "unshare(user)")
            os.read(r, 1)  # wait until the parent has opened our namespace
        finally:
            os._exit(0)
    os.close(r)
    try:
        for _ in range(2000):  # the child needs microseconds; bounded so a stuck child cannot hang us
            if os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                break
            time.sleep(0.0005)
        _write_id_maps(pid, userns)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def _setup_child(spec: ShimSpec, files: list[FdFile], sync_r: int, sync_w: int) -> dict[int, int]:
    """Everything between fork and exec. Raises on failure; the caller reports it and exits 127.

    Returns the opened ``files`` (target fd → parked fd) for :func:`_install_fds`."""
    for procs in spec.cgroup_procs:
        _write(procs, str(os.getpid()))
    if spec.netns:  # a prepared network namespace (owned by host root, so nothing inside can reconfigure it)
        fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), "setns(net)")
        finally:
            os.close(fd)
    if spec.mounts:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(mount)")
        _mount("none", "/", None, MS_REC | MS_PRIVATE)
        userns_fd = (
            _mapping_userns_fd(spec.userns)
            if spec.userns and any(m.kind == "idmap" for m in spec.mounts)
            else -1
        )
        for m in spec.mounts:
            if m.kind == "bind":
                _mount(m.source, m.target, None, MS_BIND | MS_REC)
                if m.ro:
                    _read_only_recursive(m.target)
            elif m.kind == "overlay":
                _mount("overlay", m.target, "overlay", 0, m.options)
            elif m.kind == "tmpfs":
                _mount("tmpfs", m.target, "tmpfs", MS_NOSUID | MS_NODEV, m.options)
            elif m.kind == "loop":
                _mount_loop(m)
            elif m.kind == "idmap":
                if userns_fd < 0:
                    raise ValueError("idmap mounts need a user namespace")
                _idmapped_clone(m.source, m.target, userns_fd, m.ro)
            else:
                raise ValueError(f"unknown mount kind {m.kind!r}")
        if userns_fd >= 0:
            os.close(userns_fd)
    parked = _open_fd_files(files)
    if spec.userns:
        _check(_libc.unshare(CLONE_NEWUSER), "unshare(user)")
        os.write(sync_w, b"u")  # parent writes our uid/gid maps …
        if os.read(sync_r, 1) != b"m":  # … and tells us it did
            raise OSError(errno.EPERM, "user namespace mapping was not written")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        if spec.userns.bounding_caps is not None:
            _limit_bounding_set(spec.userns.bounding_caps)
    return parked


PR_CAPBSET_DROP = 24
SYS_CAPGET, SYS_CAPSET = 125, 126
_CAP_VERSION_3 = 0x20080522


def _limit_bounding_set(keep: list[int]) -> None:
    """Drop every capability not in ``keep`` from the bounding set, after making all held ones inheritable.

    A uid-0 exec gets (inheritable | bounding), so the next program (bwrap) still gets everything it needs
    to build the sandbox, while any later exec by uid 0 inside can only get ``keep`` back.
    """
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two __user_cap_data_struct {effective, permitted, inheritable}
    _check(_libc.syscall(SYS_CAPGET, header, data), "capget")
    data[2], data[5] = data[1], data[4]
    _check(_libc.syscall(SYS_CAPSET, header, data), "capset")
    last = int(_read("/proc/sys/kernel/cap_last_cap"))
    for cap in range(last + 1):
        if cap not in keep:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")


_FD_PARK = 1000  # opened files wait above every fd the child uses until they are moved into place


def _open_fd_files(files: list[FdFile]) -> dict[int, int]:
    """Open ``files`` (target fd → parked fd)."""
    parked: dict[int, int] = {}
    for i, f in enumerate(files):
        mode = os.O_RDWR if getattr(f, "write", False) else os.O_RDONLY
        fd = os.open(f.path, mode | os.O_CLOEXEC)
        parked[f.fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FD_PARK + i)
        os.close(fd)
    return parked


def _install_fds(parked: dict[int, int]) -> None:
    """Move parked files to their target fds and close every other descriptor above stderr."""
    for target, fd in parked.items():
        os.dup2(fd, target)  # dup2'd descriptors are inheritable
    keep = sorted(t for t in parked if t > 2)
    low = 3
    for fd in [*keep, 1 << 16]:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1


def _kill_cgroups(procs_files: list[str]) -> None:
    """SIGKILL every task in the sandbox's cgroups, then thaw them: on cgroup v1 a frozen (paused) task only
    dies once thawed, and killing the shim's child alone would leave a paused sandbox behind."""
    for procs in procs_files:
        d = os.path.dirname(procs)
        with contextlib.suppress(OSError):
            _write(os.path.join(d, "cgroup.kill"), "1")  # v2, kernel ≥ 5.14
        with contextlib.suppress(OSError, ValueError):
            for pid in _read(procs).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            if os.path.exists(os.path.join(d, name)):
                with contextlib.suppress(OSError):
                    _write(os.path.join(d, name), value)


CHECKPOINT_TIMEOUT = 300.0  # a checkpoint writes the sandbox's memory to disk: ~1 s per 200 MiB here


class _Client:
    """One host-side connection: a channel of the agent's connection (its request ids reach the agent as
    ``<tag>:<id>``, so clients cannot collide), or a control connection to the shim itself."""

    __slots__ = ("control", "dec", "out", "sock", "tag")

    def __init__(self, sock: socket.socket, tag: str, *, control: bool = False) -> None:
        self.sock = sock
        self.tag = tag
        self.control = control  # a control-channel connection: its frames are requests to the shim
        self.dec = Decoder()
        self.out = bytearray()


class _Shim:
    def __init__(self, state_dir: str, spec: ShimSpec) -> None:
        self.state_dir = state_dir
        self.spec = spec
        self.deadline = spec.deadline
        self.sel = selectors.DefaultSelector()
        self.hello: bytes | None = None
        self.clients: dict[str, _Client] = {}
        self.next_client = 0
        self.next_own_id = 0
        self.agent_dec = Decoder()
        self.to_agent = bytearray()
        self.child_pid = 0
        self.exit_reason: str | None = None
        self.ready_reported = False
        self._agent_eof = False
        self.paused = False  # checkpointed: no sandbox command runs until shim.restore
        self.ping_id: str | None = None  # our ping to a restored agent; its answer means "running again"
        self.restore_waiter: tuple[str, Any] | None = None  # (client tag, request id) of a pending restore

    def _path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    # -- start ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.listener = _listen(self.spec.socket)
        self.control_listener = _listen(self.spec.control) if self.spec.control else None
        if self.spec.restored:
            assert self.spec.hello_file, "a restored start needs the agent's hello"
            with open(self.spec.hello_file, "rb") as f:
                self.hello = f.read()
            self.spawn(self.spec.argv, self.spec.files)
            self.send_ping()
        else:
            self.spawn(self.spec.argv, self.spec.files)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        if self.control_listener is not None:
            self.sel.register(self.control_listener, selectors.EVENT_READ, "accept_control")

    def send_ping(self) -> None:
        """Ask a restored agent for a sign of life; :meth:`read_agent` treats the answer as "ready"."""
        if self.spec.announce_restore:  # answered before the ping: ready means reseeded and on time
            self.to_agent += encode(
                {"id": self.own_id(), "op": "restored", "seed": os.urandom(64).hex(), "time": time.time()}
            )
        self.ping_id = self.own_id()
        self.to_agent += encode({"id": self.ping_id, "op": "ping"})
        self.update_interest()

    def spawn(self, argv: list[str], files: list[FdFile]) -> None:
        """Fork the sandbox command ``argv`` with fresh stdio pipes (see the module docstring, step 2)."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        p2c_r, p2c_w = os.pipe()  # user-namespace handshake, parent → child
        c2p_r, c2p_w = os.pipe()  # child → parent ("u" = unshared, "E..." = set-up failed)
        log_fd = os.open(self._path("sandbox.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(p2c_w)
                os.close(c2p_r)
                os.setpgid(0, 0)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                extra_fds = _setup_child(self.spec, files, p2c_r, c2p_w)
                os.dup2(in_r, 0)
                os.dup2(out_w, 1)
                os.dup2(log_fd, 2)
                _install_fds(extra_fds)
                os.execvpe(argv[0], argv, {**self.spec.env})  # noqa: S606
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.write(c2p_w, b"E" + str(exc).encode()[:2000])
                with contextlib.suppress(OSError):  # after closerange the pipe is gone: stderr is the log
                    os.write(2, f"corral-shim: sandbox set-up failed: {exc}\n".encode())
            os._exit(127)
        for fd in (in_r, out_w, p2c_r, c2p_w, log_fd):
            os.close(fd)
        self.child_pid = pid
        if self.exit_reason is not None:  # SIGTERM arrived while we were forking
            self.kill(self.exit_reason)
        if self.spec.userns:
            msg = os.read(c2p_r, 4096)
            if msg != b"u":
                self.report_failed("sandbox set-up failed: " + msg[1:].decode(errors="replace"))
            else:
                _write_id_maps(pid, self.spec.userns)
                os.write(p2c_w, b"m")
        os.close(p2c_w)
        self.setup_err_fd = c2p_r
        os.set_blocking(c2p_r, False)
        self.agent_in = in_w
        self.agent_out = out_r
        os.set_blocking(in_w, False)
        os.set_blocking(out_r, False)
        self._agent_eof = False
        self.sel.register(out_r, selectors.EVENT_READ, "agent_out")
        self.sel.register(c2p_r, selectors.EVENT_READ, "setup_err")

    def report(self, line: str) -> None:
        if self.ready_reported:
            return
        self.ready_reported = True
        with contextlib.suppress(OSError):
            os.write(1, (line + "\n").encode())
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)

    def report_failed(self, reason: str) -> None:
        self.report("failed " + reason.replace("\n", " ")[:2000])

    # -- main loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.kill("terminated"))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # wake the loop as soon as the sandbox exits (or a signal arrives), instead of at the next 1 s tick:
        # destroy() waits for us to record the exit
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wakeup")
        status: int | None = None
        while status is None:
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.time())
            for key, events in self.sel.select(timeout=min(timeout, 1.0) if timeout is not None else 1.0):
                self.dispatch(key.data, events)
            if self.deadline is not None and time.time() >= self.deadline and self.exit_reason is None:
                self.kill("deadline")
            if self.paused:  # nothing runs; a kill ends the (checkpointed) sandbox
                if self.exit_reason is not None:
                    status = 9  # waitstatus of a SIGKILL
                continue
            pid, st = os.waitpid(self.child_pid, os.WNOHANG)
            if pid:
                status = st
        self.finish(status)
        return 0

    def dispatch(self, what: str, events: int) -> None:
        if what == "wakeup":
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 512)
        elif what == "accept":
            self.accept(self.listener)
        elif what == "accept_control":
            self.accept(self.control_listener, control=True)
        elif what == "agent_out":
            self.read_agent()
        elif what.startswith("client:"):
            # an earlier event of the same select() may have dropped this client (a send to it failed while
            # it hung up): its stale events are skipped, as the sandbox must outlive any client
            tag = what.partition(":")[2]
            if tag in self.clients and events & selectors.EVENT_READ:
                self.read_client(tag)
            if tag in self.clients and events & selectors.EVENT_WRITE:
                self.flush_client(tag)
        elif what == "agent_in":
            self.flush_agent()
        elif what == "setup_err":
            with contextlib.suppress(BlockingIOError):
                msg = os.read(self.setup_err_fd, 4096)
                if msg.startswith(b"E"):
                    self.report_failed("sandbox set-up failed: " + msg[1:].decode(errors="replace"))
                self.sel.unregister(self.setup_err_fd)
                os.close(self.setup_err_fd)

    def accept(self, listener: Any, *, control: bool = False) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.next_client += 1
        client = _Client(conn, f"c{self.next_client}", control=control)
        if not control:
            client.out += self.hello or b""
        self.clients[client.tag] = client
        self.sel.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, "client:" + client.tag)

    def drop_client(self, tag: str) -> None:
        """Forget a client; the agent ends its channel (what it owned) by its own connection rules."""
        client = self.clients.pop(tag, None)
        if client is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(client.sock)
        client.sock.close()
        if not client.control:
            self.to_agent += encode({"op": "channel.close", "ch": tag})  # protocol.messages.Op.CHANNEL_CLOSE
        self.update_interest()

    def own_id(self) -> str:
        self.next_own_id += 1
        return f"shim:{self.next_own_id}"

    def read_agent(self) -> None:
        try:
            data = os.read(self.agent_out, READ_SIZE)
        except BlockingIOError:
            return
        if not data:  # the agent closed stdout: the sandbox is ending; wait for the child to exit
            self._agent_eof = True
            self._set(self.agent_out, 0, "agent_out")
            return
        try:
            frames = self.agent_dec.feed(data)
        except ProtocolError as exc:
            self.report_failed(f"agent sent an invalid frame: {exc}")
            self.kill("agent protocol error")
            return
        for frame in frames:
            if self.hello is None and frame.get("ev") == "hello":
                self.hello = encode(frame.header, frame.payload)
                with contextlib.suppress(OSError):  # kept for sandboxes restored from this one's checkpoint
                    _write(self._path("hello.frame"), self.hello)
                self.report("ready")
                for client in self.clients.values():
                    client.out += self.hello
                continue
            if self.ping_id is not None and frame.get("id") == self.ping_id:
                self.ping_id = None
                self.report("ready")
                self.answer_restore({"ev": "ok"})
                continue
            self.route_to_client(frame)
        for tag in [t for t, c in self.clients.items() if c.out]:
            self.flush_client(tag, update=False)  # now: a trip through select first cost ~50 us per frame
        self.update_interest()

    def route_to_client(self, frame: Frame) -> None:
        aid = frame.get("id")
        if not isinstance(aid, str):
            return
        tag, _, rid = aid.partition(":")
        client = self.clients.get(tag)
        if client is None:
            return  # frames for a client that left (or for the shim's own requests) are dropped
        client.out += encode({**frame.header, "id": rid}, frame.payload)

    def read_client(self, tag: str) -> None:
        client = self.clients[tag]
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop_client(tag)  # a partial frame from the client is discarded with its decoder
            return
        try:
            frames = client.dec.feed(data)
        except ProtocolError:
            self.drop_client(tag)
            return
        for frame in frames:
            rid = frame.get("id")
            if client.control:
                answer = self.shim_op(frame, tag)
                if answer is not None:  # restore answers later, once the agent is back
                    client.out += encode(answer)
                continue
            if not isinstance(rid, str):
                client.out += encode(
                    {
                        "id": rid,
                        "ev": "error",
                        "code": "invalid",
                        "message": "every request needs a string id",
                    }
                )
                continue
            if self.paused:
                client.out += encode(
                    {"id": rid, "ev": "error", "code": "busy", "message": "the sandbox is paused; resume it"}
                )
                continue
            # the client's channel (protocol.messages.CHANNEL): the agent keeps its connection rules per client
            self.to_agent += encode({**frame.header, "id": f"{tag}:{rid}", "ch": tag}, frame.payload)
        self.flush_agent()  # writes at once and then updates interest: no write interest taken and dropped

    def shim_op(self, frame: Frame, tag: str) -> dict[str, Any] | None:
        rid = frame.get("id")
        if frame.get("op") == "checkpoint":
            return self.checkpoint(rid)
        if frame.get("op") == "restore":
            return self.restore(rid, tag)
        if frame.get("op") == "deadline":
            deadline = frame.get("deadline")
            if deadline is not None and (not isinstance(deadline, int | float) or isinstance(deadline, bool)):
                return {"id": rid, "ev": "error", "code": "invalid", "message": "deadline must be a number"}
            self.deadline = float(deadline) if deadline is not None else None
            return {"id": rid, "ev": "ok", "deadline": self.deadline}
        if frame.get("op") == "status":
            return {
                "id": rid,
                "ev": "ok",
                "child_pid": self.child_pid,
                "deadline": self.deadline,
                "clients": len(self.clients),
                "paused": self.paused,
            }
        return {"id": rid, "ev": "error", "code": "unknown_op", "message": f"unknown op {frame.get('op')}"}

    def flush_client(self, tag: str, *, update: bool = True) -> None:
        client = self.clients[tag]
        if client.out:
            try:
                n = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.drop_client(tag)
                return
            del client.out[:n]
        if update:
            self.update_interest()

    def flush_agent(self) -> None:
        if not self.to_agent:
            self.update_interest()
            return
        try:
            n = os.write(self.agent_in, self.to_agent)
        except BlockingIOError:
            n = 0
        except OSError:  # the agent is gone; its exit will end us
            self.to_agent.clear()
            n = 0
        del self.to_agent[:n]
        self.update_interest()

    def update_interest(self) -> None:
        """Back-pressure: stop reading a side while a queue towards the other side is above HIGH_WATER."""
        want_agent_out = all(len(c.out) < HIGH_WATER for c in self.clients.values())
        self._set(self.agent_out, selectors.EVENT_READ if want_agent_out else 0, "agent_out")
        self._set(self.agent_in, selectors.EVENT_WRITE if self.to_agent else 0, "agent_in")
        want_clients = len(self.to_agent) < HIGH_WATER
        for tag, client in self.clients.items():
            ev = (selectors.EVENT_READ if want_clients else 0) | (selectors.EVENT_WRITE if client.out else 0)
            self._set(client.sock, ev, "client:" + tag)

    def _set(self, fileobj: Any, events: int, data: str) -> None:
        try:
            key = self.sel.get_key(fileobj)
        except (KeyError, ValueError):
            key = None
        if key is None:
            if events and not (data == "agent_out" and self._agent_eof):
                with contextlib.suppress(ValueError, OSError):
                    self.sel.register(fileobj, events, data)
            return
        if events == 0:
            self.sel.unregister(fileobj)
        elif key.events != events:
            self.sel.modify(fileobj, events, data)

    # -- checkpoint / restore ------------------------------------------------------------------------------
    def checkpoint(self, rid: Any) -> dict[str, Any]:
        """Save the sandbox to disk with ``checkpoint_argv``; the sandbox command then exits by itself.

        Blocking (the sandbox is being stopped anyway). Everything the agent wrote before it stopped is read
        and routed first, so the byte stream to each client continues seamlessly after ``restore``.
        """
        if not self.spec.checkpoint_argv or not self.spec.restore_argv:
            return {
                "id": rid,
                "ev": "error",
                "code": "unknown_op",
                "message": "this sandbox cannot checkpoint",
            }
        if self.paused or self.child_pid <= 0 or self.exit_reason is not None or self.ping_id is not None:
            return {"id": rid, "ev": "error", "code": "busy", "message": "the sandbox is not running"}
        import subprocess

        try:
            done = subprocess.run(
                self.spec.checkpoint_argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=CHECKPOINT_TIMEOUT,
                check=False,
            )
            said = done.stderr.decode(errors="replace").strip()
            reason = f"exit {done.returncode}: {said}" if done.returncode != 0 else None
        except (OSError, subprocess.SubprocessError) as exc:
            reason = str(exc)
        if reason is not None:
            # the helper's own words (e.g. QEMU's migration error) for the operator's log: the runtime logs
            # this header and sends clients only its generic message
            reason = reason[-2000:]
            print(f"corral-shim: checkpoint failed: {reason}", file=sys.stderr)
            return {
                "id": rid,
                "ev": "error",
                "code": "internal",
                "message": "checkpoint failed",
                "reason": reason,
            }
        end = time.monotonic() + CHECKPOINT_TIMEOUT
        while not os.waitpid(self.child_pid, os.WNOHANG)[0]:
            if time.monotonic() > end:
                self.kill("checkpoint did not stop the sandbox")
                return {
                    "id": rid,
                    "ev": "error",
                    "code": "internal",
                    "message": "checkpoint failed",
                    "reason": "the sandbox command did not exit after its checkpoint",
                }
            time.sleep(0.005)  # bounded; the sandbox command exits within ms of a completed checkpoint
        drain_end = time.monotonic() + 5.0  # the writers are gone: EOF comes at once unless a stray holds it
        while not self._agent_eof and time.monotonic() < drain_end:
            select.select([self.agent_out], [], [], 0.1)
            self.read_agent()
        for fd in (self.agent_in, self.agent_out):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)
            os.close(fd)
        self.child_pid = 0
        self.paused = True
        with contextlib.suppress(OSError):  # what inspect() reads (the runtime's own state may be gone)
            _write(self._path("paused"), "")
        # the decoders and to_agent stay as they are: an agent stopped mid-write finishes the frame after
        # restore, and the stream from the shim continues where it stopped (the service is quiet while pausing)
        return {"id": rid, "ev": "ok"}

    def restore(self, rid: Any, tag: str) -> dict[str, Any] | None:
        if not self.paused or not self.spec.restore_argv:
            return {"id": rid, "ev": "error", "code": "busy", "message": "the sandbox is not paused"}
        self.paused = False
        with contextlib.suppress(OSError):
            os.unlink(self._path("paused"))
        self.restore_waiter = (tag, rid)
        self.spawn(self.spec.restore_argv, self.spec.restore_files)
        self.send_ping()
        return None

    def answer_restore(self, frame: dict[str, Any]) -> None:
        if self.restore_waiter is None:
            return
        tag, rid = self.restore_waiter
        self.restore_waiter = None
        client = self.clients.get(tag)
        if client is not None:
            client.out += encode({**frame, "id": rid})
            self.update_interest()

    def kill(self, reason: str) -> None:
        if self.exit_reason is None:
            self.exit_reason = reason
        if self.child_pid == 0:  # asked before the sandbox was forked: start() kills it once it exists
            return
        if self.spec.kill_argv:
            import subprocess

            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    self.spec.kill_argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=30,
                    check=False,
                )
        if self.child_pid > 0:  # 0 while paused: killpg(0) would be our own group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child_pid, signal.SIGKILL)
        _kill_cgroups(self.spec.cgroup_procs)

    def finish(self, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        if not self.ready_reported and self.sel.get_map() and self.setup_err_fd in self.sel.get_map():
            self.dispatch("setup_err", selectors.EVENT_READ)  # a set-up error explains the exit best
        if not self.ready_reported:
            tail = b""
            with contextlib.suppress(OSError), open(self._path("sandbox.log"), "rb") as f:
                tail = f.read()[-1500:]
            self.report_failed(
                f"sandbox exited with code {code} before its agent started: " + tail.decode(errors="replace")
            )
        self.answer_restore({"ev": "error", "code": "internal", "message": "the sandbox did not restore"})
        if self.child_pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child_pid, signal.SIGKILL)  # stragglers in the sandbox's process group
        record = {
            "exit_code": code,
            "reason": self.exit_reason or ("exited" if code >= 0 else "killed"),
            "finished_at": time.time(),
        }
        _write(self._path("exit.json.tmp"), json.dumps(record))
        os.rename(self._path("exit.json.tmp"), self._path("exit.json"))
        for client in list(self.clients.values()):  # the agent is gone: nothing more will come
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(client.sock)
            client.sock.close()
        self.clients.clear()
        for path in (self.spec.socket, self.spec.control):
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _listen(path: str) -> socket.socket:
    """A non-blocking Unix listener at ``path``, mode 0600 (only the host's root reaches a sandbox)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with unix_path(path) as usable:
            listener.bind(usable)
    finally:
        os.umask(old)
    listener.listen(8)
    listener.setblocking(False)
    return listener


def _await_assignment() -> str | None:
    """``--standby``: started ahead of need, wait for the state dir on stdin (one line; EOF: not needed).

    Then become what ``_shim.py STATE_DIR`` would be: stderr to the sandbox's ``shim.log``, stdin to
    /dev/null, the normal priority back.
    """
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 4096)
        if not chunk:
            return None  # the runtime closed, or its process exited
        line += chunk
    state_dir = line.decode().strip()
    log_fd = os.open(os.path.join(state_dir, "shim.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError as exc:  # lowering the nice value needs CAP_SYS_NICE; local runtimes run as root
        os.write(2, f"corral-shim: stays at the standby's low priority: {exc}\n".encode())
    return state_dir


def _retitle(args: list[str]) -> None:
    """Make ``/proc/self/cmdline`` (what ``ps`` shows) read ``args``, as a shim started for its state dir.

    Rewrites the original argument strings in place: the kernel shows the bytes between the process's
    ``arg_start`` and ``arg_end``, and a standby is started with a blank argument that leaves room. If the
    new line does not fit, the standby's own command line stays.
    """
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    arg_start, arg_end = int(fields[45]), int(fields[46])  # stat fields 48 and 49
    title = b"\0".join(a.encode() for a in args) + b"\0"
    if len(title) > arg_end - arg_start:
        return
    ctypes.memmove(arg_start, title.ljust(arg_end - arg_start, b"\0"), arg_end - arg_start)


def main() -> int:
    if sys.argv[1:2] == ["--standby"]:
        assigned = _await_assignment()
        if assigned is None:
            return 0
        state_dir = assigned
        _retitle([sys.executable, "-I", "-S", sys.argv[0], state_dir])
    else:
        state_dir = sys.argv[1]
    spec = load_spec(_read(os.path.join(state_dir, "shim.json")))
    shim = _Shim(state_dir, spec)
    # handled from the first instruction on: a SIGTERM during start() must still take the sandbox down
    signal.signal(signal.SIGTERM, lambda *_: shim.kill("terminated"))
    try:
        shim.start()
    except Exception as exc:
        shim.report_failed(f"shim could not start: {exc}")
        return 1
    return shim.run()


if __name__ == "__main__":
    sys.exit(main())
