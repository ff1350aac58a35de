"""Short SQLite statements run on the event loop's own thread, when they cannot have to wait.

Every SQLite call of the store runs on a worker thread (sqlite3 blocks), and the hop there and back costs
~100-130 µs on the development VM: more than the statement itself. The exec round trip paid three of them (the
sandbox record, and the audit entries of the process's start and exit), ~0.4 ms of a ~2.8 ms round trip.

:class:`InlineDb` is a second connection for the hot statements, used on the event loop's thread, that never
waits: it has no busy timeout, so a statement that would need a lock someone else holds (another process, or
the worker connection, is writing) fails at once with ``SQLITE_BUSY`` and the caller runs it the usual way,
on the worker thread, which may wait. Nothing else in a statement can wait long: in WAL mode readers never wait
for writers, and a commit appends to the WAL without syncing it (``synchronous=NORMAL``). The one slow thing a
commit may do is a checkpoint (it syncs), so this connection never checkpoints by itself
(``wal_autocheckpoint=0``); after every ``CHECKPOINT_EVERY`` commits here, the store runs a passive checkpoint
on its worker thread instead (the worker connection's own commits still checkpoint as before).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["BUSY", "CHECKPOINT_EVERY", "Busy", "InlineDb"]

T = TypeVar("T")

CHECKPOINT_EVERY = 500  # inline commits (audit entries, ~1 WAL page each) between checkpoints: a ~2 MiB WAL


class Busy:
    """The statement would have had to wait: run it on the worker thread."""


BUSY = Busy()
_WAITING = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class InlineDb:
    def __init__(self, path: Path) -> None:
        # timeout=0: SQLITE_BUSY at once instead of waiting; check_same_thread=False: it is made on the thread
        # that opens the store, which need not be the one that runs the event loop
        self._db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._lock = threading.Lock()  # a second event loop (another thread) using the store takes the worker
        self.commits = 0

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T | Busy:
        """``fn(connection)`` now, or :data:`BUSY` if it would have had to wait (``fn`` must roll back what it
        began when it raises)."""
        if not self._lock.acquire(blocking=False):
            return BUSY
        try:
            return fn(self._db)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in _WAITING:
                return BUSY
            raise
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._db.close()
