"""Per-sandbox writable layers over read-only template layers, shared by the namespace and gVisor runtimes.

A template is an ordered tuple of read-only layer directories (:class:`~corral.runtimes.base.HostLayers`,
topmost first: an OCI image's layers, build steps, or a single unpacked tree); building them is
:mod:`corral.images`' job. Every sandbox gets its own writable layer on top (overlayfs ``upperdir``/``workdir``
under its state dir, with several ``lowerdir``s), so sandboxes never see each other's changes and throwing one
away is ``rm -r``.

Ownership convention: files in a layer are owned by the uids they should have *inside* a sandbox (root = 0,
the default user = 1000). Runtimes present them through an idmapped mount, so "0" becomes the sandbox's own
unprivileged host uid; nothing in a template is ever owned by a host account.

:func:`export_upper` turns a stopped (paused) sandbox's writable layer back into a layer of that convention:
that is how an image build step becomes a new shared layer.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from corral.errors import InvalidRequest
from corral.runtimes.base import HostLayers

__all__ = [
    "SANDBOX_USER_UID",
    "LayerDirs",
    "export_upper",
    "make_layer_dirs",
    "mkfs_argv",
    "overlay_options",
    "remove_state_dir",
]

SANDBOX_USER_UID = 1000
MIN_DISK_MB = 16  # ext4's journal and metadata take a few MiB; below this a quota would be mostly overhead


@dataclass(frozen=True, kw_only=True)
class LayerDirs:
    """The per-sandbox directories of a writable overlay, all under the sandbox's state dir."""

    lowers: tuple[Path, ...]  # mount points for the (idmapped) read-only layers, topmost first
    binds: tuple[Path, ...]  # mount points for the (idmapped) read-only binds, in HostLayers.binds order
    upper: Path
    work: Path
    merged: Path
    # with a disk quota: upper and work live on a size-capped ext4 image loop-mounted at ``disk`` (in the
    # sandbox's private mount namespace only), built by :func:`mkfs_argv` from ``seed``
    image: Path | None = None
    disk: Path | None = None
    seed: Path | None = None


def make_layer_dirs(
    state_dir: Path, rootfs: HostLayers, *, owner: int, disk_mb: int | None = None
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


_OPAQUE_XATTR = "trusted.overlay.opaque"
_ID_RANGE = 65536  # ids a sandbox's user namespace maps (see the runtimes' uid allocators)
_OVERFLOW_ID = 65534


def export_upper(upper: Path, dest: Path, *, id_base: int) -> None:
    """Copy a sandbox's writable layer into ``dest`` (a new, empty directory) as a read-only layer.

    The upper dir was written by hostile code, so nothing in it is followed or trusted: entries are read
    with ``lstat`` and opened ``O_NOFOLLOW``; host ids ``id_base + n`` become in-sandbox ids ``n`` (anything
    else becomes 65534); setuid/setgid bits are dropped; overlayfs whiteouts (0/0 character devices) and
    opaque-directory xattrs are kept, other device nodes, FIFOs and sockets are left out; hard links within
    the layer stay hard links. The caller pauses (or stops) the sandbox first, so the tree holds still.
    """

    def ids(st: os.stat_result) -> tuple[int, int]:
        def one(host: int) -> int:
            n = host - id_base
            return n if 0 <= n < _ID_RANGE else _OVERFLOW_ID

        return one(st.st_uid), one(st.st_gid)

    def mode(st: os.stat_result) -> int:
        return stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)

    links: dict[tuple[int, int], str] = {}
    directories: list[tuple[str, os.stat_result]] = []
    src_root = os.fspath(upper)
    dst_root = os.fspath(dest)
    for dirpath, dirnames, filenames in os.walk(src_root, followlinks=False):
        rel = os.path.relpath(dirpath, src_root)
        out_dir = dst_root if rel == "." else os.path.join(dst_root, rel)
        for name in list(dirnames):  # os.walk lists symlinks to directories here; they are links, not dirs
            if os.path.islink(os.path.join(dirpath, name)):
                dirnames.remove(name)
                filenames.append(name)
        for name in dirnames:
            src = os.path.join(dirpath, name)
            st = os.lstat(src)
            out = os.path.join(out_dir, name)
            os.mkdir(out, 0o700)
            try:
                if os.getxattr(src, _OPAQUE_XATTR, follow_symlinks=False) == b"y":
                    os.setxattr(out, _OPAQUE_XATTR, b"y", follow_symlinks=False)
            except OSError:
                pass  # no such xattr: an ordinary directory
            directories.append((out, st))
        for name in filenames:
            src = os.path.join(dirpath, name)
            out = os.path.join(out_dir, name)
            st = os.lstat(src)
            uid, gid = ids(st)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), out)
            elif stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0):
                os.mknod(out, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    os.link(links[key], out)
                    continue
                fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as fin, open(out, "xb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
                os.chmod(out, mode(st))
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                links[key] = out
            else:
                continue  # devices, FIFOs, sockets: not part of a layer
            os.lchown(out, uid, gid)
    for out, st in reversed(directories):
        uid, gid = ids(st)
        os.lchown(out, uid, gid)
        os.chmod(out, mode(st))
    os.chmod(dst_root, 0o755)  # noqa: S103 - a layer's root is the sandbox's /, world-readable like any /


def remove_state_dir(path: Path) -> None:
    """``rmtree`` that tolerates entries vanishing underneath it.

    A sandbox's last processes are killed just before this runs; an unlink one of them had already started can
    still complete while the tree is walked, and that file being gone is what we wanted anyway.
    """

    def ignore_missing(
        func: object, name: str, exc_info: tuple[type[BaseException], BaseException, object]
    ) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=ignore_missing)
