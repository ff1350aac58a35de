"""The ``microvm`` runtime: one virtual machine per sandbox, with its own guest kernel.

From the outside in:

1. the **shim** (:mod:`.._shim`) runs the VMM as its sandbox command; the agent's channel is the VMM's stdio
   (QEMU: a virtio-serial port on the ``stdio`` chardev), so relaying, the hard deadline, the exit record and
   checkpoint/restore are the shim's, exactly as for gVisor;
2. the **engine** (:mod:`.qemu`; ``[runtime.microvm] engine`` may name Firecracker or cloud-hypervisor,
   :mod:`.firecracker`, which are not usable yet) builds the VMM's command line and drives the running VMM
   (pause, resume, memory images);
3. the **guest** (:mod:`.guest`): a Debian cloud kernel and Corral's initramfs, whose ``/init`` mounts the
   **disks** (:mod:`.disks`): the template's layers and binds as read-only erofs images, a thin per-sandbox
   qcow2 upper, the agent bundle; then it becomes the agent.

Limits: ``memory_mb`` is the guest's RAM (``-m``); ``cpus`` rounds up to vCPUs, a fraction is a guest cgroup
``cpu.max``; ``pids`` is the guest cgroup's ``pids.max``; ``disk_mb`` is the size of the writable disk (ENOSPC
past it; without it 4 GiB, sparse). Network: none at all (no device) by default; with a policy, a virtio-net
device on a tap in the sandbox's prepared network namespace (QEMU runs there), bridged to its veth, so the
egress path, its rules and its proxy are exactly the other runtimes' (:mod:`.._net`); the guest's ``/init``
addresses it. Pause keeps it; snapshots and forks of a VM with network are refused (its image holds the NIC).

Pause: ``QMP stop`` (the VM's memory stays in RAM; sub-millisecond) or, with ``pause = "disk"``, the memory
goes to a file in the state dir and QEMU exits (the shim's checkpoint), restored on resume. Snapshot and fork:
``stop`` + migration to a file + a copy of the writable disk, then ``cont``; a fork or a template with memory
restores that image (``-incoming``) with its own copy of the disk, and its guest RNG is reseeded from the host
before anyone can use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread

from corral.errors import Conflict, InvalidRequest, RuntimeFailure, RuntimeUnavailable, Timeout, Unsupported
from corral.protocol.frames import Decoder, ProtocolError, encode
from corral.runtimes import _shimctl
from corral.runtimes._bundle import AgentBundle
from corral.runtimes._local import SNAPSHOTS, LocalRuntime, LocalSandbox, host_layers, sandbox_net
from corral.runtimes._net import netns as _netns
from corral.runtimes._net.stack import SandboxNet
from corral.runtimes._shimspec import ShimSpec
from corral.runtimes._uids import UidAllocator
from corral.runtimes.base import (
    Artifact,
    ArtifactKind,
    Capabilities,
    Instance,
    Observed,
    ObservedState,
    SandboxSpec,
    Snapshot,
)
from corral.runtimes.microvm import disks, hostside
from corral.runtimes.microvm.engine import Engine
from corral.runtimes.microvm.firecracker import CloudHypervisorEngine, FirecrackerEngine
from corral.runtimes.microvm.guest import Guest, ensure_guest
from corral.runtimes.microvm.qemu import ACCELERATORS, QemuEngine
from corral.runtimes.microvm.vm import AGENT_SERIAL, UPPER_SERIAL, Disk, VmConfig

__all__ = ["MicroVMOptions", "MicroVMRuntime"]

log = logging.getLogger("corral.runtimes.microvm")

BOOT_TIMEOUT = 180.0  # create → agent hello: 3-10 s under TCG here, far more on a loaded CI host
CHECKPOINT_TIMEOUT = 300.0  # memory to disk and back: ~0.5 s per 256 MiB guest here
CHECKPOINT_DIR = "checkpoint"  # below the state dir: the memory image of a sandbox paused to disk
MAX_SOCKET_PATH = 107
PAUSE_MODES = ("memory", "disk")
ENGINES = ("qemu", "firecracker", "cloud-hypervisor")
_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
_POLL = 0.005
STOP_TIMEOUT = 5.0
GOLDEN_PING_TIMEOUT = 30.0
GOLDEN_FORMAT = 2  # in the golden key: bumped when how a golden image is taken changes (2: after a ping)


@dataclass(frozen=True, kw_only=True)
class MicroVMOptions:
    """``[runtime.microvm]``: ``engine`` (``qemu``, the default; ``firecracker`` (with ``jailer``) and
    ``cloud-hypervisor`` are found on PATH, or at the ``firecracker``, ``jailer``, ``cloud_hypervisor``
    options, but refuse to start until their agent relay exists, see :mod:`.firecracker`),
    ``accel`` (``tcg``, the default, or ``kvm``: never chosen or probed on its own,
    since KVM hangs on nested hosts), ``qemu`` (the binary), ``pause`` (``memory``: QMP stop, the guest's
    RAM stays allocated; ``disk``: its memory goes to a file and QEMU exits until resume) and ``cache_dir``
    (the guest kernel, initramfs and erofs images of host trees such as ``/usr``, keyed by their inputs, so
    one host-wide directory can serve every data dir; default below the cache root; template layers and the
    agent bundle, which live in the data dir, get their images there);
    ``golden``: the first boot of each machine shape is saved right after its agent said hello, and later
    creates of that shape (warm-pool members too) restore it instead of booting."""

    engine: str = "qemu"
    accel: str = "tcg"
    qemu: str | None = None
    firecracker: str | None = None
    jailer: str | None = None
    cloud_hypervisor: str | None = None
    pause: str = "memory"
    cache_dir: str | None = None
    golden: bool = True

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InvalidRequest(f"[runtime.microvm] engine must be one of {', '.join(ENGINES)}")
        if self.accel not in ACCELERATORS:
            raise InvalidRequest(f"[runtime.microvm] accel must be one of {', '.join(ACCELERATORS)}")
        if self.pause not in PAUSE_MODES:
            raise InvalidRequest(f"[runtime.microvm] pause must be one of {', '.join(PAUSE_MODES)}")


class MicroVMRuntime(LocalRuntime[str]):
    """A QEMU ``-M microvm`` guest per sandbox (see the module docstring)."""

    name: ClassVar[str] = "microvm"
    capabilities: ClassVar[Capabilities] = Capabilities(
        pause=True,
        snapshot=frozenset({ArtifactKind.DISK, ArtifactKind.MEMORY}),
        network_policy=True,
        snapshot_network=False,  # a memory image holds the NIC, on a tap only its sandbox has
    )
    Options: ClassVar[type[Any]] = MicroVMOptions
    ready_timeout: ClassVar[float] = BOOT_TIMEOUT
    options: MicroVMOptions

    def __init__(self, config: Any, options: Any = None) -> None:
        super().__init__(config, options)
        self.engine: Engine = QemuEngine(binary=self.options.qemu, accel=self.options.accel)
        self._rest_engine: FirecrackerEngine | CloudHypervisorEngine | None = None
        if self.options.engine == "firecracker":
            self._rest_engine = FirecrackerEngine(binary=self.options.firecracker, jailer=self.options.jailer)
        elif self.options.engine == "cloud-hypervisor":
            self._rest_engine = CloudHypervisorEngine(binary=self.options.cloud_hypervisor)
        self.cache_dir = Path(self.options.cache_dir) if self.options.cache_dir else config.cache_root
        self._guest: Guest | None = None
        self._guest_lock = threading.Lock()

    def check_host(self) -> str:
        """Binaries only (cheap: readiness probes call it); the guest is fetched and built on first use."""
        if self._rest_engine is not None:
            self._rest_engine.check()  # RuntimeUnavailable: what to install, or what is not built yet
        return self.engine.check()

    def _ensure_guest(self) -> Guest:
        with self._guest_lock:  # one build per process; concurrent processes publish atomically
            if self._guest is None:
                self._guest = ensure_guest(self.cache_dir)
            return self._guest

    # -- create ---------------------------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec) -> Instance:
        if not _HOSTNAME.match(spec.hostname):
            raise InvalidRequest("hostname must be letters, digits, dots and dashes (at most 63)")
        try:
            return await super().create(spec)
        except Timeout as exc:  # the skeleton removed everything; the console went to the log first
            raise RuntimeFailure(
                f"the microVM did not start its agent within {self.ready_timeout:g} s "
                "(the guest console is in the server log)",
                details={"stage": "boot"},
            ) from exc

    def prepare(self, spec: SandboxSpec, sandbox: LocalSandbox) -> ShimSpec:
        """The writable disk, ``vm.json`` and the shim spec (the skeleton cleans up on failure)."""
        if len(sandbox.socket) > MAX_SOCKET_PATH or len(sandbox.control) > MAX_SOCKET_PATH:
            raise RuntimeUnavailable("the runtime state directory path is too long for a Unix socket")
        state_dir = sandbox.state_dir
        sandbox.extra["booting"] = True  # until the agent said hello: a failed boot logs the console
        sandbox.extra["engine"] = self.engine.name
        (state_dir / CHECKPOINT_DIR).mkdir(mode=0o700)
        upper = state_dir / "upper.qcow2"
        incoming: Path | None = None
        net = sandbox_net(sandbox)
        if net is not None and spec.restore_from is not None:
            raise Unsupported(
                "a microVM restored from a memory image cannot have network; create it with network='none'"
            )
        if spec.restore_from is not None:
            memory = spec.restore_from.path
            config = hostside.restored_config(spec, memory, upper)
            incoming = memory / "memory"
            # a restored agent says no new hello: keep its first one here, for snapshots of this sandbox
            shutil.copyfile(memory / "hello.frame", state_dir / "hello.frame")
        else:
            config = self._fresh_config(spec, self.bundle, self._ensure_guest(), upper, net)
            if net is not None:  # its NIC: a tap bridged to the sandbox's veth, in the netns QEMU runs in
                _netns.attach_tap(net.plan)  # makes _netns.TAP
            if spec.upper_seed is not None:
                disks.copy_upper(hostside.disk_seed(spec.upper_seed), upper)
            else:
                size = spec.limits.disk_mb or disks.DEFAULT_DISK_MB
                disks.make_upper(upper, disks.ensure_empty_ext4(self.cache_dir, size))
                # a VM with network has its own addresses on its kernel command line: no shared shape
                golden = self._golden_dir(config, size) if self.options.golden and net is None else None
                if golden is not None and (golden / "memory").exists():  # this shape booted before: restore
                    config = hostside.restored_config(spec, golden, upper)
                    incoming = golden / "memory"
                    shutil.copyfile(golden / "hello.frame", state_dir / "hello.frame")
                elif golden is not None:
                    sandbox.extra["golden"] = str(golden)  # started() captures this boot for the next ones
        config.save(state_dir / "vm.json")
        image = state_dir / CHECKPOINT_DIR / "memory"
        binary = self.host
        # the VMM's own unprivileged uid (recorded first: a failure below releases it)
        sandbox.extra["uid_slot"] = slot = UidAllocator(self.config.state_root).allocate(spec.sandbox_id)
        uid = UidAllocator.base(slot)
        boot = self.engine.launch(binary, config, state_dir, uid=uid, incoming=incoming)
        restore = self.engine.launch(binary, config, state_dir, uid=uid, incoming=image)
        return ShimSpec(
            argv=boot.argv,
            files=boot.files,
            socket=sandbox.socket,
            control=sandbox.control,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            deadline=spec.deadline,
            restored=incoming is not None,
            hello_file=str(state_dir / "hello.frame") if incoming is not None else None,
            checkpoint_argv=self.engine.checkpoint_argv(sys.executable, state_dir, image),
            restore_argv=restore.argv,
            restore_files=restore.files,
            announce_restore=True,
            netns=net.plan.netns_path if net is not None else None,
        )

    async def started(self, spec: SandboxSpec, sandbox: LocalSandbox) -> None:
        golden = sandbox.extra.pop("golden", None)
        if golden is not None:  # a fresh boot nobody has talked to yet: the golden image of its shape
            await _round_trip(sandbox.socket)
            await self._capture_golden(sandbox.state_dir, Path(golden))
        await anyio.to_thread.run_sync(self.engine.quiet_console, sandbox.state_dir)
        sandbox.extra.pop("booting", None)

    def _golden_dir(self, config: VmConfig, disk_mb: int) -> Path:
        """Where the golden image of machines like ``config`` is kept: keyed by everything the guest saw at
        boot (kernel, initramfs, the content-keyed disk images, the empty disk's size, memory, vCPUs and the
        init's arguments), so a change to any of them means a new boot."""
        shape = json.loads(config.with_upper("").to_json())
        shape["upper_backing"] = str(disks.ensure_empty_ext4(self.cache_dir, disk_mb))
        shape["capture"] = GOLDEN_FORMAT
        key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:24]
        return self.config.cache_root / "microvm-golden" / key  # with the data dir: it holds an agent bundle

    async def _capture_golden(self, state_dir: Path, golden: Path) -> None:
        """Stop, save, continue (~0.5 s under TCG); published atomically, so concurrent first boots of
        one shape are harmless (one image wins). A failure costs only the speed-up, never the sandbox."""
        tmp = golden.with_name(f".{golden.name}-{os.getpid()}-{threading.get_ident()}")
        try:
            await anyio.to_thread.run_sync(hostside.private_dirs, tmp)
            try:
                await anyio.to_thread.run_sync(
                    partial(self.engine.save_memory, state_dir, tmp / "memory", then_quit=False)
                )
                await anyio.to_thread.run_sync(hostside.capture, state_dir, tmp)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.engine.resume, state_dir)
            await anyio.to_thread.run_sync(hostside.publish, tmp, golden)
        except (OSError, RuntimeFailure) as exc:
            log.warning("could not keep a golden image of a microVM: %s", exc)
        finally:
            await anyio.to_thread.run_sync(partial(shutil.rmtree, tmp, ignore_errors=True))

    def _fresh_config(
        self, spec: SandboxSpec, bundle: AgentBundle, guest: Guest, upper: Path, net: SandboxNet | None
    ) -> VmConfig:
        rootfs = host_layers(spec, self.name)
        vcpus = max(1, math.ceil(spec.limits.cpus))
        images: list[Disk] = []
        args = {"pids": str(spec.limits.pids), "hostname": spec.hostname, "loader": bundle.loader_name}
        if net is not None:  # the guest's /init addresses eth0 with what the namespace's end of the veth had
            plan = net.plan
            args.update(net4=f"{plan.guest_ip}/{plan.prefix}", gw4=plan.host_ip)
            if plan.guest_ip6 is not None and plan.host_ip6 is not None:
                args.update(net6=f"{plan.guest_ip6}/{plan.prefix6}", gw6=plan.host_ip6)
        if spec.limits.cpus < vcpus:  # a fraction of a vCPU: the guest cgroup's cpu.max
            args["cpu"] = str(max(1000, int(spec.limits.cpus * 100_000)))
        for index, layer in enumerate(rootfs.lower):
            images.append(
                Disk(serial=f"corral-l{index}", path=str(disks.ensure_erofs(self.config.cache_root, layer)))
            )
            args[f"l{index}"] = "1"
        for index, bind in enumerate(rootfs.binds):
            if not bind.target.startswith("/") or any(c.isspace() or c == "," for c in bind.target):
                raise InvalidRequest(f"bind target {bind.target!r} cannot be given to a microVM")
            path = disks.ensure_erofs(self.cache_dir, bind.source, tree=True)
            images.append(Disk(serial=f"corral-b{index}", path=str(path)))
            args[f"b{index}"] = bind.target
        images.append(Disk(serial=UPPER_SERIAL, path=str(upper), format="qcow2", readonly=False))
        images.append(
            Disk(serial=AGENT_SERIAL, path=str(disks.ensure_erofs(self.config.cache_root, bundle.path)))
        )
        return VmConfig(
            kernel=str(guest.kernel),
            initramfs=str(guest.initramfs),
            memory_mb=spec.limits.memory_mb,
            vcpus=vcpus,
            disks=tuple(images),
            args=args,
            nic=_netns.TAP if net is not None else None,
        )

    # -- operations on a running sandbox --------------------------------------------------------------------
    async def pause(self, instance: Instance) -> None:
        sandbox = LocalSandbox.of(instance)
        if not await anyio.to_thread.run_sync(sandbox.state_dir.exists):
            raise RuntimeFailure("could not pause the microVM: it no longer exists")
        if self.options.pause == "disk":
            await anyio.to_thread.run_sync(hostside.clear_dir, sandbox.state_dir / CHECKPOINT_DIR)
            await _shimctl.control(
                sandbox.control,
                sandbox.socket,
                "checkpoint",
                what="pause the microVM",
                timeout=CHECKPOINT_TIMEOUT,
            )
        else:
            await anyio.to_thread.run_sync(self.engine.pause, sandbox.state_dir)

    async def resume(self, instance: Instance) -> None:
        sandbox = LocalSandbox.of(instance)
        if await anyio.to_thread.run_sync((sandbox.state_dir / "paused").exists):  # paused to disk
            await _shimctl.control(
                sandbox.control,
                sandbox.socket,
                "restore",
                what="resume the microVM",
                timeout=CHECKPOINT_TIMEOUT,
            )
        else:
            await anyio.to_thread.run_sync(self.engine.resume, sandbox.state_dir)

    async def snapshot(self, instance: Instance, key: str) -> Snapshot:
        """Stop, write memory + device state and a copy of the writable disk below
        ``cache_root/snapshots/KEY``, continue: a DISK and a MEMORY artifact (a fork restores both)."""
        sandbox = LocalSandbox.of(instance)
        if "/" in key or key in ("", ".", ".."):
            raise InvalidRequest("a snapshot key is one path component")
        if sandbox_net(sandbox) is not None:  # its image holds a NIC on a tap only this sandbox has
            raise Unsupported(
                "microVM sandboxes with network cannot be snapshotted or forked yet; use network='none' for "
                "those (pause and resume keep the network)"
            )
        if await anyio.to_thread.run_sync((sandbox.state_dir / "paused").exists):
            raise Conflict("resume the microVM before taking a snapshot of it")
        dest = self.config.cache_root / SNAPSHOTS / key
        memory = dest / "memory"
        try:
            await anyio.to_thread.run_sync(hostside.private_dirs, memory)
            try:
                await anyio.to_thread.run_sync(
                    partial(self.engine.save_memory, sandbox.state_dir, memory / "memory", then_quit=False)
                )
                await anyio.to_thread.run_sync(hostside.capture, sandbox.state_dir, memory)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.engine.resume, sandbox.state_dir)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(partial(shutil.rmtree, dest, ignore_errors=True))
            raise
        return Snapshot(
            files=Artifact.at(ArtifactKind.DISK, memory / "upper.qcow2", runtime=self.name),
            memory=Artifact.at(ArtifactKind.MEMORY, memory, runtime=self.name),
        )

    async def discard(self, snapshot: Snapshot) -> None:
        roots = {
            a.path.parent.parent if a.kind is ArtifactKind.DISK else a.path.parent
            for a in (snapshot.files, snapshot.memory)
            if a is not None
        }
        for root in roots:
            if root.parent != self.config.cache_root / SNAPSHOTS:
                raise InvalidRequest("that snapshot was not made by this runtime")
            await anyio.to_thread.run_sync(partial(shutil.rmtree, root, ignore_errors=True))

    async def refine_running(self, sandbox: LocalSandbox) -> Observed:
        status = await anyio.to_thread.run_sync(self.engine.status, sandbox.state_dir)
        if status in ("paused", "postmigrate", "finish-migrate"):
            return Observed(state=ObservedState.PAUSED)
        if status is None and not await anyio.to_thread.run_sync(hostside.vm_processes, sandbox.state_dir):
            return Observed(state=ObservedState.EXITED)  # the shim records the exit in a moment
        return Observed(state=ObservedState.RUNNING)

    # -- teardown hooks -------------------------------------------------------------------------------------
    def kill_sandbox(self, sandbox: LocalSandbox) -> None:
        """SIGKILL the VMM (and a checkpoint helper): the shim records the exit and leaves by itself."""
        if sandbox.extra.get("booting"):
            hostside.log_console(sandbox.sandbox_id, sandbox.state_dir)
        deadline = time.monotonic() + STOP_TIMEOUT
        while pids := hostside.vm_processes(sandbox.state_dir):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeFailure("could not stop the microVM", details={"left": len(pids)})
            time.sleep(_POLL)  # bounded; dying processes we do not parent have no event to wait on

    def release(self, sandbox: LocalSandbox) -> None:
        slot = sandbox.extra.get("uid_slot")
        if slot is not None:
            UidAllocator(self.config.state_root).release(int(slot), sandbox.sandbox_id)

    def shim_exits_by_itself(self, sandbox: LocalSandbox) -> bool:
        return not (sandbox.state_dir / "paused").exists()  # paused to disk: no VMM whose exit ends the shim


async def _round_trip(socket: str) -> None:
    """One ping answered by the agent before a golden image is taken. Measured here under TCG: an image
    saved at the agent's hello makes every restore of it wait ~0.9 s, idle, for its first answer (the guest
    is still between its boot and its first request); one saved after a round trip answers 0.1 s after
    the restore. The ping goes through the shim like any client's, and says nothing to the sandbox."""
    stream = await _shimctl.connect(socket)
    try:
        with anyio.fail_after(GOLDEN_PING_TIMEOUT):
            await stream.send(encode({"id": "corral-golden", "op": "ping"}))
            decoder = Decoder()
            while True:
                frames = decoder.feed(await stream.receive())
                if any(f.get("id") == "corral-golden" for f in frames):
                    return
    except (OSError, TimeoutError, anyio.EndOfStream, ProtocolError):
        log.warning("the agent of a microVM did not answer before its golden image was taken")
    finally:
        await stream.aclose()
