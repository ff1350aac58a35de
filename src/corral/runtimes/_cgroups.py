"""Per-sandbox control groups on cgroup v1 and v2: create, limit, freeze, thaw, kill, remove.

Every sandbox gets ``corral/<sandbox_id>`` below each controller it uses: on v1 one directory per controller
hierarchy (``memory``, ``pids``, ``cpu``, ``freezer``), on v2 one directory in the unified tree. The shim's
child joins them (``cgroup.procs``) before it makes any namespace, so bwrap and everything in the sandbox are
accounted from the first instruction and nothing can move itself out (the sandbox has a cgroup namespace and
no cgroupfs mount, and its root is not the owner of the host's cgroup files).

Limits and why:

- memory: ``memory.limit_in_bytes`` (v1) / ``memory.max`` (v2), with swap pinned to the same value
  (``memory.memsw.limit_in_bytes``) or to 0 (``memory.swap.max``), so a sandbox cannot spill into swap. The
  kernel OOM-kills the biggest process of the sandbox, not the host's.
- pids: ``pids.max`` counts tasks (threads too); a fork bomb gets EAGAIN there.
- cpu: CFS bandwidth, ``cpus`` x a 100 ms period (``cpu.cfs_quota_us`` / ``cpu.max``).
- freezer: pause/resume (``freezer.state`` / ``cgroup.freeze``).

Which version is active is read from ``/proc/self/mountinfo``: v1 when the v1 memory controller is mounted
(including the "hybrid" layout with an empty cgroup2 at ``/sys/fs/cgroup/unified``), else v2 when the unified
tree offers the memory and pids controllers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.errors import RuntimeUnavailable
from corral.runtimes.base import Limits

__all__ = ["V1_CONTROLLERS", "CgroupBusy", "CgroupLayout", "SandboxCgroup", "detect_layout"]

V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")
PARENT = "corral"
CFS_PERIOD_US = 100_000  # the kernel default period; quota = cpus x period
_SETTLE_TRIES = 200  # x 5 ms = 1 s at most to see a freeze settle
_SETTLE_SLEEP = 0.005
# SIGKILL -> every task gone. Milliseconds normally; seconds when every core is busy, since a dying task
# still has to be scheduled to run its exit path. After this the removal is left to a later retry.
REMOVE_TIMEOUT = 5.0
_REKILL_EVERY = 0.25  # a task forked between reading the pids and the signal is caught by the next round


class CgroupBusy(OSError):
    """The sandbox's tasks had not all exited when the removal's deadline came: retry later, nothing failed."""


@dataclass(frozen=True, kw_only=True)
class CgroupLayout:
    """Where the controllers are mounted. ``version`` 1: ``roots`` maps controller → hierarchy mount point;
    version 2: ``roots`` has the single key ``""`` → the unified mount point."""

    version: int
    roots: dict[str, Path]


def _parse_mountinfo(text: str) -> list[tuple[str, Path, str]]:
    """(fstype, mount point, super options) of every cgroup/cgroup2 mount."""
    out: list[tuple[str, Path, str]] = []
    for line in text.splitlines():
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mount_point = fields[4].replace("\\040", " ")
        out.append((tail[0], Path(mount_point), tail[2]))
    return out


def detect_layout(mountinfo: str | None = None) -> CgroupLayout:
    """Find the active cgroup version and its mount points, or say how to get cgroups."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    mounts = _parse_mountinfo(mountinfo)
    v1: dict[str, Path] = {}
    for fstype, mount_point, opts in mounts:
        if fstype == "cgroup":
            for opt in opts.split(","):
                if opt in V1_CONTROLLERS:
                    v1.setdefault(opt, mount_point)
    if "memory" in v1:
        missing = [c for c in V1_CONTROLLERS if c not in v1]
        if missing:
            raise RuntimeUnavailable(
                f"cgroup v1 controllers {', '.join(missing)} are not mounted", details={"missing": missing}
            )
        return CgroupLayout(version=1, roots=v1)
    for fstype, mount_point, _ in mounts:
        if fstype == "cgroup2":
            with contextlib.suppress(OSError):
                available = (mount_point / "cgroup.controllers").read_text().split()
                if {"memory", "pids"} <= set(available):
                    return CgroupLayout(version=2, roots={"": mount_point})
    raise RuntimeUnavailable(
        "no usable cgroup hierarchy: mount cgroup2 at /sys/fs/cgroup with the memory and pids controllers "
        "(systemd does this with systemd.unified_cgroup_hierarchy=1)",
        details={"fix": "mount -t cgroup2 none /sys/fs/cgroup"},
    )


def _read(path: Path) -> str:
    """A cgroup file's text; '' once the cgroup is gone, or going: v1 answers ENODEV while another rmdir of
    it is under way (two teardowns of one sandbox at once, as the e2b tests saw: a second server, a race)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return ""
        raise


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:  # one write() per value: cgroupfs parses each write on its own
        f.write(value)


@dataclass(frozen=True, kw_only=True)
class SandboxCgroup:
    """The cgroup directories of one sandbox. Plain data, so it can be rebuilt from :meth:`to_json`."""

    version: int
    dirs: dict[str, Path]  # v1: controller → directory; v2: "" → directory

    # -- naming and persistence ---------------------------------------------------------------------------
    @classmethod
    def for_sandbox(cls, layout: CgroupLayout, name: str) -> SandboxCgroup:
        return cls(version=layout.version, dirs={c: root / PARENT / name for c, root in layout.roots.items()})

    def to_json(self) -> dict[str, object]:
        return {"version": self.version, "dirs": {c: str(p) for c, p in self.dirs.items()}}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> SandboxCgroup:
        dirs = data["dirs"]
        assert isinstance(dirs, dict)
        return cls(version=int(str(data["version"])), dirs={str(c): Path(p) for c, p in dirs.items()})

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files the sandbox's first process writes itself into."""
        return [str(d / "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def _dir(self, controller: str) -> Path:
        return self.dirs[controller] if self.version == 1 else self.dirs[""]

    # -- lifecycle ----------------------------------------------------------------------------------------
    def create(self, limits: Limits) -> None:
        """Make the directories and write the limits. Raises OSError; the caller then calls :meth:`remove`."""
        if self.version == 2:
            self._enable_v2_controllers()
        for d in dict.fromkeys(self.dirs.values()):
            d.mkdir(parents=True, exist_ok=True)
        memory = limits.memory_mb * 1024 * 1024
        quota = max(1000, int(limits.cpus * CFS_PERIOD_US))  # the kernel's minimum quota is 1 ms
        if self.version == 1:
            mem = self._dir("memory")
            _write(mem / "memory.limit_in_bytes", str(memory))
            if (mem / "memory.memsw.limit_in_bytes").exists():  # only with swap accounting
                _write(mem / "memory.memsw.limit_in_bytes", str(memory))
            _write(self._dir("pids") / "pids.max", str(limits.pids))
            _write(self._dir("cpu") / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(self._dir("cpu") / "cpu.cfs_quota_us", str(quota))
        else:
            d = self.dirs[""]
            _write(d / "memory.max", str(memory))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(limits.pids))
            _write(d / "cpu.max", f"{quota} {CFS_PERIOD_US}")

    def _enable_v2_controllers(self) -> None:
        """v2 only lets a child use a controller its parent delegates, so delegate down to ``corral/``."""
        sandbox = self.dirs[""]
        parent, root = sandbox.parent, sandbox.parent.parent
        parent.mkdir(exist_ok=True)
        for d in (root, parent):
            available = (
                set((d / "cgroup.controllers").read_text().split())
                if (d / "cgroup.controllers").exists()
                else set(V2_CONTROLLERS)
            )
            wanted = [c for c in V2_CONTROLLERS if c in available]
            _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in dict.fromkeys(self.dirs.values()):
            for sub in _walk_bottom_up(d):
                with contextlib.suppress(ProcessLookupError):
                    found.update(int(p) for p in _read(sub / "cgroup.procs").split())
        return found

    def freeze(self) -> None:
        """Stop every task of the sandbox; returns once the kernel reports the group frozen."""
        if self.version == 1:
            state = self._dir("freezer") / "freezer.state"
            _write(state, "FROZEN")
            self._settle(lambda: state.read_text().strip() == "FROZEN")
        else:
            _write(self.dirs[""] / "cgroup.freeze", "1")
            self._settle(lambda: "frozen 1" in (self.dirs[""] / "cgroup.events").read_text())

    def thaw(self) -> None:
        if self.version == 1:
            _write(self._dir("freezer") / "freezer.state", "THAWED")
        else:
            _write(self.dirs[""] / "cgroup.freeze", "0")

    def frozen(self) -> bool:
        try:
            if self.version == 1:
                return (self._dir("freezer") / "freezer.state").read_text().strip() != "THAWED"
            return "frozen 1" in (self.dirs[""] / "cgroup.events").read_text()
        except FileNotFoundError:
            return False

    @property
    def oom_events_file(self) -> str:
        """The file whose ``oom_kill`` line counts the kernel's OOM kills in this sandbox."""
        return str(self._dir("memory") / ("memory.oom_control" if self.version == 1 else "memory.events"))

    @property
    def memory_usage_files(self) -> tuple[str, str]:
        """The memory controller's usage and statistics files (read by the agent: ``corral.agent.usage``)."""
        mem = self._dir("memory")
        if self.version == 1:
            return str(mem / "memory.usage_in_bytes"), str(mem / "memory.stat")
        return str(mem / "memory.current"), str(mem / "memory.stat")

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this sandbox (0 if the kernel does not say)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            text = (self._dir("memory") / name).read_text()
        except FileNotFoundError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def kill(self) -> None:
        """SIGKILL every task. On v1, frozen tasks only die once thawed, so thaw after signalling."""
        d2 = self.dirs.get("")
        if d2 is not None and (d2 / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(d2 / "cgroup.kill", "1")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.thaw()

    def empty(self) -> bool:
        """No task is left in any of the sandbox's cgroups, their sub-cgroups included. v2 says so itself
        (``populated 0`` in ``cgroup.events``); v1 has no such flag, so its ``tasks`` files (every thread,
        where ``cgroup.procs`` lists only thread-group leaders) are read."""
        if self.version == 2:
            events = _read(self.dirs[""] / "cgroup.events")
            return not events or "populated 0" in events
        return not any(
            _read(sub / "tasks").strip()
            for d in dict.fromkeys(self.dirs.values())
            for sub in _walk_bottom_up(d)
        )

    def remove(self, timeout: float = REMOVE_TIMEOUT) -> None:
        """Kill every task, wait (bounded) until the kernel has let them all go, then remove the directories.

        rmdir answers EBUSY while a killed task is still running its exit path, which on a loaded host takes
        a while, so the wait is for the cgroup to be empty, not a fixed number of rmdir attempts. Idempotent.
        Raises :class:`CgroupBusy` if tasks remain at the deadline (the caller retries later), another
        OSError if a directory cannot be removed for any other reason.
        """
        if not any(d.exists() for d in self.dirs.values()):
            return
        deadline = time.monotonic() + timeout
        while True:
            self.kill()
            if _wait_until(self.empty, min(deadline, time.monotonic() + _REKILL_EVERY)):
                if self._rmdirs():
                    return
                time.sleep(_SETTLE_SLEEP)  # empty, yet a task raced in (or the kernel lags): bounded below
            if time.monotonic() >= deadline:
                raise CgroupBusy(
                    errno.EBUSY, f"the tasks of cgroup {sorted(map(str, self.dirs.values()))} have not exited"
                )

    def _rmdirs(self) -> bool:
        """Remove every directory, children first; False if one is still busy."""
        busy = False
        for d in dict.fromkeys(self.dirs.values()):
            for sub in _walk_bottom_up(d):
                try:
                    sub.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno == errno.ENODEV:  # cgroup v1: another rmdir of it is under way; it is going
                        continue
                    if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        raise
                    busy = True
        return not busy

    @staticmethod
    def _settle(done: object) -> None:
        assert callable(done)
        for _ in range(_SETTLE_TRIES):
            if done():
                return
            time.sleep(_SETTLE_SLEEP)  # v1 FREEZING → FROZEN takes about a millisecond; bounded
        raise OSError(errno.ETIMEDOUT, "the sandbox did not settle in its new freezer state")


def _wait_until(done: Callable[[], bool], deadline: float) -> bool:
    """Poll ``done`` until it holds or ``deadline`` (monotonic) passes: tasks leaving a cgroup raise no event
    on v1, so this backs off from 1 ms to 20 ms between looks."""
    pause = 0.001
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)  # bounded by the deadline
        pause = min(pause * 2, 0.02)
    return True


def _walk_bottom_up(d: Path) -> list[Path]:
    """``d`` and its sub-cgroups, children first (a cgroup can only be removed once it has none)."""
    if not d.is_dir():
        return []
    out: list[Path] = []
    for root, dirs, _ in os.walk(d, topdown=False):
        out.extend(Path(root) / x for x in dirs)
    out.append(d)
    return out
