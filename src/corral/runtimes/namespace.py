"""The ``namespace`` runtime: Linux namespaces through bubblewrap, on the host kernel.

One sandbox is, from the outside in (each layer set up by the shim's child before it execs bwrap, see
:mod:`corral.runtimes._shim`):

1. **cgroups** (:mod:`._cgroups`): memory, pids, cpu, freezer, joined first so everything below is accounted;
2. a **private mount namespace** holding the sandbox's mounts, so nothing ever appears in the host's mount
   table and everything unmounts itself when the sandbox's last process exits: the template layers and binds
   (host ``/usr``) and the agent bundle as **idmapped** read-only mounts (host root's files appear owned by
   the sandbox's root), and an **overlayfs** with a per-sandbox upper dir on disk (:mod:`._rootfs`), or on a
   loop-mounted ext4 image of ``disk_mb`` when the sandbox has a disk quota;
3. a **user namespace** mapping sandbox uids 0..65535 to a host range no other sandbox and no host account
   uses (:class:`UidAllocator`): root inside is an unprivileged stranger outside. The shim also trims the
   capability bounding set there to :data:`SANDBOX_CAPS` (bwrap 0.8 leaves it full when run as uid 0);
4. **bubblewrap** (no ``--unshare-user``: it runs as uid 0 of that user namespace and keeps its capabilities
   there) makes pid, ipc, uts, net and cgroup namespaces, pivots into the overlay, mounts a fresh ``/proc``,
   a minimal ``/dev`` and the agent bundle at ``/.corral`` (read-only), clears the environment, keeps only
   :data:`SANDBOX_CAPS` (Docker's default set minus NET_RAW and MKNOD; no SYS_ADMIN), sets no_new_privs and
   loads the seccomp filter (:mod:`._seccomp`). bwrap reaches the mounts through :data:`MOUNT_STAGE`, so
   the state dir stays private to root;
5. the **agent** (:mod:`corral.agent`) as the sandbox's main process, talking over its stdio to the shim.

Network ``none`` is ``--unshare-net``: a namespace whose only interface is loopback (bwrap brings ``lo`` up).
Any other policy (:mod:`corral.netpolicy`): the shim's child joins the network namespace the skeleton
prepared (:mod:`._net.stack`: veth to the host, nftables, the DNS answerer and egress proxy) before it enters
the user namespace; that namespace belongs to host root, so root in the sandbox cannot reconfigure it.

``/tmp`` is part of the overlay, not a tmpfs: files there count against the sandbox's disk, not its memory
limit, and they are kept by file-system snapshots like everything else.
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import partial
from pathlib import Path
from typing import ClassVar

import anyio
import anyio.from_thread
import anyio.to_thread

from corral.errors import InvalidState, RuntimeFailure, RuntimeUnavailable
from corral.runtimes import _layers, _proc, _rootfs, _seccomp
from corral.runtimes._bundle import MOUNT_POINT, AgentBundle, agent_argv
from corral.runtimes._cgroups import CgroupLayout, SandboxCgroup, detect_layout
from corral.runtimes._local import LocalRuntime, LocalSandbox, host_layers, sandbox_net
from corral.runtimes._net.stack import SandboxNet
from corral.runtimes._shimspec import FdFile, Mount, ShimSpec, UserNs
from corral.runtimes._uids import UidAllocator
from corral.runtimes.base import (
    ArtifactKind,
    Capabilities,
    HostLayers,
    Instance,
    Observed,
    ObservedState,
    SandboxSpec,
)

__all__ = ["NamespaceRuntime"]

log = logging.getLogger("corral.runtimes.namespace")

READY_TIMEOUT = 30.0  # create → agent hello; ~0.1 s normally, generous for a loaded host
SECCOMP_FD = 9
OOM_EVENTS_FD = 10  # the agent's view of its memory cgroup's OOM kills (corral.agent.memory)
MEMORY_USAGE_FDS = (11, 12)  # its memory cgroup's usage and statistics (corral.agent.usage)
# Where each sandbox's private mount namespace shows its state_dir/fs: bwrap runs as the sandbox's uid,
# which may not traverse state_root's parents (often mode 0700), so the shim binds fs/ onto this
# world-traversable, always-empty host directory first, in the private namespace only.
MOUNT_STAGE = Path("/run/corral/namespace-stage")
# capabilities kept inside the sandbox's user namespace (Docker's default set minus NET_RAW and MKNOD)
SANDBOX_CAPS = {  # name -> number (linux/capability.h)
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_SYS_CHROOT": 18,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


_Host = tuple[str, CgroupLayout, bytes]  # bwrap's path, the cgroup layout, the seccomp program


class NamespaceRuntime(LocalRuntime[_Host]):
    """bubblewrap + user namespace + seccomp + cgroups + overlayfs. See the module docstring."""

    name: ClassVar[str] = "namespace"
    capabilities: ClassVar[Capabilities] = Capabilities(
        pause=True, snapshot=frozenset({ArtifactKind.LAYER}), network_policy=True
    )
    ready_timeout: ClassVar[float] = READY_TIMEOUT

    def check_host(self) -> _Host:
        return _check_host()

    def prepare(self, spec: SandboxSpec, sandbox: LocalSandbox) -> ShimSpec:
        bwrap, layout, program = self.host
        cgroup = SandboxCgroup.for_sandbox(layout, spec.sandbox_id)
        sandbox.extra["cgroup"] = cgroup.to_json()  # recorded before it exists: a failure below removes it
        slot = UidAllocator(self.config.state_root).allocate(spec.sandbox_id)
        sandbox.extra["uid_slot"] = slot
        sandbox.extra["uid_base"] = base = UidAllocator.base(slot)
        return _prepare(spec, sandbox, cgroup, base, bwrap, program, self.bundle, sandbox_net(sandbox))

    # -- teardown and inspect hooks -------------------------------------------------------------------------
    def cgroup(self, sandbox: LocalSandbox) -> SandboxCgroup | None:
        data = sandbox.extra.get("cgroup")
        return SandboxCgroup.from_json(dict(data)) if data is not None else None

    def release(self, sandbox: LocalSandbox) -> None:
        slot = sandbox.extra.get("uid_slot")
        if slot is not None:
            UidAllocator(self.config.state_root).release(int(slot), sandbox.sandbox_id)

    async def refine_running(self, sandbox: LocalSandbox) -> Observed:
        cgroup = self.cgroup(sandbox)
        frozen = cgroup is not None and await anyio.to_thread.run_sync(cgroup.frozen)
        return Observed(state=ObservedState.PAUSED if frozen else ObservedState.RUNNING)

    def layer_id_base(self, sandbox: LocalSandbox) -> int:
        return int(sandbox.extra["uid_base"])

    # -- pause and snapshots --------------------------------------------------------------------------------
    async def pause(self, instance: Instance) -> None:
        await self._freezer(LocalSandbox.of(instance), freeze=True)

    async def resume(self, instance: Instance) -> None:
        await self._freezer(LocalSandbox.of(instance), freeze=False)

    async def capture(self, sandbox: LocalSandbox, dest: Path) -> bool:
        """Freeze, copy the writable layer (owners shifted back to the sandbox's own uids), thaw. File system
        only: memory would need CRIU, and Debian 12's CRIU 3.17 fails on this kernel (README, snapshots)."""
        cgroup = self.cgroup(sandbox)
        assert cgroup is not None
        was_frozen = await anyio.to_thread.run_sync(cgroup.frozen)
        await self._freezer(sandbox, freeze=True)  # the files stop changing while they are copied
        try:
            base = self.layer_id_base(sandbox)
            await anyio.to_thread.run_sync(
                partial(_layers.capture, sandbox.state_dir / "fs" / "upper", dest / "layer", base=base)
            )
        finally:
            if not was_frozen:
                with anyio.CancelScope(shield=True):
                    await self._freezer(sandbox, freeze=False)
        return False

    async def _freezer(self, sandbox: LocalSandbox, *, freeze: bool) -> None:
        cgroup = self.cgroup(sandbox)
        assert cgroup is not None
        try:
            await anyio.to_thread.run_sync(cgroup.freeze if freeze else cgroup.thaw)
        except FileNotFoundError as exc:  # destroyed meanwhile (or by another process)
            raise InvalidState("the sandbox is no longer on this host") from exc
        except OSError as exc:
            log.error("sandbox %s: freezer failed: %s", sandbox.sandbox_id, exc)
            raise RuntimeFailure(f"could not {'pause' if freeze else 'resume'} the sandbox") from exc


# -- blocking helpers (run in worker threads) ---------------------------------------------------------------


def _check_host() -> tuple[str, CgroupLayout, bytes]:
    if os.geteuid() != 0:
        raise RuntimeUnavailable(
            "the namespace runtime needs root (it maps user namespaces and manages "
            "cgroups); run the Corral server as root",
            details={"fix": "run as root"},
        )
    bwrap = _proc.require_binary("bwrap")
    try:
        max_userns = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        max_userns = 0
    if max_userns <= 0:
        raise RuntimeUnavailable(
            "user namespaces are disabled on this host; enable them with: "
            "sysctl -w user.max_user_namespaces=15000",
            details={"fix": "sysctl -w user.max_user_namespaces=15000"},
        )
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise RuntimeUnavailable(
            "the kernel has no overlayfs; load it with: modprobe overlay", details={"fix": "modprobe overlay"}
        )
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    if (major, minor) < (5, 19):  # idmapped lower layers of overlayfs
        raise RuntimeUnavailable(
            "the namespace runtime needs Linux 5.19 or newer (idmapped overlay layers)",
            details={"kernel": os.uname().release},
        )
    MOUNT_STAGE.mkdir(mode=0o755, parents=True, exist_ok=True)
    return bwrap, detect_layout(), _seccomp.build_filter()


def _prepare(
    spec: SandboxSpec,
    sandbox: LocalSandbox,
    cgroup: SandboxCgroup,
    base: int,
    bwrap: str,
    program: bytes,
    bundle: AgentBundle,
    net: SandboxNet | None,
) -> ShimSpec:
    """Cgroups, writable layer, seccomp program and shim.json for one sandbox (the caller cleans up)."""
    state_dir = sandbox.state_dir
    rootfs = host_layers(spec, "namespace")
    cgroup.create(spec.limits)
    disk_mb = spec.limits.disk_mb
    if disk_mb is not None and not Path("/dev/loop-control").exists():
        raise RuntimeUnavailable(
            "disk quotas need loop devices; load the driver with: modprobe loop",
            details={"fix": "modprobe loop"},
        )
    dirs = _rootfs.make_layer_dirs(state_dir, rootfs, owner=base, disk_mb=disk_mb)
    if spec.upper_seed is not None:  # a fork: its own copy of its parent's changes
        seed = spec.upper_seed.path
        _layers.seed(seed, dirs.seed / "upper" if dirs.seed is not None else dirs.upper, base=base)
    if dirs.image is not None and dirs.disk is not None and dirs.seed is not None:
        _proc.require_binary("mkfs.ext4")
        argv = _rootfs.mkfs_argv(dirs)
        anyio.from_thread.run(partial(_proc.run, argv, timeout=60, what="format the sandbox's disk"))
        shutil.rmtree(dirs.seed)
    _seccomp.write_filter(state_dir / "seccomp.bpf", program)
    mounts = [
        Mount(kind="idmap", source=str(src), target=str(dst), ro=True)
        for src, dst in zip(rootfs.lower, dirs.lowers, strict=True)
    ]
    mounts += [
        Mount(kind="idmap", source=str(b.source), target=str(dst), ro=True)
        for b, dst in zip(rootfs.binds, dirs.binds, strict=True)
    ]
    bundle_dir = dirs.merged.parent / "bundle"
    bundle_dir.mkdir(mode=0o700)
    mounts.append(Mount(kind="idmap", source=str(bundle.path), target=str(bundle_dir), ro=True))
    if dirs.image is not None and dirs.disk is not None:  # the writable layer's own, size-capped fs
        mounts.append(Mount(kind="loop", source=str(dirs.image), target=str(dirs.disk), fstype="ext4"))
    mounts.append(Mount(kind="overlay", target=str(dirs.merged), options=_rootfs.overlay_options(dirs)))
    mounts.append(Mount(kind="bind", source=str(dirs.merged.parent), target=str(MOUNT_STAGE)))
    if net is not None:  # every DNS query is redirected to the answerer anyway; this one names it
        (dirs.merged.parent / "resolv.conf").write_text(f"nameserver {net.plan.host_ip}\noptions ndots:0\n")
    argv = _bwrap_argv(spec, rootfs, bwrap, bundle, networked=net is not None)
    shim_spec = ShimSpec(
        argv=argv,
        socket=sandbox.socket,
        control=sandbox.control,
        env={"PATH": SANDBOX_PATH},
        cgroup_procs=cgroup.procs_files,
        mounts=mounts,
        userns=UserNs(base=base, bounding_caps=sorted(SANDBOX_CAPS.values())),
        deadline=spec.deadline,
        files=[
            FdFile(fd=SECCOMP_FD, path=str(state_dir / "seccomp.bpf")),
            FdFile(fd=OOM_EVENTS_FD, path=cgroup.oom_events_file),
            *(
                FdFile(fd=fd, path=f)
                for fd, f in zip(MEMORY_USAGE_FDS, cgroup.memory_usage_files, strict=True)
            ),
        ],
        netns=net.plan.netns_path if net is not None else None,
    )
    _write_private(state_dir / "shim.json", shim_spec.to_json())  # holds spec.env, which may be secret
    _write_private(state_dir / "shim.log", "")  # the shim appends to it; create it private
    return shim_spec


# namespaces and process set-up; the user namespace is the shim's, so no --unshare-user
_BWRAP_SETUP = [
    "--die-with-parent",
    "--new-session",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup-try",
]
_BWRAP_FS = [
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--perms",
    "1777",
    "--tmpfs",
    "/dev/shm",
    "--chdir",
    "/",
    "--clearenv",
]


def _bwrap_argv(
    spec: SandboxSpec, rootfs: HostLayers, bwrap: str, bundle: AgentBundle, *, networked: bool
) -> list[str]:
    """bwrap's command line; every source path is below MOUNT_STAGE (see its comment). A networked sandbox
    is already in its prepared network namespace (the shim joined it); otherwise bwrap makes an empty one."""
    setup = _BWRAP_SETUP if networked else [*_BWRAP_SETUP, "--unshare-net"]
    argv = [bwrap, *setup, "--hostname", spec.hostname, "--bind", str(MOUNT_STAGE / "merged"), "/"]
    for i, b in enumerate(rootfs.binds):
        argv += ["--ro-bind", str(MOUNT_STAGE / f"bind{i}"), b.target]
    if networked:
        argv += ["--ro-bind", str(MOUNT_STAGE / "resolv.conf"), "/etc/resolv.conf"]
    argv += ["--ro-bind", str(MOUNT_STAGE / "bundle"), MOUNT_POINT, *_BWRAP_FS]
    env = {"PATH": SANDBOX_PATH, "HOME": "/root", "LANG": "C.UTF-8", "HOSTNAME": spec.hostname, **spec.env}
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += ["--cap-drop", "ALL"]
    for cap in SANDBOX_CAPS:
        argv += ["--cap-add", cap]
    agent = agent_argv(
        bundle, oom_events_fd=OOM_EVENTS_FD, memory_usage_fds=MEMORY_USAGE_FDS
    )  # the kernel kills; the agent is told (memory)
    return [*argv, "--seccomp", str(SECCOMP_FD), "--", *agent]


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
