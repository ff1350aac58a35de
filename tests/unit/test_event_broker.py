"""The sandbox change broker (core/events.py): every stored write reaches the subscribers allowed to see it,
scoped by tenant, and a subscriber that stops reading is dropped with a marker instead of slowing writers."""

from __future__ import annotations

import dataclasses
import time

import anyio
import pytest

from corral.core.events import BUFFER, SandboxEvents, observed
from corral.core.records import POOL_TENANT, SandboxRecord
from corral.ids import SandboxId, TenantId
from corral.models import SandboxState
from corral.runtimes.base import Limits
from corral.store.memory import MemoryStore

pytestmark = pytest.mark.anyio

ALICE, BOB = TenantId("tn-" + "alice" * 3 + "a"), TenantId("tn-" + "bob" * 5 + "b")


def record(tenant: TenantId, **kw: object) -> SandboxRecord:
    now = time.time()
    base = SandboxRecord(
        sandbox_id=SandboxId.new(),
        tenant_id=tenant,
        isolation="fake",
        template="base",
        state=SandboxState.CREATING,
        limits=Limits(),
        created_at=now,
        timeout=60.0,
        deadline=now + 60,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


async def test_each_write_reaches_its_own_tenant_only() -> None:
    events = SandboxEvents()
    store = observed(MemoryStore(), events)
    with events.subscribe(ALICE) as alice, events.subscribe(BOB) as bob, events.subscribe(None) as admin:
        made = await store.put_sandbox(record(ALICE), expect_version=None)
        running = await store.put_sandbox(
            dataclasses.replace(made, state=SandboxState.RUNNING), expect_version=made.version
        )
        await store.delete_sandbox(running.sandbox_id)
        got = [alice.receive_nowait() for _ in range(3)]
        assert [(c.record.state, c.removed) for c in got if c] == [
            (SandboxState.CREATING, False),
            (SandboxState.RUNNING, False),
            (SandboxState.RUNNING, True),
        ]
        with pytest.raises(anyio.WouldBlock):
            bob.receive_nowait()  # another tenant's sandbox never shows
        with pytest.raises(anyio.WouldBlock):
            admin.receive_nowait()  # nor to admins: they get pool members only
        member = await store.put_sandbox(record(POOL_TENANT), expect_version=None)
        change = admin.receive_nowait()
        assert change is not None and change.record.sandbox_id == member.sandbox_id
        with pytest.raises(anyio.WouldBlock):
            alice.receive_nowait()
    assert events.subscribers == 0


async def test_a_reader_that_falls_behind_is_dropped_with_a_marker_and_writers_go_on() -> None:
    events = SandboxEvents()
    store = observed(MemoryStore(), events)
    with events.subscribe(ALICE) as slow:
        for _ in range(BUFFER + 10):  # nobody reads: the writes must not block
            with anyio.fail_after(5):
                await store.put_sandbox(record(ALICE), expect_version=None)
        received = []
        with pytest.raises(anyio.EndOfStream):
            while True:
                received.append(slow.receive_nowait())
        assert len(received) == BUFFER + 1 and received[-1] is None  # BUFFER changes, then "lagged"
        assert events.subscribers == 0
