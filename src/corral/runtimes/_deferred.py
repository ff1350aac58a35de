"""Teardowns the kernel held up, kept on disk and finished later (by the reaper, or the runtime's next call).

A kill has succeeded once the sandbox's tasks are SIGKILLed: they can never run again. Their removal from the
host (the cgroup, then the state dir whose mounts go with the last task, then the uid range) waits for the
kernel to let every task go, which on a loaded host can take longer than a kill may wait. When it does
(:class:`~corral.runtimes._cgroups.CgroupBusy`), the rest of the teardown is written to
``<state_root>/.teardowns/<runtime>/<sandbox id>.json`` and the kill returns; :meth:`Deferred.retry` runs
it again (teardowns are idempotent) until it completes. The file names what to retry, so any process that
sees the state root can finish it, after a restart too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.runtimes._cgroups import CgroupBusy

__all__ = ["Deferred"]

log = logging.getLogger("corral.runtimes.deferred")

Teardown = Callable[..., None]  # keyword arguments: JSON values, plus ``wait`` (seconds) on a retry
RETRY_WAIT = 0.0  # a retry only looks: it must not hold up the reaper or the unrelated call that runs it


class Deferred:
    """The pending teardowns of one runtime. Blocking methods: call them in a worker thread."""

    def __init__(self, state_root: Path, runtime: str, teardown: Teardown) -> None:
        self.dir = state_root / ".teardowns" / runtime
        self._teardown = teardown

    def run(self, sandbox_id: str, args: dict[str, Any], *, wait: float | None = None) -> None:
        """``teardown(**args)`` now; if the kernel is not done with the sandbox's tasks yet, leave it for
        :meth:`retry`. Any other failure is raised (an entry there was stays for the next retry)."""
        try:
            if wait is None:
                self._teardown(**args)
            else:
                self._teardown(**args, wait=wait)
        except CgroupBusy as exc:
            self._save(sandbox_id, args)
            log.warning("sandbox %s: teardown deferred, its tasks are still exiting (%s)", sandbox_id, exc)
            return
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"{sandbox_id}.json").unlink()

    def pending(self) -> list[str]:
        try:
            return sorted(p.stem for p in self.dir.glob("*.json"))
        except FileNotFoundError:
            return []

    def retry(self) -> None:
        """Run every pending teardown once more. A failure is logged and the entry kept: never raised, since
        the caller (the reaper, or another sandbox's create or kill) is not the one that asked for it."""
        for sandbox_id in self.pending():
            path = self.dir / f"{sandbox_id}.json"
            try:
                args = json.loads(path.read_text())
            except FileNotFoundError:
                continue  # finished by another process meanwhile
            except ValueError:
                log.error("sandbox %s: unreadable deferred teardown %s; removing it", sandbox_id, path)
                path.unlink(missing_ok=True)
                continue
            try:
                self.run(sandbox_id, args, wait=RETRY_WAIT)
            except Exception:
                log.exception("sandbox %s: deferred teardown failed; it is retried later", sandbox_id)

    def _save(self, sandbox_id: str, args: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{sandbox_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(args))
        os.replace(tmp, path)  # readers see a whole entry or none
