"""The ``qemu`` engine: QEMU ``-M microvm``, TCG unless the operator configures KVM.

The VM is the shim's sandbox command, like ``runsc run`` for gVisor: the virtio-serial port ``agent`` is
QEMU's ``stdio`` chardev, so the shim's stdio pipes *are* the agent's channel and everything the shim does
(relay, deadline, exit record, checkpoint/restore) works unchanged. The guest console goes to a file in the
state dir (never to a client); QMP listens on a Unix socket there for pause, resume and snapshots.

No NIC unless the sandbox has network (``-nodefaults``; ``VmConfig.nic``: a virtio-net device on the tap
the runtime made in the sandbox's network namespace, which QEMU runs in). Accelerator: ``tcg`` by
default; ``kvm`` only when ``[runtime.microvm] accel = "kvm"`` is set. /dev/kvm is never opened or probed
otherwise: on nested hosts like this one KVM hangs QEMU, possibly unkillably.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from corral.errors import InvalidRequest, RuntimeFailure, RuntimeUnavailable
from corral.runtimes import _proc
from corral.runtimes._shimspec import FdFile
from corral.runtimes.microvm import qmp
from corral.runtimes.microvm.engine import Launch
from corral.runtimes.microvm.vm import VmConfig, kernel_cmdline

__all__ = ["ACCELERATORS", "QemuEngine"]

ACCELERATORS = ("tcg", "kvm")
NIC_MAC = "52:54:00:c0:a1:01"  # alone on its own bridge, so one address serves every VM
QEMU = "qemu-system-x86_64"
MIGRATE_TIMEOUT = 300.0  # ~0.5 s per 256 MiB guest here; generous for large guests on a loaded host
CONSOLE_RING = 64 * 1024  # bytes of guest console kept in memory once the agent is up
INCOMING_FD = 3  # the memory image a restore reads, opened by the shim
DISK_FD_BASE = 10  # then two descriptors per writable disk (see launch)


class QemuEngine:
    """Builds QEMU command lines and drives a running QEMU over QMP."""

    name = "qemu"

    def __init__(self, *, binary: str | None = None, accel: str = "tcg") -> None:
        if accel not in ACCELERATORS:
            raise InvalidRequest(f"[runtime.microvm] accel must be one of {', '.join(ACCELERATORS)}")
        self.binary_name = binary or QEMU
        self.accel = accel

    def check(self) -> str:
        binary = shutil.which(self.binary_name)
        if binary is None:
            raise RuntimeUnavailable(
                f"QEMU ({self.binary_name}) is not installed on this host; install it with: "
                "apt-get install qemu-system-x86",
                details={"binary": self.binary_name, "install": "apt-get install qemu-system-x86"},
            )
        for tool in ("qemu-img", "mkfs.erofs", "mkfs.ext4", "lz4"):
            _proc.require_binary(tool)
        return binary

    def launch(
        self, binary: str, config: VmConfig, state_dir: Path, *, uid: int, incoming: Path | None = None
    ) -> Launch:
        """The command that boots ``config`` (or, with ``incoming``, restores the memory image there).

        QEMU opens everything on its command line (disks, kernel, console file, QMP socket) as root, then
        drops to ``uid`` (``-runas``: no capabilities, no supplementary groups) before the guest runs; its
        seccomp filter then also denies spawning processes, so memory images come and go as descriptors."""
        accel = "kvm" if self.accel == "kvm" else "tcg,thread=" + ("multi" if config.vcpus > 1 else "single")
        argv = [
            binary,
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,pit=on,pic=off,rtc=on,acpi=on",
            "-accel",
            accel,
            "-cpu",
            "host" if self.accel == "kvm" else "max",
            "-m",
            str(config.memory_mb),
            "-smp",
            str(config.vcpus),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            # snapshots stop the VM before migrating (one consistent cut, no dirty-page rounds): without
            # this the "paused" run state travels with the image and every restore would stay paused
            "-global",
            "migration.store-global-state=off",
            "-kernel",
            config.kernel,
            "-initrd",
            config.initramfs,
            "-append",
            kernel_cmdline(config, () if self.accel == "kvm" else (f"tsc_early_khz={_host_tsc_khz()}",)),
            # an unprivileged uid and group of its own (the allocator's, never a host account)
            "-runas",
            f"{uid}:{uid}",
            # QEMU's own seccomp filter: no obsolete syscalls, no spawning, no scheduler/affinity changes.
            # set*uid stays allowed only because the filter is loaded before -runas drops to `uid`; after
            # that QEMU has no capability left to change ids with
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
            # the console goes to a file only until the agent is up (see quiet_console)
            "-chardev",
            f"file,id=console,path={_escape(str(state_dir / 'console.log'))}",
            "-serial",
            "chardev:console",
            "-qmp",
            f"unix:{state_dir / 'qmp.sock'},server=on,wait=off",
            "-device",
            "virtio-serial-device,max_ports=2",
            "-chardev",
            "stdio,id=agent,signal=off",
            "-device",
            "virtserialport,chardev=agent,name=agent",
        ]
        files: list[FdFile] = []
        for index, disk in enumerate(config.disks):
            ro = ",readonly=on" if disk.readonly else ""
            path = _escape(disk.path)
            if not disk.readonly:
                # QEMU reopens a writable image read-only when a migration ends (and read-write when an
                # incoming one does), which as `uid` it could not do by path: an fd set holding one
                # descriptor of each mode, opened by the shim, lets it pick the one it needs. Two open files
                # would take QEMU's image locks against each other: the image is this VM's alone (in the
                # root-only state dir), so it needs none
                fdset = index + 1
                for mode, fd in enumerate((DISK_FD_BASE + 2 * index, DISK_FD_BASE + 2 * index + 1)):
                    files.append(FdFile(fd=fd, path=disk.path, write=mode == 0))
                    argv += ["-add-fd", f"fd={fd},set={fdset}"]
                path = f"/dev/fdset/{fdset},file.locking=off"
            argv += [
                "-drive",
                f"id=d{index},file={path},format={disk.format},if=none{ro},cache=writeback,discard=unmap",
                "-device",
                f"virtio-blk-device,drive=d{index},serial={disk.serial}",
            ]
        if config.nic is not None:  # the tap the runtime made in the netns QEMU runs in; else no NIC at all
            argv += [
                "-netdev",
                f"tap,id=net0,ifname={config.nic},script=no,downscript=no",
                "-device",
                f"virtio-net-device,netdev=net0,mac={NIC_MAC}",
            ]
        if incoming is not None:
            argv += ["-incoming", f"fd:{INCOMING_FD}"]
            files.append(FdFile(fd=INCOMING_FD, path=str(incoming)))
        return Launch(argv, files)

    def checkpoint_argv(self, python: str, state_dir: Path, image: Path) -> list[str]:
        """A command that saves the VM's memory to ``image`` and ends QEMU (the shim's ``shim.checkpoint``)."""
        return [
            python,
            "-I",
            "-m",
            "corral.runtimes.microvm.qmp",
            str(state_dir / "qmp.sock"),
            "save",
            str(image),
        ]

    # -- operations on a running VM (blocking; run in worker threads) -----------------------------------
    def pause(self, state_dir: Path) -> None:
        qmp.command(state_dir / "qmp.sock", "stop")

    def resume(self, state_dir: Path) -> None:
        qmp.command(state_dir / "qmp.sock", "cont")

    def quiet_console(self, state_dir: Path) -> None:
        """Swap the console's file for a small in-memory ring: from now on the guest runs hostile code as
        root, which could write to the serial port without end, and the host disk must not fill up."""
        qmp.command(
            state_dir / "qmp.sock",
            "chardev-change",
            id="console",
            backend={"type": "ringbuf", "data": {"size": CONSOLE_RING}},
        )

    def save_memory(self, state_dir: Path, image: Path, *, then_quit: bool) -> None:
        """Stop the VM and write its memory and device state to ``image``; ``then_quit`` ends QEMU after."""
        qmp.save(state_dir / "qmp.sock", image, quit=then_quit, timeout=MIGRATE_TIMEOUT)

    def status(self, state_dir: Path) -> str | None:
        """QEMU's run state ("running", "paused", "inmigrate", …) or None if it does not answer."""
        try:
            reply = qmp.command(state_dir / "qmp.sock", "query-status", timeout=5.0)
        except (RuntimeFailure, OSError):
            return None
        status = reply.get("status") if isinstance(reply, dict) else None
        return status if isinstance(status, str) else None

    def wait_status(self, state_dir: Path, want: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.status(state_dir) != want:
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"the microVM did not reach the {want} state")
            time.sleep(0.01)  # bounded; QMP has no event for "run state reached" we could wait on here


def _host_tsc_khz() -> int:
    """Under TCG the guest reads the host's TSC but cannot calibrate it (no PIT/HPET reference that keeps
    up): without this the guest kernel marks the TSC unstable and hangs. The host's nominal rate will do."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2_000_000


def _escape(path: str) -> str:
    """QEMU option values escape a comma by doubling it."""
    return path.replace(",", ",,")
