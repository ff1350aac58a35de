"""What one microVM is made of, independent of the engine that runs it (QEMU, Firecracker, cloud-hypervisor).

A :class:`VmConfig` is written to the sandbox's state dir as ``vm.json`` and copied next to every memory image
taken of it: a restore must rebuild the exact same machine (memory size, vCPUs, the same disks in the same
order with the same contents), so it reads the config the image was taken from instead of deriving one anew.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

__all__ = ["AGENT_SERIAL", "UPPER_SERIAL", "Disk", "VmConfig", "kernel_cmdline"]

AGENT_SERIAL = "corral-agent"
UPPER_SERIAL = "corral-upper"

# Measured here under TCG (research/microvm.md): the PIT plus these flags keep the timer calibration from
# hanging; `random.trust_cpu=on` keeps Python from blocking on getrandom(); `panic=-1` with QEMU's
# -no-reboot turns the agent's exit (PID 1) into the VM's exit.
BASE_CMDLINE = (
    "console=ttyS0",
    "quiet",
    "loglevel=3",
    "panic=-1",
    "reboot=t",
    "tsc=reliable",
    "no_timer_check",
    "random.trust_cpu=on",
    "rdinit=/init",
    "cryptomgr.notests",
    "i8042.noaux",
    "i8042.nokbd",
    "8250.nr_uarts=1",
)


@dataclass(frozen=True, kw_only=True)
class Disk:
    serial: str  # how the guest's /init finds it (virtio-blk serial, ≤ 20 bytes)
    path: str
    format: str = "raw"  # "raw" or "qcow2"
    readonly: bool = True


@dataclass(frozen=True, kw_only=True)
class VmConfig:
    kernel: str
    initramfs: str
    memory_mb: int
    vcpus: int
    disks: tuple[Disk, ...]
    args: dict[str, str] = field(default_factory=dict)  # corral.<key>=<value> on the kernel command line
    nic: str | None = None  # a virtio-net device on this tap of the network namespace the VMM runs in

    def with_upper(self, path: str) -> VmConfig:
        """The same machine with its writable disk at ``path`` (a fork's or a restore's own copy)."""
        disks = tuple(replace(d, path=path) if d.serial == UPPER_SERIAL else d for d in self.disks)
        return replace(self, disks=disks)

    @property
    def upper(self) -> Disk:
        return next(d for d in self.disks if d.serial == UPPER_SERIAL)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VmConfig:
        data = json.loads(text)
        data["disks"] = tuple(Disk(**d) for d in data["disks"])
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> VmConfig:
        return cls.from_json(path.read_text())


def kernel_cmdline(config: VmConfig, extra: tuple[str, ...] = ()) -> str:
    """The guest kernel's command line: the base flags, the engine's own, then the init's arguments."""
    words = [*BASE_CMDLINE, *extra, *(f"corral.{k}={v}" for k, v in sorted(config.args.items()))]
    for word in words:
        if any(c.isspace() for c in word):
            raise ValueError(f"kernel argument with white space: {word!r}")
    line = " ".join(words)
    if len(line) >= 2048:  # COMMAND_LINE_SIZE on x86
        raise ValueError("kernel command line too long")
    return line
