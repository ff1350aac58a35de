"""The ``gvisor`` runtime: gVisor's user-space kernel (``runsc``) over a plain OCI bundle, no Docker.

One sandbox, from the outside in:

1. the **shim** (:mod:`._shim`) forks ``runsc run`` in the foreground, with the agent's stdio as pipes (runsc
   hands its own stdio to the container's init, which is the agent). Foreground ``run`` is one runsc process
   instead of three: measured here, ``run`` boots in ~150 ms where ``create`` + ``start`` + ``wait`` took
   ~1.8 s (``wait`` polls), and stdio pipes are the agent transport that survives ``runsc checkpoint`` /
   ``restore`` (research/runtimes.md §2.1), which a later ``restore`` start mode reuses as is;
2. before exec, the shim's child enters a **private mount namespace** and mounts the per-sandbox
   **overlayfs** there (template layers read-only, the upper dir on disk under the state dir; with
   ``Limits.disk_mb`` on a loop-mounted ext4 image of that size, so a full disk is ENOSPC). runsc serves
   that merged dir as the sandbox's writable root, so writes land in the upper dir, visible to the host for
   file-system snapshots, and the mount vanishes with the sandbox: nothing enters the host's mount table;
3. ``runsc`` with **one set of global flags**, stored in the :class:`Instance` and reused by every later
   command (``state``, ``pause``, ``kill``): a ``--root`` of its own per sandbox (runsc matches container ids
   by prefix, and parallel deletes on a shared root orphaned sandboxes), ``--platform=ptrace`` (kvm hangs on
   this host, systrap idles hot), ``--network=none`` (loopback only; no netstack) unless the sandbox has a
   network policy: then ``--network=sandbox`` (gVisor's own netstack on the veth of the namespace the
   skeleton prepared, named in the OCI spec; ``/proc/sys/net`` is hidden in the shim's mount namespace for
   the kernel ≥ 6.11 detection bug) with the same egress path as the namespace runtime; and a debug log in
   the state dir, never on the client path;
4. the OCI spec (:mod:`._oci`): the agent as init (uid 0, Docker-like capabilities without NET_RAW, MKNOD,
   SYS_ADMIN; no_new_privs), the bundle at ``/.corral`` and template binds (host ``/usr``) read-only,
   cgroup limits in ``linux.resources`` under ``cgroupsPath`` ``/corral/<sandbox id>``, and
   ``RLIMIT_NPROC`` as the guest-level process cap.

Teardown does not use ``runsc delete`` (1.2-2 s here). The sandbox's host processes are exactly those whose
argv names its private ``--root`` (``runsc run``, the gofer, the sentry and its ptrace stubs) plus the members
of its cgroups; destroy SIGKILLs them, removes the cgroups and the state dir. Nothing else of runsc persists,
so this is complete, takes ~30 ms, and needs nothing but the :class:`Instance` (safe from any process).

Known limits (runsc 0.0~20221219, Debian 12): ``statx()`` with ``AT_NO_AUTOMOUNT`` fails with EINVAL, so
Debian 12's ``ls``/``stat``/``mount`` fail on every path (runsc 20240729 from bookworm-backports fixes it;
pass ``runsc=`` to use another binary). The sentry has no OOM killer: a host OOM kill would end the whole
sandbox, so the agent kills the process that reached the limit itself and the host cgroup has headroom above
it (:func:`memory_headroom_mb`). A host OOM kill that still happens ends the sandbox, reported as an exit
with code 137, not as ``reason="oom"`` (runsc removes the cgroup, and its counters, on its way out).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from corral.errors import Conflict, InvalidRequest, RuntimeFailure, RuntimeUnavailable, Unsupported
from corral.runtimes import _layers, _oci, _proc, _rootfs, _shimctl
from corral.runtimes._bundle import MOUNT_POINT, AgentBundle, agent_argv
from corral.runtimes._cgroups import SandboxCgroup
from corral.runtimes._local import STOP_TIMEOUT, LocalRuntime, LocalSandbox, host_layers, sandbox_net
from corral.runtimes._net.stack import SandboxNet
from corral.runtimes._rootfs import LayerDirs
from corral.runtimes._shimspec import Mount, ShimSpec
from corral.runtimes.base import (
    ArtifactKind,
    Capabilities,
    HostLayers,
    Instance,
    Limits,
    Observed,
    ObservedState,
    SandboxSpec,
)

__all__ = ["GVisorOptions", "GVisorRuntime"]

log = logging.getLogger("corral.runtimes.gvisor")

READY_TIMEOUT = 60.0  # create → agent hello: ~0.4 s here; generous for a loaded 2-core CI host
COMMAND_TIMEOUT = 30.0  # runsc state/pause/resume/kill take 20-50 ms
# checkpoint writes the sandbox's memory to disk, restore reads it back: ~0.1-0.3 s for an idle sandbox and
# ~1 s per 200 MiB here; generous for a loaded host and large sandboxes
CHECKPOINT_TIMEOUT = 300.0
CHECKPOINT_DIR = "checkpoint"  # below the state dir: the image of a paused sandbox (removed with it)
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL
# Host threads per guest process under the ptrace platform: 256 sleeping guest processes made 1937 host
# threads here (plus ~34 for an idle sandbox). pids.max must stay above that, or the sandbox dies instead of
# fork() failing; RLIMIT_NPROC is the real cap (per uid, so root's and the user's processes each get it).
HOST_THREADS_PER_PROCESS = 16


@dataclass(frozen=True, kw_only=True)
class GVisorOptions:
    """``[runtime.gvisor]``: ``platform`` (runsc's ``--platform``: ptrace, systrap; kvm hangs on this host)
    and ``runsc`` (the binary; default ``runsc`` on PATH, e.g. a newer static build)."""

    platform: str = "ptrace"
    runsc: str | None = None

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise InvalidRequest(
                f"[runtime.gvisor] platform must be one of {', '.join(PLATFORMS)}, got {self.platform!r}"
            )


PLATFORMS = ("ptrace", "systrap", "kvm")


class GVisorRuntime(LocalRuntime[str]):
    """runsc (ptrace platform) over an OCI bundle with a host overlayfs root. See the module docstring."""

    name: ClassVar[str] = "gvisor"
    capabilities: ClassVar[Capabilities] = Capabilities(
        pause=True,
        checkpoint=True,
        snapshot=frozenset({ArtifactKind.LAYER, ArtifactKind.MEMORY}),
        network_policy=True,
        # runsc 20240729 restores netstack without the namespace's interfaces and routes (gVisor issue 4595:
        # the restored stack is created anew): a restored sandbox would have loopback only
        pause_network=False,
        snapshot_network=False,
    )
    Options: ClassVar[type[Any]] = GVisorOptions
    ready_timeout: ClassVar[float] = READY_TIMEOUT
    options: GVisorOptions

    def check_host(self) -> str:
        return _check_host(self.options.runsc)

    def _global_flags(self, runsc: str, state_dir: Path, *, networked: bool) -> list[str]:
        """The flags every runsc command for this sandbox gets (stored in the Instance: a config change
        later must not change them for a running sandbox). Networked: gVisor's own network stack (netstack)
        on the prepared namespace's veth; open connections are dropped, not refused, by a pause."""
        network = ["--network=sandbox", "--net-disconnect-ok"] if networked else ["--network=none"]
        return [
            runsc,
            f"--root={state_dir / 'runsc'}",
            f"--platform={self.options.platform}",
            *network,
            "--overlay2=none",  # our host overlayfs is the rw root (newer runsc default to a sentry overlay)
            f"--debug-log={state_dir / 'logs'}/runsc.%COMMAND%.log",
        ]

    # -- create -------------------------------------------------------------------------------------------
    def prepare(self, spec: SandboxSpec, sandbox: LocalSandbox) -> ShimSpec:
        if len(sandbox.socket) > MAX_SOCKET_PATH or len(sandbox.control) > MAX_SOCKET_PATH:
            raise RuntimeUnavailable(
                "the runtime state directory path is too long for a Unix socket",
                details={"max": MAX_SOCKET_PATH - len("/sb-…/control.sock")},
            )
        net = sandbox_net(sandbox)
        flags = self._global_flags(self.host, sandbox.state_dir, networked=net is not None)
        sandbox.extra.update(container_id=str(spec.sandbox_id), runsc_flags=flags)
        return _prepare(spec, sandbox, self.bundle, flags, net)

    async def started(self, spec: SandboxSpec, sandbox: LocalSandbox) -> None:
        await anyio.to_thread.run_sync(_verify_limits, spec.sandbox_id, spec.limits)

    # -- operations on a running sandbox ----------------------------------------------------------------
    async def pause(self, instance: Instance) -> None:
        """``runsc checkpoint`` through the shim: memory, processes and open files go to an image in the state
        dir and the sandbox stops (no CPU, no memory). The shim stays, holding the clients' connections."""
        await self._checkpoint(LocalSandbox.of(instance))

    async def _checkpoint(self, sandbox: LocalSandbox) -> None:
        if sandbox_net(sandbox) is not None:  # Capabilities.pause_network: the service refuses first
            # runsc 20240729 restores netstack without the namespace's interface and routes: the sandbox
            # would come back with no network at all, so refuse instead of breaking it
            raise Unsupported(
                "gVisor sandboxes with network cannot be paused, snapshotted or forked yet; "
                "use network='none' for those, or the namespace runtime"
            )
        if not await anyio.to_thread.run_sync(_trim_logs, sandbox.state_dir):
            raise RuntimeFailure("could not pause the gVisor sandbox: the sandbox no longer exists")
        # runsc will not overwrite an image: drop the previous pause's (its restore finished long ago)
        await anyio.to_thread.run_sync(_clear_dir, sandbox.state_dir / CHECKPOINT_DIR)
        await _shimctl.control(
            sandbox.control,
            sandbox.socket,
            "checkpoint",
            what="pause the gVisor sandbox",
            timeout=CHECKPOINT_TIMEOUT,
        )

    async def resume(self, instance: Instance) -> None:
        await self._restore(LocalSandbox.of(instance))

    async def _restore(self, sandbox: LocalSandbox) -> None:
        """``runsc restore`` of the pause image, with new stdio pipes to the same shim."""
        # runsc applies NO limits to a cgroup that already exists (see _refuse_existing_cgroups); the old
        # one is empty now (its processes are gone) and is removed before the restore makes it again
        await anyio.to_thread.run_sync(_cgroup(sandbox.sandbox_id).remove)
        await anyio.to_thread.run_sync(_forget_stopped_container, sandbox.state_dir / "runsc")
        await _shimctl.control(
            sandbox.control,
            sandbox.socket,
            "restore",
            what="resume the gVisor sandbox",
            timeout=CHECKPOINT_TIMEOUT,
        )

    async def capture(self, sandbox: LocalSandbox, dest: Path) -> bool:
        """Checkpoint (the sandbox stops, so its files and memory agree), copy the writable layer and the
        image to ``dest``, restore. The sandbox is back when this returns, with a short gap in between."""
        await self._checkpoint(sandbox)
        try:
            await anyio.to_thread.run_sync(_capture, sandbox.state_dir, dest)
        finally:
            with anyio.CancelScope(shield=True):
                await self._restore(sandbox)
        return True

    async def refine_running(self, sandbox: LocalSandbox) -> Observed:
        """The shim is up: ask runsc whether the sentry is paused (its state files are runsc's private
        format)."""
        result = await self._runsc_command(sandbox, "state", what="inspect the gVisor sandbox", check=False)
        status = _status(result.stdout) if result.returncode == 0 else None
        if status == "paused":
            return Observed(state=ObservedState.PAUSED)
        if status == "stopped":  # the agent is gone; the shim writes exit.json in a moment
            return Observed(state=ObservedState.EXITED)
        return Observed(state=ObservedState.RUNNING)

    # -- teardown hooks -------------------------------------------------------------------------------------
    def kill_sandbox(self, sandbox: LocalSandbox) -> None:
        """SIGKILL the sandbox's host processes (found by their ``--root``). The shim sees ``runsc run`` exit,
        records exit.json and exits by itself; the private mount namespace, and with it the overlay, goes
        with its last process. Teardown does not use ``runsc delete`` (1.2-2 s here)."""
        _kill_processes(sandbox.state_dir / "runsc")

    def shim_exits_by_itself(self, sandbox: LocalSandbox) -> bool:
        return not (sandbox.state_dir / "paused").exists()  # paused: no child whose exit would end the shim

    def cgroup(self, sandbox: LocalSandbox) -> SandboxCgroup | None:
        return _cgroup(sandbox.sandbox_id)  # runsc removes them only on a clean exit

    async def _runsc_command(
        self, sandbox: LocalSandbox, *args: str, what: str, check: bool = True
    ) -> _proc.ProcResult:
        """Run ``runsc <the instance's global flags> <args> <container id>``."""
        flags = [str(f) for f in sandbox.extra["runsc_flags"]]
        if not await anyio.to_thread.run_sync(_trim_logs, sandbox.state_dir):
            raise RuntimeFailure(f"could not {what}: the sandbox no longer exists")
        return await _proc.run(
            [*flags, *args, str(sandbox.extra["container_id"])],
            timeout=COMMAND_TIMEOUT,
            what=what,
            check=check,
        )


def _forget_stopped_container(runsc_root: Path) -> None:
    """runsc keeps a *restored* container's state as "stopped" after its checkpoint (a `run` one is deleted)
    and then refuses to restore it again. Nothing of the sandbox runs while it is paused, so its private
    --root is dropped instead of spending a `runsc delete` (1-2 s here)."""
    if _sandbox_processes(runsc_root):
        raise RuntimeFailure("could not resume the gVisor sandbox: it is still running")
    for item in runsc_root.iterdir():
        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def _clear_dir(path: Path) -> None:
    for item in path.iterdir():
        item.unlink()


def _capture(state_dir: Path, dest: Path) -> None:
    """Copy a checkpointed sandbox's writable layer and memory image (+ the agent's hello) into ``dest``."""
    _layers.capture(state_dir / "fs" / "upper", dest / "layer")
    memory = dest / "memory"
    memory.mkdir(mode=0o700)
    for item in (state_dir / CHECKPOINT_DIR).iterdir():
        shutil.copyfile(item, memory / item.name)
    shutil.copyfile(state_dir / "hello.frame", memory / "hello.frame")


def _status(stdout: bytes) -> str | None:
    try:
        data: Any = json.loads(stdout)
    except ValueError:
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None


def _prepare(
    spec: SandboxSpec, sandbox: LocalSandbox, bundle: AgentBundle, flags: list[str], net: SandboxNet | None
) -> ShimSpec:
    """Writable layer, OCI bundle and shim spec for one sandbox (the caller cleans up on failure)."""
    state_dir = sandbox.state_dir
    rootfs = host_layers(spec, "gvisor")
    _refuse_existing_cgroups(spec.sandbox_id)
    layers = _make_layer_dirs(state_dir, spec, rootfs)
    (state_dir / CHECKPOINT_DIR).mkdir(mode=0o700)
    (state_dir / "runsc").mkdir(mode=0o700)
    (state_dir / "logs").mkdir(mode=0o700)
    # Host paths the sandbox sees (template binds such as /usr, the agent bundle) are first bound READ-ONLY at
    # the kernel level in the shim's private mount namespace, and runsc is handed those staged mounts. gVisor's
    # own "ro" is not enough: runsc 20240729 refuses creating files on a read-only bind but let open(O_TRUNC)
    # of an existing one truncate the host file (tests/runtimes/test_escape_gvisor.py). With the kernel
    # enforcing it, a sentry bug cannot write to the host through these paths.
    staged: list[Mount] = []
    mounts = []
    for index, (source, target) in enumerate(
        [*((b.source, b.target) for b in rootfs.binds), (bundle.path, MOUNT_POINT)]
    ):
        stage = state_dir / "ro" / str(index)
        stage.mkdir(parents=True)
        staged.append(Mount(kind="bind", source=str(source), target=str(stage), ro=True))
        mounts.append(_oci.bind_mount(stage, target))
    if net is not None:  # every DNS query is redirected to the answerer anyway; this one names it
        resolv = state_dir / "resolv.conf"
        resolv.write_text(f"nameserver {net.plan.host_ip}\noptions ndots:0\n")
        mounts.append(_oci.bind_mount(resolv, "/etc/resolv.conf"))
    config = _oci.build_config(
        args=agent_argv(bundle, memory_limit=spec.limits.memory_mb << 20),
        root=layers.merged,
        limits=spec.limits,
        hostname=spec.hostname,
        env=spec.env,
        mounts=mounts,
        cgroups_path=f"/corral/{spec.sandbox_id}",
        pids_safety_net=max(_oci.MIN_PIDS_SAFETY_NET, HOST_THREADS_PER_PROCESS * spec.limits.pids + 512),
        memory_headroom_mb=memory_headroom_mb(spec.limits.memory_mb),
        netns=net.plan.netns_path if net is not None else None,
    )
    bundle_dir = state_dir / "bundle"
    _oci.write_config(bundle_dir, config)
    container_id = str(spec.sandbox_id)  # fixed length, and alone in its --root: no prefix ambiguity
    # A restored sandbox (a fork, a template with memory, a resume) runs `restore --image-path=… --bundle=…`
    # in the same foreground/stdio-pipe position as `run`: the agent gets new pipes and carries on.
    images = state_dir / CHECKPOINT_DIR
    restore = [*flags, "restore", f"--image-path={images}", f"--bundle={bundle_dir}", container_id]
    memory = spec.restore_from.path if spec.restore_from is not None else None
    if memory is not None:
        argv = [
            *flags,
            "restore",
            f"--image-path={memory}",
            f"--bundle={bundle_dir}",
            container_id,
        ]
    else:
        argv = [*flags, "run", f"--bundle={bundle_dir}", container_id]
    return ShimSpec(
        argv=argv,
        restored=memory is not None,
        hello_file=str(memory / "hello.frame") if memory is not None else None,
        checkpoint_argv=[*flags, "checkpoint", f"--image-path={images}", container_id],
        restore_argv=restore,
        socket=sandbox.socket,
        control=sandbox.control,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        mounts=[
            *(
                [Mount(kind="loop", source=str(layers.image), target=str(layers.disk), fstype="ext4")]
                if layers.image is not None and layers.disk is not None
                else []
            ),
            Mount(kind="overlay", target=str(layers.merged), options=_rootfs.overlay_options(layers)),
            *staged,
            # runsc's netstack mis-detects the namespace on kernels >= 6.11 unless /proc/sys/net is hidden
            *([Mount(kind="tmpfs", target="/proc/sys/net")] if net is not None else []),
        ],
        netns=net.plan.netns_path if net is not None else None,
        kill_argv=[*flags, "kill", container_id, "KILL"],  # the shim's deadline/SIGTERM path
        deadline=spec.deadline,
    )


# -- blocking host helpers (run in worker threads) ---------------------------------------------------------


def _check_host(runsc_override: str | None) -> str:
    if os.geteuid() != 0:
        raise RuntimeUnavailable(
            "the gvisor runtime needs root (runsc manages cgroups and mounts the sandbox's root); "
            "run the Corral server as root",
            details={"fix": "run as root"},
        )
    runsc = _proc.require_binary(runsc_override or "runsc")
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise RuntimeUnavailable(
            "the kernel has no overlayfs; load it with: modprobe overlay", details={"fix": "modprobe overlay"}
        )
    return runsc


def _make_layer_dirs(state_dir: Path, spec: SandboxSpec, rootfs: HostLayers) -> LayerDirs:
    """The writable layer (:func:`._rootfs.make_layer_dirs`, owner 0: no user namespace here, the sentry is
    the boundary). The template's layers are the overlay's lower dirs directly (no idmapped copies). With
    ``disk_mb`` the upper dir lives on a size-capped ext4 image, formatted here, that the shim loop-mounts in
    its private mount namespace: a full sandbox gets ENOSPC instead of filling the host's disk."""
    if spec.limits.disk_mb is not None and not Path("/dev/loop-control").exists():
        raise RuntimeUnavailable(
            "disk quotas need loop devices; load the driver with: modprobe loop",
            details={"fix": "modprobe loop"},
        )
    dirs = _rootfs.make_layer_dirs(state_dir, rootfs, owner=0, disk_mb=spec.limits.disk_mb)
    if spec.upper_seed is not None:
        _layers.seed(spec.upper_seed.path, dirs.seed / "upper" if dirs.seed is not None else dirs.upper)
    if dirs.image is not None and dirs.seed is not None:
        argv = [_proc.require_binary("mkfs.ext4"), *_rootfs.mkfs_argv(dirs)[1:]]
        anyio.from_thread.run(partial(_proc.run, argv, timeout=60, what="format the sandbox's disk"))
        shutil.rmtree(dirs.seed)
    return replace(dirs, lowers=rootfs.lower)


def _cgroup(sandbox_id: str) -> SandboxCgroup:
    """Every directory runsc makes for ``cgroupsPath`` /corral/<id>: one per mounted v1 hierarchy (runsc uses
    them all: blkio, cpuset, devices, name=systemd, …), or the one v2 directory."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup":
            opts = [
                o for o in tail[2].split(",") if o not in ("rw", "ro") and not o.startswith("release_agent")
            ]
            for key in opts or [mount_point.name]:
                v1.setdefault(key, mount_point / "corral" / sandbox_id)
        elif tail[0] == "cgroup2" and v2 is None:
            v2 = mount_point / "corral" / sandbox_id
    if v1:
        if v2 is not None:  # hybrid host: runsc uses v1; sweep the unified tree too, it costs a stat
            v1.setdefault("unified", v2)
        # SandboxCgroup.kill() thaws through the "freezer" entry; without that hierarchy, point it at a
        # directory that has no freezer.state: the write then fails harmlessly
        v1.setdefault("freezer", next(iter(v1.values())))
        return SandboxCgroup(version=1, dirs=v1)
    return SandboxCgroup(version=2, dirs={"": v2} if v2 is not None else {})


def _refuse_existing_cgroups(sandbox_id: str) -> None:
    """runsc treats an existing cgroup as someone else's and then applies NO limits to it (measured: a
    memory bomb ate the host), so a leftover directory with our name must stop the create."""
    if any(d.exists() for d in _cgroup(sandbox_id).dirs.values()):
        raise Conflict(f"sandbox {sandbox_id} still has control groups on this host; destroy it first")


def memory_headroom_mb(memory_mb: int) -> int:
    """What the host cgroup allows above the sandbox's limit. The sentry has no OOM killer (gVisor issue
    1967): a host OOM kill takes the whole sandbox, so the agent's own OOM killer acts at the limit (see
    ``corral.agent.memory``), and this room, for the sentry's and gofer's own memory and for what a fast
    allocation adds before the agent looks again, keeps the host's from acting first."""
    return max(128, memory_mb // 2)


def _verify_limits(sandbox_id: str, limits: Limits) -> None:
    """Check that the memory limit really is in force before handing out the sandbox."""
    cgroup = _cgroup(sandbox_id)
    memory_dir = cgroup.dirs.get("memory", cgroup.dirs.get(""))
    name = "memory.limit_in_bytes" if cgroup.version == 1 else "memory.max"
    try:
        value = (memory_dir / name).read_text().strip() if memory_dir else ""
    except OSError:
        value = ""
    if value != str((limits.memory_mb + memory_headroom_mb(limits.memory_mb)) * 1024 * 1024):
        log.error(
            "sandbox %s: memory limit is %r in %s, expected %s MiB",
            sandbox_id,
            value,
            memory_dir,
            limits.memory_mb,
        )
        raise RuntimeFailure("could not apply the sandbox's memory limit")


LOG_LIMIT = 1 << 20  # runsc appends ~1.5 KiB per command to its debug log; inspect runs `state` often


def _trim_logs(state_dir: Path) -> bool:
    """Keep the short commands' debug logs bounded. Returns whether the sandbox's state dir exists."""
    if not state_dir.exists():
        return False
    with contextlib.suppress(OSError):
        for f in (state_dir / "logs").iterdir():
            if f.stat().st_size > LOG_LIMIT and not f.name.endswith((".run.log", ".boot.log", ".gofer.log")):
                f.write_bytes(b"")
    return True


def _sandbox_processes(runsc_root: Path) -> set[int]:
    """Host processes of one sandbox: every argv naming its private ``--root`` (runsc run, gofer, sentry and
    the sentry's ptrace stubs, which are forks of it)."""
    flag = f"--root={runsc_root}".encode()
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if flag in Path(entry.path, "cmdline").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
    return found


_POLL = 0.005


def _kill_processes(runsc_root: Path) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT
    while pids := _sandbox_processes(runsc_root):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeFailure("could not stop the gVisor sandbox's processes", details={"left": len(pids)})
        time.sleep(_POLL)  # bounded; dying processes have no event we could wait on from here
