"""OCI runtime-spec ``config.json`` generation, shared by every runtime that takes an OCI bundle.

runsc consumes it today; the same document is what a Kata or containerd-based runtime would take, so nothing
here knows about gVisor: gVisor-specific decisions (which limits the sentry enforces, where the bundle lives)
are the caller's, passed in as plain values. The output follows runtime-spec 1.0 and is deterministic (same
inputs, same bytes), which keeps bundles diffable and cacheable.

Security defaults, and why:

* **Capabilities** are Docker's default set minus ``NET_RAW`` (raw sockets spoof packets) and ``MKNOD``
  (device nodes). Never ``SYS_ADMIN`` (mount, namespaces), ``SYS_MODULE``, ``SYS_PTRACE``, ``NET_ADMIN``. The
  agent keeps ``SETUID``/``SETGID``/``CHOWN``/``DAC_OVERRIDE``/``FOWNER`` because it runs user commands as uid
  1000 and manages their files.
* **noNewPrivileges**: set-uid binaries in the image cannot raise privileges again.
* **Process cap**: ``RLIMIT_NPROC`` in ``process.rlimits`` is the real, guest-level cap (a fork bomb gets
  EAGAIN). The pids cgroup is only a high safety net: under gVisor it counts the *host threads* of the
  sentry and gofer (an idle sandbox already uses ~34), and hitting it kills the whole sandbox instead of
  failing one ``fork``. See research/runtimes.md §2.1 and §3.5.
* **maskedPaths / readonlyPaths**: the usual runc/Docker lists, so a runtime without a user-space kernel
  does not expose the host's ``/proc/kcore`` and friends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.runtimes.base import Limits

__all__ = [
    "CAPABILITIES",
    "CPU_PERIOD_US",
    "MIN_PIDS_SAFETY_NET",
    "OciMount",
    "bind_mount",
    "build_config",
    "default_mounts",
    "linux_resources",
    "write_config",
]

OCI_VERSION = "1.0.2"
CPU_PERIOD_US = 100_000  # the kernel's default CFS period; quota = cpus x period
# runsc boots with ~34 host threads, and 200 guest sleeps made 2838: stay well above that
MIN_PIDS_SAFETY_NET = 4096
NOFILE = 65536  # per-process open files: generous for builds and servers, bounded for a hostile process

CAPABILITIES: tuple[str, ...] = (
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)

MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


@dataclass(frozen=True, kw_only=True)
class OciMount:
    """One entry of the spec's ``mounts`` list."""

    destination: str
    type: str
    source: str
    options: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"destination": self.destination, "type": self.type, "source": self.source}
        if self.options:
            out["options"] = list(self.options)
        return out


def bind_mount(source: Path | str, destination: str, *, readonly: bool = True) -> OciMount:
    """A recursive bind of a host path; read-only unless asked otherwise."""
    opts = ("rbind", "ro", "nosuid", "nodev") if readonly else ("rbind", "rw", "nosuid", "nodev")
    return OciMount(destination=destination, type="bind", source=str(source), options=opts)


def default_mounts(*, tmp: bool = True) -> list[OciMount]:
    """The kernel file systems every Linux container expects, plus a tmpfs ``/tmp``.

    ``/tmp`` is a tmpfs so scratch files stay out of the snapshot-able writable layer and count against the
    sandbox's memory limit rather than the host disk (under gVisor it lives in the sentry, and a future
    checkpoint includes it).
    """
    mounts = [
        OciMount(destination="/proc", type="proc", source="proc", options=("nosuid", "noexec", "nodev")),
        OciMount(
            destination="/dev",
            type="tmpfs",
            source="tmpfs",
            options=("nosuid", "strictatime", "mode=755", "size=65536k"),
        ),
        OciMount(
            destination="/dev/pts",
            type="devpts",
            source="devpts",
            options=("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"),
        ),
        OciMount(
            destination="/dev/shm",
            type="tmpfs",
            source="shm",
            options=("nosuid", "noexec", "nodev", "mode=1777", "size=65536k"),
        ),
        OciMount(
            destination="/sys", type="sysfs", source="sysfs", options=("nosuid", "noexec", "nodev", "ro")
        ),
    ]
    if tmp:
        mounts.append(
            OciMount(
                destination="/tmp", type="tmpfs", source="tmpfs", options=("nosuid", "nodev", "mode=1777")
            )
        )
    return mounts


def linux_resources(
    limits: Limits, *, pids_safety_net: int = MIN_PIDS_SAFETY_NET, memory_headroom_mb: int = 0
) -> dict[str, Any]:
    """``linux.resources`` for ``limits``: memory (swap included, so a bomb cannot spill into swap) plus
    ``memory_headroom_mb`` for the runtime's own processes, CPU quota, and the pids safety net (never below
    ``pids_safety_net``; see the module docstring)."""
    memory = (limits.memory_mb + memory_headroom_mb) * 1024 * 1024
    return {
        "memory": {"limit": memory, "swap": memory},
        "cpu": {"quota": max(1000, round(limits.cpus * CPU_PERIOD_US)), "period": CPU_PERIOD_US},
        "pids": {"limit": max(pids_safety_net, limits.pids)},
    }


def _rlimit(kind: str, value: int) -> dict[str, Any]:
    return {"type": kind, "hard": value, "soft": value}


def build_config(
    *,
    args: Sequence[str],
    root: Path | str,
    limits: Limits,
    hostname: str,
    env: Mapping[str, str] | None = None,
    mounts: Sequence[OciMount] = (),
    cgroups_path: str | None = None,
    root_readonly: bool = False,
    cwd: str = "/",
    pids_safety_net: int = MIN_PIDS_SAFETY_NET,
    memory_headroom_mb: int = 0,
    netns: str | None = None,
) -> dict[str, Any]:
    """The complete runtime config for one sandbox whose init process is ``args`` (run as root, uid 0).

    ``mounts`` come after :func:`default_mounts`, so a caller can add binds (the agent bundle, the template's
    ``/usr``) but mount targets of the defaults are not overridden silently: duplicates raise ``ValueError``.
    ``pids_safety_net`` is the runtime's floor for the pids cgroup (see :func:`linux_resources`).
    ``netns``: join this network namespace file (a prepared egress namespace) instead of making a new one.
    """
    all_mounts = [*default_mounts(), *mounts]
    seen: set[str] = set()
    for m in all_mounts:
        if m.destination in seen:
            raise ValueError(f"two mounts target {m.destination}")
        seen.add(m.destination)
    full_env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "xterm",
        **(env or {}),
    }
    caps = list(CAPABILITIES)
    config: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [f"{k}={v}" for k, v in full_env.items()],
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [
                _rlimit("RLIMIT_NOFILE", NOFILE),
                _rlimit("RLIMIT_NPROC", limits.pids),
                _rlimit("RLIMIT_CORE", 0),  # core dumps of user code would fill the writable layer
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": str(root), "readonly": root_readonly},
        "hostname": hostname,
        "mounts": [m.to_json() for m in all_mounts],
        "linux": {
            "namespaces": [
                {"type": t, **({"path": netns} if t == "network" and netns else {})}
                for t in ("pid", "network", "ipc", "uts", "mount")
            ],
            "resources": linux_resources(
                limits, pids_safety_net=pids_safety_net, memory_headroom_mb=memory_headroom_mb
            ),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    if cgroups_path is not None:
        config["linux"]["cgroupsPath"] = cgroups_path
    return config


def write_config(bundle_dir: Path, config: Mapping[str, Any]) -> Path:
    """Write ``bundle_dir/config.json`` atomically (mode 0600: it names host paths)."""
    bundle_dir.mkdir(parents=True, exist_ok=True)
    path = bundle_dir / "config.json"
    tmp = bundle_dir / ".config.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tmp.rename(path)
    return path
