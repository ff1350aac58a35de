"""PostgreSQL Store: for a server that must not lose state (``CORRAL_DATABASE_URL=postgresql://…``).

Same contract as the SQLite store (tests/unit/test_store_contract.py runs against both, and against a real
PostgreSQL in CI). Records are JSONB documents beside the columns we filter on.

- Compare-and-swap: ``SELECT … FOR UPDATE`` then write, in one transaction; a new record is an
  ``INSERT … ON CONFLICT DO NOTHING`` whose row count tells whether someone else created it first.
- The audit chain: appends take a transaction-scoped advisory lock, so two servers sharing the database
  cannot fork the chain; UPDATE, DELETE and TRUNCATE on the table are refused by triggers.
- Connections come from a psycopg pool, opened on first use (construction stays synchronous so wiring code is
  the same for every store).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from corral.core.audit import GENESIS, AuditDraft, AuditEntry, seal
from corral.core.auth import ApiKeyRecord, TenantRecord
from corral.core.records import PoolRecord, SandboxRecord, TemplateRecord, pool_key
from corral.errors import Conflict, RuntimeFailure
from corral.ids import KeyId, PoolId, SandboxId, TenantId
from corral.models import SandboxState
from corral.store._common import check_version, matches

__all__ = ["PostgresStore"]

T = TypeVar("T")
R = TypeVar("R", SandboxRecord, TemplateRecord, TenantRecord, PoolRecord)
Conn = psycopg.AsyncConnection[Any]

_AUDIT_LOCK = 0x636F7272616C  # "corral": the advisory lock key that serialises audit appends

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, state TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, version INTEGER NOT NULL, data JSONB NOT NULL);
CREATE INDEX IF NOT EXISTS sandboxes_tenant_state ON sandboxes (tenant_id, state);
CREATE TABLE IF NOT EXISTS templates (name TEXT PRIMARY KEY, version INTEGER NOT NULL, data JSONB NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, version INTEGER NOT NULL, data JSONB NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, tenant_id TEXT, data JSONB NOT NULL);
CREATE TABLE IF NOT EXISTS pools (key TEXT PRIMARY KEY, version INTEGER NOT NULL, data JSONB NOT NULL);
CREATE INDEX IF NOT EXISTS sandboxes_pool ON sandboxes ((data->>'pool_id')) WHERE data->>'pool_id' IS NOT NULL;
CREATE TABLE IF NOT EXISTS audit (seq BIGINT PRIMARY KEY, hash TEXT NOT NULL, data JSONB NOT NULL);
CREATE OR REPLACE FUNCTION corral_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'audit_append_only') THEN
    CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
      FOR EACH ROW EXECUTE FUNCTION corral_audit_append_only();
    CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
      FOR EACH STATEMENT EXECUTE FUNCTION corral_audit_append_only();
  END IF;
END $$;
"""


class PostgresStore:
    def __init__(self, url: str, *, max_connections: int = 10) -> None:
        self._url = url
        self._max = max_connections
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._opening = anyio.Lock()

    async def _open(self) -> AsyncConnectionPool[Conn]:
        async with self._opening:
            if self._pool is None:
                pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
                    self._url, min_size=1, max_size=self._max, open=False, kwargs={"autocommit": True}
                )
                try:
                    await pool.open(wait=True, timeout=15)
                    # One schema set-up at a time, even with several servers starting together.
                    async with pool.connection() as conn, conn.transaction():
                        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_AUDIT_LOCK + 1,))
                        await conn.execute(_SCHEMA)
                except (psycopg.Error, TimeoutError) as exc:
                    await pool.close()
                    raise RuntimeFailure(
                        "cannot reach the PostgreSQL store; check CORRAL_DATABASE_URL and that the server runs",
                        details={"reason": type(exc).__name__},
                    ) from exc
                self._pool = pool
            return self._pool

    async def _run(self, fn: Callable[[Conn], Awaitable[T]], *, transaction: bool = False) -> T:
        pool = await self._open()
        try:
            async with pool.connection() as conn:
                if not transaction:
                    return await fn(conn)
                async with conn.transaction():
                    return await fn(conn)
        except psycopg.OperationalError as exc:
            raise RuntimeFailure("the PostgreSQL store is unavailable; retry shortly") from exc

    async def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        async def q(conn: Conn) -> Any:
            row = await (await conn.execute(sql, args)).fetchone()
            return row[0] if row else None

        return await self._run(q)

    async def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        async def q(conn: Conn) -> list[Any]:
            return [r[0] for r in await (await conn.execute(sql, args)).fetchall()]

        return await self._run(q)

    async def _cas(
        self,
        record: R,
        *,
        kind: str,
        key: str,
        table: str,
        expect_version: int | None,
        columns: dict[str, Any],
    ) -> R:
        key_col = sql.Identifier({"templates": "name", "pools": "key"}.get(table, "id"))
        tbl = sql.Identifier(table)

        async def put(conn: Conn) -> R:
            query = sql.SQL("SELECT version FROM {} WHERE {} = %s FOR UPDATE").format(tbl, key_col)
            row = await (await conn.execute(query, (key,))).fetchone()
            new = dataclasses.replace(
                record, version=check_version(kind, key, row[0] if row else None, expect_version)
            )
            cols: dict[str, Any] = {
                **columns,
                "version": new.version,
                "data": Jsonb(json.loads(new.to_json())),
            }
            names = sql.SQL(", ").join(map(sql.Identifier, cols))
            if row is None:
                insert = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
                    tbl, names, sql.SQL(", ").join(sql.Placeholder() * len(cols))
                )
                cur = await conn.execute(insert, tuple(cols.values()))
                if cur.rowcount != 1:
                    raise Conflict(f"{kind} {key} already exists")
            else:
                sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in cols)
                update = sql.SQL("UPDATE {} SET {} WHERE {} = %s").format(tbl, sets, key_col)
                await conn.execute(update, (*cols.values(), key))
            return new

        try:
            return await self._run(put, transaction=True)
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict(f"{kind} {key} conflicts with an existing one (same name?)") from exc

    # -- sandboxes -----------------------------------------------------------------------------------------
    async def get_sandbox(self, sandbox_id: SandboxId) -> SandboxRecord | None:
        data = await self._one("SELECT data FROM sandboxes WHERE id = %s", (sandbox_id,))
        return SandboxRecord.from_json(json.dumps(data)) if data else None

    async def put_sandbox(self, record: SandboxRecord, *, expect_version: int | None) -> SandboxRecord:
        return await self._cas(
            record,
            kind="sandbox",
            key=record.sandbox_id,
            table="sandboxes",
            expect_version=expect_version,
            columns={
                "id": record.sandbox_id,
                "tenant_id": record.tenant_id,
                "state": record.state.value,
                "created_at": record.created_at,
            },
        )

    async def list_sandboxes(
        self,
        *,
        tenant_id: TenantId | None = None,
        states: frozenset[SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[SandboxRecord]:
        # Every filter is a bound parameter; an unset one matches everything.
        rows = await self._all(
            "SELECT data FROM sandboxes WHERE (%s::text IS NULL OR tenant_id = %s) "
            "AND (%s::text[] IS NULL OR state = ANY(%s)) AND (%s::jsonb IS NULL OR data->'metadata' @> %s) "
            "ORDER BY created_at",
            (
                tenant_id,
                tenant_id,
                [s.value for s in states] if states is not None else None,
                [s.value for s in states] if states is not None else None,
                Jsonb(dict(metadata)) if metadata else None,
                Jsonb(dict(metadata)) if metadata else None,
            ),
        )
        records = [SandboxRecord.from_json(json.dumps(r)) for r in rows]
        return [r for r in records if matches(r, tenant_id=tenant_id, states=states, metadata=metadata)]

    async def delete_sandbox(self, sandbox_id: SandboxId) -> None:
        await self._run(lambda c: c.execute("DELETE FROM sandboxes WHERE id = %s", (sandbox_id,)))

    # -- templates -----------------------------------------------------------------------------------------
    async def get_template(self, name: str) -> TemplateRecord | None:
        data = await self._one("SELECT data FROM templates WHERE name = %s", (name,))
        return TemplateRecord.from_json(json.dumps(data)) if data else None

    async def put_template(self, record: TemplateRecord, *, expect_version: int | None) -> TemplateRecord:
        return await self._cas(
            record,
            kind="template",
            key=record.name,
            table="templates",
            expect_version=expect_version,
            columns={"name": record.name},
        )

    async def list_templates(self) -> list[TemplateRecord]:
        rows = await self._all("SELECT data FROM templates ORDER BY name")
        return [TemplateRecord.from_json(json.dumps(r)) for r in rows]

    async def delete_template(self, name: str) -> None:
        await self._run(lambda c: c.execute("DELETE FROM templates WHERE name = %s", (name,)))

    # -- warm pools ----------------------------------------------------------------------------------------
    async def get_pool(self, template: str, isolation: str) -> PoolRecord | None:
        data = await self._one("SELECT data FROM pools WHERE key = %s", (pool_key(template, isolation),))
        return PoolRecord.from_json(json.dumps(data)) if data else None

    async def put_pool(self, record: PoolRecord, *, expect_version: int | None) -> PoolRecord:
        return await self._cas(
            record,
            kind="pool",
            key=record.key,
            table="pools",
            expect_version=expect_version,
            columns={"key": record.key},
        )

    async def list_pools(self) -> list[PoolRecord]:
        rows = await self._all("SELECT data FROM pools")
        pools = [PoolRecord.from_json(json.dumps(r)) for r in rows]
        return sorted(pools, key=lambda p: (p.template, p.isolation))

    async def delete_pool(self, template: str, isolation: str) -> None:
        key = pool_key(template, isolation)
        await self._run(lambda c: c.execute("DELETE FROM pools WHERE key = %s", (key,)))

    async def list_pool_members(self, pool_id: PoolId | None = None) -> list[SandboxRecord]:
        rows = await self._all(
            "SELECT data FROM sandboxes WHERE data->>'pool_id' IS NOT NULL AND state != %s "
            "AND (%s::text IS NULL OR data->>'pool_id' = %s) ORDER BY created_at",
            (SandboxState.STOPPED.value, pool_id, pool_id),
        )
        return [SandboxRecord.from_json(json.dumps(r)) for r in rows]

    # -- tenants and keys ------------------------------------------------------------------------------------
    async def get_tenant(self, tenant_id: TenantId) -> TenantRecord | None:
        data = await self._one("SELECT data FROM tenants WHERE id = %s", (tenant_id,))
        return TenantRecord.from_json(json.dumps(data)) if data else None

    async def get_tenant_by_name(self, name: str) -> TenantRecord | None:
        data = await self._one("SELECT data FROM tenants WHERE name = %s", (name,))
        return TenantRecord.from_json(json.dumps(data)) if data else None

    async def put_tenant(self, record: TenantRecord, *, expect_version: int | None) -> TenantRecord:
        return await self._cas(
            record,
            kind="tenant",
            key=record.tenant_id,
            table="tenants",
            expect_version=expect_version,
            columns={"id": record.tenant_id, "name": record.name},
        )

    async def list_tenants(self) -> list[TenantRecord]:
        return [
            TenantRecord.from_json(json.dumps(r))
            for r in await self._all("SELECT data FROM tenants ORDER BY name")
        ]

    async def get_key(self, key_id: KeyId) -> ApiKeyRecord | None:
        data = await self._one("SELECT data FROM api_keys WHERE id = %s", (key_id,))
        return ApiKeyRecord.from_json(json.dumps(data)) if data else None

    async def put_key(self, record: ApiKeyRecord) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO api_keys (id, tenant_id, data) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data",
                (record.key_id, record.tenant_id, Jsonb(json.loads(record.to_json()))),
            )
        )

    async def list_keys(self, *, tenant_id: TenantId | None = None) -> list[ApiKeyRecord]:
        if tenant_id is None:
            rows = await self._all("SELECT data FROM api_keys ORDER BY id")
        else:
            rows = await self._all("SELECT data FROM api_keys WHERE tenant_id = %s ORDER BY id", (tenant_id,))
        return [ApiKeyRecord.from_json(json.dumps(r)) for r in rows]

    # -- audit ---------------------------------------------------------------------------------------------
    async def append_audit(self, draft: AuditDraft) -> AuditEntry:
        async def append(conn: Conn) -> AuditEntry:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_AUDIT_LOCK,))
            head = await (
                await conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            ).fetchone()
            entry = seal(draft, seq=head[0] + 1 if head else 1, prev_hash=head[1] if head else GENESIS)
            await conn.execute(
                "INSERT INTO audit (seq, hash, data) VALUES (%s, %s, %s)",
                (entry.seq, entry.hash, Jsonb(entry.to_wire())),
            )
            return entry

        return await self._run(append, transaction=True)

    async def audit_entries(self, *, after_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        rows = await self._all(
            "SELECT data FROM audit WHERE seq > %s ORDER BY seq LIMIT %s", (after_seq, limit)
        )
        return [AuditEntry(**r) for r in rows]

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
