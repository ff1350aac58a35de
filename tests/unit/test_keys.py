"""API keys in both forms: Corral's ``corral_<id>_<secret>`` and E2B's ``e2b_<hex>`` (what E2B's SDK accepts)."""

from __future__ import annotations

import re

import pytest

from corral.core.auth import AuthService, parse_token
from corral.errors import InvalidRequest, Unauthenticated
from corral.store.memory import MemoryStore

pytestmark = pytest.mark.anyio

E2B_SHAPE = re.compile(r"\Ae2b_[0-9a-f]+\Z")  # the check E2B's SDK 2.45 makes before sending a key


async def test_an_e2b_key_is_an_ordinary_tenant_key() -> None:
    auth = AuthService(MemoryStore())
    acme = await auth.create_tenant("acme")
    new = await auth.create_key(tenant="acme", name="for e2b", e2b=True)
    assert E2B_SHAPE.match(new.token) and len(new.token) == 4 + 84
    assert str(new.record.key_id) not in new.token  # the id travels hex-encoded, not spelled out
    principal = await auth.authenticate(new.token)
    assert principal.tenant_id == acme.tenant_id and principal.key_id == new.record.key_id
    assert parse_token(new.token)[0] == new.record.key_id
    # listed, and revoked, like any key
    assert [k.key_id for k in await auth.store.list_keys(tenant_id=acme.tenant_id)] == [new.record.key_id]
    await auth.revoke_key(str(new.record.key_id))
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.authenticate(new.token)


async def test_both_forms_side_by_side() -> None:
    auth = AuthService(MemoryStore())
    await auth.create_tenant("acme")
    corral_key = await auth.create_key(tenant="acme")
    e2b_key = await auth.create_key(tenant="acme", e2b=True)
    assert corral_key.token.startswith("corral_key-")
    a, b = await auth.authenticate(corral_key.token), await auth.authenticate(e2b_key.token)
    assert a.tenant_id == b.tenant_id and a.key_id != b.key_id
    assert len({(await auth.create_key(tenant="acme", e2b=True)).token for _ in range(5)}) == 5


async def test_forged_and_malformed_e2b_keys_are_refused() -> None:
    auth = AuthService(MemoryStore())
    await auth.create_tenant("acme")
    real = (await auth.create_key(tenant="acme", e2b=True)).token
    flipped = real[:-1] + ("0" if real[-1] != "0" else "1")  # right key id, wrong secret
    other_id = real[:4] + ("0" if real[4] != "0" else "1") + real[5:]  # wrong id, right secret
    for token in (
        flipped,
        other_id,
        real[:-2],  # too short
        real + "00",  # too long
        real.upper().replace("E2B_", "e2b_"),  # upper-case hex is not a key we made
        "e2b_" + "0" * 84,
        "e2b_",
        "e2b_zz" + real[6:],
    ):
        with pytest.raises(Unauthenticated):
            await auth.authenticate(token)


async def test_e2b_keys_are_for_tenants_only() -> None:
    auth = AuthService(MemoryStore())
    with pytest.raises(InvalidRequest, match="tenant keys"):
        await auth.create_key(tenant=None, e2b=True)
