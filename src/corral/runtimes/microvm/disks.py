"""The disks a microVM gets, built on the host from what the other runtimes use as directories.

- **Read-only erofs images** of each template layer, each bind source (the host template's ``/usr``) and the
  agent bundle, cached under ``cache/microvm/erofs/`` by a key of their source: a layer's path (layers are
  immutable, content-addressed directories) plus its inode change time, a bind source's path plus the change
  times of its top-level entries and of dpkg's status file (a package install changes them). ``mkfs.erofs``
  keeps owners and modes, so the guest sees the in-sandbox ownership convention the layers are written in.
- **A writable upper per sandbox**: an empty ext4 of the sandbox's disk size, formatted once per size (the
  shared, read-only backing file) and a per-sandbox qcow2 over it that holds only what the guest writes (thin:
  a new sandbox costs ~200 KiB). A full upper is ENOSPC in the guest, which is the disk limit. For engines
  that take raw disks only (Firecracker), :func:`raw_upper` makes a sparse raw copy instead.

Everything here runs in worker threads (blocking subprocess calls through :mod:`corral.runtimes._proc`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from corral.runtimes import _proc

__all__ = [
    "DEFAULT_DISK_MB",
    "copy_upper",
    "ensure_empty_ext4",
    "ensure_erofs",
    "make_upper",
    "raw_upper",
]

log = logging.getLogger("corral.runtimes.microvm.disks")

DEFAULT_DISK_MB = 4096  # a sandbox without a disk limit still gets a bounded, sparse writable disk
EROFS_TIMEOUT = 1800.0  # the host's /usr (~5 GiB) takes minutes on a loaded 2-core host; once per host
DPKG_STATUS = Path("/var/lib/dpkg/status")

Progress = Callable[[str], None]


def _source_key(source: Path, *, tree: bool) -> str:
    """Changes when ``source`` changes: its own ctime, and for a host tree (a bind source) those of its
    top-level entries and of dpkg's status file."""
    h = hashlib.sha256(str(source.resolve()).encode())
    st = source.stat()
    h.update(f"{st.st_ctime_ns}:{st.st_ino}".encode())
    if tree:
        for entry in sorted(os.scandir(source), key=lambda e: e.name):
            with contextlib.suppress(OSError):
                h.update(f"{entry.name}:{entry.stat(follow_symlinks=False).st_ctime_ns}".encode())
        with contextlib.suppress(OSError):
            h.update(str(DPKG_STATUS.stat().st_mtime_ns).encode())
    return h.hexdigest()[:20]


def ensure_erofs(
    cache_root: Path, source: Path, *, tree: bool = False, progress: Progress | None = None
) -> Path:
    """A read-only erofs image of the directory ``source``, built once (atomically) and cached."""
    target = cache_root / "microvm" / "erofs" / f"{_source_key(source, tree=tree)}.erofs"
    if target.exists():
        return target
    message = f"Building a guest disk image of {source.name or '/'}…"
    log.info("%s (%s)", message, source)
    if progress is not None:
        progress(message)
    # lz4 (not lz4hc): ~3x faster to build, and the guest decompresses it at the same speed
    return _build_file(
        target,
        lambda tmp: _proc.run_blocking(
            [_proc.require_binary("mkfs.erofs"), "-zlz4", "--quiet", str(tmp), str(source)],
            timeout=EROFS_TIMEOUT,
            what="build a guest disk image",
        ),
    )


def _build_file(target: Path, build: Callable[[Path], object]) -> Path:
    """Run ``build`` on a temporary file next to ``target``, then publish it read-only under that name
    (atomically: a concurrent build of the same thing is harmless, one of them wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".build-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        build(tmp)
        tmp.chmod(0o444)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def ensure_empty_ext4(cache_root: Path, size_mb: int) -> Path:
    """A sparse, empty ext4 of ``size_mb`` MiB: the shared backing file of every writable upper that size."""
    target = cache_root / "microvm" / "ext4" / f"empty-{size_mb}m.ext4"
    if target.exists():
        return target

    def build(tmp: Path) -> None:
        os.truncate(tmp, size_mb * 1024 * 1024)
        _proc.run_blocking(
            [
                _proc.require_binary("mkfs.ext4"),
                "-q",
                "-F",
                "-m",
                "0",  # no blocks reserved for root: the whole disk limit is the sandbox's
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                "-O",
                "^has_journal",  # the upper dies with the sandbox; a journal only costs writes
                str(tmp),
            ],
            timeout=120,
            what="format the sandbox's writable disk",
        )

    return _build_file(target, build)


def make_upper(dest: Path, backing: Path) -> None:
    """A thin qcow2 at ``dest`` over the shared empty ext4 ``backing``."""
    _proc.run_blocking(
        [
            _proc.require_binary("qemu-img"),
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(backing),
            str(dest),
        ],
        timeout=60,
        what="create the sandbox's writable disk",
    )


def copy_upper(source: Path, dest: Path) -> None:
    """A copy of a (stopped or paused) VM's qcow2 upper that shares its backing file: a fork's own disk.

    ``cp --reflink=auto --sparse=always`` keeps it thin where the host file system allows."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    _proc.run_blocking(
        [_proc.require_binary("cp"), "--reflink=auto", "--sparse=always", str(source), str(tmp)],
        timeout=600,
        what="copy the sandbox's writable disk",
    )
    os.replace(tmp, dest)


def raw_upper(dest: Path, size_mb: int, cache_root: Path) -> None:
    """A sparse raw copy of the empty ext4 (engines without qcow2)."""
    empty = ensure_empty_ext4(cache_root, size_mb)
    _proc.run_blocking(
        [_proc.require_binary("cp"), "--sparse=always", str(empty), str(dest)],
        timeout=600,
        what="create the sandbox's writable disk",
    )
    os.chmod(dest, 0o600)
