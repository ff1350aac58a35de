"""`corral audit verify` on a real SQLite store: intact, refused in-place edits, and tampering found."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from corral.core.audit import AuditAction, AuditLog
from corral.store.sqlite import SqliteStore


def verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_DATA_DIR": str(data_dir)}
    env.pop("CORRAL_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tampering_with_the_audit_log_is_detected(tmp_path: Path) -> None:
    async def fill() -> None:
        store = SqliteStore(tmp_path / "corral.db")
        log = AuditLog(store, clock=lambda: 1_700_000_000.0)
        for i in range(4):
            await log.record(AuditAction.PROCESS_EXIT, tenant_id="tn-x", sandbox_id=None, exit_code=i)
        await store.aclose()

    anyio.run(fill)
    ok = verify(tmp_path)
    assert ok.returncode == 0 and "4 entries" in ok.stdout, ok.stderr

    db = sqlite3.connect(tmp_path / "corral.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE audit SET data = '{}' WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM audit WHERE seq = 3")
    # someone with write access to the file goes around the triggers and changes an exit code
    db.execute("DROP TRIGGER audit_no_update")
    row = db.execute("SELECT data FROM audit WHERE seq = 2").fetchone()[0]
    db.execute("UPDATE audit SET data = ? WHERE seq = 2", (row.replace('"exit_code":1', '"exit_code":0'),))
    db.commit()
    db.close()
    bad = verify(tmp_path)
    assert bad.returncode == 1
    assert "TAMPERED" in bad.stderr and "entry 2" in bad.stderr
