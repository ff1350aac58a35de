"""Warm pools from the SDK: keep booted sandboxes ready so ``Sandbox.create`` skips the boot.

A pool is per (template, isolation); a create with the same template, isolation and limits is served from it
(``SandboxInfo.from_pool``) and otherwise starts cold, so pools never change what a create returns, only how
fast. A Corral server refills pools in the background; embedded mode has no background task, so ``fill``
boots the missing members now.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from corral.client._async.backend import AsyncBackend, open_default_backend
from corral.models import PoolInfo, PoolParams

__all__ = ["AsyncPools"]


class AsyncPools:
    """``AsyncPools()`` uses the default backend (embedded, or the server named by CORRAL_URL)."""

    def __init__(self, backend: AsyncBackend | None = None) -> None:
        self._owns = backend is None
        self._backend = backend or open_default_backend()

    async def set(
        self,
        template: str,
        size: int,
        *,
        isolation: str | None = None,
        memory_mb: int | None = None,
        cpus: float | None = None,
    ) -> PoolInfo:
        """Keep ``size`` sandboxes of ``template`` ready (0 empties the pool but keeps it)."""
        return await self._backend.set_pool(
            PoolParams(template=template, size=size, isolation=isolation, memory_mb=memory_mb, cpus=cpus)
        )

    def fill(self, template: str, *, isolation: str | None = None) -> AsyncIterator[PoolInfo]:
        """Boot the missing members now, yielding progress; the last item is the pool as it ends up."""
        return self._backend.fill_pool(template, isolation)

    async def list(self) -> list[PoolInfo]:
        return await self._backend.list_pools()

    async def delete(self, template: str, *, isolation: str | None = None) -> None:
        """Forget the pool and kill its unclaimed members (claimed sandboxes are not affected)."""
        await self._backend.delete_pool(template, isolation)

    async def aclose(self) -> None:
        if self._owns:
            await self._backend.aclose()

    async def __aenter__(self) -> AsyncPools:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
