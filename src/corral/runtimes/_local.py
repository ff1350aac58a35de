"""The skeleton every local runtime shares: one sandbox = one state dir + one shim on this host.

A local runtime (namespace, gvisor, fake, and the microVM runtime) runs each sandbox under a host-side shim
(:mod:`._shim`) that holds the agent's stdio, relays the agent protocol on ``STATE_DIR/agent.sock``, answers
its own control channel on ``STATE_DIR/control.sock`` (the hard deadline, checkpoint/restore) and records
``exit.json``. What differs between runtimes is only what the shim runs and what else the sandbox holds on
the host (cgroups, a uid range, runsc's processes, a VM's disks); this class does the rest once:

- **create**: host check (once per process), agent bundle, the private state dir (``Conflict`` if it exists),
  the shim started through the per-process launcher, ready wait, the :class:`~.base.Instance`; on any failure
  or cancellation the same teardown as :meth:`destroy`, shielded;
- **the Instance**: ``ref`` is the state dir, ``extra`` holds ``shim_pid``/``shim_start_ticks`` and what the
  subclass records in :attr:`LocalSandbox.extra` while it prepares (read back with
  :meth:`LocalSandbox.of`); ``node`` is ``RuntimeConfig.node``;
- **teardown order** (idempotent, needs nothing but the Instance, runs in a worker thread): stop the
  sandbox's own processes (hook), stop the shim (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`), remove
  its cgroup (hook), remove its egress stack (netns, veth, nft table, egress process: :mod:`._net.stack`),
  wait for a disk-quota loop device to detach, refuse to delete through a mount, remove the state dir, then
  release what lives outside it (hook);
- **inspect**: missing / exited (``exit.json``, ``oom`` when the cgroup counted OOM kills) / crashed (a dead
  shim) / paused (the shim's ``paused`` marker) / running, refined by a hook (freezer state, ``runsc state``);
- **network** (``Capabilities.network_policy``): a spec with a policy gets its egress stack before
  ``prepare`` (recorded as ``extra["net"]``, see :func:`sandbox_net`), which joins it; ``update_network``,
  ``network_stats``, ``network_decisions``;
- **set_deadline**, **export_layer**, **snapshot** (state dir → ``cache_root/snapshots/KEY``, removed again
  on failure), **discard**.

Extension points, for a new local runtime (a VM engine plugs in here; nothing else needs to change):

- class attributes ``name``, ``capabilities``, ``Options`` (a frozen dataclass of its ``[runtime.<name>]``
  table, given as ``self.options``), ``ready_timeout`` (create → agent hello), ``uses_bundle`` (the agent
  bundle is built before ``prepare``; it is then ``self.bundle``), ``state_dir_mode``;
- ``check_host()`` (blocking, once): raise ``RuntimeUnavailable`` naming the fix, or return facts ``prepare``
  needs (binaries found, a cgroup layout, ...), kept as ``self.host``;
- ``prepare(spec, sandbox)`` (blocking): make everything the sandbox needs below ``sandbox.state_dir`` (and
  record anything made elsewhere in ``sandbox.extra`` *first*, so a failure half-way is cleaned up), return
  the :class:`~._shimspec.ShimSpec`: ``argv`` is what the shim runs with the agent's channel on that
  process's stdio (bwrap → the agent; ``runsc run``; a VMM whose guest agent's serial port is its stdio,
  e.g. QEMU ``-chardev stdio`` on a virtio-serial port), ``socket=sandbox.socket``,
  ``control=sandbox.control``, ``deadline=spec.deadline``, and where the runtime pauses to disk
  ``checkpoint_argv``/``restore_argv`` (driven through the control channel) and a ``kill_argv``;
- ``started(spec, sandbox)`` (async): checks after the agent said hello (gVisor: the memory limit is in force);
- ``kill_sandbox(sandbox)``, ``cgroup(sandbox)``, ``release(sandbox)`` (blocking): the teardown hooks above;
  ``shim_exits_by_itself(sandbox)``: True when killing the sandbox ends the shim (no SIGTERM needed);
- ``refine_running(sandbox)`` (async): RUNNING or PAUSED for a sandbox whose shim is up;
- ``pause``/``resume`` (default: Unsupported), ``capture(sandbox, dest)`` (async: hold the sandbox still and
  write the snapshot's ``layer/``, and ``memory/`` where declared, below ``dest``; returns whether memory was
  captured), ``layer_id_base(sandbox)`` (the host
  uid of in-sandbox root, for :meth:`export_layer`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from corral.errors import Conflict, InvalidRequest, RuntimeFailure, Unsupported
from corral.ids import SandboxId
from corral.netpolicy import NetworkPolicy
from corral.runtimes import _proc, _rootfs, _shimctl
from corral.runtimes._bundle import AgentBundle, ensure_bundle
from corral.runtimes._cgroups import REMOVE_TIMEOUT, CgroupBusy, SandboxCgroup
from corral.runtimes._deferred import Deferred
from corral.runtimes._net import stack as _net
from corral.runtimes._net.stack import SandboxNet
from corral.runtimes._shimspec import ShimSpec
from corral.runtimes.base import (
    Artifact,
    ArtifactKind,
    ByteStream,
    Capabilities,
    HostLayers,
    Instance,
    NoOptions,
    Observed,
    ObservedState,
    RuntimeConfig,
    SandboxSpec,
    Snapshot,
)

__all__ = [
    "STOP_TIMEOUT",
    "LocalRuntime",
    "LocalSandbox",
    "host_layers",
    "refuse_if_mounted",
    "sandbox_net",
    "wait_loop_released",
]

log = logging.getLogger("corral.runtimes.local")

STOP_TIMEOUT = 5.0  # SIGTERM/SIGKILL → processes gone, before escalating; they normally go within ms
LOOP_RELEASE_TIMEOUT = 5.0  # a disk-quota loop device detaches just after the sandbox's last task exits
_POLL = 0.005  # polling processes we do not parent and loop devices: neither has an event to wait on
SNAPSHOTS = "snapshots"  # below cache_root: one directory per snapshot key

HostT = TypeVar("HostT")


@dataclass(kw_only=True)
class LocalSandbox:
    """The host-side view of one local sandbox: what an :class:`~.base.Instance` of a local runtime means."""

    sandbox_id: SandboxId
    state_dir: Path
    shim: _shimctl.ShimHandle | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # runtime facts, persisted in Instance.extra

    @property
    def socket(self) -> str:
        return str(self.state_dir / "agent.sock")

    @property
    def control(self) -> str:
        return str(self.state_dir / "control.sock")

    @classmethod
    def of(cls, instance: Instance) -> LocalSandbox:
        extra = dict(instance.extra)
        pid, ticks = extra.pop("shim_pid", None), extra.pop("shim_start_ticks", None)
        shim = _shimctl.ShimHandle(int(pid), int(ticks)) if pid is not None and ticks is not None else None
        return cls(sandbox_id=instance.sandbox_id, state_dir=Path(instance.ref), shim=shim, extra=extra)


class LocalRuntime(Generic[HostT]):
    """The shared skeleton; see the module docstring for what a subclass provides."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    Options: ClassVar[type[Any]] = NoOptions
    ready_timeout: ClassVar[float] = 60.0
    uses_bundle: ClassVar[bool] = True
    state_dir_mode: ClassVar[int] = 0o700  # private: env values, logs and the sandbox's files are below it

    def __init__(self, config: RuntimeConfig, options: Any = None) -> None:
        self.config = config
        self.options = options if options is not None else self.Options()
        self._host: HostT | None = None
        self._checked = False
        self._bundle: AgentBundle | None = None
        # kills whose host clean-up the kernel held up (runtimes/_deferred.py), finished by the reaper
        self._deferred = Deferred(config.state_root, self.name, self._teardown_json)

    # -- hooks ------------------------------------------------------------------------------------------------
    def check_host(self) -> HostT:
        raise NotImplementedError

    def prepare(self, spec: SandboxSpec, sandbox: LocalSandbox) -> ShimSpec:
        raise NotImplementedError

    async def started(self, spec: SandboxSpec, sandbox: LocalSandbox) -> None:
        return None

    def kill_sandbox(self, sandbox: LocalSandbox) -> None:
        return None

    def shim_exits_by_itself(self, sandbox: LocalSandbox) -> bool:
        return False

    def cgroup(self, sandbox: LocalSandbox) -> SandboxCgroup | None:
        return None

    def release(self, sandbox: LocalSandbox) -> None:
        return None

    async def refine_running(self, sandbox: LocalSandbox) -> Observed:
        return Observed(state=ObservedState.RUNNING)

    async def capture(self, sandbox: LocalSandbox, dest: Path) -> bool:
        raise Unsupported(f"{self.name} sandboxes cannot be snapshotted")

    def layer_id_base(self, sandbox: LocalSandbox) -> int:
        return 0

    async def pause(self, instance: Instance) -> None:
        raise Unsupported(f"{self.name} sandboxes cannot be paused")

    async def resume(self, instance: Instance) -> None:
        raise Unsupported(f"{self.name} sandboxes cannot be resumed")

    # -- host check and shared assets -------------------------------------------------------------------------
    async def check(self) -> None:
        await self.host_facts()

    async def host_facts(self) -> HostT:
        if not self._checked:
            self._host = await anyio.to_thread.run_sync(self.check_host)
            self._checked = True
        return self.host

    @property
    def host(self) -> HostT:
        assert self._checked, "host_facts() runs before prepare()"
        return self._host  # type: ignore[return-value]  # set with _checked

    @property
    def bundle(self) -> AgentBundle:
        assert self._bundle is not None, "the bundle is built before prepare() (uses_bundle)"
        return self._bundle

    # -- create -----------------------------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec) -> Instance:
        await self.host_facts()
        await self.finish_teardowns()  # embedded mode has no reaper: leftovers of earlier kills go here
        if self.uses_bundle and self._bundle is None:
            self._bundle = await anyio.to_thread.run_sync(ensure_bundle, self.config.cache_root)
        sandbox = LocalSandbox(sandbox_id=spec.sandbox_id, state_dir=self.config.state_root / spec.sandbox_id)
        await anyio.to_thread.run_sync(self._make_state_dir, sandbox)
        try:
            if spec.network.enabled:  # the sandbox's link, rules and egress process; joined in prepare()
                if not self.capabilities.network_policy:
                    raise Unsupported(f"{self.name} sandboxes have no network; create it with network='none'")
                net = await _net.setup(
                    spec.sandbox_id,
                    sandbox.state_dir / "net",
                    spec.network,
                    self.config.egress,
                    wait=False,
                    secrets=dict(spec.egress_secrets) if spec.egress_secrets else None,
                )
                sandbox.extra["net"] = net.to_json()
            shim_spec = await anyio.to_thread.run_sync(self.prepare, spec, sandbox)
            # held from here on, so a teardown after a failure (or a cancel) knows which shim to wait for
            sandbox.shim = _shimctl.launcher.spawn(sandbox.state_dir, shim_spec)
            await _shimctl.launcher.wait_ready(
                sandbox.shim, what=f"start the {self.name} sandbox", timeout=self.ready_timeout
            )
            await self.started(spec, sandbox)
            egress = sandbox_net(sandbox)
            if egress is not None:  # it started listening while the sandbox booted
                await _net.ready(egress)
            # a cancel that arrived while a worker thread ran is only seen at the next checkpoint: take it
            # here, inside the clean-up scope, or the caller would vanish and leave a running sandbox behind
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._teardown_or_defer, sandbox)
            raise
        return self.instance(sandbox)

    def instance(self, sandbox: LocalSandbox) -> Instance:
        assert sandbox.shim is not None
        return Instance(
            sandbox_id=sandbox.sandbox_id,
            runtime=self.name,
            node=self.config.node,
            ref=str(sandbox.state_dir),
            extra={
                **sandbox.extra,
                "shim_pid": sandbox.shim.pid,
                "shim_start_ticks": sandbox.shim.start_ticks,
            },
        )

    def _make_state_dir(self, sandbox: LocalSandbox) -> None:
        self.config.state_root.mkdir(parents=True, exist_ok=True)
        try:
            sandbox.state_dir.mkdir(mode=self.state_dir_mode)
        except FileExistsError as exc:
            raise Conflict(f"sandbox {sandbox.sandbox_id} already exists on this host") from exc

    # -- operations on a running sandbox --------------------------------------------------------------------
    async def connect(self, instance: Instance) -> ByteStream:
        return await _shimctl.connect(LocalSandbox.of(instance).socket)

    async def set_deadline(self, instance: Instance, deadline: float | None) -> None:
        sandbox = LocalSandbox.of(instance)
        await _shimctl.control(
            sandbox.control, sandbox.socket, "deadline", what="move the sandbox's deadline", deadline=deadline
        )

    async def inspect(self, instance: Instance) -> Observed:
        sandbox = LocalSandbox.of(instance)
        observed = await anyio.to_thread.run_sync(self._observe, sandbox)
        if observed.state is not ObservedState.RUNNING:
            return observed
        refined = await self.refine_running(sandbox)
        if refined.state is ObservedState.EXITED:  # it ended just now: the shim records why in a moment
            return await anyio.to_thread.run_sync(self._observe, sandbox)
        return refined

    def _observe(self, sandbox: LocalSandbox) -> Observed:
        if not sandbox.state_dir.exists():
            return Observed(state=ObservedState.MISSING)
        shim = sandbox.shim or _shimctl.ShimHandle(0, 0)
        observed = _shimctl.observe(sandbox.state_dir, shim)
        if observed.state is ObservedState.RUNNING and (sandbox.state_dir / "paused").exists():
            return Observed(state=ObservedState.PAUSED)  # checkpointed: the shim holds it on disk
        if observed.state is ObservedState.EXITED and observed.reason in ("exited", "killed"):
            cgroup = self.cgroup(sandbox)
            with contextlib.suppress(OSError):
                if cgroup is not None and cgroup.oom_kills() > 0:
                    return Observed(state=ObservedState.EXITED, exit_code=observed.exit_code, reason="oom")
        return observed

    async def destroy(self, instance: Instance) -> None:
        """Remove everything of the sandbox (see the module docstring). Shielded: a teardown asked for inside
        a cancelled scope (a caller's deadline passed) still runs."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._teardown_or_defer, LocalSandbox.of(instance))

    async def finish_teardowns(self) -> int:
        """Finish the teardowns the kernel held up (:class:`~.base.TeardownFinisher`: the reaper calls it)."""
        await anyio.to_thread.run_sync(self._deferred.retry)
        return len(await anyio.to_thread.run_sync(self._deferred.pending))

    def _teardown_or_defer(self, sandbox: LocalSandbox) -> None:
        """:meth:`_teardown`; one whose cgroup the kernel has not let go of yet is kept on disk and finished
        later, so a kill never fails because the host is slow to reap the sandbox's tasks."""
        extra = dict(sandbox.extra)
        if sandbox.shim is not None:
            extra.update(shim_pid=sandbox.shim.pid, shim_start_ticks=sandbox.shim.start_ticks)
        ref = Instance(
            sandbox_id=sandbox.sandbox_id,
            runtime=self.name,
            node=self.config.node,
            ref=str(sandbox.state_dir),
            extra=extra,
        )
        self._deferred.run(sandbox.sandbox_id, {"instance": ref.to_json()})

    def _teardown_json(self, *, instance: str, wait: float = REMOVE_TIMEOUT) -> None:
        self._teardown(LocalSandbox.of(Instance.from_json(instance)), wait=wait)

    def _teardown(self, sandbox: LocalSandbox, *, wait: float = REMOVE_TIMEOUT) -> None:
        self.kill_sandbox(sandbox)
        shim = sandbox.shim
        if shim is not None and _proc.pid_alive(shim.pid, shim.start_ticks):
            if not self.shim_exits_by_itself(sandbox):
                _proc.kill_pid(
                    shim.pid, shim.start_ticks, signal.SIGTERM
                )  # it kills the sandbox, records exit
            deadline = time.monotonic() + STOP_TIMEOUT
            while _proc.pid_alive(shim.pid, shim.start_ticks) and time.monotonic() < deadline:
                time.sleep(_POLL)  # bounded: the shim exits within milliseconds of its sandbox
            _proc.kill_pid(shim.pid, shim.start_ticks, signal.SIGKILL)
        if shim is not None:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(shim.pid, os.WNOHANG)  # reap it if this process started it
        cgroup = self.cgroup(sandbox)
        if cgroup is not None:
            try:
                # kills whatever is left: the private mount namespace dies with its last task
                cgroup.remove(wait)
            except CgroupBusy:
                raise  # its tasks are still exiting: the caller finishes this teardown later
            except OSError as exc:
                log.error("sandbox %s: could not remove its cgroups: %s", sandbox.sandbox_id, exc)
                raise RuntimeFailure("could not remove the sandbox's cgroups") from exc
        net = sandbox_net(sandbox)
        if net is not None:  # its processes are gone: now its link, rules and egress process
            _net.teardown_blocking(net)
        if sandbox.state_dir.exists():
            wait_loop_released(sandbox.state_dir / "disk.img")
            refuse_if_mounted(sandbox.state_dir)
            _rootfs.remove_state_dir(sandbox.state_dir)
        self.release(sandbox)

    # -- network (NetworkController, where Capabilities.network_policy) ------------------------------------
    async def update_network(self, instance: Instance, policy: NetworkPolicy) -> int:
        return await _net.update(_required_net(instance), policy, self.config.egress)

    async def network_stats(self, instance: Instance) -> dict[str, Any]:
        return await _net.stats(_required_net(instance))

    async def network_decisions(self, instance: Instance, offset: int) -> tuple[list[dict[str, Any]], int]:
        net = sandbox_net(LocalSandbox.of(instance))
        if net is None:
            return [], offset
        return await _net.decisions(net, offset)

    # -- file system ----------------------------------------------------------------------------------------
    async def export_layer(self, instance: Instance, dest: Path) -> None:
        """The writable layer as a template layer (see :func:`._rootfs.export_upper`); not with a disk quota,
        whose upper dir is visible only inside the sandbox's own mount namespace."""
        sandbox = LocalSandbox.of(instance)
        fs = sandbox.state_dir / "fs"
        if (fs / "disk").exists() or not (fs / "upper").is_dir():
            raise InvalidRequest("only sandboxes without a disk quota can be saved as a layer")
        await anyio.to_thread.run_sync(
            partial(_rootfs.export_upper, fs / "upper", dest, id_base=self.layer_id_base(sandbox))
        )

    async def snapshot(self, instance: Instance, key: str) -> Snapshot:
        """Capture into ``cache_root/snapshots/KEY`` (``layer/``, and ``memory/`` where the runtime can)."""
        sandbox = LocalSandbox.of(instance)
        if ArtifactKind.LAYER not in self.capabilities.snapshot:
            raise Unsupported(f"{self.name} sandboxes cannot be snapshotted or forked")
        if (sandbox.state_dir / "disk.img").exists():
            raise Unsupported(f"snapshots of {self.name} sandboxes with a disk quota are not supported yet")
        if "/" in key or key in ("", ".", ".."):
            raise InvalidRequest("a snapshot key is one path component")
        dest = self.config.cache_root / SNAPSHOTS / key
        await anyio.to_thread.run_sync(partial(dest.parent.mkdir, mode=0o700, parents=True, exist_ok=True))
        try:
            await anyio.to_thread.run_sync(partial(dest.mkdir, mode=0o700))
            memory = await self.capture(sandbox, dest)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(partial(shutil.rmtree, dest, ignore_errors=True))
            raise
        return Snapshot(
            files=Artifact.at(ArtifactKind.LAYER, dest / "layer", runtime=self.name),
            memory=Artifact.at(ArtifactKind.MEMORY, dest / "memory", runtime=self.name) if memory else None,
        )

    async def discard(self, snapshot: Snapshot) -> None:
        roots = {a.path.parent for a in (snapshot.files, snapshot.memory) if a is not None}
        for root in roots:
            if root.parent != self.config.cache_root / SNAPSHOTS:
                raise InvalidRequest("that snapshot was not made by this runtime")
            await anyio.to_thread.run_sync(partial(shutil.rmtree, root, ignore_errors=True))


def sandbox_net(sandbox: LocalSandbox) -> SandboxNet | None:
    """The sandbox's egress stack, if it was created with network."""
    data = sandbox.extra.get("net")
    return SandboxNet.from_json(data) if data is not None else None


def _required_net(instance: Instance) -> SandboxNet:
    net = sandbox_net(LocalSandbox.of(instance))
    if net is None:
        raise Unsupported(
            "this sandbox was created without network (network='none') and cannot get it later; "
            "create it with a policy, e.g. network={'allow_out': []}, to change its network at runtime"
        )
    return net


def host_layers(spec: SandboxSpec, runtime: str) -> HostLayers:
    """The spec's root file system as host layers, which the overlay-based runtimes need."""
    if not isinstance(spec.rootfs, HostLayers):
        raise Unsupported(f"the {runtime} runtime starts sandboxes from host layers, not {spec.rootfs.kind}")
    return spec.rootfs


def wait_loop_released(image: Path) -> None:
    """A disk-quota sandbox's loop device detaches itself (autoclear) once the mount namespace holding it is
    gone, which the kernel finishes just after the sandbox's last task exits. Wait for it, briefly."""
    if not image.exists():
        return
    deadline = time.monotonic() + LOOP_RELEASE_TIMEOUT
    while time.monotonic() < deadline:
        in_use = False
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            with contextlib.suppress(OSError):
                in_use = in_use or backing.read_text().strip() == str(image)
        if not in_use:
            return
        time.sleep(_POLL)  # bounded; loop detach has no event we can wait on
    log.warning("a loop device still uses %s after the sandbox ended", image)


def refuse_if_mounted(path: Path) -> None:
    """Never ``rm -r`` through a mount (a bound host ``/usr``): a sandbox's mounts live in its own mount
    namespace, so one showing up in ours means something is badly wrong, and we stop instead of deleting."""
    prefix = str(path.resolve()) + "/"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point.startswith(prefix):
            log.error("sandbox state dir %s still has a mount at %s", path, mount_point)
            raise RuntimeFailure("the sandbox's state directory still has mounts; refusing to delete it")
