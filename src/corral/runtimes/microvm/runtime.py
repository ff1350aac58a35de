"""The ``microvm`` runtime: one virtual machine per sandbox, with its own guest kernel.

From the outside in:

1. the **shim** (:mod:`.._shim`) runs the VMM as its sandbox command; the agent's channel is the VMM's stdio
   (QEMU: a virtio-serial port on the ``stdio`` chardev), so relaying, the hard deadline, the exit record and
   checkpoint/restore are the shim's, exactly as for gVisor;
2. the **engine** (:mod:`.qemu`; Firecracker and cloud-hypervisor behind the same methods) builds the VMM's
   command line and drives the running VMM (pause, resume, memory images);
3. the **guest** (:mod:`.guest`): a Debian cloud kernel and Corral's initramfs, whose ``/init`` mounts the
   **disks** (:mod:`.disks`): the template's layers and binds as read-only erofs images, a thin per-sandbox
   qcow2 upper, the agent bundle; then it becomes the agent.

Limits: ``memory_mb`` is the guest's RAM (``-m``); ``cpus`` rounds up to vCPUs, a fraction is a guest cgroup
``cpu.max``; ``pids`` is the guest cgroup's ``pids.max``; ``disk_mb`` is the size of the writable disk (ENOSPC
past it; without it 4 GiB, sparse). The guest has no network device at all.

Pause: ``QMP stop`` (the VM's memory stays in RAM; sub-millisecond) or, with ``pause = "disk"``, the memory
goes to a file in the state dir and QEMU exits (the shim's checkpoint), restored on resume. Snapshot and fork:
``stop`` + migration to a file + a copy of the writable disk, then ``cont``; a fork or a template with memory
restores that image (``-incoming``) with its own copy of the disk, and its guest RNG is reseeded from the host
before anyone can use it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import ClassVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from corral.errors import Conflict, InvalidRequest, RuntimeFailure, RuntimeUnavailable, Timeout
from corral.runtimes import _proc, _rootfs, _shimctl
from corral.runtimes._bundle import AgentBundle, ensure_bundle
from corral.runtimes._shimspec import ShimSpec
from corral.runtimes.base import (
    ByteStream,
    Capabilities,
    Instance,
    Observed,
    ObservedState,
    RuntimeConfig,
    SandboxSpec,
    Snapshot,
)
from corral.runtimes.microvm import disks
from corral.runtimes.microvm.guest import Guest, ensure_guest
from corral.runtimes.microvm.qemu import QemuEngine
from corral.runtimes.microvm.vm import AGENT_SERIAL, UPPER_SERIAL, Disk, VmConfig

__all__ = ["MicroVMRuntime"]

log = logging.getLogger("corral.runtimes.microvm")

BOOT_TIMEOUT = 180.0  # create → agent hello: 3-8 s under TCG here, far more on a loaded CI host
COMMAND_TIMEOUT = 30.0
CHECKPOINT_DIR = "checkpoint"  # below the state dir: the memory image of a sandbox paused to disk
CONSOLE_LINES = 40  # of the guest console, logged when a boot fails (never sent to a client)
MAX_SOCKET_PATH = 107
PAUSE_MODES = ("memory", "disk")
_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
_POLL = 0.005
STOP_TIMEOUT = 5.0


class MicroVMRuntime:
    """A QEMU ``-M microvm`` guest per sandbox (see the module docstring)."""

    name: ClassVar[str] = "microvm"
    capabilities: ClassVar[Capabilities] = Capabilities(pause=True, checkpoint=True, snapshot_fs=True)

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        accel: str = "tcg",
        qemu: str | None = None,
        pause: str = "memory",
        boot_timeout: float = BOOT_TIMEOUT,
        cache_dir: Path | None = None,
    ) -> None:
        """``cache_dir``: where the guest kernel, initramfs and disk images are kept (default below the
        runtime's cache root; they are keyed by their inputs, so a host-wide directory can be shared)."""
        if pause not in PAUSE_MODES:
            raise InvalidRequest(f"[runtime.microvm] pause must be one of {', '.join(PAUSE_MODES)}")
        self.config = config
        self.engine = QemuEngine(binary=qemu, accel=accel)
        self.pause_mode = pause
        self.boot_timeout = boot_timeout
        self.cache_dir = cache_dir if cache_dir is not None else config.cache_root
        self._binary: str | None = None
        self._guest: Guest | None = None
        self._bundle: AgentBundle | None = None

    # -- host check ---------------------------------------------------------------------------------------
    async def check(self) -> None:
        await self._host()

    async def _host(self) -> str:
        if self._binary is None:
            self._binary = await anyio.to_thread.run_sync(self.engine.check)
        return self._binary

    async def _assets(self) -> tuple[str, Guest, AgentBundle]:
        binary = await self._host()
        if self._guest is None:
            self._guest = await anyio.to_thread.run_sync(partial(ensure_guest, self.cache_dir))
        if self._bundle is None:
            self._bundle = await anyio.to_thread.run_sync(ensure_bundle, self.config.cache_root)
        return binary, self._guest, self._bundle

    # -- create ---------------------------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec) -> Instance:
        binary, guest, bundle = await self._assets()
        if not _HOSTNAME.match(spec.hostname):
            raise InvalidRequest("hostname must be letters, digits, dots and dashes (at most 63)")
        state_dir = self.config.state_root / spec.sandbox_id
        socket_path = state_dir / "agent.sock"
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise RuntimeUnavailable("the runtime state directory path is too long for a Unix socket")
        self.config.state_root.mkdir(parents=True, exist_ok=True)
        try:
            state_dir.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise Conflict(f"sandbox {spec.sandbox_id} already exists on this host") from exc
        handle: _shimctl.ShimHandle | None = None
        try:
            shim_spec = await anyio.to_thread.run_sync(self._prepare, spec, state_dir, binary, guest, bundle)
            handle = _shimctl.launcher.spawn(state_dir, shim_spec)
            try:
                await _shimctl.launcher.wait_ready(
                    handle, what="start the microVM", timeout=self.boot_timeout
                )
            except (Timeout, RuntimeFailure) as exc:
                _log_console(spec.sandbox_id, state_dir)
                if isinstance(exc, Timeout):
                    raise RuntimeFailure(
                        f"the microVM did not start its agent within {self.boot_timeout:g} s "
                        "(the guest console is in the server log)",
                        details={"stage": "boot"},
                    ) from exc
                raise
            await anyio.lowlevel.checkpoint_if_cancelled()
            return Instance(
                sandbox_id=spec.sandbox_id,
                runtime=self.name,
                state_dir=str(state_dir),
                shim_pid=handle.pid,
                shim_start_ticks=handle.start_ticks,
                socket_path=str(socket_path),
                extra={"engine": self.engine.name},
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    _teardown,
                    state_dir,
                    handle.pid if handle else None,
                    handle.start_ticks if handle else None,
                )
            raise

    def _prepare(
        self, spec: SandboxSpec, state_dir: Path, binary: str, guest: Guest, bundle: AgentBundle
    ) -> ShimSpec:
        """The writable disk, ``vm.json`` and the shim spec (the caller cleans up on failure)."""
        (state_dir / CHECKPOINT_DIR).mkdir(mode=0o700)
        upper = state_dir / "upper.qcow2"
        incoming: Path | None = None
        if spec.restore_from is not None:
            config = self._restored_config(spec, upper)
            incoming = spec.restore_from / "memory"
        else:
            config = self._fresh_config(spec, guest, bundle, upper)
            if spec.upper_seed is not None:
                disks.copy_upper(spec.upper_seed, upper)
            else:
                size = spec.limits.disk_mb or disks.DEFAULT_DISK_MB
                disks.make_upper(upper, disks.ensure_empty_ext4(self.cache_dir, size))
        config.save(state_dir / "vm.json")
        image = state_dir / CHECKPOINT_DIR / "memory"
        return ShimSpec(
            argv=self.engine.argv(binary, config, state_dir, incoming=incoming),
            socket=str(state_dir / "agent.sock"),
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            deadline=spec.deadline,
            restored=incoming is not None,
            hello_file=str(spec.restore_from / "hello.frame") if spec.restore_from is not None else None,
            checkpoint_argv=self.engine.checkpoint_argv(sys.executable, state_dir, image),
            restore_argv=self.engine.argv(binary, config, state_dir, incoming=image),
            reseed_on_restore=True,
        )

    def _fresh_config(self, spec: SandboxSpec, guest: Guest, bundle: AgentBundle, upper: Path) -> VmConfig:
        vcpus = max(1, math.ceil(spec.limits.cpus))
        images: list[Disk] = []
        args = {
            "pids": str(spec.limits.pids),
            "hostname": spec.hostname,
            "loader": bundle.loader_name,
        }
        if spec.limits.cpus < vcpus:
            args["cpu"] = str(max(1000, int(spec.limits.cpus * 100_000)))
        for index, layer in enumerate(spec.rootfs.lower):
            images.append(
                Disk(serial=f"corral-l{index}", path=str(disks.ensure_erofs(self.cache_dir, layer)))
            )
            args[f"l{index}"] = "1"
        for index, bind in enumerate(spec.rootfs.binds):
            if not bind.target.startswith("/") or any(c.isspace() or c == "," for c in bind.target):
                raise InvalidRequest(f"bind target {bind.target!r} cannot be given to a microVM")
            path = disks.ensure_erofs(self.cache_dir, bind.source, tree=True)
            images.append(Disk(serial=f"corral-b{index}", path=str(path)))
            args[f"b{index}"] = bind.target
        images.append(Disk(serial=UPPER_SERIAL, path=str(upper), format="qcow2", readonly=False))
        images.append(Disk(serial=AGENT_SERIAL, path=str(disks.ensure_erofs(self.cache_dir, bundle.path))))
        return VmConfig(
            kernel=str(guest.kernel),
            initramfs=str(guest.initramfs),
            memory_mb=spec.limits.memory_mb,
            vcpus=vcpus,
            disks=tuple(images),
            args=args,
        )

    def _restored_config(self, spec: SandboxSpec, upper: Path) -> VmConfig:
        """The machine a memory image was taken of, with this sandbox's own copy of its disk."""
        assert spec.restore_from is not None
        try:
            config = VmConfig.load(spec.restore_from / "vm.json")
        except (OSError, ValueError, TypeError) as exc:
            raise InvalidRequest("that snapshot is not a microVM memory image") from exc
        if config.memory_mb != spec.limits.memory_mb:
            raise InvalidRequest(
                f"a microVM memory image restores with the memory it was taken with ({config.memory_mb} MiB)",
                details={"memory_mb": config.memory_mb},
            )
        missing = [d for d in config.disks if d.serial != UPPER_SERIAL and not Path(d.path).exists()]
        if missing:
            raise RuntimeFailure("a disk image of that snapshot is gone from this host")
        disks.copy_upper(spec.upper_seed or spec.restore_from / "upper.qcow2", upper)
        return config.with_upper(str(upper))

    # -- operations on a running sandbox --------------------------------------------------------------------
    async def connect(self, instance: Instance) -> ByteStream:
        return await _shimctl.connect(instance.socket_path)

    async def pause(self, instance: Instance) -> None:
        state_dir = Path(instance.state_dir)
        if not await anyio.to_thread.run_sync(state_dir.exists):
            raise RuntimeFailure("could not pause the microVM: it no longer exists")
        if self.pause_mode == "disk":
            await anyio.to_thread.run_sync(_clear_dir, state_dir / CHECKPOINT_DIR)
            await _shimctl.call(
                instance.socket_path,
                "shim.checkpoint",
                what="pause the microVM",
                timeout=COMMAND_TIMEOUT * 10,
            )
        else:
            await anyio.to_thread.run_sync(self.engine.pause, state_dir)

    async def resume(self, instance: Instance) -> None:
        state_dir = Path(instance.state_dir)
        if await anyio.to_thread.run_sync(
            (state_dir / "paused").exists
        ):  # paused to disk: the shim restores the image
            await _shimctl.call(
                instance.socket_path, "shim.restore", what="resume the microVM", timeout=COMMAND_TIMEOUT * 10
            )
        else:
            await anyio.to_thread.run_sync(self.engine.resume, state_dir)

    async def snapshot(self, instance: Instance, dest: Path) -> Snapshot:
        """Stop, write memory + device state and a copy of the writable disk to ``dest/memory``, continue."""
        state_dir = Path(instance.state_dir)
        if await anyio.to_thread.run_sync((state_dir / "paused").exists):
            raise Conflict("resume the microVM before taking a snapshot of it")
        await anyio.to_thread.run_sync(partial(dest.mkdir, mode=0o700))
        memory = dest / "memory"
        await anyio.to_thread.run_sync(partial(memory.mkdir, mode=0o700))
        try:
            await anyio.to_thread.run_sync(
                partial(self.engine.save_memory, state_dir, memory / "memory", then_quit=False)
            )
            await anyio.to_thread.run_sync(_capture, state_dir, memory)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.engine.resume, state_dir)
        return Snapshot(layer=memory / "upper.qcow2", memory=memory)

    async def inspect(self, instance: Instance) -> Observed:
        state_dir = Path(instance.state_dir)
        observed = await anyio.to_thread.run_sync(_observe, instance)
        if observed.state is not ObservedState.RUNNING:
            return observed
        status = await anyio.to_thread.run_sync(self.engine.status, state_dir)
        if status in ("paused", "postmigrate", "finish-migrate"):
            return Observed(state=ObservedState.PAUSED)
        if status is None:  # QEMU is going away; the shim records the exit in a moment
            return await anyio.to_thread.run_sync(_observe, instance)
        return Observed(state=ObservedState.RUNNING)

    async def destroy(self, instance: Instance) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                _teardown, Path(instance.state_dir), instance.shim_pid, instance.shim_start_ticks
            )


# -- blocking helpers (worker threads) -----------------------------------------------------------------------


def _capture(state_dir: Path, memory: Path) -> None:
    """With the VM stopped (its disks flushed): the disk copy, the machine and the agent's hello."""
    disks.copy_upper(state_dir / "upper.qcow2", memory / "upper.qcow2")
    shutil.copyfile(state_dir / "vm.json", memory / "vm.json")
    shutil.copyfile(state_dir / "hello.frame", memory / "hello.frame")


def _clear_dir(path: Path) -> None:
    for item in path.iterdir():
        item.unlink()


def _observe(instance: Instance) -> Observed:
    state_dir = Path(instance.state_dir)
    if not state_dir.exists():
        return Observed(state=ObservedState.MISSING)
    observed = _shimctl.observe(state_dir, _shimctl.ShimHandle(instance.shim_pid, instance.shim_start_ticks))
    if observed.state is ObservedState.RUNNING and (state_dir / "paused").exists():
        return Observed(state=ObservedState.PAUSED)
    return observed


def _log_console(sandbox_id: str, state_dir: Path) -> None:
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


def _vm_processes(state_dir: Path) -> set[int]:
    """Host processes of one VM: the VMM and a checkpoint helper, both of which name its QMP socket."""
    marker = str(state_dir / "qmp.sock").encode()
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in Path(entry.path, "cmdline").read_bytes():
                    found.add(int(entry.name))
    return found


def _teardown(state_dir: Path, shim_pid: int | None, shim_ticks: int | None) -> None:
    """SIGKILL the VMM (the shim records the exit and leaves), make sure the shim is gone, remove the state
    dir with the writable disk. Idempotent; needs nothing but the Instance."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while pids := _vm_processes(state_dir):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeFailure("could not stop the microVM", details={"left": len(pids)})
        time.sleep(_POLL)
    if shim_pid is not None and shim_ticks is not None:
        if (state_dir / "paused").exists():
            _proc.kill_pid(shim_pid, shim_ticks, signal.SIGTERM)  # paused to disk: no VMM whose exit ends it
        deadline = time.monotonic() + STOP_TIMEOUT
        while _proc.pid_alive(shim_pid, shim_ticks) and time.monotonic() < deadline:
            time.sleep(_POLL)
        _proc.kill_pid(shim_pid, shim_ticks, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(shim_pid, os.WNOHANG)
    if state_dir.exists():
        _rootfs.remove_state_dir(state_dir)
