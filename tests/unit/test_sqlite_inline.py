"""The SQLite store's hot statements on the event loop's thread (store/_inline.py): never waiting, never lost.

Another connection holding the write lock stands for another process writing (a CLI call, a second server).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from corral.core.audit import AuditAction, AuditDraft, verify
from corral.core.records import LOCAL_TENANT, SandboxRecord
from corral.ids import SandboxId
from corral.models import SandboxState
from corral.runtimes.base import Limits
from corral.store._inline import BUSY, CHECKPOINT_EVERY, InlineDb
from corral.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "c.db")
    yield s
    await s.aclose()


def _draft(i: int) -> AuditDraft:
    return AuditDraft(at=time.time(), action=AuditAction.PROCESS_START, sandbox_id="sb-x", details={"i": i})


def _writer(path: Path) -> sqlite3.Connection:
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock until COMMIT
    return other


async def test_inline_reports_busy_instead_of_waiting_for_a_writer(
    store: SqliteStore, tmp_path: Path
) -> None:
    inline = InlineDb(tmp_path / "c.db")
    other = _writer(tmp_path / "c.db")
    try:
        start = time.monotonic()
        assert inline.run(lambda db: db.execute("BEGIN IMMEDIATE")) is BUSY
        assert time.monotonic() - start < 1  # not the 30 s the worker connection would wait
        # readers do not wait for writers in WAL mode
        assert inline.run(lambda db: db.execute("SELECT count(*) FROM audit").fetchone()) == (0,)
    finally:
        other.execute("COMMIT")
        other.close()
        inline.close()


async def test_a_locked_database_sends_the_statements_to_the_worker_which_waits(
    store: SqliteStore, tmp_path: Path
) -> None:
    rec = SandboxRecord(
        sandbox_id=SandboxId.new(),
        tenant_id=LOCAL_TENANT,
        isolation="fake",
        template="base",
        state=SandboxState.RUNNING,
        limits=Limits(),
        created_at=time.time(),
        timeout=60.0,
        deadline=None,
    )
    await store.put_sandbox(rec, expect_version=None)
    await store.append_audit(_draft(0))
    other = _writer(tmp_path / "c.db")
    try:
        assert await store.get_sandbox(rec.sandbox_id) is not None  # a read goes on regardless
        done: list[int] = []

        async def append() -> None:
            done.append((await store.append_audit(_draft(1))).seq)

        async with anyio.create_task_group() as tg:
            tg.start_soon(append)
            await anyio.wait_all_tasks_blocked()  # the append waits on the worker thread for the lock
            assert done == []
            other.execute("COMMIT")  # the other writer finishes: the waiting append goes through
    finally:
        other.close()
    assert done == [2]
    assert (await verify(store)).ok


async def test_the_wal_is_checkpointed_although_inline_commits_never_checkpoint(
    store: SqliteStore, tmp_path: Path
) -> None:
    for i in range(CHECKPOINT_EVERY + 5):
        await store.append_audit(_draft(i))
    probe = sqlite3.connect(tmp_path / "c.db")
    try:
        _busy, wal_frames, _done = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        probe.close()
    assert wal_frames < CHECKPOINT_EVERY  # the WAL restarted after the store's checkpoint
    assert (await verify(store)).entries == CHECKPOINT_EVERY + 5
