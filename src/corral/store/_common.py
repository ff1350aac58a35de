"""Logic shared by the Store implementations: filtering and the compare-and-swap check."""

from __future__ import annotations

from collections.abc import Mapping

from corral.core.records import SandboxRecord
from corral.errors import Conflict
from corral.ids import TenantId
from corral.models import SandboxState

__all__ = ["check_version", "matches"]


def matches(
    record: SandboxRecord,
    *,
    tenant_id: TenantId | None,
    states: frozenset[SandboxState] | None,
    metadata: Mapping[str, str] | None,
) -> bool:
    if tenant_id is not None and record.tenant_id != tenant_id:
        return False
    if states is not None and record.state not in states:
        return False
    return not metadata or all(record.metadata.get(k) == v for k, v in metadata.items())


def check_version(kind: str, key: str, stored: int | None, expect_version: int | None) -> int:
    """Return the new version, or raise Conflict if someone else changed the record first."""
    if stored != expect_version:
        if expect_version is None:
            raise Conflict(f"{kind} {key} already exists")
        raise Conflict(
            f"{kind} {key} was changed concurrently; retry the operation",
            details={"expected_version": expect_version, "version": stored},
        )
    return (stored or 0) + 1
