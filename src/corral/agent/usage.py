"""What the sandbox uses, as the sandbox sees it: CPU time, memory, and the disk that holds its writes.

One answer for every isolation, measured where the numbers are the sandbox's own:

- **CPU**: the CPU time of every process in the sandbox's pid namespace, their waited-for children included
  (``/proc/<pid>/stat`` utime + stime + cutime + cstime). The agent's ``/proc`` is the sandbox's own under
  each runtime (a fresh procfs in its pid namespace, gVisor's sentry, a VM's guest kernel). The server turns
  two readings into a share of the sandbox's CPUs.
- **Memory**: where the runtime hands the agent its memory cgroup's files (``--memory-usage-fd`` and
  ``--memory-stat-fd``: namespace sandboxes, whose ``/proc/meminfo`` is the host's), their usage less the
  inactive page cache, as ``docker stats`` counts it; otherwise ``/proc/meminfo`` (``MemTotal -
  MemAvailable``), which is the sandbox's own under gVisor (the sentry's accounting) and in a VM.
- **Disk**: ``statvfs("/")``, what ``df /`` shows in the sandbox: the writable layer's own file system where
  it has a quota (or the VM's disk), else the host file system it lives on.

The fds are read only (opened by the runtime, not inheritable): nothing the sandbox starts can use them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

__all__ = ["configure", "sample"]

_usage_fd: int | None = None
_stat_fd: int | None = None
_TICK = os.sysconf("SC_CLK_TCK")


def configure(usage_fd: int | None, stat_fd: int | None) -> None:
    """From the agent's command line, before the agent starts."""
    global _usage_fd, _stat_fd
    _usage_fd, _stat_fd = usage_fd, stat_fd
    for fd in (usage_fd, stat_fd):
        if fd is not None:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def _cpu_seconds() -> float:
    ticks = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone since the listing
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces
        with contextlib.suppress(IndexError, ValueError):
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / _TICK


def _pairs(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return out


def _memory() -> tuple[int, int, int | None]:
    """(used, cache, total or None when the runtime's limit is the total)."""
    if _usage_fd is not None and _stat_fd is not None:
        with contextlib.suppress(OSError, ValueError):
            usage = int(os.pread(_usage_fd, 64, 0))
            stat = _pairs(os.pread(_stat_fd, 16384, 0).decode())
            inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))  # cgroup v1 / v2
            cache = stat.get("total_cache", stat.get("file", 0))
            return max(0, usage - inactive), cache, None
    with open("/proc/meminfo") as f:
        info = _pairs(f.read())
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", info.get("MemFree", 0))
    return max(0, total - available), info.get("Cached", 0), total


def sample() -> dict[str, Any]:
    used, cache, total = _memory()
    disk = os.statvfs("/")
    return {
        "cpu_seconds": _cpu_seconds(),
        "mem_used": used,
        "mem_cache": cache,
        "mem_total": total,
        "disk_used": (disk.f_blocks - disk.f_bfree) * disk.f_frsize,
        "disk_total": disk.f_blocks * disk.f_frsize,
    }
