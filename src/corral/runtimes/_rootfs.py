"""Root file systems for local sandboxes: templates (read-only, shared) and per-sandbox writable layers.

Runtime-neutral: the namespace and gVisor runtimes both use it.

A template is a directory used as a read-only lower layer (:class:`~corral.runtimes.base.RootfsSpec`); every
sandbox gets its own writable layer on top (overlayfs ``upperdir``/``workdir`` under its state dir), so
sandboxes never see each other's changes and throwing one away is ``rm -r``.

Ownership convention: files in a template are owned by the uids they should have *inside* a sandbox (root = 0,
the default user = 1000). Runtimes present them through an idmapped mount, so "0" becomes the sandbox's own
unprivileged host uid; nothing in a template is ever owned by a host account.

The default template, ``base`` (:func:`ensure_host_template`), is a skeleton directory plus the host's
``/usr`` bound read-only: sandboxes see the host's installed programs, and none of its data. Its ``/etc`` is
generated or copied from an allowlist of harmless host files; secrets (shadow, ssh host keys, machine-id,
apt credentials, TLS private keys) are never copied.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import InvalidRequest
from corral.runtimes.base import Bind, RootfsSpec

__all__ = [
    "SANDBOX_USER_UID",
    "LayerDirs",
    "ensure_host_template",
    "make_layer_dirs",
    "mkfs_argv",
    "overlay_options",
    "rootfs_from_directory",
    "rootfs_from_tarball",
]

TEMPLATE_VERSION = 1  # bump when the skeleton below changes, so hosts rebuild it
SANDBOX_USER_UID = 1000
MIN_DISK_MB = 16  # ext4's journal and metadata take a few MiB; below this a quota would be mostly overhead
HOST_ETC = Path("/etc")

# host /etc entries copied into the template (files, symlinks or whole directories); nothing else is
_ETC_ALLOW = (
    "nsswitch.conf",
    "resolv.conf",
    "host.conf",
    "gai.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ca-certificates.conf",
    "alternatives",
    "localtime",
    "timezone",
    "os-release",
    "debian_version",
    "profile",
    "profile.d",
    "bash.bashrc",
    "inputrc",
    "environment",
    "mime.types",
    "protocols",
    "services",
    "networks",
    "ethertypes",
    "locale.alias",
    "locale.gen",
    "login.defs",
    "shells",
    "skel",
    "magic",
    "magic.mime",
    "mke2fs.conf",
    "python3",
    "python3.11",
    "python3.12",
    "python3.13",
    "gitconfig",
    "manpath.config",
    "adduser.conf",
    "deluser.conf",
    "issue",
    "perl",
    "ssl/openssl.cnf",
    "ssl/certs",
)
_USERS_DB = (
    "root:x:0:0:root:/root:/bin/bash\n"
    "user:x:1000:1000:sandbox user:/home/user:/bin/bash\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
_GROUP = "root:x:0:\nshadow:x:42:\nusers:x:100:user\nuser:x:1000:\nnogroup:x:65534:\n"
_SHADOW = "root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"
_HOSTS = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def _etc_digest() -> str:
    """Changes when an allowed host file changes (a CA update, a new alternative), so the template follows."""
    h = hashlib.sha256(f"v{TEMPLATE_VERSION}".encode())
    for name in _ETC_ALLOW:
        with contextlib.suppress(OSError):
            st = (HOST_ETC / name).lstat()
            h.update(f"{name}:{st.st_mtime_ns}:{st.st_size}".encode())
    return h.hexdigest()[:16]


def ensure_host_template(cache_root: Path) -> RootfsSpec:
    """The ``base`` template: skeleton dirs, a safe ``/etc``, and the host's ``/usr`` bound read-only.

    Built once per host (atomically: built in a temporary directory and renamed), rebuilt when an allowed
    ``/etc`` file changes.
    """
    root = cache_root / "templates"
    target = root / f"base-{_etc_digest()}"
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _build_skeleton(tmp)
            try:
                tmp.rename(target)
            except OSError:  # another process built it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    binds = [Bind(source=Path("/usr"), target="/usr")]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # hosts without a merged /usr
        host = Path("/") / name
        if host.is_dir() and not host.is_symlink():
            binds.append(Bind(source=host, target=f"/{name}"))
    return RootfsSpec(lower=(target,), binds=tuple(binds))


def _build_skeleton(dest: Path) -> None:
    dest.chmod(0o755)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            (dest / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            (dest / name).mkdir()
    for d, mode in (
        ("usr", 0o755),
        ("etc", 0o755),
        ("root", 0o700),
        ("home", 0o755),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("var/lib", 0o755),
        ("var/log", 0o755),
        ("var/cache", 0o755),
        ("run", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("mnt", 0o755),
        ("opt", 0o755),
        ("srv", 0o755),
        ("media", 0o755),
        (".corral", 0o755),
        ("etc/ssl", 0o755),
        ("usr/local", 0o755),
    ):
        (dest / d).mkdir(exist_ok=True)
        (dest / d).chmod(mode)
    (dest / "var/run").symlink_to("../run")
    etc = dest / "etc"
    for name in _ETC_ALLOW:
        src = HOST_ETC / name
        if src.is_symlink():
            (etc / name).symlink_to(os.readlink(src))
        elif src.is_dir():
            shutil.copytree(src, etc / name, symlinks=True)
        elif src.is_file():
            shutil.copy2(src, etc / name, follow_symlinks=False)
    for name, text, mode in (
        ("passwd", _USERS_DB, 0o644),
        ("group", _GROUP, 0o644),
        ("shadow", _SHADOW, 0o640),
        ("hosts", _HOSTS, 0o644),
        ("hostname", "sandbox\n", 0o644),
    ):
        (etc / name).write_text(text)
        (etc / name).chmod(mode)
    with contextlib.suppress(FileExistsError):
        (etc / "mtab").symlink_to("../proc/self/mounts")
    for dirpath, dirnames, filenames in os.walk(dest):  # everything belongs to the sandbox's root …
        for n in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, n), 0, 0)
    os.chown(etc / "shadow", 0, 42)
    home = dest / "home" / "user"  # … except the default user's home
    home.mkdir(mode=0o755)
    os.chown(home, SANDBOX_USER_UID, SANDBOX_USER_UID)
    os.chown(dest, 0, 0)


def rootfs_from_directory(path: Path) -> RootfsSpec:
    """A template from an existing directory tree (owned by in-sandbox uids, see the module docstring)."""
    path = path.resolve()
    if not path.is_dir():
        raise InvalidRequest("the root file system directory does not exist", details={"path": path.name})
    return RootfsSpec(lower=(path,))


def rootfs_from_tarball(path: Path, cache_root: Path) -> RootfsSpec:
    """Unpack a root file system tarball (once per content digest) and use it as a template.

    Extraction is defensive: no absolute member paths, no ``..`` escapes, no links pointing out of the tree
    while extracting, no device nodes or FIFOs (skipped), no setuid/setgid bits. Numeric ownership is kept
    (it is the in-sandbox ownership).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    root = cache_root / "rootfs"
    target = root / h.hexdigest()[:24]
    if target.is_dir():
        return RootfsSpec(lower=(target,))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        tmp.chmod(0o755)
        try:
            with tarfile.open(path) as tar:
                _safe_extract(tar, tmp)
        except (tarfile.TarError, OSError) as exc:
            raise InvalidRequest(
                f"the root file system tarball cannot be unpacked safely: {exc}",
                details={"tarball": path.name},
            ) from exc
        try:
            tmp.rename(target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RootfsSpec(lower=(target,))


class UnsafeMember(tarfile.TarError):
    """A tarball member that would land, or point, outside the tree being unpacked."""


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def _rootfs_member(member: tarfile.TarInfo, root: str) -> tarfile.TarInfo | None:
    """A copy of ``member`` that is safe to unpack under ``root``, or None to skip it.

    Written out rather than using the stdlib ``data`` filter: that needs Python >= 3.11.4 (Debian 12 has
    3.11.2), and it drops what a root file system needs (absolute symlinks such as /etc/alternatives,
    ownership, /tmp's 1777). Rules: devices and FIFOs are skipped; a member, a hard link's target and a
    symlink's target (absolute ones taken relative to the tree) must resolve inside ``root``; setuid and
    setgid bits are dropped; numeric ownership is kept (it is the in-sandbox ownership).
    """
    if member.isdev() or member.isfifo():
        return None
    if member.name.startswith("/") or os.path.isabs(member.name):
        raise UnsafeMember(f"member {member.name!r} has an absolute path")
    where = os.path.realpath(os.path.join(root, member.name))
    if not _inside(root, where):
        raise UnsafeMember(f"member {member.name!r} would be written outside the tree")
    if member.issym():
        base = root if member.linkname.startswith("/") else os.path.dirname(where)
        target = os.path.realpath(os.path.join(base, member.linkname.lstrip("/")))
        if not _inside(root, target):
            raise UnsafeMember(f"symlink {member.name!r} points outside the tree")
    elif member.islnk():
        target = os.path.realpath(os.path.join(root, member.linkname))
        if not _inside(root, target):
            raise UnsafeMember(f"hard link {member.name!r} points outside the tree")
    safe = copy.copy(member)
    safe.uname = safe.gname = ""
    if not member.issym():  # symlink modes mean nothing; setuid/setgid never survive
        safe.mode = member.mode & 0o1777 & ~(stat.S_ISUID | stat.S_ISGID)
    return safe


# members were checked by _rootfs_member; where tarfile has extraction filters (3.11.4+, and "data" becomes the
# default in 3.14), say so, or it would drop the absolute symlinks and ownership a root file system needs
_TRUSTED: dict[str, Any] = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack every safe member; directory modes are applied last so read-only directories can be filled."""
    root = os.path.realpath(dest)
    directories: list[tarfile.TarInfo] = []
    for member in tar:
        safe = _rootfs_member(member, root)
        if safe is None:
            continue
        if safe.isdir():
            directories.append(safe)
            safe = copy.copy(safe)
            safe.mode |= 0o700
        tar.extract(safe, root, set_attrs=not safe.isdir(), numeric_owner=True, **_TRUSTED)
    for directory in sorted(directories, key=lambda d: d.name, reverse=True):
        path = os.path.join(root, directory.name)
        os.chown(path, directory.uid, directory.gid, follow_symlinks=False)
        os.chmod(path, directory.mode)


@dataclass(frozen=True, kw_only=True)
class LayerDirs:
    """The per-sandbox directories of a writable overlay, all under the sandbox's state dir."""

    lowers: tuple[Path, ...]  # mount points for the (idmapped) read-only layers, topmost first
    binds: tuple[Path, ...]  # mount points for the (idmapped) read-only binds, in RootfsSpec.binds order
    upper: Path
    work: Path
    merged: Path
    # with a disk quota: upper and work live on a size-capped ext4 image loop-mounted at ``disk`` (in the
    # sandbox's private mount namespace only), built by :func:`mkfs_argv` from ``seed``
    image: Path | None = None
    disk: Path | None = None
    seed: Path | None = None


def make_layer_dirs(
    state_dir: Path, rootfs: RootfsSpec, *, owner: int, disk_mb: int | None = None
) -> LayerDirs:
    """Create the directories of a sandbox's writable layer.

    ``upper`` is owned by ``owner`` (the host uid of the sandbox's root) because overlayfs shows the upper
    directory's owner and mode on the merged root; ``work`` is overlayfs-private.

    With ``disk_mb`` the writable layer gets its own file system of that size (a sparse ext4 image, so a
    full sandbox gets ENOSPC instead of filling the host's disk): ``upper``/``work`` are first made in
    ``seed``, which :func:`mkfs_argv` copies into the image; the runtime mounts the image at ``disk``.
    """
    for layer in rootfs.lower:
        if not layer.is_dir():
            raise InvalidRequest(
                "a layer of the sandbox's root file system does not exist", details={"layer": layer.name}
            )
    fs = state_dir / "fs"
    layer = fs / "disk" if disk_mb else fs
    dirs = LayerDirs(
        lowers=tuple(fs / f"lower{i}" for i in range(len(rootfs.lower))),
        binds=tuple(fs / f"bind{i}" for i in range(len(rootfs.binds))),
        upper=layer / "upper",
        work=layer / "work",
        merged=fs / "merged",
        image=state_dir / "disk.img" if disk_mb else None,
        disk=layer if disk_mb else None,
        seed=fs / "seed" if disk_mb else None,
    )
    fs.mkdir()
    fs.chmod(0o711)  # traversed by bwrap, which runs as the sandbox's root (an unprivileged host uid)
    for d in (*dirs.lowers, *dirs.binds, dirs.merged):
        d.mkdir(mode=0o700)
    base = dirs.seed or fs
    if dirs.seed is not None and dirs.disk is not None and dirs.image is not None:
        dirs.seed.mkdir(mode=0o700)
        dirs.disk.mkdir(mode=0o700)
        with open(dirs.image, "wb") as f:  # sparse: blocks are allocated as the sandbox writes
            f.truncate(max(disk_mb or 0, MIN_DISK_MB) * 1024 * 1024)
    (base / "work").mkdir(mode=0o700)
    upper = base / "upper"
    upper.mkdir(mode=0o755)
    top = rootfs.lower[0].stat() if rootfs.lower else None
    if top is not None:  # the merged root looks like the template's root
        upper.chmod(stat.S_IMODE(top.st_mode))
    os.chown(upper, owner + (top.st_uid if top else 0), owner + (top.st_gid if top else 0))
    return dirs


def mkfs_argv(dirs: LayerDirs) -> list[str]:
    """The command that formats ``dirs.image`` as ext4 holding ``seed`` (the empty upper and work dirs).

    No reserved blocks (``-m 0``): the sandbox's root should get the whole quota.
    """
    assert dirs.image is not None and dirs.seed is not None
    return ["mkfs.ext4", "-q", "-F", "-m", "0", "-d", str(dirs.seed), str(dirs.image)]


def _escape(path: Path) -> str:
    """overlayfs splits its options on ',' and lowerdir on ':'; backslash-escape both."""
    return str(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def overlay_options(dirs: LayerDirs) -> str:
    """The ``mount -t overlay`` data for ``dirs``.

    ``userxattr`` is not used: the overlay is mounted by host root in the shim, which is also why the lower
    layers can be idmapped. ``index=off``/``metacopy=off`` keep the upper dir a plain tree that snapshots and
    host-side file access can read directly.
    """
    lower = ":".join(_escape(p) for p in dirs.lowers)
    return (
        f"lowerdir={lower},upperdir={_escape(dirs.upper)},workdir={_escape(dirs.work)},index=off,metacopy=off"
    )
