"""Templates: named root file systems that sandboxes start from.

``base`` is built in: the host's programs (``/usr``) read-only, under a skeleton ``/etc`` and home that
hold none of the host's data. Others are imported from a directory or a tarball (OCI images and build steps
arrive with the image pipeline). A template's files are shared read-only by all of its sandboxes; each sandbox
writes to its own copy-on-write layer.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import anyio.to_thread

from corral.core.records import TemplateRecord
from corral.core.store import Store
from corral.errors import Conflict, InvalidRequest, NotFound
from corral.runtimes import _rootfs
from corral.runtimes.base import RootfsSpec

__all__ = ["BASE_TEMPLATE", "LAYER_KIND", "TemplateRegistry"]

BASE_TEMPLATE = "base"
LAYER_KIND = "base-layer"  # a directory layered on top of ``base`` (the code-interpreter template)
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
        if record.kind == LAYER_KIND:
            base = await anyio.to_thread.run_sync(_rootfs.ensure_host_template, self._cache_root)
            return RootfsSpec(lower=(Path(record.rootfs), *base.lower), binds=base.binds)
        return _rootfs.rootfs_from_directory(Path(record.rootfs))

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

    async def register_layer(self, name: str, layer: Path, *, description: str = "") -> TemplateRecord:
        """Register (or re-point) ``name`` to a layer over ``base``; idempotent for builders."""
        check_template_name(name)
        if name == BASE_TEMPLATE:
            raise InvalidRequest("the built-in base template cannot be replaced")
        existing = await self._store.get_template(name)
        if existing is not None and existing.kind == LAYER_KIND and existing.rootfs == str(layer):
            return existing
        return await self._store.put_template(
            TemplateRecord(
                name=name, kind=LAYER_KIND, rootfs=str(layer), created_at=time.time(), description=description
            ),
            expect_version=existing.version if existing is not None else None,
        )

    async def delete(self, name: str) -> None:
        check_template_name(name)
        if name == BASE_TEMPLATE:
            raise InvalidRequest("the built-in base template cannot be deleted")
        if await self._store.get_template(name) is None:
            raise NotFound(f"template {name!r} not found")
        await self._store.delete_template(name)

    async def _check_new(self, name: str) -> None:
        check_template_name(name)
        if name == BASE_TEMPLATE or await self._store.get_template(name) is not None:
            raise Conflict(f"template {name!r} already exists; delete it first or pick another name")
