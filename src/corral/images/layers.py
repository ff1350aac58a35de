"""The layer store: read-only layer directories, each made once and shared by every template that uses it.

A layer is a directory under ``ROOT/<key>`` in overlayfs's lower-layer format (whiteouts as 0/0 character
devices, opaque directories as ``trusted.overlay.opaque``), owned by in-sandbox ids. Keys say what the layer
is made of, so the same input is never unpacked twice:

- ``sha256-<hex>``: an image layer, keyed by its blob digest (:meth:`LayerStore.unpack`);
- ``step-<hex>``: the result of a build step, keyed by a hash of its parent layers and the step;
- ``tar-<hex>``, ``debootstrap-<hex>``: a root file system tarball or a debootstrap run.

Every layer is built in a private temporary directory beside its final place and renamed into place only when
complete, so a failure (an unsafe tarball, a full disk, a cancelled build) leaves nothing under its key, and
a reader never sees half a layer. Two processes building the same key both succeed: the first rename wins,
the other's copy is deleted.
"""

from __future__ import annotations

import gzip
import logging
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from corral.errors import InvalidRequest
from corral.images._extract import Devices, UnsafeMember, Whiteouts, safe_extract

__all__ = ["LayerResult", "LayerStore"]

log = logging.getLogger("corral.images.layers")
_KEY = re.compile(r"^[a-z0-9]+-[0-9a-f]{16,64}$")


@dataclass(frozen=True, kw_only=True)
class LayerResult:
    key: str
    path: Path
    created: bool  # False: it was already in the store (a cache hit)


class LayerStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"bad layer key {key!r}")
        return self.root / key

    def get(self, key: str) -> Path | None:
        path = self.path(key)
        return path if path.is_dir() else None

    def new_tmp(self) -> Path:
        """A private, empty directory in the store, for a layer being made; :meth:`commit` it or delete it."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
        tmp.chmod(0o755)
        return tmp

    def commit(self, tmp: Path, key: str) -> Path:
        """Move a finished ``tmp`` to ``key`` (if another builder got there first, keep theirs)."""
        target = self.path(key)
        try:
            tmp.rename(target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def build(self, key: str, fill: Callable[[Path], None]) -> LayerResult:
        """The layer ``key``, made by ``fill(empty_dir)`` if it is not in the store yet (blocking)."""
        target = self.path(key)
        if target.is_dir():
            return LayerResult(key=key, path=target, created=False)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
        try:
            tmp.chmod(0o755)
            fill(tmp)
            try:
                tmp.rename(target)
            except OSError:  # another builder finished the same key first
                shutil.rmtree(tmp, ignore_errors=True)
                return LayerResult(key=key, path=target, created=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return LayerResult(key=key, path=target, created=True)

    def unpack(
        self, key: str, blob: Path, *, compression: str, devices: Devices = Devices.REFUSE, what: str
    ) -> LayerResult:
        """Unpack a tar blob (``compression`` "tar" or "gzip") as layer ``key`` with OCI whiteouts.

        Raises InvalidRequest naming ``what`` (never a host path) if any member is unsafe or the archive is
        corrupt; nothing is left in the store then.
        """

        def fill(dest: Path) -> None:
            try:
                with _open(blob, compression) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                    safe_extract(tar, dest, devices=devices, whiteouts=Whiteouts.OVERLAY)
            except UnsafeMember as exc:
                raise InvalidRequest(f"{what} cannot be unpacked safely: {exc}") from exc
            except (tarfile.TarError, OSError, EOFError) as exc:
                log.error("unpacking %s (%s) failed: %s", what, blob, exc)
                raise InvalidRequest(f"{what} is not a readable tar archive") from exc

        return self.build(key, fill)


def _open(blob: Path, compression: str) -> IO[bytes]:
    if compression == "gzip":
        return cast(IO[bytes], gzip.open(blob, "rb"))
    return open(blob, "rb")
