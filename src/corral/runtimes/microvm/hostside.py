"""Blocking host-side helpers of the microvm runtime (run in worker threads): a VM's processes, its console,
the files a memory image is made of, and the machine a memory image restores."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from corral.errors import InvalidRequest, RuntimeFailure
from corral.runtimes.base import Artifact, ArtifactKind, SandboxSpec
from corral.runtimes.microvm import disks
from corral.runtimes.microvm.vm import UPPER_SERIAL, VmConfig

__all__ = [
    "capture",
    "clear_dir",
    "disk_seed",
    "log_console",
    "private_dirs",
    "publish",
    "restored_config",
    "vm_processes",
]

log = logging.getLogger("corral.runtimes.microvm")

CONSOLE_LINES = 40  # of the guest console, logged when a boot fails (never sent to a client)


def capture(state_dir: Path, memory: Path) -> None:
    """With the VM stopped (its disks flushed): the disk copy, the machine and the agent's hello."""
    disks.copy_upper(state_dir / "upper.qcow2", memory / "upper.qcow2")
    shutil.copyfile(state_dir / "vm.json", memory / "vm.json")
    shutil.copyfile(state_dir / "hello.frame", memory / "hello.frame")


def publish(tmp: Path, target: Path) -> None:
    try:
        tmp.rename(target)
    except OSError:  # another first boot of this shape won
        shutil.rmtree(tmp, ignore_errors=True)


def private_dirs(path: Path) -> None:
    """``path`` and every missing parent, each mode 0700 (``mkdir(parents=True)`` would make the parents
    0755: a snapshot store other host users could list)."""
    if path.is_dir():
        return
    private_dirs(path.parent)
    path.mkdir(mode=0o700)


def clear_dir(path: Path) -> None:
    for item in path.iterdir():
        item.unlink()


def log_console(sandbox_id: str, state_dir: Path) -> None:
    """The guest console's last lines, for the operator (they may name host details: never for clients)."""
    with contextlib.suppress(OSError):
        lines = (state_dir / "console.log").read_text(errors="replace").splitlines()[-CONSOLE_LINES:]
        log.error(
            "sandbox %s: the microVM did not boot; its console ended with:\n%s", sandbox_id, "\n".join(lines)
        )
    with contextlib.suppress(OSError):
        tail = (state_dir / "sandbox.log").read_text(errors="replace")[-4000:]
        if tail.strip():
            log.error("sandbox %s: the VMM wrote:\n%s", sandbox_id, tail)


def vm_processes(state_dir: Path) -> set[int]:
    """Host processes of one VM: the VMM and a checkpoint helper, both of which name its QMP socket."""
    marker = str(state_dir / "qmp.sock").encode()
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in Path(entry.path, "cmdline").read_bytes():
                    found.add(int(entry.name))
    return found


def disk_seed(artifact: Artifact) -> Path:
    if artifact.kind is not ArtifactKind.DISK:
        raise InvalidRequest(f"a microVM starts from a disk snapshot, not a {artifact.kind}")
    return artifact.path


def restored_config(spec: SandboxSpec, memory: Path, upper: Path) -> VmConfig:
    """The machine a memory image was taken of, with this sandbox's own copy of its disk."""
    try:
        config = VmConfig.load(memory / "vm.json")
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidRequest("that snapshot is not a microVM memory image") from exc
    if config.memory_mb != spec.limits.memory_mb:
        raise InvalidRequest(
            f"a microVM memory image restores with the memory it was taken with ({config.memory_mb} MiB)",
            details={"memory_mb": config.memory_mb},
        )
    if any(d.serial != UPPER_SERIAL and not Path(d.path).exists() for d in config.disks):
        raise RuntimeFailure("a disk image of that snapshot is gone from this host")
    seed = disk_seed(spec.upper_seed) if spec.upper_seed is not None else memory / "upper.qcow2"
    disks.copy_upper(seed, upper)
    return config.with_upper(str(upper))
