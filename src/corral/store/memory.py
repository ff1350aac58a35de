"""In-memory Store: for unit tests and throw-away embedded use. Not shared between processes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from corral.core.records import SandboxRecord, TemplateRecord
from corral.ids import SandboxId, TenantId
from corral.models import SandboxState
from corral.store._common import check_version, matches

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self) -> None:
        self._sandboxes: dict[str, SandboxRecord] = {}
        self._templates: dict[str, TemplateRecord] = {}

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

    async def aclose(self) -> None:
        return None
