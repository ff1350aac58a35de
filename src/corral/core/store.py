"""The Store protocol: where records live. Implementations are in :mod:`corral.store`.

``put`` is a compare-and-swap on ``version``: it succeeds only if the stored version equals
``expect_version`` (``None`` = must not exist yet) and returns the record with its new version. One contract
test suite runs against every implementation (tests/unit/test_store_contract.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from corral.core.audit import AuditStore
from corral.core.auth import AuthStore
from corral.core.records import PoolRecord, SandboxRecord, TemplateRecord
from corral.ids import PoolId, SandboxId, TenantId
from corral.models import SandboxState

__all__ = ["Store"]


class Store(AuthStore, AuditStore, Protocol):
    async def get_sandbox(self, sandbox_id: SandboxId) -> SandboxRecord | None: ...

    async def put_sandbox(self, record: SandboxRecord, *, expect_version: int | None) -> SandboxRecord:
        """Store ``record`` with version ``expect_version + 1`` (or 1 when new).

        Raises :class:`~corral.errors.Conflict` if the stored version differs.
        """

    async def list_sandboxes(
        self,
        *,
        tenant_id: TenantId | None = None,
        states: frozenset[SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[SandboxRecord]:
        """Records matching every given filter (metadata: all key/value pairs must match), oldest first."""

    async def delete_sandbox(self, sandbox_id: SandboxId) -> None: ...

    async def get_template(self, name: str) -> TemplateRecord | None: ...

    async def put_template(self, record: TemplateRecord, *, expect_version: int | None) -> TemplateRecord: ...

    async def list_templates(self) -> list[TemplateRecord]: ...

    async def delete_template(self, name: str) -> None: ...

    # -- warm pools (core/pools.py) ------------------------------------------------------------------------
    async def get_pool(self, template: str, isolation: str) -> PoolRecord | None: ...

    async def put_pool(self, record: PoolRecord, *, expect_version: int | None) -> PoolRecord:
        """Compare-and-swap keyed by (template, isolation), like :meth:`put_sandbox`."""

    async def list_pools(self) -> list[PoolRecord]:
        """Every pool, ordered by template then isolation."""

    async def delete_pool(self, template: str, isolation: str) -> None: ...

    async def list_pool_members(self, pool_id: PoolId | None = None) -> list[SandboxRecord]:
        """Sandbox records not stopped whose ``pool_id`` is set (to ``pool_id``, if given), oldest first."""

    async def aclose(self) -> None: ...
