"""The namespace runtime on this host: real bwrap, real cgroups, the real agent.

Lifecycle (create → connect → exec → inspect → destroy), limits (memory, pids, cpu), pause/resume,
clean-up on every failure path, non-Python root file systems, plus unit tests of the helpers that do not need a
sandbox (cgroup v2 writes on a fake tree, mountinfo parsing, tarball unpacking, the seccomp program).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import anyio
import pytest

from corral.errors import CorralError, InvalidRequest, InvalidState, RuntimeFailure
from corral.ids import SandboxId
from corral.images import rootfs as _images_rootfs
from corral.images.layers import LayerStore
from corral.protocol.frames import encode
from corral.runtimes import _cgroups, _proc, _rootfs, _seccomp
from corral.runtimes import _shim as _shim_module
from corral.runtimes.base import Bind, HostLayers, Limits, ObservedState, SandboxSpec


def _mounts() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


# --- lifecycle ---------------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_create_exec_inspect_destroy(ns_sandbox, nothing_left) -> None:
    mounts_before = _mounts()
    sb = await ns_sandbox()
    assert sb.client.hello["version"] == 1
    result = await sb.run(["echo", "hi"])
    assert (result.exit_code, result.stdout) == (0, b"hi\n")
    result = await sb.run("echo err >&2; exit 3")
    assert (result.exit_code, result.stderr) == (3, b"err\n")
    assert (await sb.client.call("ping"))["ev"] == "ok"
    assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.RUNNING
    # the mounts live in the sandbox's own mount namespace, never in the host's table
    assert _mounts() == mounts_before
    await sb.runtime.destroy(sb.instance)
    assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.MISSING
    nothing_left(sb.instance)
    assert _mounts() == mounts_before
    await sb.runtime.destroy(sb.instance)  # idempotent
    with pytest.raises(InvalidState):
        await sb.runtime.pause(sb.instance)


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_reconnect_replays_hello(ns_sandbox) -> None:
    sb = await ns_sandbox()
    await sb.run("echo one > /tmp/f")
    second = await sb.connect()  # replaces the first connection at the shim
    assert second.hello["version"] == 1
    sb.client = second
    assert (await sb.run("cat /tmp/f")).stdout == b"one\n"


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_environment_and_identity(ns_sandbox) -> None:
    sb = await ns_sandbox(env={"FOO": "bar"}, hostname="box1")
    result = await sb.run("echo $FOO $(hostname) $(id -u) $PATH")
    assert result.out.split()[:3] == ["bar", "box1", "0"]
    assert (await sb.run("id -u", user="user")).out.strip() == "1000"
    # the template's files belong to the sandbox's root and user, not to "nobody"
    stat = await sb.run("stat -c '%U %G' /etc/passwd /usr/bin/env /home/user")
    assert stat.out.split("\n")[:3] == ["root root", "root root", "user user"]


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_writes_land_in_the_sandbox_layer_only(ns_sandbox, host_rootfs) -> None:
    sb = await ns_sandbox()
    assert (await sb.run("echo changed > /etc/motd-test && useradd -m alice && id -u alice")).exit_code == 0
    assert (sb.upper / "etc" / "motd-test").read_text() == "changed\n"
    assert not (host_rootfs.lower[0] / "etc" / "motd-test").exists()  # the template is untouched
    other = await ns_sandbox()
    assert (await other.run("test -e /etc/motd-test")).exit_code == 1


# --- limits ------------------------------------------------------------------------------------------------

_MEMORY_BOMB = "b = []\nwhile True:\n    b.append(bytearray(16 * 1024 * 1024))\n"
_FORK_COUNT = """
import os, signal, time
children = []
try:
    while len(children) < 10000:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
except BlockingIOError:
    print("EAGAIN", len(children), flush=True)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_memory_limit_kills_the_hog_not_the_sandbox(ns_sandbox) -> None:
    sb = await ns_sandbox(limits=Limits(memory_mb=96))
    result = await sb.run(["python3", "-c", _MEMORY_BOMB])
    assert result.signal == 9 or result.exit_code in (137, -9)
    cgroup = _cgroups.SandboxCgroup.from_json(dict(sb.instance.extra["cgroup"]))
    assert cgroup.oom_kills() >= 1
    assert result.oom_killed  # the agent learnt it from the cgroup's counter (corral.agent.memory)
    assert (await sb.run(["echo", "alive"])).stdout == b"alive\n"  # the agent survived


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_pids_limit_stops_a_fork_bomb(ns_sandbox) -> None:
    sb = await ns_sandbox(limits=Limits(pids=40))
    result = await sb.run(["python3", "-c", _FORK_COUNT])
    words = result.out.split()
    assert words[0] == "EAGAIN", result
    assert int(words[1]) < 40
    assert (await sb.run(["echo", "alive"])).stdout == b"alive\n"


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_cpu_quota_throttles(ns_sandbox) -> None:
    sb = await ns_sandbox(limits=Limits(cpus=0.1))
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 0.6: pass\nprint(time.process_time())"
    cpu_seconds = float((await sb.run(["python3", "-c", spin])).out)
    cgroup = _cgroups.SandboxCgroup.from_json(dict(sb.instance.extra["cgroup"]))
    stat_file = "cpu.stat"
    stat = dict(
        line.split()
        for line in (cgroup.dirs.get("cpu", cgroup.dirs.get("")) / stat_file).read_text().splitlines()
    )
    assert int(stat.get("nr_throttled", 0)) > 0
    assert cpu_seconds < 0.4  # 0.1 CPU for 0.6 s of wall time is ~0.06 s; unthrottled it would be ~0.6 s


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_disk_quota_gives_enospc_not_a_full_host(ns_sandbox) -> None:
    sb = await ns_sandbox(limits=Limits(disk_mb=32))
    fill = await sb.run("dd if=/dev/zero of=/tmp/big bs=1M count=64 2>&1; sync; df -m / | tail -1")
    assert b"No space left on device" in fill.stdout, fill
    assert not (sb.state_dir / "fs" / "upper").exists()  # the layer lives on the image, not the host dir
    image = sb.state_dir / "disk.img"
    assert image.stat().st_blocks * 512 <= 40 * 1024 * 1024  # sparse, capped near the quota
    again = await sb.run("rm /tmp/big && echo ok > /tmp/small && cat /tmp/small")
    assert again.stdout == b"ok\n"  # space is back once the file is gone
    owner = await sb.run("stat -c %u:%g /tmp/small && stat -c %U / ")
    assert owner.out.split() == ["0:0", "root"]


# --- pause / resume ----------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_pause_stops_and_resume_continues(ns_sandbox) -> None:
    sb = await ns_sandbox()
    ticker = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.01; done"
    async with sb.client.request("exec", {"cmd": ticker, "user": "root"}) as req:
        frames = aiter(req)

        async def next_output() -> bytes:
            while True:
                frame = await anext(frames)
                if frame.get("ev") == "stdout":
                    return frame.payload

        await next_output()
        await sb.runtime.pause(sb.instance)
        assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.PAUSED
        with anyio.move_on_after(0.3):  # drain what was written before the freeze
            while True:
                await next_output()
        got_while_paused = b""
        with anyio.move_on_after(0.5):  # a bounded negative check: nothing may arrive while frozen
            got_while_paused = await next_output()
        assert got_while_paused == b""
        await sb.runtime.resume(sb.instance)
        assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.RUNNING
        with anyio.fail_after(10):
            assert await next_output()


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_destroy_a_paused_sandbox(ns_runtime, host_rootfs, nothing_left) -> None:
    instance = await ns_runtime.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=host_rootfs))
    try:
        await ns_runtime.pause(instance)
    finally:
        await ns_runtime.destroy(instance)
    nothing_left(instance)


# --- failures clean up -------------------------------------------------------------------------------------


def _cgroup_dirs(sandbox_id: str) -> list[str]:
    return [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/corral/{sandbox_id}")]


def _state_entries(runtime) -> set[str]:
    root = runtime.config.state_root
    return {p.name for p in root.iterdir() if p.name.startswith("sb-")} if root.exists() else set()


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_missing_rootfs_cleans_up(ns_runtime) -> None:
    before, mounts = _state_entries(ns_runtime), _mounts()
    sid = SandboxId.new()
    with pytest.raises(InvalidRequest):
        await ns_runtime.create(SandboxSpec(sandbox_id=sid, rootfs=HostLayers(lower=(Path("/nonexistent"),))))
    assert _state_entries(ns_runtime) == before
    assert not _cgroup_dirs(sid)
    assert _mounts() == mounts


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_bwrap_failure_cleans_up(ns_runtime, host_rootfs) -> None:
    before, mounts = _state_entries(ns_runtime), _mounts()
    sid = SandboxId.new()
    # a mount point below a regular file: bwrap cannot create it and exits before the agent starts
    bad = HostLayers(lower=host_rootfs.lower, binds=(Bind(source=Path("/usr"), target="/etc/passwd/usr"),))
    with pytest.raises(RuntimeFailure):
        await ns_runtime.create(SandboxSpec(sandbox_id=sid, rootfs=bad))
    assert _state_entries(ns_runtime) == before
    assert not _cgroup_dirs(sid)
    assert _mounts() == mounts


@pytest.mark.parametrize("after", [0.0, 0.01, 0.03, 0.06, 0.1])
@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_cancelled_create_cleans_up(ns_runtime, host_rootfs, after: float) -> None:
    """Cancelled at some point of its way (cgroups, layer dirs, shim start, agent boot): nothing stays."""
    await ns_runtime.check()
    before, mounts = _state_entries(ns_runtime), _mounts()
    sid = SandboxId.new()
    with anyio.move_on_after(after):
        instance = await ns_runtime.create(SandboxSpec(sandbox_id=sid, rootfs=host_rootfs))
        # finished in time: destroy, even if the deadline passes now (destroy is shielded)
        await ns_runtime.destroy(instance)
    assert _state_entries(ns_runtime) == before
    assert not _cgroup_dirs(sid)
    assert _mounts() == mounts
    assert not [p for p in _shim_processes() if sid in p]


def _shim_processes() -> list[str]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "_shim.py" in cmdline:
                out.append(cmdline)
    return out


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_duplicate_id_is_refused_without_harming_the_first(ns_sandbox, host_rootfs) -> None:
    sb = await ns_sandbox()
    with pytest.raises(CorralError):
        await sb.runtime.create(SandboxSpec(sandbox_id=sb.instance.sandbox_id, rootfs=host_rootfs))
    assert (await sb.run(["echo", "ok"])).stdout == b"ok\n"


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_deadline_kills_the_sandbox(ns_runtime, host_rootfs, nothing_left) -> None:
    import time

    instance = await ns_runtime.create(
        SandboxSpec(sandbox_id=SandboxId.new(), rootfs=host_rootfs, deadline=time.time() + 1.0)
    )
    try:
        stream = await ns_runtime.connect(instance)
        with anyio.fail_after(15):
            while True:  # the shim drops its client once the sandbox is gone and exit.json is written
                try:
                    await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        await stream.aclose()
        observed = await ns_runtime.inspect(instance)
        assert observed.state is ObservedState.EXITED
        assert observed.reason == "deadline"
    finally:
        await ns_runtime.destroy(instance)
    nothing_left(instance)


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_destroy_from_another_process(ns_runtime, host_rootfs, nothing_left) -> None:
    instance = await ns_runtime.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=host_rootfs))
    script = (
        "import anyio, sys\n"
        "from pathlib import Path\n"
        "from corral.runtimes.base import Instance, RuntimeConfig\n"
        "from corral.runtimes.namespace import NamespaceRuntime\n"
        "rt = NamespaceRuntime(RuntimeConfig(state_root=Path(sys.argv[1]), cache_root=Path(sys.argv[2])))\n"
        "anyio.run(rt.destroy, Instance.from_json(sys.argv[3]))\n"
    )
    config = ns_runtime.config
    argv = [sys.executable, "-c", script, str(config.state_root), str(config.cache_root), instance.to_json()]
    try:
        done = await anyio.run_process(argv, check=False)
        assert done.returncode == 0, done.stderr
        assert (await ns_runtime.inspect(instance)).state is ObservedState.MISSING
    finally:
        await ns_runtime.destroy(instance)  # here it finds nothing left to do
    nothing_left(instance)


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_parallel_creates_get_disjoint_uid_ranges(ns_sandbox) -> None:
    handles = []

    async def make() -> None:
        handles.append(await ns_sandbox())

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(make)
    bases = {h.instance.extra["uid_base"] for h in handles}
    assert len(bases) == 4
    for h in handles:
        assert (await h.run("cat /proc/self/uid_map")).out.split()[1] == str(h.instance.extra["uid_base"])


def test_uid_allocator_reclaims_and_releases(tmp_path: Path) -> None:
    from corral.runtimes._uids import UidAllocator

    alloc = UidAllocator(tmp_path)
    for name in ("sb-a", "sb-b", "sb-c", "sb-d", "sb-e"):  # a slot is held while its state dir exists
        (tmp_path / name).mkdir()
    assert [alloc.allocate("sb-a"), alloc.allocate("sb-b")] == [0, 1]
    alloc.release(0, "sb-b")  # not its slot: ignored
    assert alloc.allocate("sb-c") == 2
    alloc.release(0, "sb-a")
    assert alloc.allocate("sb-d") == 0
    (tmp_path / "sb-b").rmdir()  # a sandbox whose destroyer died before releasing its slot
    assert alloc.allocate("sb-e") == 1
    assert UidAllocator.base(1) - UidAllocator.base(0) == 65536 and UidAllocator.base(0) >= 100_000


def test_check_explains_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.errors import RuntimeUnavailable
    from corral.runtimes import namespace

    monkeypatch.setattr(namespace.os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeUnavailable, match="needs root"):
        namespace._check_host()


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_a_killed_shim_takes_the_sandbox_with_it(ns_sandbox) -> None:
    sb = await ns_sandbox()
    stream = await sb.runtime.connect(sb.instance)
    cgroup = _cgroups.SandboxCgroup.from_json(dict(sb.instance.extra["cgroup"]))
    assert len(cgroup.pids()) >= 2  # bwrap and the agent
    shim_fd = os.pidfd_open(sb.instance.extra["shim_pid"])
    os.kill(sb.instance.extra["shim_pid"], signal.SIGKILL)  # the supervisor crashes
    with anyio.fail_after(10):
        while True:  # its socket closes when it dies
            try:
                await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
        # the socket closes while the shim is still exiting; its pidfd turns readable once it has exited
        await anyio.wait_readable(shim_fd)
    os.close(shim_fd)
    await stream.aclose()
    observed = await sb.runtime.inspect(sb.instance)
    assert observed.state is ObservedState.EXITED and observed.reason == "crashed"
    # bwrap's --die-with-parent: nothing of the sandbox outlives its shim (destroy would also kill leftovers)
    with anyio.fail_after(10):
        for pid in cgroup.pids():  # a pidfd becomes readable when its process exits
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                await anyio.wait_readable(pidfd)
            finally:
                os.close(pidfd)


# --- non-Python root file systems ------------------------------------------------------------------------


def _busybox_rootfs(dest: Path) -> Path:
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", dest / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "id", "ps", "touch", "mkdir"):
        (dest / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "root", "home/user", "etc", "proc", "dev"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    os.chown(dest / "home" / "user", 1000, 1000)
    return dest


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.busybox
@pytest.mark.anyio
async def test_busybox_rootfs_without_python(ns_sandbox, tmp_path: Path) -> None:
    rootfs = _images_rootfs.rootfs_from_directory(_busybox_rootfs(tmp_path / "bb"))
    sb = await ns_sandbox(rootfs=rootfs)
    result = await sb.run("echo hi; ls /; test -e /usr/bin/python3 || echo no-python")
    assert result.exit_code == 0
    lines = result.out.split()
    assert lines[0] == "hi" and "no-python" in lines and "bin" in lines
    assert (await sb.run("touch /tmp/x && ls /tmp")).out.strip() == "x"


# --- helpers without a sandbox -----------------------------------------------------------------------------


def test_cgroup_v2_writes_on_a_fake_tree(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    layout = _cgroups.CgroupLayout(version=2, roots={"": root})
    cg = _cgroups.SandboxCgroup.for_sandbox(layout, "sb-test")
    d = root / "corral" / "sb-test"
    d.mkdir(parents=True)
    (d / "memory.swap.max").write_text("max\n")
    cg.create(Limits(memory_mb=64, cpus=0.5, pids=50))
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (root / "corral" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (d / "memory.max").read_text() == str(64 * 1024 * 1024)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "50"
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert cg.procs_files == [str(d / "cgroup.procs")]
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")  # what the kernel reports once frozen
    cg.freeze()
    assert (d / "cgroup.freeze").read_text() == "1" and cg.frozen()
    cg.thaw()
    assert (d / "cgroup.freeze").read_text() == "0"
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    assert cg.oom_kills() == 2
    assert _cgroups.SandboxCgroup.from_json(cg.to_json()) == cg


_MOUNTINFO_V1 = """\
25 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:8 - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
32 25 0:28 / /sys/fs/cgroup/pids rw,relatime shared:10 - cgroup cgroup rw,pids
33 25 0:29 / /sys/fs/cgroup/freezer rw,relatime shared:11 - cgroup cgroup rw,freezer
34 25 0:30 / /sys/fs/cgroup/unified rw,relatime shared:12 - cgroup2 cgroup2 rw
"""


def test_detect_layout_v1_and_v2(tmp_path: Path) -> None:
    layout = _cgroups.detect_layout(_MOUNTINFO_V1)
    assert layout.version == 1
    assert layout.roots["cpu"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert layout.roots["memory"] == Path("/sys/fs/cgroup/memory")
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    v2 = f"25 1 254:0 / / rw - ext4 /dev/vda rw\n40 25 0:30 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    assert _cgroups.detect_layout(v2) == _cgroups.CgroupLayout(version=2, roots={"": tmp_path})
    with pytest.raises(CorralError):
        _cgroups.detect_layout("25 1 254:0 / / rw - ext4 /dev/vda rw\n")


def test_seccomp_program_compiles() -> None:
    program = _seccomp.build_filter()
    assert len(program) % 8 == 0 and len(program) > 8 * len(_seccomp.DENIED_SYSCALLS) // 2


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in attrs.items():
        setattr(info, k, v)
    return info


@pytest.mark.root  # restoring numeric ownership needs root
def test_rootfs_tarball_keeps_what_a_rootfs_needs(tmp_path: Path) -> None:
    tarball = tmp_path / "rootfs.tar"
    tarball.write_bytes(
        _tar(
            [
                (_info("tmp", tarfile.DIRTYPE, mode=0o1777), b""),
                (_info("home/user", tarfile.DIRTYPE, mode=0o755, uid=1000, gid=1000), b""),
                (_info("bin/tool", mode=0o4755), b"#!/bin/sh\n"),
                (_info("etc/alt", tarfile.SYMTYPE, linkname="/bin/tool"), b""),
                (_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
            ]
        )
    )
    made = _images_rootfs.tarball_layer(tarball, LayerStore(tmp_path / "cache"))
    root = made.path
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (root / "home/user").stat().st_uid == 1000
    assert (root / "bin/tool").stat().st_mode & 0o7777 == 0o755  # setuid dropped
    assert os.readlink(root / "etc/alt") == "/bin/tool"  # absolute links are the rootfs's own
    assert not (root / "dev/null").exists()  # device nodes skipped
    again = _images_rootfs.tarball_layer(tarball, LayerStore(tmp_path / "cache"))
    assert again.path == root and made.created and not again.created  # cached by digest


@pytest.mark.parametrize(
    "member",
    [
        _info("../escape"),
        _info("etc", tarfile.SYMTYPE, linkname="../../.."),
        _info("hard", tarfile.LNKTYPE, linkname="../../outside"),
    ],
    ids=["dotdot", "symlink-out", "hardlink-out"],
)
@pytest.mark.root
def test_rootfs_tarball_refuses_escapes(tmp_path: Path, member: tarfile.TarInfo) -> None:
    tarball = tmp_path / "bad.tar"
    members = [(member, b"" if member.issym() or member.islnk() else b"x")]
    if member.issym():
        members.append((_info("etc/passwd"), b"pwned"))
    tarball.write_bytes(_tar(members))
    with pytest.raises(InvalidRequest):
        _images_rootfs.tarball_layer(tarball, LayerStore(tmp_path / "cache"))
    assert not (tmp_path / "escape").exists() and not list((tmp_path / "cache").glob("*"))


@pytest.mark.root
def test_host_template_copies_no_secrets(tmp_path: Path) -> None:
    spec = _images_rootfs.ensure_host_template(tmp_path)
    etc = spec.lower[0] / "etc"
    users = [line.split(":")[0] for line in (etc / "passwd").read_text().splitlines()]
    assert users == ["root", "user", "nobody"]
    assert "$" not in (etc / "shadow").read_text()  # no password hashes, the host's or any
    for secret in ("ssh", "machine-id", "gshadow", "ssl/private", "apt", "sudoers", "hostname-"):
        assert not (etc / secret).exists(), secret
    assert (spec.lower[0] / "home" / "user").stat().st_uid == 1000
    assert (spec.lower[0] / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert [b.target for b in spec.binds][:1] == ["/usr"]
    assert _images_rootfs.ensure_host_template(tmp_path) == spec  # built once


@pytest.mark.root
def test_teardown_never_deletes_through_a_mount(tmp_path: Path) -> None:
    from corral.ids import SandboxId
    from corral.runtimes._local import LocalSandbox
    from corral.runtimes.base import RuntimeConfig
    from corral.runtimes.namespace import NamespaceRuntime

    state_dir = tmp_path / "sb-aaaaaaaaaaaaaaaa"
    target = state_dir / "fs" / "merged"
    target.mkdir(parents=True)
    cgroup = _cgroups.SandboxCgroup(version=1, dirs={"pids": tmp_path / "no-such-cgroup"})
    subprocess.run(["mount", "-t", "tmpfs", "corral-test", str(target)], check=True)
    runtime = NamespaceRuntime(RuntimeConfig(state_root=tmp_path, cache_root=tmp_path / "cache"))
    sandbox = LocalSandbox(
        sandbox_id=SandboxId("sb-aaaaaaaaaaaaaaaa"), state_dir=state_dir, extra={"cgroup": cgroup.to_json()}
    )
    try:
        (target / "precious").write_text("keep me")
        with pytest.raises(RuntimeFailure):
            runtime._teardown(sandbox)
        assert (target / "precious").read_text() == "keep me"
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_overlay_options_escape_separators(tmp_path: Path) -> None:
    dirs = _rootfs.LayerDirs(
        lowers=(Path("/a:b"), Path("/c,d")), binds=(), upper=Path("/u"), work=Path("/w"), merged=Path("/m")
    )
    assert _rootfs.overlay_options(dirs).startswith(r"lowerdir=/a\:b:/c\,d,upperdir=/u,workdir=/w")


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_destroy_asked_inside_a_cancelled_scope_still_cleans_up(
    ns_runtime, host_rootfs, nothing_left
) -> None:
    """A caller whose deadline has passed by the time its create returned must not leave the sandbox running:
    destroy is shielded (an unshielded worker-thread call would be cancelled before it started)."""
    instance = await ns_runtime.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=host_rootfs))
    with anyio.CancelScope() as scope:
        scope.cancel()
        await ns_runtime.destroy(instance)
    nothing_left(instance)


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.anyio
async def test_clients_that_hang_up_mid_stream_do_not_take_the_sandbox_down(ns_sandbox) -> None:
    """A client resetting its connection while the agent streams to it: the shim's send to it fails and drops
    it, and the same select() may still hold a read event of that client. The shim once died of that stale
    event (KeyError), and the sandbox with it (seen as "crashed"); now such events are skipped."""
    sb = await ns_sandbox()
    for i in range(40):
        with _shim_module.unix_path(str(sb.state_dir / "agent.sock")) as path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
        sock.sendall(encode({"id": f"r{i}", "op": "exec", "argv": ["yes", "x" * 200], "user": "root"}))
        got = 0
        while got < 256 * 1024:  # the agent is streaming to us: the hello, then output
            got += len(sock.recv(65536))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        sock.close()
    result = await sb.run(["echo", "still here"])
    assert result.exit_code == 0 and result.stdout == b"still here\n"
    assert _proc.pid_alive(sb.instance.extra["shim_pid"], sb.instance.extra["shim_start_ticks"])
