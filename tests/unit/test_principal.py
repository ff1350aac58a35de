"""The principal of every service call, and the per-sandbox envd access token.

A second adapter (the E2B surface) must not be able to act as the embedded tenant by forgetting an argument: every
``SandboxService`` method that touches a tenant's sandboxes takes the tenant as a required argument. The envd
access token lets E2B's in-sandbox API act for a sandbox's owner with no API key, for that one sandbox only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.core.records import LOCAL_TENANT, SandboxRecord
from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.errors import NotFound
from corral.ids import TenantId
from corral.models import CreateParams, PoolParams
from corral.runtimes.base import Runtime, RuntimeConfig
from corral.runtimes.fake import FakeRuntime
from corral.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio

# Service methods that act for no tenant: housekeeping, and the two envd authenticators, which *find* the tenant.
TENANTLESS = {
    "aclose",
    "reap",
    "finish_teardowns",  # the node's deferred teardowns (reaper and server shutdown), whoever owned them
    "run_reaper",
    "run_sampler",  # resource samples of every running sandbox of this node
    "usable_runtimes",
    "build_template",  # templates are shared; the routes let only admins build them
    "open_port_for_traffic",  # the port proxy: the traffic token finds the tenant
    "owns",  # node ownership of a record (reaper and reconcile), not an action on a sandbox
    "authenticate_envd",
    "authenticate_envd_proof",
}


def test_every_tenant_scoped_service_method_requires_the_tenant() -> None:
    methods = {
        name: fn
        for name, fn in inspect.getmembers(SandboxService, inspect.isfunction)
        if not name.startswith("_")
    }
    scoped = {name: fn for name, fn in methods.items() if name not in TENANTLESS}
    assert len(scoped) >= 30, sorted(scoped)  # the lifecycle, process, file, code, pty, port, snapshot calls
    for name, fn in scoped.items():
        param = inspect.signature(fn).parameters.get("tenant")
        assert param is not None, f"SandboxService.{name} takes no tenant"
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert param.default is inspect.Parameter.empty, f"SandboxService.{name} has a default tenant"
    for name in TENANTLESS & methods.keys():
        assert "tenant" not in inspect.signature(methods[name]).parameters, name


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[SandboxService]:
    settings = Settings(data_dir=tmp_path / "data", default_isolation="fake", enabled_runtimes=("fake",))
    runtime = FakeRuntime(RuntimeConfig(state_root=settings.state_root, cache_root=settings.cache_root))

    def runtime_for(name: str) -> Runtime:
        assert name == "fake"
        return runtime

    svc = SandboxService(settings=settings, store=SqliteStore(settings.db_path), runtime_for=runtime_for)
    yield svc
    for record in await svc.store.list_sandboxes():
        if record.state.value != "stopped":
            await svc.kill(record.sandbox_id, tenant=record.tenant_id)
    await svc.aclose()
    await svc.store.aclose()


async def test_the_envd_token_finds_the_owner_and_nothing_else(service: SandboxService) -> None:
    acme = TenantId.new()
    a = await service.create(CreateParams(), tenant=acme)
    b = await service.create(CreateParams(), tenant=LOCAL_TENANT)
    assert a.envd_access_token and b.envd_access_token
    assert a.envd_access_token != b.envd_access_token != a.traffic_token
    assert len(a.envd_access_token) >= 43  # 256 bits, URL-safe base64
    assert await service.authenticate_envd(a.sandbox_id, a.envd_access_token) == acme
    assert await service.authenticate_envd(b.sandbox_id, b.envd_access_token) == LOCAL_TENANT
    # the owner sees the same token on every read
    assert (await service.get(a.sandbox_id, tenant=acme)).envd_access_token == a.envd_access_token

    # wrong token, another sandbox's token, none, a prefix, an unknown or malformed id: the same NotFound
    unknown = "sb-0000000000000000"
    attempts = [
        (a.sandbox_id, b.envd_access_token),
        (a.sandbox_id, None),
        (a.sandbox_id, ""),
        (a.sandbox_id, a.envd_access_token[:-1]),
        (a.sandbox_id, a.envd_access_token + "x"),
        (a.sandbox_id, "é" * 43),  # not ASCII: still a plain "no", not a TypeError from compare_digest
        (unknown, a.envd_access_token),
        ("../etc", a.envd_access_token),
    ]
    for sandbox_id, token in attempts:
        with pytest.raises(NotFound) as caught:
            await service.authenticate_envd(sandbox_id, token)
        assert str(caught.value) == f"sandbox {sandbox_id} was not found"

    # a killed sandbox's token opens nothing any more
    await service.kill(a.sandbox_id, tenant=acme)
    with pytest.raises(NotFound):
        await service.authenticate_envd(a.sandbox_id, a.envd_access_token)


async def test_a_proof_derived_from_the_token(service: SandboxService) -> None:
    """Signed file URLs: the adapter checks a hash made from the token, and never needs to read it itself."""
    info = await service.create(CreateParams(), tenant=LOCAL_TENANT)
    assert info.envd_access_token

    def signature(token: str) -> str:
        return hashlib.sha256(f"/a.txt:read:user:{token}".encode()).hexdigest()

    good = signature(info.envd_access_token)
    seen: list[str] = []

    def proves(token: str) -> bool:
        seen.append(token)
        return hmac.compare_digest(good, signature(token))

    assert await service.authenticate_envd_proof(info.sandbox_id, proves) == LOCAL_TENANT
    with pytest.raises(NotFound):
        await service.authenticate_envd_proof(info.sandbox_id, lambda _token: False)
    with pytest.raises(NotFound):  # an unknown sandbox is asked the same question (against no real token)
        await service.authenticate_envd_proof("sb-0000000000000000", proves)
    assert len(seen) == 2 and seen[0] == info.envd_access_token and seen[1] != info.envd_access_token


async def test_the_token_is_kept_out_of_reprs_and_the_audit_log(service: SandboxService) -> None:
    info = await service.create(CreateParams(metadata={"k": "v"}), tenant=LOCAL_TENANT)
    token = info.envd_access_token
    assert token
    record = await service.store.get_sandbox(info.sandbox_id)  # type: ignore[arg-type]
    assert record is not None and record.envd_access_token == token
    assert token not in repr(info) and token not in repr(record)
    assert SandboxRecord.from_json(record.to_json()).envd_access_token == token  # stable across reads
    await service.kill(info.sandbox_id, tenant=LOCAL_TENANT)
    entries = await service.store.audit_entries()
    assert len(entries) >= 2 and all(token not in entry.to_json() for entry in entries)


async def test_an_old_record_without_a_token_opens_nothing(service: SandboxService) -> None:
    info = await service.create(CreateParams(), tenant=LOCAL_TENANT)
    record = await service.store.get_sandbox(info.sandbox_id)  # type: ignore[arg-type]
    assert record is not None
    legacy = record.to_json().replace(f'"envd_access_token": "{info.envd_access_token}", ', "")
    assert "envd_access_token" not in legacy
    old = SandboxRecord.from_json(legacy)
    assert old.envd_access_token == ""  # not a fresh random token on every read
    await service.store.put_sandbox(dataclasses.replace(old), expect_version=record.version)
    for token in ("", None):
        with pytest.raises(NotFound):
            await service.authenticate_envd(info.sandbox_id, token)


async def test_a_claimed_pool_member_gets_a_fresh_token(service: SandboxService) -> None:
    await service.pools.set(PoolParams(template="base", isolation="fake", size=1))
    async for _ in service.pools.fill("base", "fake"):
        pass
    [pooled] = await service.store.list_sandboxes()
    assert pooled.pool_id is not None
    with pytest.raises(NotFound):  # unclaimed: nobody's sandbox yet, whatever the token
        await service.authenticate_envd(pooled.sandbox_id, pooled.envd_access_token)
    claimed = await service.create(CreateParams(template="base", isolation="fake"), tenant=LOCAL_TENANT)
    assert claimed.from_pool and claimed.sandbox_id == pooled.sandbox_id
    assert claimed.envd_access_token and claimed.envd_access_token != pooled.envd_access_token
    assert await service.authenticate_envd(claimed.sandbox_id, claimed.envd_access_token) == LOCAL_TENANT
