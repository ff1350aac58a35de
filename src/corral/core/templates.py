"""Templates: named root file systems that sandboxes start from.

``base`` is built in: the host's programs (``/usr``) read-only, under a skeleton ``/etc`` and home that
hold none of the host's data. Others are imported from a directory or a tarball (OCI images and build steps
arrive with the image pipeline). A template's files are shared read-only by all of its sandboxes; each sandbox
writes to its own copy-on-write layer.
"""

from __future__ import annotations

import re
import shutil
import time
from functools import partial
from pathlib import Path

import anyio.to_thread

from corral.core.records import TemplateRecord
from corral.core.store import Store
from corral.errors import Conflict, InvalidRequest, NotFound
from corral.runtimes import _rootfs
from corral.runtimes.base import RootfsSpec

__all__ = ["BASE_TEMPLATE", "TemplateRegistry"]

BASE_TEMPLATE = "base"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_template_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(
            f"template name {name!r} is not valid: use 1-63 characters a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


class TemplateRegistry:
    def __init__(self, store: Store, cache_root: Path) -> None:
        self._store = store
        self._cache_root = cache_root

    async def resolve(self, name: str) -> RootfsSpec:
        """The root file system for template ``name``; NotFound lists what exists."""
        check_template_name(name)
        if name == BASE_TEMPLATE:
            return await anyio.to_thread.run_sync(_rootfs.ensure_host_template, self._cache_root)
        record = await self._store.get_template(name)
        if record is None:
            names = [BASE_TEMPLATE] + [t.name for t in await self._store.list_templates()]
            raise NotFound(
                f"template {name!r} not found; available templates: {', '.join(names)}",
                details={"available": names},
            )
        if record.kind == "snapshot" and record.parent is not None:  # its layer on top of its parent's
            parent = await self.resolve(record.parent)
            return RootfsSpec(lower=(Path(record.rootfs), *parent.lower), binds=parent.binds)
        return _rootfs.rootfs_from_directory(Path(record.rootfs))

    async def memory(self, name: str) -> Path | None:
        """The memory image a snapshot template holds, if any."""
        record = None if name == BASE_TEMPLATE else await self._store.get_template(name)
        return Path(record.memory) if record is not None and record.memory else None

    async def add(self, record: TemplateRecord) -> TemplateRecord:
        """Register a template built elsewhere (a snapshot); Conflict if the name is taken."""
        await self._check_new(record.name)
        return await self._store.put_template(record, expect_version=None)

    async def list(self) -> list[TemplateRecord]:
        base = TemplateRecord(
            name=BASE_TEMPLATE,
            kind="host",
            rootfs="",
            created_at=0.0,
            description="the host's /usr read-only under a clean /etc and home",
        )
        return [base, *await self._store.list_templates()]

    async def import_directory(self, name: str, path: Path, *, description: str = "") -> TemplateRecord:
        """Register a directory as a template, used in place (it must not change while sandboxes use it)."""
        await self._check_new(name)
        rootfs = await anyio.to_thread.run_sync(_rootfs.rootfs_from_directory, path)
        return await self._store.put_template(
            TemplateRecord(
                name=name,
                kind="directory",
                rootfs=str(rootfs.lower[0]),
                created_at=time.time(),
                description=description,
            ),
            expect_version=None,
        )

    async def import_tarball(self, name: str, path: Path, *, description: str = "") -> TemplateRecord:
        """Unpack a tarball (safely: no absolute paths, no escapes, no devices) into the template cache."""
        await self._check_new(name)
        rootfs = await anyio.to_thread.run_sync(_rootfs.rootfs_from_tarball, path, self._cache_root)
        return await self._store.put_template(
            TemplateRecord(
                name=name,
                kind="tarball",
                rootfs=str(rootfs.lower[0]),
                created_at=time.time(),
                description=description,
            ),
            expect_version=None,
        )

    async def delete(self, name: str) -> None:
        check_template_name(name)
        if name == BASE_TEMPLATE:
            raise InvalidRequest("the built-in base template cannot be deleted")
        record = await self._store.get_template(name)
        if record is None:
            raise NotFound(f"template {name!r} not found")
        children = [t.name for t in await self._store.list_templates() if t.parent == name]
        if children:
            raise Conflict(
                f"template {name!r} is the base of snapshots {', '.join(children)}; delete those first",
                details={"snapshots": children},
            )
        await self._store.delete_template(name)
        if record.kind == "snapshot":  # its files are ours (under the cache); other kinds may be the user's
            await anyio.to_thread.run_sync(
                partial(shutil.rmtree, Path(record.rootfs).parent, ignore_errors=True)
            )

    async def check_new(self, name: str) -> None:
        """Raise unless ``name`` is a valid name no template has."""
        await self._check_new(name)

    async def _check_new(self, name: str) -> None:
        check_template_name(name)
        if name == BASE_TEMPLATE or await self._store.get_template(name) is not None:
            raise Conflict(f"template {name!r} already exists; delete it first or pick another name")
