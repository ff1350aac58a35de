"""Templates from the SDK: list, build (from an image, directory, tarball or debootstrap, plus steps), import a
directory or tarball root file system, delete."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from corral.client._async.backend import AsyncBackend, open_default_backend
from corral.errors import NotFound
from corral.models import BuildEvent, BuildParams, TemplateInfo

__all__ = ["AsyncTemplates"]


class AsyncTemplates:
    """``AsyncTemplates()`` uses the default backend (embedded, or the server named by CORRAL_URL)."""

    def __init__(self, backend: AsyncBackend | None = None) -> None:
        self._owns = backend is None
        self._backend = backend or open_default_backend()

    async def list(self) -> list[TemplateInfo]:
        return await self._backend.list_templates()

    async def import_directory(
        self, name: str, path: str | os.PathLike[str], *, description: str = ""
    ) -> TemplateInfo:
        """Use a directory as a root file system, in place (it must not change while sandboxes use it)."""
        return await self._backend.import_template(name, directory=os.fspath(path), description=description)

    async def import_tarball(
        self, name: str, path: str | os.PathLike[str], *, description: str = ""
    ) -> TemplateInfo:
        """Unpack a tar archive (safely) into the template store."""
        return await self._backend.import_template(name, tarball=os.fspath(path), description=description)

    async def delete(self, name: str) -> None:
        await self._backend.delete_template(name)

    async def build(
        self,
        name: str,
        from_image: str,
        *,
        run: Sequence[str] = (),
        env: dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        start_cmd: str | None = None,
        ready_cmd: str | None = None,
        registry_username: str | None = None,
        registry_password: str | None = None,
        registry_token: str | None = None,
        insecure_registry: bool = False,
        isolation: str | None = None,
        description: str = "",
        on_progress: Callable[[BuildEvent], object] | None = None,
    ) -> TemplateInfo:
        """Build template ``name`` from an image (``127.0.0.1:5000/app:1``), a local directory or tarball
        (a path starting with ``/`` or ``.``) or ``debootstrap:SUITE``, then ``run`` each shell step in a
        sandbox with no network. ``start_cmd`` runs in the background in every sandbox made from it and
        ``ready_cmd`` must succeed before create returns. Registry credentials default to the
        ``CORRAL_REGISTRY_USER``/``CORRAL_REGISTRY_PASSWORD`` environment variables. ``on_progress`` gets
        every :class:`~corral.models.BuildEvent`."""
        params = BuildParams(
            name=name,
            source=from_image,
            steps=list(run),
            env=dict(env or {}),
            workdir=workdir,
            user=user,
            start_cmd=start_cmd,
            ready_cmd=ready_cmd,
            registry_username=registry_username or os.environ.get("CORRAL_REGISTRY_USER"),
            registry_password=registry_password or os.environ.get("CORRAL_REGISTRY_PASSWORD"),
            registry_token=registry_token,
            insecure_registry=insecure_registry,
            isolation=isolation,
            description=description,
        )
        async for event in self._backend.build_template(params):
            if on_progress is not None:
                on_progress(event)
        for info in await self._backend.list_templates():
            if info.name == name:
                return info
        raise NotFound(f"template {name!r} vanished right after its build")  # deleted concurrently

    async def aclose(self) -> None:
        if self._owns:
            await self._backend.aclose()

    async def __aenter__(self) -> AsyncTemplates:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
