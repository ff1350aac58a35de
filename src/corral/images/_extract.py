"""Safe unpacking of hostile tar archives: root file system tarballs and OCI image layers.

Every member is checked before anything is written (:func:`safe_member`): no absolute member paths, no ``..``
escapes, no link (hard or symbolic, absolute ones taken relative to the tree) that points out of the tree,
no setuid/setgid bits. Numeric ownership is kept: it is the in-sandbox ownership (see
:mod:`corral.images.rootfs`).

Written out rather than using the stdlib ``data`` filter: that needs Python >= 3.11.4 (Debian 12 has 3.11.2),
and it drops what a root file system needs (absolute symlinks such as /etc/alternatives, ownership, /tmp's
1777).

OCI layers (``Whiteouts.OVERLAY``) are unpacked straight into overlayfs's on-disk format, so a layer directory
can be an overlay ``lowerdir`` as it is: ``.wh.NAME`` becomes a 0/0 character device (overlayfs's whiteout)
and ``DIR/.wh..wh..opq`` the ``trusted.overlay.opaque=y`` xattr on DIR. Each layer is unpacked into its own
empty directory, so a symlink from an earlier layer can never redirect a later layer's writes.
"""

from __future__ import annotations

import copy
import os
import stat
import tarfile
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = ["Devices", "UnsafeMember", "Whiteouts", "safe_extract", "safe_member"]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"


class Devices(StrEnum):
    SKIP = "skip"  # root fs tarballs made with `tar c /` carry /dev nodes: leave them out
    REFUSE = "refuse"  # image layers: a device node is refused (the whole layer fails)


class Whiteouts(StrEnum):
    KEEP = "keep"  # .wh.* members are ordinary files (a plain root file system tarball)
    OVERLAY = "overlay"  # OCI whiteouts become overlayfs whiteouts (image layers)


class UnsafeMember(tarfile.TarError):
    """A tarball member that would land, or point, outside the tree being unpacked, or is not allowed."""


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def safe_member(member: tarfile.TarInfo, root: str, *, devices: Devices) -> tarfile.TarInfo | None:
    """A copy of ``member`` that is safe to unpack under ``root``, or None to skip it (see the docstring)."""
    if member.isdev() or member.isfifo():
        if devices is Devices.REFUSE:
            raise UnsafeMember(f"member {member.name!r} is a device node or FIFO")
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


# members were checked by safe_member; where tarfile has extraction filters (3.11.4+, and "data" becomes the
# default in 3.14), say so, or it would drop the absolute symlinks and ownership a root file system needs
_TRUSTED: dict[str, Any] = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def safe_extract(
    tar: tarfile.TarFile,
    dest: Path,
    *,
    devices: Devices = Devices.SKIP,
    whiteouts: Whiteouts = Whiteouts.KEEP,
) -> None:
    """Unpack every safe member into ``dest`` (an empty directory); directory modes are applied last so
    read-only directories can be filled. Raises :class:`UnsafeMember` (or a TarError/OSError) and leaves
    ``dest`` half-filled: callers unpack into a temporary directory and rename it only on success."""
    root = os.path.realpath(dest)
    directories: list[tarfile.TarInfo] = []
    opaque: list[str] = []
    for member in tar:
        safe = safe_member(member, root, devices=devices)
        if safe is None:
            continue
        name = os.path.basename(safe.name.rstrip("/"))
        if whiteouts is Whiteouts.OVERLAY and name.startswith(WHITEOUT_PREFIX):
            parent = os.path.join(root, os.path.dirname(safe.name.rstrip("/")))
            os.makedirs(parent, mode=0o755, exist_ok=True)
            if name == OPAQUE_MARKER:
                opaque.append(parent)
            else:
                hidden = name[len(WHITEOUT_PREFIX) :]
                if hidden in ("", ".", "..") or "/" in hidden:
                    raise UnsafeMember(f"whiteout {member.name!r} names nothing")
                os.mknod(os.path.join(parent, hidden), stat.S_IFCHR | 0o600, os.makedev(0, 0))
            continue
        if safe.isdir():
            directories.append(safe)
            safe = copy.copy(safe)
            safe.mode |= 0o700
        tar.extract(safe, root, set_attrs=not safe.isdir(), numeric_owner=True, **_TRUSTED)
    for path in opaque:
        os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)
    for directory in sorted(directories, key=lambda d: d.name, reverse=True):
        path = os.path.join(root, directory.name)
        os.chown(path, directory.uid, directory.gid, follow_symlinks=False)
        os.chmod(path, directory.mode)
