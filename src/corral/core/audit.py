"""The audit log: an append-only, hash-chained record of what was done to sandboxes.

Each entry carries the SHA-256 of the previous entry's hash plus its own canonical JSON, so changing, removing
or reordering any entry breaks every hash after it: :func:`verify` walks the chain and names the first bad
entry. The store appends atomically (it reads the head and inserts in one transaction) and refuses UPDATE and
DELETE on the table (triggers), so tampering needs direct write access to the database file, and even then it
shows unless the attacker rewrites the whole chain after the change. To catch that too, keep the head hash
somewhere else: the server logs it, and ``corral audit verify`` prints it.

The log lives outside every sandbox (in the control plane's store); nothing inside a sandbox can reach it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

__all__ = [
    "AuditAction",
    "AuditDraft",
    "AuditEntry",
    "AuditLog",
    "AuditStore",
    "VerifyResult",
    "seal",
    "verify",
]

GENESIS = "0" * 64


class AuditAction(StrEnum):
    SANDBOX_CREATE = "sandbox.create"
    SANDBOX_KILL = "sandbox.kill"
    SANDBOX_EXPIRE = "sandbox.expire"  # ended at its deadline (by the reaper or its shim)
    SANDBOX_CRASH = "sandbox.crash"  # died on its own (OOM, runtime failure) or was abandoned while creating
    PROCESS_START = "process.start"
    PROCESS_EXIT = "process.exit"
    FILE_WRITE = "file.write"
    TENANT_CREATE = "tenant.create"
    KEY_CREATE = "key.create"
    KEY_REVOKE = "key.revoke"
    NETWORK_UPDATE = "network.update"  # a sandbox's egress policy changed at runtime
    NETWORK_ALLOW = "network.allow"  # egress decisions (count = how many since the previous entry)
    NETWORK_DENY = "network.deny"


@dataclass(frozen=True, kw_only=True)
class AuditDraft:
    """What happened; the store gives it a place in the chain."""

    at: float
    action: AuditAction
    tenant_id: str | None = None
    sandbox_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    seq: int
    at: float
    action: str
    tenant_id: str | None
    sandbox_id: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str

    def body(self) -> dict[str, Any]:
        """Every field the hash covers (all but the hash itself). Shares ``details`` (JSON values) with the
        entry: ``dataclasses.asdict`` deep-copied it, ~20 µs per audit entry (two per exec)."""
        return {
            "seq": self.seq,
            "at": self.at,
            "action": self.action,
            "tenant_id": self.tenant_id,
            "sandbox_id": self.sandbox_id,
            "details": self.details,
            "prev_hash": self.prev_hash,
        }

    def to_wire(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash}

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AuditEntry:
        return cls(**json.loads(text))


def _digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(draft: AuditDraft, *, seq: int, prev_hash: str) -> AuditEntry:
    """The entry that follows ``prev_hash`` at position ``seq``; called by stores inside their transaction."""
    unsealed = AuditEntry(
        seq=seq,
        at=draft.at,
        action=draft.action.value,
        tenant_id=draft.tenant_id,
        sandbox_id=draft.sandbox_id,
        details=draft.details,
        prev_hash=prev_hash,
        hash="",
    )
    return dataclasses.replace(unsealed, hash=_digest(unsealed.body()))


class AuditStore(Protocol):
    async def append_audit(self, draft: AuditDraft) -> AuditEntry:
        """Seal ``draft`` after the current head and insert it, atomically."""

    async def audit_entries(self, *, after_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Entries with ``seq > after_seq`` in order, at most ``limit``."""


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    ok: bool
    entries: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str = ""


async def iter_entries(
    store: AuditStore, *, after_seq: int = 0, page: int = 1000
) -> AsyncIterator[AuditEntry]:
    after = after_seq
    while True:
        batch = await store.audit_entries(after_seq=after, limit=page)
        for entry in batch:
            yield entry
        if len(batch) < page:
            return
        after = batch[-1].seq


async def verify(store: AuditStore) -> VerifyResult:
    """Walk the whole chain; report the first entry whose link or hash does not hold."""
    prev, expected_seq, count = GENESIS, 1, 0
    async for entry in iter_entries(store):
        problem = ""
        if entry.seq != expected_seq:
            problem = f"entry {expected_seq} is missing (found {entry.seq} next)"
        elif entry.prev_hash != prev:
            problem = "its prev_hash does not match the entry before it (an entry was changed or removed)"
        elif _digest(entry.body()) != entry.hash:
            problem = "its contents do not match its hash (the entry was changed)"
        if problem:
            return VerifyResult(
                ok=False, entries=count, head_hash=prev, first_bad_seq=entry.seq, problem=problem
            )
        prev, expected_seq, count = entry.hash, entry.seq + 1, count + 1
    return VerifyResult(ok=True, entries=count, head_hash=prev)


class AuditLog:
    """What the service calls: one method per fact, so entries have a fixed shape."""

    def __init__(self, store: AuditStore, *, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    async def record(
        self,
        action: AuditAction,
        *,
        tenant_id: str | None = None,
        sandbox_id: str | None = None,
        **details: Any,
    ) -> AuditEntry:
        return await self._store.append_audit(
            AuditDraft(
                at=self._clock(), action=action, tenant_id=tenant_id, sandbox_id=sandbox_id, details=details
            )
        )


async def entries_of_sandbox(
    store: AuditStore, sandbox_id: str, tenant_id: str, *, limit: int = 200
) -> list[AuditEntry]:
    """The last ``limit`` entries about one sandbox of one tenant, oldest first (a walk of the log)."""
    found: collections.deque[AuditEntry] = collections.deque(maxlen=limit)
    async for entry in iter_entries(store):
        if entry.sandbox_id == sandbox_id and entry.tenant_id == tenant_id:
            found.append(entry)
    return list(found)
