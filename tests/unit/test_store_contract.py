"""One contract, every Store implementation: CAS versions, filters, templates, persistence."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.core.audit import GENESIS, AuditAction, AuditDraft, verify
from corral.core.auth import ApiKeyRecord, Quotas, TenantRecord
from corral.core.records import LOCAL_TENANT, POOL_TENANT, PoolRecord, SandboxRecord, TemplateRecord
from corral.core.store import Store
from corral.errors import Conflict
from corral.ids import KeyId, PoolId, SandboxId, TenantId
from corral.models import SandboxState
from corral.runtimes.base import Instance, Limits
from corral.store.memory import MemoryStore
from corral.store.postgres import PostgresStore
from corral.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = SqliteStore(tmp_path / "c.db")
    else:
        s = PostgresStore(request.getfixturevalue("postgres_url"))
    yield s
    await s.aclose()


def record(**kw: object) -> SandboxRecord:
    base = dict(
        sandbox_id=SandboxId.new(),
        tenant_id=LOCAL_TENANT,
        isolation="fake",
        template="base",
        state=SandboxState.RUNNING,
        limits=Limits(),
        created_at=time.time(),
        timeout=60.0,
        deadline=time.time() + 60,
    )
    base.update(kw)
    return SandboxRecord(**base)  # type: ignore[arg-type]


async def test_put_new_then_get_round_trips_every_field(store: Store) -> None:
    inst = Instance(
        sandbox_id=SandboxId.new(),
        runtime="fake",
        node="node-a",
        ref="/x",
        extra={"k": [1, 2], "shim_pid": 1},
    )
    rec = record(metadata={"a": "1"}, env={"E": "v"}, instance=inst, limits=Limits(memory_mb=64, cpus=0.5))
    stored = await store.put_sandbox(rec, expect_version=None)
    assert stored.version == 1
    got = await store.get_sandbox(rec.sandbox_id)
    assert got == stored


async def test_put_new_twice_conflicts(store: Store) -> None:
    rec = await store.put_sandbox(record(), expect_version=None)
    with pytest.raises(Conflict):
        await store.put_sandbox(rec, expect_version=None)


async def test_stale_version_conflicts_and_keeps_the_winner(store: Store) -> None:
    rec = await store.put_sandbox(record(), expect_version=None)
    winner = await store.put_sandbox(dataclasses.replace(rec, state=SandboxState.PAUSED), expect_version=1)
    assert winner.version == 2
    with pytest.raises(Conflict):
        await store.put_sandbox(dataclasses.replace(rec, state=SandboxState.STOPPED), expect_version=1)
    got = await store.get_sandbox(rec.sandbox_id)
    assert got is not None and got.state is SandboxState.PAUSED and got.version == 2


async def test_list_filters_by_tenant_state_and_metadata(store: Store) -> None:
    other = TenantId.new()
    a = await store.put_sandbox(record(metadata={"team": "x", "env": "dev"}), expect_version=None)
    await store.put_sandbox(record(metadata={"team": "y"}), expect_version=None)
    await store.put_sandbox(record(tenant_id=other, metadata={"team": "x"}), expect_version=None)
    await store.put_sandbox(record(state=SandboxState.STOPPED, metadata={"team": "x"}), expect_version=None)
    found = await store.list_sandboxes(
        tenant_id=LOCAL_TENANT, states=frozenset({SandboxState.RUNNING}), metadata={"team": "x"}
    )
    assert [r.sandbox_id for r in found] == [a.sandbox_id]
    assert len(await store.list_sandboxes()) == 4
    assert len(await store.list_sandboxes(tenant_id=other)) == 1
    assert await store.list_sandboxes(metadata={"team": "x", "env": "prod"}) == []


async def test_delete_removes(store: Store) -> None:
    rec = await store.put_sandbox(record(), expect_version=None)
    await store.delete_sandbox(rec.sandbox_id)
    assert await store.get_sandbox(rec.sandbox_id) is None
    await store.delete_sandbox(rec.sandbox_id)  # idempotent


async def test_templates_cas_and_listing(store: Store) -> None:
    t = await store.put_template(
        TemplateRecord(name="py", kind="directory", rootfs="/r", created_at=1.0), expect_version=None
    )
    assert t.version == 1
    with pytest.raises(Conflict):
        await store.put_template(t, expect_version=None)
    await store.put_template(
        TemplateRecord(name="a", kind="tarball", rootfs="/t", created_at=2.0), expect_version=None
    )
    assert [x.name for x in await store.list_templates()] == ["a", "py"]
    await store.delete_template("py")
    assert await store.get_template("py") is None


async def test_sqlite_is_shared_between_connections(tmp_path: Path) -> None:
    one, two = SqliteStore(tmp_path / "c.db"), SqliteStore(tmp_path / "c.db")
    try:
        rec = await one.put_sandbox(record(), expect_version=None)
        seen = await two.get_sandbox(rec.sandbox_id)
        assert seen == rec
        await two.put_sandbox(dataclasses.replace(seen, state=SandboxState.PAUSED), expect_version=1)
        with pytest.raises(Conflict):
            await one.put_sandbox(rec, expect_version=1)
    finally:
        await one.aclose()
        await two.aclose()


# -- tenants, keys, audit -----------------------------------------------------------------------------------


async def test_tenants_cas_unique_names_and_quotas_round_trip(store: Store) -> None:
    t = TenantRecord(tenant_id=TenantId.new(), name="acme", created_at=1.0, quotas=Quotas(max_sandboxes=3))
    stored = await store.put_tenant(t, expect_version=None)
    assert stored.version == 1
    assert await store.get_tenant(t.tenant_id) == stored
    assert await store.get_tenant_by_name("acme") == stored
    with pytest.raises(Conflict):  # same name, other id
        await store.put_tenant(
            TenantRecord(tenant_id=TenantId.new(), name="acme", created_at=2.0), expect_version=None
        )
    updated = await store.put_tenant(
        dataclasses.replace(stored, quotas=Quotas(max_memory_mb=512, max_timeout=60.0)), expect_version=1
    )
    assert (await store.get_tenant(t.tenant_id)) == updated and updated.quotas.max_memory_mb == 512
    with pytest.raises(Conflict):
        await store.put_tenant(stored, expect_version=1)
    assert [x.name for x in await store.list_tenants()] == ["acme"]


async def test_keys_round_trip_revoke_and_filter_by_tenant(store: Store) -> None:
    tenant = TenantId.new()
    k1 = ApiKeyRecord(key_id=KeyId.new(), tenant_id=tenant, secret_sha256="a" * 64, created_at=1.0, name="ci")
    admin = ApiKeyRecord(key_id=KeyId.new(), tenant_id=None, secret_sha256="b" * 64, created_at=2.0)
    await store.put_key(k1)
    await store.put_key(admin)
    assert await store.get_key(k1.key_id) == k1
    assert (await store.get_key(admin.key_id)) == admin and admin.admin
    assert await store.list_keys(tenant_id=tenant) == [k1]
    assert len(await store.list_keys()) == 2
    revoked = dataclasses.replace(k1, revoked_at=5.0)
    await store.put_key(revoked)
    assert await store.get_key(k1.key_id) == revoked


async def test_audit_appends_a_verifiable_chain(store: Store) -> None:
    for i in range(5):
        await store.append_audit(
            AuditDraft(
                at=1000.0 + i / 3,
                action=AuditAction.PROCESS_EXIT,
                tenant_id="tn-x",
                sandbox_id=None,
                details={"i": i, "argv": ["echo", "é"]},
            )
        )
    entries = await store.audit_entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS and entries[1].prev_hash == entries[0].hash
    assert [e.seq for e in await store.audit_entries(after_seq=3, limit=1)] == [4]
    result = await verify(store)
    assert result.ok and result.entries == 5 and result.head_hash == entries[-1].hash


async def test_concurrent_audit_appends_keep_one_chain(store: Store) -> None:
    import anyio

    async def append(i: int) -> None:
        await store.append_audit(AuditDraft(at=float(i), action=AuditAction.FILE_WRITE, details={"i": i}))

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(append, i)
    result = await verify(store)
    assert result.ok and result.entries == 20


def pool(**kw: object) -> PoolRecord:
    base = dict(
        pool_id=PoolId.new(),
        template="base",
        isolation="fake",
        target=2,
        limits=Limits(memory_mb=256),
        created_at=time.time(),
    )
    base.update(kw)
    return PoolRecord(**base)  # type: ignore[arg-type]


async def test_pools_cas_keyed_by_template_and_isolation(store: MemoryStore | SqliteStore) -> None:
    p = await store.put_pool(pool(), expect_version=None)
    assert p.version == 1
    assert await store.get_pool("base", "fake") == p
    assert await store.get_pool("base", "gvisor") is None
    with pytest.raises(Conflict):
        await store.put_pool(pool(), expect_version=None)  # same (template, isolation), another generation
    bigger = await store.put_pool(dataclasses.replace(p, target=5), expect_version=1)
    assert bigger.version == 2
    with pytest.raises(Conflict):
        await store.put_pool(dataclasses.replace(p, target=0), expect_version=1)
    assert (await store.get_pool("base", "fake")) == bigger
    other = await store.put_pool(pool(isolation="gvisor"), expect_version=None)
    await store.put_pool(pool(template="alpine"), expect_version=None)
    listed = await store.list_pools()
    assert [(x.template, x.isolation) for x in listed] == [
        ("alpine", "fake"),
        ("base", "fake"),
        ("base", "gvisor"),
    ]
    assert listed[2] == other
    await store.delete_pool("base", "fake")
    assert await store.get_pool("base", "fake") is None
    await store.delete_pool("base", "fake")  # idempotent
    assert len(await store.list_pools()) == 2


async def test_pool_membership_is_a_field_found_by_pool(store: MemoryStore | SqliteStore) -> None:
    one, two = PoolId.new(), PoolId.new()
    a = await store.put_sandbox(
        record(tenant_id=POOL_TENANT, pool_id=one, deadline=None, created_at=1.0), expect_version=None
    )
    b = await store.put_sandbox(
        record(tenant_id=POOL_TENANT, pool_id=one, state=SandboxState.CREATING, created_at=2.0),
        expect_version=None,
    )
    c = await store.put_sandbox(record(tenant_id=POOL_TENANT, pool_id=two), expect_version=None)
    await store.put_sandbox(
        record(tenant_id=POOL_TENANT, pool_id=one, state=SandboxState.STOPPED), expect_version=None
    )
    await store.put_sandbox(record(), expect_version=None)  # an ordinary sandbox
    assert [r.sandbox_id for r in await store.list_pool_members(one)] == [a.sandbox_id, b.sandbox_id]
    assert {r.sandbox_id for r in await store.list_pool_members()} == {
        a.sandbox_id,
        b.sandbox_id,
        c.sandbox_id,
    }
    got = await store.get_sandbox(a.sandbox_id)
    assert got is not None and got.pool_id == one and got.from_pool is False
    # a claim is a compare-and-swap on the member: exactly one of two claimers with the same version wins
    claimed = await store.put_sandbox(
        dataclasses.replace(a, pool_id=None, from_pool=True, tenant_id=LOCAL_TENANT), expect_version=a.version
    )
    with pytest.raises(Conflict):
        await store.put_sandbox(
            dataclasses.replace(a, pool_id=None, from_pool=True, tenant_id=TenantId.new()),
            expect_version=a.version,
        )
    assert [r.sandbox_id for r in await store.list_pool_members(one)] == [b.sandbox_id]
    again = await store.get_sandbox(a.sandbox_id)
    assert again == claimed and again.from_pool and again.pool_id is None and again.tenant_id == LOCAL_TENANT
