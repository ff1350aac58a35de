"""SQLite Store: the embedded default. Shared safely by every process on the host that uses the same file.

Each record is one row holding its JSON plus the columns we filter on. WAL mode lets a CLI call read while a
server writes; ``BEGIN IMMEDIATE`` makes the version check and the write one atomic step across processes.
Calls run in a worker thread (sqlite3 is blocking) with one connection per store, guarded by a lock. The two
statements on every command's path (reading a sandbox record, appending an audit entry) run on the event loop's
thread instead when they need not wait for a lock (``_inline``), and on the worker thread when they would.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio.lowlevel
import anyio.to_thread

from corral.core.audit import GENESIS, AuditDraft, AuditEntry, seal
from corral.core.auth import ApiKeyRecord, TenantRecord
from corral.core.records import PoolRecord, SandboxRecord, TemplateRecord, pool_key
from corral.errors import Conflict
from corral.ids import KeyId, PoolId, SandboxId, TenantId
from corral.models import SandboxState
from corral.store._common import check_version, matches
from corral.store._inline import CHECKPOINT_EVERY, Busy, InlineDb

__all__ = ["SqliteStore"]

T = TypeVar("T")
R = TypeVar("R", SandboxRecord, TemplateRecord, TenantRecord, PoolRecord)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    version INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_tenant_state ON sandboxes (tenant_id, state);
CREATE TABLE IF NOT EXISTS templates (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pools (
    key TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    data TEXT NOT NULL
);
-- Warm-pool members, found on every create: a partial index over the JSON field, so existing databases
-- need no migration and the index holds only the (few) records that are pool members.
CREATE INDEX IF NOT EXISTS sandboxes_pool ON sandboxes (json_extract(data, '$.pool_id'))
    WHERE json_extract(data, '$.pool_id') IS NOT NULL;
"""

# Tenants, API keys and the audit log (core/auth.py, core/audit.py). The audit table refuses UPDATE and DELETE:
# entries are only ever appended, and the hash chain shows any change made by going around these triggers.
_AUTH_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    version INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class SqliteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN ourselves; check_same_thread=False: calls hop worker threads
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.executescript(_AUTH_SCHEMA)
        self._inline = InlineDb(path)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn(self._db)

        return await anyio.to_thread.run_sync(locked)

    async def _hot(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A hot-path statement: on this thread if it need not wait (see ``_inline``), else on the worker."""
        result = self._inline.run(fn)
        if isinstance(result, Busy):
            return await self._call(fn)
        await anyio.lowlevel.checkpoint()  # still a cancellation point and a yield, as a worker call was
        return result

    # -- sandboxes -----------------------------------------------------------------------------------------
    async def get_sandbox(self, sandbox_id: SandboxId) -> SandboxRecord | None:
        row = await self._hot(
            lambda db: db.execute("SELECT data FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        )
        return SandboxRecord.from_json(row[0]) if row else None

    async def _cas(
        self,
        record: R,
        *,
        kind: str,
        key: str,
        version_sql: str,
        expect_version: int | None,
        write: Callable[[sqlite3.Connection, R], None],
    ) -> R:
        """Compare-and-swap in one immediate transaction, so it is atomic across processes too."""

        def put(db: sqlite3.Connection) -> R:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(version_sql, (key,)).fetchone()
                new = dataclasses.replace(
                    record, version=check_version(kind, key, row[0] if row else None, expect_version)
                )
                write(db, new)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return new

        return await self._call(put)

    async def put_sandbox(self, record: SandboxRecord, *, expect_version: int | None) -> SandboxRecord:
        def write(db: sqlite3.Connection, new: SandboxRecord) -> None:
            db.execute(
                "INSERT OR REPLACE INTO sandboxes (id, tenant_id, state, created_at, version, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (new.sandbox_id, new.tenant_id, new.state.value, new.created_at, new.version, new.to_json()),
            )

        return await self._cas(
            record,
            kind="sandbox",
            key=record.sandbox_id,
            expect_version=expect_version,
            version_sql="SELECT version FROM sandboxes WHERE id = ?",
            write=write,
        )

    async def list_sandboxes(
        self,
        *,
        tenant_id: TenantId | None = None,
        states: frozenset[SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[SandboxRecord]:
        query = "SELECT data FROM sandboxes"
        clauses: list[str] = []
        args: list[Any] = []
        if tenant_id is not None:
            clauses.append("tenant_id = ?")
            args.append(tenant_id)
        if states is not None:
            clauses.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(s.value for s in states)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY created_at"
        rows = await self._call(lambda db: db.execute(query, args).fetchall())
        records = [SandboxRecord.from_json(r[0]) for r in rows]
        return [r for r in records if matches(r, tenant_id=None, states=None, metadata=metadata)]

    async def delete_sandbox(self, sandbox_id: SandboxId) -> None:
        await self._call(lambda db: db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,)))

    # -- templates -----------------------------------------------------------------------------------------
    async def get_template(self, name: str) -> TemplateRecord | None:
        row = await self._call(
            lambda db: db.execute("SELECT data FROM templates WHERE name = ?", (name,)).fetchone()
        )
        return TemplateRecord.from_json(row[0]) if row else None

    async def put_template(self, record: TemplateRecord, *, expect_version: int | None) -> TemplateRecord:
        def write(db: sqlite3.Connection, new: TemplateRecord) -> None:
            db.execute(
                "INSERT OR REPLACE INTO templates (name, version, data) VALUES (?, ?, ?)",
                (new.name, new.version, new.to_json()),
            )

        return await self._cas(
            record,
            kind="template",
            key=record.name,
            expect_version=expect_version,
            version_sql="SELECT version FROM templates WHERE name = ?",
            write=write,
        )

    async def list_templates(self) -> list[TemplateRecord]:
        rows = await self._call(lambda db: db.execute("SELECT data FROM templates ORDER BY name").fetchall())
        return [TemplateRecord.from_json(r[0]) for r in rows]

    async def delete_template(self, name: str) -> None:
        await self._call(lambda db: db.execute("DELETE FROM templates WHERE name = ?", (name,)))

    # -- tenants and keys ------------------------------------------------------------------------------------
    async def get_tenant(self, tenant_id: TenantId) -> TenantRecord | None:
        row = await self._call(
            lambda db: db.execute("SELECT data FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        )
        return TenantRecord.from_json(row[0]) if row else None

    async def get_tenant_by_name(self, name: str) -> TenantRecord | None:
        row = await self._call(
            lambda db: db.execute("SELECT data FROM tenants WHERE name = ?", (name,)).fetchone()
        )
        return TenantRecord.from_json(row[0]) if row else None

    async def put_tenant(self, record: TenantRecord, *, expect_version: int | None) -> TenantRecord:
        def write(db: sqlite3.Connection, new: TenantRecord) -> None:
            try:
                db.execute(
                    "INSERT INTO tenants (id, name, version, data) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
                    "SET name = excluded.name, version = excluded.version, data = excluded.data",
                    (new.tenant_id, new.name, new.version, new.to_json()),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"tenant {new.name!r} already exists") from exc

        return await self._cas(
            record,
            kind="tenant",
            key=record.tenant_id,
            expect_version=expect_version,
            version_sql="SELECT version FROM tenants WHERE id = ?",
            write=write,
        )

    async def list_tenants(self) -> list[TenantRecord]:
        rows = await self._call(lambda db: db.execute("SELECT data FROM tenants ORDER BY name").fetchall())
        return [TenantRecord.from_json(r[0]) for r in rows]

    async def get_key(self, key_id: KeyId) -> ApiKeyRecord | None:
        row = await self._call(
            lambda db: db.execute("SELECT data FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        )
        return ApiKeyRecord.from_json(row[0]) if row else None

    async def put_key(self, record: ApiKeyRecord) -> None:
        await self._call(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO api_keys (id, tenant_id, data) VALUES (?, ?, ?)",
                (record.key_id, record.tenant_id, record.to_json()),
            )
        )

    async def list_keys(self, *, tenant_id: TenantId | None = None) -> list[ApiKeyRecord]:
        def query(db: sqlite3.Connection) -> list[Any]:
            if tenant_id is None:
                return db.execute("SELECT data FROM api_keys ORDER BY id").fetchall()
            return db.execute(
                "SELECT data FROM api_keys WHERE tenant_id = ? ORDER BY id", (tenant_id,)
            ).fetchall()

        return [ApiKeyRecord.from_json(r[0]) for r in await self._call(query)]

    # -- audit ---------------------------------------------------------------------------------------------
    async def append_audit(self, draft: AuditDraft) -> AuditEntry:
        def append(db: sqlite3.Connection) -> AuditEntry:
            db.execute("BEGIN IMMEDIATE")  # the head read and the insert are one step, across processes too
            try:
                head = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                entry = seal(draft, seq=head[0] + 1 if head else 1, prev_hash=head[1] if head else GENESIS)
                db.execute(
                    "INSERT INTO audit (seq, hash, data) VALUES (?, ?, ?)",
                    (entry.seq, entry.hash, entry.to_json()),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return entry

        entry = await self._hot(append)
        self._inline.commits += 1  # counts worker commits too: a checkpoint now and then either way
        if self._inline.commits >= CHECKPOINT_EVERY:
            self._inline.commits = 0
            await self._call(lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)"))
        return entry

    async def audit_entries(self, *, after_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        rows = await self._call(
            lambda db: db.execute(
                "SELECT data FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            ).fetchall()
        )
        return [AuditEntry.from_json(r[0]) for r in rows]

    # -- warm pools ----------------------------------------------------------------------------------------
    async def get_pool(self, template: str, isolation: str) -> PoolRecord | None:
        key = pool_key(template, isolation)
        row = await self._call(
            lambda db: db.execute("SELECT data FROM pools WHERE key = ?", (key,)).fetchone()
        )
        return PoolRecord.from_json(row[0]) if row else None

    async def put_pool(self, record: PoolRecord, *, expect_version: int | None) -> PoolRecord:
        def write(db: sqlite3.Connection, new: PoolRecord) -> None:
            db.execute(
                "INSERT OR REPLACE INTO pools (key, version, data) VALUES (?, ?, ?)",
                (new.key, new.version, new.to_json()),
            )

        return await self._cas(
            record,
            kind="pool",
            key=record.key,
            expect_version=expect_version,
            version_sql="SELECT version FROM pools WHERE key = ?",
            write=write,
        )

    async def list_pools(self) -> list[PoolRecord]:
        rows = await self._call(lambda db: db.execute("SELECT data FROM pools").fetchall())
        return sorted((PoolRecord.from_json(r[0]) for r in rows), key=lambda p: (p.template, p.isolation))

    async def delete_pool(self, template: str, isolation: str) -> None:
        key = pool_key(template, isolation)
        await self._call(lambda db: db.execute("DELETE FROM pools WHERE key = ?", (key,)))

    async def list_pool_members(self, pool_id: PoolId | None = None) -> list[SandboxRecord]:
        query = "SELECT data FROM sandboxes WHERE json_extract(data, '$.pool_id') IS NOT NULL AND state != ?"
        args: list[Any] = [SandboxState.STOPPED.value]
        if pool_id is not None:
            query += " AND json_extract(data, '$.pool_id') = ?"
            args.append(pool_id)
        query += " ORDER BY created_at"
        rows = await self._call(lambda db: db.execute(query, args).fetchall())
        return [SandboxRecord.from_json(r[0]) for r in rows]

    async def aclose(self) -> None:
        self._inline.close()
        await self._call(lambda db: db.close())
