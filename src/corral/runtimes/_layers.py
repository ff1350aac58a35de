"""Copying a sandbox's writable layer in and out: the file-system half of snapshots and forks.

Runtime-neutral (the namespace and gVisor runtimes both use it). An overlayfs upper dir is more than files: a
deleted file is a *whiteout* (a 0:0 character device), a replaced directory carries the
``trusted.overlay.opaque`` xattr, and file capabilities live in ``security.capability``. ``cp -a`` as root
keeps all of that (devices, xattrs, owners, modes, times, hard links), which is why a captured layer works
both as a read-only lower layer of a template (overlayfs honours whiteouts in lower layers) and as the seed of
a new sandbox's upper dir.

Owners: template layers hold the uids seen *inside* a sandbox (see :mod:`._rootfs`). A namespace sandbox's
upper dir holds host uids shifted by its user namespace base, so :func:`capture` maps them back (through
:func:`._rootfs.export_upper`, which also treats the tree as hostile) and :func:`seed` shifts them forward by
``+base``; gVisor's gofer writes inside uids directly (base 0).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from corral.errors import RuntimeFailure
from corral.runtimes import _proc, _rootfs

__all__ = ["capture", "copy_tree", "seed"]

COPY_TIMEOUT = 600.0  # a writable layer of a few GiB copies in well under this on a local disk


def copy_tree(src: Path, dst: Path) -> None:
    """``cp -a src dst`` (dst must not exist): owners, modes, times, xattrs, devices, hard links."""
    _proc.run_blocking(
        [_proc.require_binary("cp"), "-a", "--reflink=auto", "--", str(src), str(dst)],
        timeout=COPY_TIMEOUT,
        what="copy the sandbox's files",
    )


def _shift_owners(root: Path, delta: int) -> None:
    """Add ``delta`` to every owner below ``root`` (and of root), refusing ids outside the sandbox's range."""

    def entries() -> Iterator[str]:  # each path once (os.walk lists a directory in its parent and as itself)
        yield str(root)
        for dirpath, dirnames, filenames in os.walk(root):
            yield from (os.path.join(dirpath, n) for n in (*dirnames, *filenames))

    for name in entries():
        st = os.lstat(name)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            continue  # a whiteout: overlayfs makes it as the mounter (host root) and ignores its owner
        uid, gid = st.st_uid + delta, st.st_gid + delta
        if min(uid, gid) < 0:
            raise RuntimeFailure("the sandbox's files have owners outside its user namespace")
        os.lchown(name, uid, gid)
        if not stat.S_ISLNK(st.st_mode):  # chown clears set-id bits; put them back
            os.chmod(name, st.st_mode & 0o7777)


def capture(upper: Path, dest: Path, *, base: int = 0) -> None:
    """Copy a sandbox's upper dir to ``dest`` as a template layer with :func:`._rootfs.export_upper` (the
    hardened copy shared with the image pipeline: nothing followed, host ids back to inside ids, set-id bits
    and device nodes other than whiteouts dropped). ``dest``'s parent is made (private) if needed."""
    dest.parent.mkdir(mode=0o700, exist_ok=True)
    dest.mkdir(mode=0o755)
    _rootfs.export_upper(upper, dest, id_base=base)


def seed(layer: Path, upper: Path, *, base: int = 0) -> None:
    """Fill a new sandbox's (empty) upper dir from a captured layer, owners shifted to the sandbox's range."""
    staging = upper.with_name(upper.name + ".seed")
    copy_tree(layer, staging)
    if base:
        _shift_owners(staging, base)
    shutil.rmtree(upper)
    staging.rename(upper)
