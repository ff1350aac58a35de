"""The sandbox's own OOM killer, and what says a process was killed for memory.

A sandbox must survive its own runaway process, as a VM would: the process that ate the memory dies (SIGKILL),
the agent and everything else go on, and the process's exit says ``oom_killed``. Where the kernel enforces the
limit (the namespace runtime: a memory cgroup of the sandbox alone) it kills the worst process itself and the
agent only needs to be told (below). Under gVisor nothing inside does (the sentry has no OOM killer, gVisor
issue 1967) and the host cgroup's OOM kill takes the whole sandbox, so there the agent is the OOM killer:

- **Watch.** ``--memory-limit BYTES`` (the sandbox's limit; the runtime passes it where the sandbox's own
  ``/proc/meminfo`` counts what it uses: under gVisor, ``MemTotal - MemFree`` is the sentry's accounting of
  the sandbox, tmpfs included) arms it: every ``FAST`` seconds while more than half the limit is used
  (``SLOW`` otherwise), it reads that, and at ``THRESHOLD`` of the limit SIGKILLs the process the kernel would
  pick, ``rss + oom_score_adj * limit / 1000`` (its own badness formula), never the agent itself; the runtime
  leaves room above the limit (gVisor: host cgroup headroom) for the moment it takes to notice.
- **Last to go.** Every process the agent starts is born with ``oom_score_adj`` ``USER_OOM_SCORE_ADJ``: the
  agent raises its own for the moment of the fork (:func:`children_preferred_for_oom`; raising, and going
  back down to where it was, needs no privilege, while lowering below that would need CAP_SYS_RESOURCE,
  which even the host's root may lack), spawners hold it for good, and what those processes start inherits
  it. So the kernel, too, picks anything of the sandbox before the agent and its file workers. A process
  may lower itself back to the agent's level, never below; the agent's own watch never picks the agent.
- **Told.** The kernel may be first (a fast allocation between two looks). ``--oom-events-fd N`` is the
  sandbox's own ``memory.oom_control`` (v1) or ``memory.events`` (v2), opened by the runtime; a process that
  dies of SIGKILL (or a shell reporting 137) after its ``oom_kill`` count went up was killed for memory too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator

from corral.agent.loop import Loop, Timer, log

__all__ = [
    "USER_OOM_SCORE_ADJ",
    "MemoryGuard",
    "children_preferred_for_oom",
    "configure",
    "prefer_self_for_oom",
]

THRESHOLD = 0.9  # of the limit: where the agent kills, below the hard limit the kernel or host enforces
FAST = 0.01  # seconds between looks while usage is above half the limit
SLOW = 0.1
# After a kill, the victim's memory is given back only once it has exited and the (user-space) kernel has
# reclaimed it, which under load takes a while: until then, and for SETTLE seconds after it is gone, usage
# still reads high, and choosing again would kill a bystander (the next command, a server) for memory the
# first victim still holds. The kernel's OOM killer waits for its victim the same way. Usage that keeps
# growing meanwhile means the victim was not (alone) the culprit: then the watch picks again at once.
SETTLE = 0.5
# what the kernel adds to the badness of each process the agent starts: half the limit, so the agent goes last
USER_OOM_SCORE_ADJ = 500
_SIGKILL_STATUS = 128 + signal.SIGKILL  # how a shell reports a child killed by SIGKILL

_limit: int | None = None
_events_fd: int | None = None
_own_adj = 0  # the agent's oom_score_adj, as the runtime started it
_available = False  # usage counts what the kernel cannot reclaim (MemAvailable), not what is free


def configure(limit: int | None, events_fd: int | None, *, available: bool = False) -> None:
    """From the agent's command line, before the agent starts. ``available``: usage is ``MemTotal -
    MemAvailable`` (a kernel of the sandbox's own, whose page cache is reclaimable: a microVM's guest, where
    a bomb would otherwise thrash that cache, the agent's own code included, long before its OOM killer acts)."""
    global _limit, _events_fd, _own_adj, _available
    _limit, _events_fd, _available = limit, events_fd, available
    with contextlib.suppress(OSError, ValueError), open("/proc/self/oom_score_adj", "rb") as f:
        _own_adj = int(f.read())
    if events_fd is not None:
        try:
            os.set_inheritable(events_fd, False)  # the agent's own: no process it starts gets it
        except OSError:
            _events_fd = None


@contextlib.contextmanager
def children_preferred_for_oom() -> Iterator[None]:
    """Around the agent's own ``Popen``: the child inherits ``USER_OOM_SCORE_ADJ`` at fork, so it never runs
    (nor forks) at the agent's level, and CPython can still vfork (a ``preexec_fn`` would stop that)."""
    _set_own_adj(USER_OOM_SCORE_ADJ)
    try:
        yield
    finally:
        _set_own_adj(_own_adj)


def prefer_self_for_oom() -> None:
    """For a spawner: everything it starts is born preferred."""
    _set_own_adj(USER_OOM_SCORE_ADJ)


def _set_own_adj(value: int) -> None:
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(value))


class MemoryGuard:
    """Watches the sandbox's memory; ``victim_of(pid)`` maps a killed pid to the callback that marks it."""

    def __init__(self, loop: Loop, mark: Callable[[int], None]) -> None:
        self.loop = loop
        self.limit = _limit
        self._mark = mark  # pid (or process group) the agent killed for memory
        self._protected = {os.getpid(), os.getppid(), 1}  # the agent, and bwrap above it in a namespace
        self._oom_kills = self._read_oom_kills()
        self._timer: Timer | None = None
        self._victim: int | None = None  # the last process killed for memory, while its memory may be held
        self._victim_gone: float | None = None  # when it was seen gone (monotonic)
        self._used_at_kill = 0
        if self.limit:
            self._timer = loop.call_later(SLOW, self._look)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    # --- the watch -------------------------------------------------------------------------------------------
    def _look(self) -> None:
        assert self.limit
        used = _used()
        if used >= THRESHOLD * self.limit and not self._victim_holds_memory(used):
            self._used_at_kill = used
            self._kill_one()
        self._timer = self.loop.call_later(FAST if used > self.limit // 2 else SLOW, self._look)

    def _victim_holds_memory(self, used: int) -> bool:
        """Whether the last victim may still be giving its memory back (see ``SETTLE``)."""
        if self._victim is None:
            return False
        if used > self._used_at_kill:  # still growing: something else is eating memory too
            return False
        if os.path.exists(f"/proc/{self._victim}"):  # killed, not yet gone (or not yet reaped)
            return True
        now = time.monotonic()
        if self._victim_gone is None:
            self._victim_gone = now
        if now - self._victim_gone < SETTLE:
            return True
        self._victim = self._victim_gone = None
        return False

    def _kill_one(self) -> None:
        assert self.limit
        usage = {int(name): _rss(name) for name in os.listdir("/proc") if name.isdigit()}
        best, best_score = None, None
        for pid, rss in usage.items():
            if pid in self._protected or rss == 0:
                continue
            score = rss + _adj(pid) * self.limit // 1000
            if best_score is None or score > best_score:
                best, best_score = pid, score
        if best is None:
            return
        try:
            group = os.getpgid(best)
            os.kill(best, signal.SIGKILL)
        except ProcessLookupError:
            return
        log(f"out of memory: killed pid {best} ({usage[best] >> 20} MiB resident)")
        self._victim, self._victim_gone = best, None
        self._mark(best)
        if group != best:
            self._mark(group)  # the command it belongs to (started as a process group of its own)

    # --- the kernel's kills ----------------------------------------------------------------------------------
    def killed_by_kernel(self, exit_code: int | None, sig: int | None) -> bool:
        """For a process that just exited: was it (or a child whose status it passed on) OOM-killed?"""
        if sig != signal.SIGKILL and exit_code != _SIGKILL_STATUS:
            return False
        count = self._read_oom_kills()
        if count > self._oom_kills:
            self._oom_kills = count
            return True
        return False

    @staticmethod
    def _read_oom_kills() -> int:
        if _events_fd is None:
            return 0
        try:
            text = os.pread(_events_fd, 4096, 0).decode()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _used() -> int:
    """Bytes in use by the sandbox, from its own ``/proc/meminfo``."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f.read().decode().splitlines()[:3]:
                key, _, value = line.partition(":")
                fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return fields.get("MemTotal", 0) - fields.get("MemAvailable" if _available else "MemFree", 0)


def _rss(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0  # gone meanwhile, or a kernel thread


def _adj(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0
