"""In-memory Store: for unit tests and throw-away embedded use. Not shared between processes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from corral.core.audit import GENESIS, AuditDraft, AuditEntry, seal
from corral.core.auth import ApiKeyRecord, TenantRecord
from corral.core.records import PoolRecord, SandboxRecord, TemplateRecord, pool_key
from corral.errors import Conflict
from corral.ids import KeyId, PoolId, SandboxId, TenantId
from corral.models import SandboxState
from corral.store._common import check_version, matches

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self) -> None:
        self._sandboxes: dict[str, SandboxRecord] = {}
        self._templates: dict[str, TemplateRecord] = {}
        self._tenants: dict[str, TenantRecord] = {}
        self._keys: dict[str, ApiKeyRecord] = {}
        self._audit: list[AuditEntry] = []
        self._pools: dict[str, PoolRecord] = {}

    async def get_sandbox(self, sandbox_id: SandboxId) -> SandboxRecord | None:
        return self._sandboxes.get(sandbox_id)

    async def put_sandbox(self, record: SandboxRecord, *, expect_version: int | None) -> SandboxRecord:
        old = self._sandboxes.get(record.sandbox_id)
        version = check_version("sandbox", record.sandbox_id, old.version if old else None, expect_version)
        new = dataclasses.replace(record, version=version)
        self._sandboxes[record.sandbox_id] = new
        return new

    async def list_sandboxes(
        self,
        *,
        tenant_id: TenantId | None = None,
        states: frozenset[SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[SandboxRecord]:
        found = [
            r
            for r in self._sandboxes.values()
            if matches(r, tenant_id=tenant_id, states=states, metadata=metadata)
        ]
        return sorted(found, key=lambda r: r.created_at)

    async def delete_sandbox(self, sandbox_id: SandboxId) -> None:
        self._sandboxes.pop(sandbox_id, None)

    async def get_template(self, name: str) -> TemplateRecord | None:
        return self._templates.get(name)

    async def put_template(self, record: TemplateRecord, *, expect_version: int | None) -> TemplateRecord:
        old = self._templates.get(record.name)
        version = check_version("template", record.name, old.version if old else None, expect_version)
        new = dataclasses.replace(record, version=version)
        self._templates[record.name] = new
        return new

    async def list_templates(self) -> list[TemplateRecord]:
        return sorted(self._templates.values(), key=lambda t: t.name)

    async def delete_template(self, name: str) -> None:
        self._templates.pop(name, None)

    async def get_pool(self, template: str, isolation: str) -> PoolRecord | None:
        return self._pools.get(pool_key(template, isolation))

    async def put_pool(self, record: PoolRecord, *, expect_version: int | None) -> PoolRecord:
        old = self._pools.get(record.key)
        version = check_version("pool", record.key, old.version if old else None, expect_version)
        new = dataclasses.replace(record, version=version)
        self._pools[record.key] = new
        return new

    async def list_pools(self) -> list[PoolRecord]:
        return sorted(self._pools.values(), key=lambda p: (p.template, p.isolation))

    async def delete_pool(self, template: str, isolation: str) -> None:
        self._pools.pop(pool_key(template, isolation), None)

    async def list_pool_members(self, pool_id: PoolId | None = None) -> list[SandboxRecord]:
        found = [
            r
            for r in self._sandboxes.values()
            if r.pool_id is not None
            and (pool_id is None or r.pool_id == pool_id)
            and r.state is not SandboxState.STOPPED
        ]
        return sorted(found, key=lambda r: r.created_at)

    async def aclose(self) -> None:
        return None

    # -- tenants and keys ------------------------------------------------------------------------------------
    async def get_tenant(self, tenant_id: TenantId) -> TenantRecord | None:
        return self._tenants.get(tenant_id)

    async def get_tenant_by_name(self, name: str) -> TenantRecord | None:
        return next((t for t in self._tenants.values() if t.name == name), None)

    async def put_tenant(self, record: TenantRecord, *, expect_version: int | None) -> TenantRecord:
        old = self._tenants.get(record.tenant_id)
        version = check_version("tenant", record.tenant_id, old.version if old else None, expect_version)
        same_name = await self.get_tenant_by_name(record.name)
        if same_name is not None and same_name.tenant_id != record.tenant_id:
            raise Conflict(f"tenant {record.name!r} already exists")
        new = dataclasses.replace(record, version=version)
        self._tenants[record.tenant_id] = new
        return new

    async def list_tenants(self) -> list[TenantRecord]:
        return sorted(self._tenants.values(), key=lambda t: t.name)

    async def get_key(self, key_id: KeyId) -> ApiKeyRecord | None:
        return self._keys.get(key_id)

    async def put_key(self, record: ApiKeyRecord) -> None:
        self._keys[record.key_id] = record

    async def list_keys(self, *, tenant_id: TenantId | None = None) -> list[ApiKeyRecord]:
        keys = sorted(self._keys.values(), key=lambda k: k.key_id)
        return keys if tenant_id is None else [k for k in keys if k.tenant_id == tenant_id]

    # -- audit ---------------------------------------------------------------------------------------------
    async def append_audit(self, draft: AuditDraft) -> AuditEntry:
        head = self._audit[-1] if self._audit else None
        entry = seal(draft, seq=head.seq + 1 if head else 1, prev_hash=head.hash if head else GENESIS)
        self._audit.append(entry)
        return entry

    async def audit_entries(self, *, after_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        return [e for e in self._audit if e.seq > after_seq][:limit]
