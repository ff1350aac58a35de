"""Templates from the SDK: list them, import a directory or tarball root file system, delete them."""

from __future__ import annotations

import os

from corral.client._async.backend import AsyncBackend, open_default_backend
from corral.models import TemplateInfo

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

    async def build_code_interpreter(self, name: str = "code-interpreter") -> TemplateInfo:
        """Build (once; cached) the template with Jupyter kernels, pandas and matplotlib, and register it."""
        return await self._backend.build_code_interpreter_template(name)

    async def delete(self, name: str) -> None:
        await self._backend.delete_template(name)

    async def aclose(self) -> None:
        if self._owns:
            await self._backend.aclose()

    async def __aenter__(self) -> AsyncTemplates:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
