"""Templates: named root file systems that sandboxes start from.

``base`` is built in: the host's programs (``/usr``) read-only, under a skeleton ``/etc`` and home that
hold none of the host's data. Others are imported from a directory or a tarball, or built (:mod:`corral.images`)
from an OCI image, a directory, a tarball or debootstrap plus ``--run`` steps. A template is an ordered tuple of
read-only layers shared by all of its sandboxes; each sandbox writes to its own copy-on-write layer.

The layer and blob stores live under the cache root (``layers/``, ``oci/``). Deleting a template keeps its
layers (they are the rebuild cache, and a build running now may be using them); pruning unused layers is a
separate, not yet written, maintenance pass.
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
from corral.errors import Conflict, InvalidRequest, NotFound, Unsupported
from corral.images import rootfs as _rootfs
from corral.images.layers import LayerStore
from corral.runtimes.base import Artifact, HostLayers, OciImage, RootfsKind, RootfsSource

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
        self.layers = LayerStore(cache_root / "layers")
        self.oci_layout = cache_root / "oci"

    async def resolve(
        self, name: str, *, accepts: tuple[RootfsKind, ...] = (RootfsKind.HOST_LAYERS,)
    ) -> RootfsSource:
        """Template ``name``'s root file system in the first form a runtime ``accepts`` that the template
        offers (``Capabilities.rootfs``); NotFound lists what exists, Unsupported says what was offered.

        Every template offers host layers; one built from an image with no steps also offers that image's
        reference (a runtime that takes only other forms names the forms it takes in the error).
        """
        offered = [RootfsKind.HOST_LAYERS]
        if RootfsKind.OCI_IMAGE in accepts:
            record = (
                None if name == BASE_TEMPLATE else await self._store.get_template(check_template_name(name))
            )
            if record is not None and record.image:
                return OciImage(reference=record.image)
            if record is None and name != BASE_TEMPLATE:
                await self._host_layers(name)  # raises NotFound listing what exists
        layers = await self._host_layers(name)
        if RootfsKind.HOST_LAYERS in accepts:
            return layers
        raise Unsupported(
            f"template {name!r} is offered as {', '.join(offered)}; this isolation takes {', '.join(accepts)}"
            " (build a template from an image, with no --run steps, for it)",
            details={"offered": offered, "accepted": list(accepts)},
        )

    async def _host_layers(self, name: str) -> HostLayers:
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
            return HostLayers(lower=(Path(record.rootfs), *base.lower), binds=base.binds)

        if record.disk_runtime is not None:  # a VM's disk image is no layer (the service starts it as a fork)
            raise Unsupported(disk_only(name, record.disk_runtime))
        if record.kind == "snapshot" and record.parent is not None:  # its layer on top of its parent's
            parent = await self._host_layers(record.parent)
            return HostLayers(lower=(Path(record.rootfs), *parent.lower), binds=parent.binds)
        if record.layers:
            layers = tuple(Path(p) for p in record.layers)
            if not await anyio.to_thread.run_sync(lambda: all(p.is_dir() for p in layers)):
                raise NotFound(f"template {name!r} lost layers from the layer store; build it again")
            return HostLayers(lower=layers)
        return _rootfs.rootfs_from_directory(Path(record.rootfs))

    async def memory(self, name: str) -> Artifact | None:
        """The memory image a snapshot template holds, if any (restorable by its ``runtime`` only)."""
        record = None if name == BASE_TEMPLATE else await self._store.get_template(name)
        return record.memory_artifact() if record is not None else None

    async def disk(self, name: str) -> tuple[str, Artifact] | None:
        """For a snapshot template holding a VM's disk image: its parent template and that image."""
        record = None if name == BASE_TEMPLATE else await self._store.get_template(name)
        artifact = record.disk_artifact() if record is not None else None
        if record is None or artifact is None or record.parent is None:
            return None
        return record.parent, artifact

    async def add(self, record: TemplateRecord) -> TemplateRecord:
        """Register a template built elsewhere (a snapshot); Conflict if the name is taken."""
        await self._check_new(record.name)
        return await self._store.put_template(record, expect_version=None)

    async def get(self, name: str) -> TemplateRecord | None:
        """The stored record of a non-base template (None for ``base`` and unknown names)."""
        check_template_name(name)
        return None if name == BASE_TEMPLATE else await self._store.get_template(name)

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
        made = await anyio.to_thread.run_sync(_rootfs.tarball_layer, path, self.layers)
        return await self._store.put_template(
            TemplateRecord(
                name=name,
                kind="tarball",
                rootfs=str(made.path),
                layers=[str(made.path)],
                layer_keys=[made.key],
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
                partial(shutil.rmtree, self._snapshot_dir(Path(record.rootfs)), ignore_errors=True)
            )

    def _snapshot_dir(self, rootfs: Path) -> Path:
        """What a snapshot's files live in: its ``cache_root/snapshots/KEY/`` (the local runtimes' layout,
        whatever lies below it: a layer dir, a disk image beside a memory image), else its rootfs's parent."""
        snapshots = self._cache_root / "snapshots"
        if rootfs.is_relative_to(snapshots) and rootfs != snapshots:
            return snapshots / rootfs.relative_to(snapshots).parts[0]
        return rootfs.parent

    async def put_built(self, record: TemplateRecord) -> TemplateRecord:
        """Store a built template (:mod:`corral.core.builder`); the name was checked before the build."""
        await self._check_new(record.name)
        return await self._store.put_template(record, expect_version=None)

    async def check_new(self, name: str) -> None:
        await self._check_new(name)

    async def _check_new(self, name: str) -> None:
        check_template_name(name)
        if name == BASE_TEMPLATE or await self._store.get_template(name) is not None:
            raise Conflict(f"template {name!r} already exists; delete it first or pick another name")


def disk_only(name: str, runtime: str) -> str:
    return f"template {name!r} is a {runtime} snapshot (a disk image): only {runtime} sandboxes start from it"
