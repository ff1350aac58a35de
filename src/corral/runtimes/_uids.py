"""Host uid ranges for sandboxes: no sandbox uid, and no VMM's uid, is a host account or another sandbox's."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from corral.errors import CorralError

__all__ = ["UidAllocator"]


class UidAllocator:
    """Hands out disjoint 65536-uid host ranges, one per sandbox, across processes and runtimes (the
    namespace runtime maps a sandbox's uids onto its range; a microVM's VMM runs as the range's first uid).

    Ranges start at ``UID_BASE`` (1e9), far above the ids ``useradd`` and ``/etc/subuid`` hand out, so no
    sandbox uid is ever a host account. The table is a JSON file under ``state_root``, changed under an
    ``flock``; a slot whose sandbox no longer has a state directory is reclaimed (its sandbox was destroyed by
    a process that died before releasing it).
    """

    UID_BASE = 1_000_000_000
    RANGE = 65536
    SLOTS = 16384  # 1e9 + 16384 x 65536 ~ 2.07e9 < 2^31, clear of the 32-bit "-1" uid

    def __init__(self, state_root: Path) -> None:
        self.state_root = state_root
        self.table = state_root / "uid-slots.json"
        self.lock = state_root / "uid-slots.lock"

    @contextlib.contextmanager
    def _locked(self) -> Any:
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                slots: dict[str, str] = json.loads(self.table.read_text())
            except FileNotFoundError:
                slots = {}
            yield slots
            tmp = self.table.with_suffix(".tmp")
            tmp.write_text(json.dumps(slots, sort_keys=True))
            tmp.rename(self.table)
        finally:
            os.close(fd)

    def allocate(self, sandbox_id: str) -> int:
        with self._locked() as slots:
            for slot, owner in list(slots.items()):
                if not (self.state_root / owner).exists():
                    del slots[slot]
            for slot in range(self.SLOTS):
                if str(slot) not in slots:
                    slots[str(slot)] = sandbox_id
                    return slot
        raise CorralError("no free uid range for another sandbox on this host")

    def release(self, slot: int, sandbox_id: str) -> None:
        with self._locked() as slots:
            if slots.get(str(slot)) == sandbox_id:
                del slots[str(slot)]

    @classmethod
    def base(cls, slot: int) -> int:
        return cls.UID_BASE + slot * cls.RANGE
