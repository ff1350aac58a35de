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
   this host, systrap idles hot), ``--network=none`` (loopback only; no netstack, so the kernel ≥ 6.11
   ``/proc/sys/net`` detection bug cannot bite) and a debug log in the state dir, never on the client path;
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
import errno
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from corral.errors import Conflict, InvalidRequest, RuntimeFailure, RuntimeUnavailable, Unsupported
from corral.runtimes import _layers, _oci, _proc, _rootfs, _shimctl
from corral.runtimes._bundle import MOUNT_POINT, AgentBundle, agent_argv, ensure_bundle
from corral.runtimes._cgroups import REMOVE_TIMEOUT, CgroupBusy, SandboxCgroup
from corral.runtimes._deferred import Deferred
from corral.runtimes._rootfs import LayerDirs
from corral.runtimes._shimspec import Mount, ShimSpec
from corral.runtimes.base import (
    ByteStream,
    Capabilities,
    Instance,
    Limits,
    Observed,
    ObservedState,
    RuntimeConfig,
    SandboxSpec,
    Snapshot,
)

__all__ = ["GVisorRuntime"]

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


class GVisorRuntime:
    """runsc (ptrace platform) over an OCI bundle with a host overlayfs root. See the module docstring."""

    name: ClassVar[str] = "gvisor"
    capabilities: ClassVar[Capabilities] = Capabilities(pause=True, checkpoint=True, snapshot_fs=True)

    def __init__(self, config: RuntimeConfig, *, platform: str = "ptrace", runsc: str | None = None) -> None:
        """``runsc``: the binary to use (default: ``runsc`` on PATH), e.g. a newer static build."""
        self.config = config
        self.platform = platform
        self._runsc_override = runsc
        self._runsc: str | None = None
        self._bundle: AgentBundle | None = None
        self._deferred = Deferred(config.state_root, self.name, _teardown_json)

    async def finish_teardowns(self) -> None:
        await anyio.to_thread.run_sync(self._deferred.retry)

    async def _teardown(
        self, sandbox_id: str, state_dir: Path, shim_pid: int | None, shim_ticks: int | None
    ) -> None:
        """:func:`_teardown`; one the kernel holds up is finished later (see ``_deferred``)."""
        args = {
            "sandbox_id": sandbox_id,
            "state_dir": str(state_dir),
            "shim_pid": shim_pid,
            "shim_ticks": shim_ticks,
        }
        await anyio.to_thread.run_sync(self._deferred.run, sandbox_id, args)

    # -- host check ---------------------------------------------------------------------------------------
    async def check(self) -> None:
        await self._host()

    async def _host(self) -> str:
        if self._runsc is None:
            self._runsc = await anyio.to_thread.run_sync(_check_host, self._runsc_override)
        return self._runsc

    def _global_flags(self, runsc: str, state_dir: Path) -> list[str]:
        """The flags every runsc command for this sandbox gets (stored in the Instance: a config change
        later must not change them for a running sandbox)."""
        return [
            runsc,
            f"--root={state_dir / 'runsc'}",
            f"--platform={self.platform}",
            "--network=none",
            "--overlay2=none",  # our host overlayfs is the rw root (newer runsc default to a sentry overlay)
            f"--debug-log={state_dir / 'logs'}/runsc.%COMMAND%.log",
        ]

    # -- create -------------------------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec) -> Instance:
        runsc = await self._host()
        await self.finish_teardowns()  # embedded mode has no reaper: leftovers of earlier kills go here
        if self._bundle is None:
            self._bundle = await anyio.to_thread.run_sync(ensure_bundle, self.config.cache_root)
        bundle = self._bundle
        state_dir = self.config.state_root / spec.sandbox_id
        socket_path = state_dir / "agent.sock"
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise RuntimeUnavailable(
                "the runtime state directory path is too long for a Unix socket",
                details={"max": MAX_SOCKET_PATH - len("/sb-…/agent.sock")},
            )
        self.config.state_root.mkdir(parents=True, exist_ok=True)
        try:
            state_dir.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise Conflict(f"sandbox {spec.sandbox_id} already exists on this host") from exc
        flags = self._global_flags(runsc, state_dir)
        handle: _shimctl.ShimHandle | None = None
        try:
            shim_spec = await anyio.to_thread.run_sync(_prepare, spec, state_dir, bundle, flags)
            handle = await _shimctl.launcher.launch(
                state_dir, shim_spec, what="start the gVisor sandbox", timeout=READY_TIMEOUT
            )
            await anyio.to_thread.run_sync(_verify_limits, spec.sandbox_id, spec.limits)
            # a cancel that arrived while a worker thread ran is only seen at the next checkpoint: take it
            # here, inside the clean-up scope, or the caller would vanish and leave a running sandbox behind
            await anyio.lowlevel.checkpoint_if_cancelled()
            return Instance(
                sandbox_id=spec.sandbox_id,
                runtime=self.name,
                state_dir=str(state_dir),
                shim_pid=handle.pid,
                shim_start_ticks=handle.start_ticks,
                socket_path=str(socket_path),
                extra={"container_id": str(spec.sandbox_id), "runsc_flags": flags},
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._teardown(
                    spec.sandbox_id,
                    state_dir,
                    handle.pid if handle else None,
                    handle.start_ticks if handle else None,
                )
            raise

    # -- operations on a running sandbox ----------------------------------------------------------------
    async def connect(self, instance: Instance) -> ByteStream:
        return await _shimctl.connect(instance.socket_path)

    async def pause(self, instance: Instance) -> None:
        """``runsc checkpoint`` through the shim: memory, processes and open files go to an image in the state
        dir and the sandbox stops (no CPU, no memory). The shim stays, holding the clients' connections."""
        if not await anyio.to_thread.run_sync(_trim_logs, Path(instance.state_dir)):
            raise RuntimeFailure("could not pause the gVisor sandbox: the sandbox no longer exists")
        # runsc will not overwrite an image: drop the previous pause's (its restore finished long ago)
        await anyio.to_thread.run_sync(_clear_dir, Path(instance.state_dir) / CHECKPOINT_DIR)
        await _shimctl.call(
            instance.socket_path,
            "shim.checkpoint",
            what="pause the gVisor sandbox",
            timeout=CHECKPOINT_TIMEOUT,
        )

    async def resume(self, instance: Instance) -> None:
        """``runsc restore`` of the pause image, with new stdio pipes to the same shim."""
        # runsc applies NO limits to a cgroup that already exists (see _refuse_existing_cgroups); the old
        # one is empty now (its processes are gone) and is removed before the restore makes it again
        await anyio.to_thread.run_sync(_cgroup(instance.sandbox_id).remove)
        await anyio.to_thread.run_sync(_forget_stopped_container, Path(instance.state_dir) / "runsc")
        await _shimctl.call(
            instance.socket_path, "shim.restore", what="resume the gVisor sandbox", timeout=CHECKPOINT_TIMEOUT
        )

    async def snapshot(self, instance: Instance, dest: Path) -> Snapshot:
        """Checkpoint (the sandbox stops, so its files and memory agree), copy the writable layer and the
        image to ``dest``, restore. The sandbox is back when this returns, with a short gap in between."""
        state_dir = Path(instance.state_dir)
        if (state_dir / "disk.img").exists():
            raise Unsupported("snapshots of gVisor sandboxes with a disk quota are not supported yet")
        await self.pause(instance)
        try:
            await anyio.to_thread.run_sync(_capture, state_dir, dest)
        finally:
            with anyio.CancelScope(shield=True):
                await self.resume(instance)
        return Snapshot(layer=dest / "layer", memory=dest / "memory")

    async def export_layer(self, instance: Instance, dest: Path) -> None:
        """The writable layer as a template layer (see :func:`._rootfs.export_upper`); not with a disk quota,
        whose upper dir is visible only inside the sandbox's own mount namespace."""
        fs = Path(instance.state_dir) / "fs"
        if (fs / "disk").exists() or not (fs / "upper").is_dir():
            raise InvalidRequest("only sandboxes without a disk quota can be saved as a layer")
        await anyio.to_thread.run_sync(partial(_rootfs.export_upper, fs / "upper", dest, id_base=0))

    async def inspect(self, instance: Instance) -> Observed:
        observed = await anyio.to_thread.run_sync(_observe, instance)
        if observed.state is not ObservedState.RUNNING:  # includes PAUSED: checkpointed, runsc knows nothing
            return observed
        # the shim is up: ask runsc whether the sentry is paused (its state files are runsc's private format)
        result = await self._runsc_command(instance, "state", what="inspect the gVisor sandbox", check=False)
        status = _status(result.stdout) if result.returncode == 0 else None
        if status == "paused":
            return Observed(state=ObservedState.PAUSED)
        if status == "stopped":  # the agent is gone; the shim writes exit.json in a moment
            return await anyio.to_thread.run_sync(_observe, instance)
        return Observed(state=ObservedState.RUNNING)

    async def destroy(self, instance: Instance) -> None:
        with anyio.CancelScope(shield=True):  # runs even when asked inside a cancelled scope
            await self._teardown(
                instance.sandbox_id,
                Path(instance.state_dir),
                instance.shim_pid,
                instance.shim_start_ticks,
            )

    async def _runsc_command(
        self, instance: Instance, *args: str, what: str, check: bool = True
    ) -> _proc.ProcResult:
        """Run ``runsc <the instance's global flags> <args> <container id>``."""
        flags = [str(f) for f in instance.extra["runsc_flags"]]
        if not await anyio.to_thread.run_sync(_trim_logs, Path(instance.state_dir)):
            raise RuntimeFailure(f"could not {what}: the sandbox no longer exists")
        return await _proc.run(
            [*flags, *args, str(instance.extra["container_id"])],
            timeout=COMMAND_TIMEOUT,
            what=what,
            check=check,
        )


def _observe(instance: Instance) -> Observed:
    """What the host shows without asking runsc: missing, exited (exit.json, or a dead shim), paused (the shim
    holds a checkpointed sandbox) or running."""
    state_dir = Path(instance.state_dir)
    if not state_dir.exists():
        return Observed(state=ObservedState.MISSING)
    observed = _shimctl.observe(state_dir, _shimctl.ShimHandle(instance.shim_pid, instance.shim_start_ticks))
    if observed.state is ObservedState.RUNNING and (state_dir / "paused").exists():
        return Observed(state=ObservedState.PAUSED)
    return observed


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
    dest.mkdir(mode=0o700)
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


def _prepare(spec: SandboxSpec, state_dir: Path, bundle: AgentBundle, flags: list[str]) -> ShimSpec:
    """Writable layer, OCI bundle and shim spec for one sandbox (the caller cleans up on failure)."""
    _refuse_existing_cgroups(spec.sandbox_id)
    layers = _make_layer_dirs(state_dir, spec)
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
        [*((b.source, b.target) for b in spec.rootfs.binds), (bundle.path, MOUNT_POINT)]
    ):
        stage = state_dir / "ro" / str(index)
        stage.mkdir(parents=True)
        staged.append(Mount(kind="bind", source=str(source), target=str(stage), ro=True))
        mounts.append(_oci.bind_mount(stage, target))
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
    )
    bundle_dir = state_dir / "bundle"
    _oci.write_config(bundle_dir, config)
    container_id = str(spec.sandbox_id)  # fixed length, and alone in its --root: no prefix ambiguity
    # A restored sandbox (a fork, a template with memory, a resume) runs `restore --image-path=… --bundle=…`
    # in the same foreground/stdio-pipe position as `run`: the agent gets new pipes and carries on.
    images = state_dir / CHECKPOINT_DIR
    restore = [*flags, "restore", f"--image-path={images}", f"--bundle={bundle_dir}", container_id]
    if spec.restore_from is not None:
        argv = [
            *flags,
            "restore",
            f"--image-path={spec.restore_from}",
            f"--bundle={bundle_dir}",
            container_id,
        ]
    else:
        argv = [*flags, "run", f"--bundle={bundle_dir}", container_id]
    return ShimSpec(
        argv=argv,
        restored=spec.restore_from is not None,
        hello_file=str(spec.restore_from / "hello.frame") if spec.restore_from is not None else None,
        checkpoint_argv=[*flags, "checkpoint", f"--image-path={images}", container_id],
        restore_argv=restore,
        socket=str(state_dir / "agent.sock"),
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        mounts=[
            *(
                [Mount(kind="loop", source=str(layers.image), target=str(layers.disk), fstype="ext4")]
                if layers.image is not None and layers.disk is not None
                else []
            ),
            Mount(kind="overlay", target=str(layers.merged), options=_rootfs.overlay_options(layers)),
            *staged,
        ],
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


def _make_layer_dirs(state_dir: Path, spec: SandboxSpec) -> LayerDirs:
    """The writable layer (:func:`._rootfs.make_layer_dirs`, owner 0: no user namespace here, the sentry is
    the boundary). The template's layers are the overlay's lower dirs directly (no idmapped copies). With
    ``disk_mb`` the upper dir lives on a size-capped ext4 image, formatted here, that the shim loop-mounts in
    its private mount namespace: a full sandbox gets ENOSPC instead of filling the host's disk."""
    if spec.limits.disk_mb is not None and not Path("/dev/loop-control").exists():
        raise RuntimeUnavailable(
            "disk quotas need loop devices; load the driver with: modprobe loop",
            details={"fix": "modprobe loop"},
        )
    dirs = _rootfs.make_layer_dirs(state_dir, spec.rootfs, owner=0, disk_mb=spec.limits.disk_mb)
    if spec.upper_seed is not None:
        _layers.seed(spec.upper_seed, dirs.seed / "upper" if dirs.seed is not None else dirs.upper)
    if dirs.image is not None and dirs.seed is not None:
        argv = [_proc.require_binary("mkfs.ext4"), *_rootfs.mkfs_argv(dirs)[1:]]
        anyio.from_thread.run(partial(_proc.run, argv, timeout=60, what="format the sandbox's disk"))
        shutil.rmtree(dirs.seed)
    return replace(dirs, lowers=spec.rootfs.lower)


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


STOP_TIMEOUT = 5.0  # SIGKILL → processes gone; they normally go within a few ms
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


def _teardown_json(
    *,
    sandbox_id: str,
    state_dir: str,
    shim_pid: int | None,
    shim_ticks: int | None,
    wait: float = REMOVE_TIMEOUT,
) -> None:
    _teardown(sandbox_id, Path(state_dir), shim_pid, shim_ticks, wait=wait)


def _teardown(
    sandbox_id: str,
    state_dir: Path,
    shim_pid: int | None,
    shim_ticks: int | None,
    *,
    wait: float = REMOVE_TIMEOUT,
) -> None:
    """Remove everything of a sandbox, in dependency order. Idempotent; needs no in-memory state.

    1. SIGKILL the sandbox's host processes (found by their ``--root``). The shim sees ``runsc run`` exit,
       records exit.json and exits by itself; the private mount namespace, and with it the overlay, goes
       with its last process.
    2. Make sure the shim is gone (SIGKILL if it lingers).
    3. Remove the cgroups (runsc removes them only on a clean exit), then the state dir.
    """
    _kill_processes(state_dir / "runsc")
    if shim_pid is not None and shim_ticks is not None and (state_dir / "paused").exists():
        _proc.kill_pid(shim_pid, shim_ticks, signal.SIGTERM)  # paused: no child whose exit would end the shim
    if shim_pid is not None and shim_ticks is not None:
        deadline = time.monotonic() + STOP_TIMEOUT
        while _proc.pid_alive(shim_pid, shim_ticks) and time.monotonic() < deadline:
            time.sleep(_POLL)  # bounded: the shim exits within ms of its child
        _proc.kill_pid(shim_pid, shim_ticks, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(shim_pid, os.WNOHANG)  # reap it if we are its parent
    try:
        _cgroup(sandbox_id).remove(wait)
    except CgroupBusy:
        raise  # its processes are still exiting: the caller finishes this teardown later
    except OSError as exc:
        log.error("sandbox %s: could not remove its cgroups: %s", sandbox_id, exc)
        raise RuntimeFailure("could not remove the sandbox's cgroups") from exc
    _wait_loop_released(state_dir / "disk.img")
    if state_dir.exists():
        _refuse_if_mounted(state_dir)
        _rootfs.remove_state_dir(state_dir)


def _wait_loop_released(image: Path) -> None:
    """A disk-quota sandbox's loop device detaches itself (autoclear) once the shim child's mount namespace is
    gone, which the kernel finishes shortly after the last process exits."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        in_use = False
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            with contextlib.suppress(OSError):
                in_use = in_use or backing.read_text().strip() == str(image)
        if not in_use:
            return
        time.sleep(_POLL)  # bounded; loop detach has no event we can wait on
    log.warning("a loop device still uses %s after the sandbox ended", image)


def _refuse_if_mounted(path: Path) -> None:
    """Never ``rm -r`` through a mount: the sandbox's mounts live in the shim child's mount namespace, so one
    showing up in ours means something is badly wrong, and we stop instead of deleting host files."""
    prefix = str(path.resolve()) + "/"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point.startswith(prefix):
            log.error("sandbox state dir %s still has a mount at %s", path, mount_point)
            raise RuntimeFailure(
                "the sandbox's state directory still has mounts; refusing to delete it",
                details={"errno": errno.EBUSY},
            )
