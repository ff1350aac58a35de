"""Every egress decision of one sandbox, counted exactly and fed to the audit log without flooding it.

Each decision (kind ``dns``/``tcp``, destination, port, allowed or not, the deciding rule) adds one to an
exact counter. The audit feed (``decisions.jsonl``, read by the core into the audit log) gets a line the
first time a key is seen and, while it repeats, at most one line per :data:`FEED_INTERVAL` carrying the
count since the last line, so the sum of the ``count`` fields always equals the counters: a denial flood
is rate-limited in the feed and the log, never dropped from the counts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from typing import Any

__all__ = ["Ledger"]

FEED_INTERVAL = 10.0
log = logging.getLogger("corral.egress")

Key = tuple[str, bool, str, int, str, str]  # kind, allowed, destination, port, rule, name


class Ledger:
    def __init__(self, feed_path: str, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.counts: Counter[Key] = Counter()
        self._pending: Counter[Key] = Counter()
        self._last: dict[Key, float] = {}
        fd = os.open(feed_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._feed = os.fdopen(fd, "a", buffering=1)

    def record(self, kind: str, allowed: bool, dest: str, port: int, rule: str, name: str | None) -> None:
        key: Key = (kind, allowed, dest, port, rule, name or "")
        self.counts[key] += 1
        self._pending[key] += 1
        now = time.monotonic()
        if now - self._last.get(key, -FEED_INTERVAL) >= FEED_INTERVAL:
            self._write(key, now)

    def _write(self, key: Key, now: float) -> None:
        count = self._pending.pop(key, 0)
        if not count:
            return
        self._last[key] = now
        kind, allowed, dest, port, rule, name = key
        line: dict[str, Any] = {
            "at": time.time(),
            "kind": kind,
            "allowed": allowed,
            "dest": dest,
            "port": port,
            "rule": rule,
            "name": name or None,
            "count": count,
        }
        self._feed.write(json.dumps(line) + "\n")
        level = logging.INFO if allowed else logging.WARNING
        log.log(
            level,
            "sandbox %s %s %s %s:%s (%s) x%d",
            self.sandbox_id,
            kind,
            "allowed" if allowed else "DENIED",
            name or dest,
            port,
            rule,
            count,
        )

    def flush(self) -> None:
        """Write every pending count (periodically and at exit)."""
        now = time.monotonic()
        for key in list(self._pending):
            self._write(key, now)

    def totals(self) -> dict[str, Any]:
        out: dict[str, int] = Counter()
        for (kind, allowed, *_), n in self.counts.items():
            out[f"{kind}_{'allowed' if allowed else 'denied'}"] += n
        return {
            "totals": dict(out),
            "decisions": [
                {"kind": k, "allowed": a, "dest": d, "port": p, "rule": r, "name": n or None, "count": c}
                for (k, a, d, p, r, n), c in sorted(self.counts.items())
            ],
        }
