"""The gvisor runtime on this host: real runsc (ptrace platform), real cgroups, the real agent.

Lifecycle (create → connect → exec → files → inspect → destroy), the OCI spec as the sandbox sees it, limits
(memory, processes, cpu), pause/resume, teardown that leaves nothing (also after the shim was SIGKILLed,
from a fresh runtime object, and when paused), every failure path of create, non-Python root file systems,
plus unit tests of the OCI config builder.

Sandboxes whose checks only read share one module-scoped sandbox (a gVisor boot costs ~0.4 s); tests that
break, limit or pause a sandbox get their own.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.from_thread
import pytest

from corral.core import files
from corral.errors import Conflict, CorralError, InvalidRequest, RuntimeFailure, RuntimeUnavailable
from corral.ids import SandboxId
from corral.images import rootfs as _images_rootfs
from corral.runtimes import _oci
from corral.runtimes import gvisor as gvisor_mod
from corral.runtimes.base import HostLayers, Instance, Limits, ObservedState, SandboxSpec


def real(test):  # type: ignore[no-untyped-def]
    """Marks a test that boots real gVisor sandboxes (skipped with the reason where runsc or root is missing)."""
    return pytest.mark.root(pytest.mark.runsc(pytest.mark.anyio(test)))


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def shared(gvisor_module_sandbox):
    """One sandbox with default limits for the read-only checks of this module."""
    return await gvisor_module_sandbox(env={"FOO": "bar"}, hostname="box1")


# --- what a destroyed sandbox must not leave ---------------------------------------------------------------


def _mounts() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def _cgroup_dirs(sandbox_id: str) -> list[str]:
    return [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/corral/{sandbox_id}")]


def _host_processes_naming(text: str) -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (
                    Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline[:160]}")
    return found


def assert_gone(instance: Instance, mounts_before: list[str] | None = None) -> None:
    """No runsc/shim process names the sandbox's state dir, no cgroup dir, no state dir, no new mount."""
    assert not _host_processes_naming(instance.ref)
    assert not _cgroup_dirs(instance.sandbox_id)
    assert not Path(instance.ref).exists()
    if mounts_before is not None:
        assert _mounts() == mounts_before


def _cgroup_file(sandbox_id: str, controller: str, name: str) -> str | None:
    """A file of the sandbox's cgroup (v1 ``controller`` hierarchy, or the v2 tree for ``""``), stripped."""
    base = Path("/sys/fs/cgroup") / controller if controller else Path("/sys/fs/cgroup")
    try:
        return (base / "corral" / sandbox_id / name).read_text().strip()
    except OSError:
        return None


def _state_entries(runtime) -> set[str]:
    root = runtime.config.state_root
    return {p.name for p in root.iterdir() if p.name.startswith("sb-")} if root.exists() else set()


# --- lifecycle ---------------------------------------------------------------------------------------------


@real
async def test_create_exec_inspect_destroy(gvisor_sandbox) -> None:
    mounts_before = _mounts()
    sb = await gvisor_sandbox()
    assert sb.client.hello["version"] == 1
    result = await sb.run(["echo", "hi"])
    assert (result.exit_code, result.stdout) == (0, b"hi\n")
    result = await sb.run("echo err >&2; exit 3")
    assert (result.exit_code, result.stderr) == (3, b"err\n")
    assert (await sb.client.call("ping"))["ev"] == "ok"
    assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.RUNNING
    # the sandbox runs under runsc, inside gVisor's kernel (not the host's)
    assert (await sb.run(["uname", "-r"])).out.strip() != os.uname().release
    assert _host_processes_naming(sb.instance.ref)  # runsc run, gofer, sentry
    # the overlay lives in the shim child's mount namespace, never in the host's table
    assert _mounts() == mounts_before
    await sb.runtime.destroy(sb.instance)
    assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.MISSING
    assert_gone(sb.instance, mounts_before)
    await sb.runtime.destroy(sb.instance)  # idempotent


@real
async def test_reconnect_replays_hello(shared) -> None:
    await shared.run("echo one > /tmp/reconnect")
    second = await shared.connect()  # replaces the first connection at the shim
    assert second.hello["version"] == 1
    shared.client = second
    assert (await shared.run("cat /tmp/reconnect")).stdout == b"one\n"


@real
async def test_spec_as_the_sandbox_sees_it(shared) -> None:
    result = await shared.run("echo $FOO $(hostname) $(id -u); cat /proc/self/status")
    words = result.out.split()
    assert words[:3] == ["bar", "box1", "0"]
    caps = int(re.search(r"CapEff:\s*([0-9a-f]+)", result.out).group(1), 16)  # type: ignore[union-attr]
    cap_numbers = {"CAP_CHOWN": 0, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21, "CAP_MKNOD": 27, "CAP_SETUID": 7}
    assert caps & (1 << cap_numbers["CAP_CHOWN"]) and caps & (1 << cap_numbers["CAP_SETUID"])
    for dropped in ("CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_MKNOD"):
        assert not caps & (1 << cap_numbers[dropped]), dropped
    nnp = "import ctypes; print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))"  # PR_GET_NO_NEW_PRIVS
    assert (await shared.run(["python3", "-c", nnp])).out.strip() == "1"
    limits = await shared.run(["python3", "-c", "import resource as r; print(*r.getrlimit(r.RLIMIT_NPROC))"])
    assert limits.out.split() == [str(Limits().pids)] * 2
    assert (await shared.run("id -u", user="user")).out.strip() == "1000"


@real
async def test_host_cgroups_hold_the_limits(shared) -> None:
    sid = shared.instance.sandbox_id
    v1 = _cgroup_file(sid, "memory", "memory.limit_in_bytes")
    if v1 is None:  # cgroup v2 host
        assert _cgroup_file(sid, "", "memory.max") == str(Limits().memory_mb << 20)
        return
    assert v1 == str(Limits().memory_mb << 20)
    assert _cgroup_file(sid, "cpu", "cpu.cfs_quota_us") == str(int(Limits().cpus * 100_000))
    # only a safety net: it counts the sentry's host threads; RLIMIT_NPROC is the process cap
    assert int(_cgroup_file(sid, "pids", "pids.max") or 0) >= _oci.MIN_PIDS_SAFETY_NET
    assert (_cgroup_file(sid, "memory", "cgroup.procs") or "").split(), "sentry and gofer are in the cgroup"


@real
async def test_files_through_the_agent_land_in_the_upper_dir(shared, host_rootfs) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b"world" * 1000

    path = "/home/user/notes/a.txt"  # as the default user, in its home
    n = await files.write(shared.client, path, chunks(), max_bytes=1 << 20)
    assert n == 6 + 5000
    got = b"".join([c async for c in files.read(shared.client, path)])
    assert got == b"hello " + b"world" * 1000
    entry = await files.stat(shared.client, path)
    assert (entry.size, entry.uid) == (n, 1000)
    # the writable layer is the per-sandbox overlay upper dir, on the host's disk (snapshot_fs)
    upper = Path(shared.instance.ref) / "fs" / "upper"
    assert (upper / "home/user/notes/a.txt").read_bytes() == got
    assert not (host_rootfs.lower[0] / "home/user/notes").exists()  # the template is untouched
    assert (await shared.run(f"cat {path} | wc -c")).out.strip() == str(n)


@real
async def test_sandboxes_do_not_share_writes(gvisor_sandbox, shared) -> None:
    await shared.run("echo mine > /etc/only-in-shared")
    other = await gvisor_sandbox()
    assert (await other.run("test -e /etc/only-in-shared")).exit_code == 1


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


async def _wait_until_gone(runtime, instance: Instance) -> None:
    """Wait for the event "the sandbox ended": the shim drops its client once exit.json is written."""
    try:
        stream = await runtime.connect(instance)
    except CorralError:
        return  # the shim is already gone
    with anyio.fail_after(30):
        while True:
            try:
                await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
    await stream.aclose()


def _reap(pid: int) -> None:
    """Wait for our own child (the shim was started by this process) to exit."""
    with contextlib.suppress(ChildProcessError):  # already reaped by the subprocess module
        os.waitpid(pid, 0)


def _mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemAvailable")


@real
async def test_memory_bomb_is_contained(gvisor_sandbox) -> None:
    """gVisor enforces the limit on the whole sandbox: exceeding it OOM-kills the sandbox (research §2.1)."""
    available_before = _mem_available_mib()
    sb = await gvisor_sandbox(limits=Limits(memory_mb=128))
    try:
        result = await sb.run(["python3", "-c", _MEMORY_BOMB], timeout=60)
    except CorralError:  # AgentUnavailable: the sandbox, agent included, was killed
        result = None
    if result is not None:  # only the hog died: the sandbox must still answer
        assert result.signal == 9 or result.exit_code in (137, -9), result
        assert (await sb.run(["echo", "alive"])).stdout == b"alive\n"
    else:
        await _wait_until_gone(sb.runtime, sb.instance)
        assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.EXITED
    # the host did not pay for it (128 MiB of limit; allow for everything else on the machine)
    assert _mem_available_mib() > available_before - 1024


@real
@pytest.mark.parametrize("user", ["user", "root"])
async def test_process_cap_stops_a_fork_bomb(gvisor_sandbox, user: str) -> None:
    sb = await gvisor_sandbox(limits=Limits(pids=40))
    result = await sb.run(["python3", "-c", _FORK_COUNT], user=user, timeout=120)
    words = result.out.split()
    assert words and words[0] == "EAGAIN", result
    assert int(words[1]) <= 40  # the sentry lets the cap's owner reach the limit exactly
    assert (await sb.run(["echo", "alive"])).stdout == b"alive\n"


@real
async def test_cpu_quota_throttles(gvisor_sandbox) -> None:
    sb = await gvisor_sandbox(limits=Limits(cpus=0.2))
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.0: pass\n"
    assert (await sb.run(["python3", "-c", spin])).exit_code == 0
    text = _cgroup_file(sb.instance.sandbox_id, "cpu", "cpu.stat") or _cgroup_file(
        sb.instance.sandbox_id, "", "cpu.stat"
    )
    stat = dict(line.split() for line in (text or "").splitlines())
    assert int(stat["nr_throttled"]) > 0


@real
async def test_disk_quota_gives_enospc(gvisor_sandbox) -> None:
    sb = await gvisor_sandbox(limits=Limits(disk_mb=32))
    fill = await sb.run("dd if=/dev/zero of=/root/big bs=1M count=64 2>&1; echo rc=$?")
    assert "No space left on device" in fill.out and "rc=0" not in fill.out, fill
    image = Path(sb.instance.ref) / "disk.img"
    assert image.stat().st_blocks * 512 < 40 * 1024 * 1024  # the host paid at most the quota (sparse image)
    assert (await sb.run("rm /root/big && echo ok > /root/small && cat /root/small")).out == "ok\n"


# --- pause / resume ----------------------------------------------------------------------------------------


@real
async def test_pause_stops_and_resume_continues(gvisor_sandbox) -> None:
    sb = await gvisor_sandbox()
    ticker = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.02; done"
    async with sb.client.request("exec", {"cmd": ticker, "user": "root"}) as req:
        frames = aiter(req)

        async def next_numbers() -> list[int]:
            while True:
                frame = await anext(frames)
                if frame.get("ev") == "stdout":
                    return [int(x) for x in frame.payload.split()]

        last = max(await next_numbers())
        await sb.runtime.pause(sb.instance)
        assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.PAUSED
        with anyio.move_on_after(0.3):  # drain what was written before the pause
            while True:
                last = max([last, *await next_numbers()])
        got_while_paused: list[int] = []
        with anyio.move_on_after(0.5):  # a bounded negative check: nothing may arrive while paused
            got_while_paused = await next_numbers()
        assert got_while_paused == []
        await sb.runtime.resume(sb.instance)
        assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.RUNNING
        with anyio.fail_after(10):
            after = await next_numbers()
        assert after[0] == last + 1  # the same process continued where it stopped


@real
async def test_destroy_a_paused_sandbox(gvisor_runtime, host_rootfs) -> None:
    mounts_before = _mounts()
    instance = await gvisor_runtime.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=host_rootfs))
    try:
        await gvisor_runtime.pause(instance)
    finally:
        await gvisor_runtime.destroy(instance)
    assert_gone(instance, mounts_before)


# --- teardown without the creator --------------------------------------------------------------------------


@real
async def test_destroy_from_a_fresh_runtime_after_the_shim_was_killed(gvisor_runtime, host_rootfs) -> None:
    """destroy needs only the persisted Instance, and copes with an orphaned `runsc run`."""
    mounts_before = _mounts()
    instance = await gvisor_runtime.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=host_rootfs))
    try:
        os.kill(instance.extra["shim_pid"], signal.SIGKILL)
        await anyio.to_thread.run_sync(_reap, instance.extra["shim_pid"])
        stored = Instance.from_json(instance.to_json())
        other = gvisor_mod.GVisorRuntime(gvisor_runtime.config)
        observed = await other.inspect(stored)
        assert observed.state is ObservedState.EXITED  # the supervisor is gone: no agent to talk to
        await other.destroy(stored)
    finally:
        await gvisor_runtime.destroy(instance)
    assert_gone(instance, mounts_before)


@real
async def test_deadline_kills_the_sandbox(gvisor_runtime, host_rootfs) -> None:
    instance = await gvisor_runtime.create(
        SandboxSpec(sandbox_id=SandboxId.new(), rootfs=host_rootfs, deadline=time.time() + 1.0)
    )
    try:
        await _wait_until_gone(gvisor_runtime, instance)
        observed = await gvisor_runtime.inspect(instance)
        assert observed.state is ObservedState.EXITED
        assert observed.reason == "deadline"
    finally:
        await gvisor_runtime.destroy(instance)
    assert_gone(instance)


# --- failures clean up -------------------------------------------------------------------------------------


@real
async def test_missing_rootfs_cleans_up(gvisor_runtime) -> None:
    before, mounts = _state_entries(gvisor_runtime), _mounts()
    sid = SandboxId.new()
    with pytest.raises(InvalidRequest) as err:
        await gvisor_runtime.create(
            SandboxSpec(sandbox_id=sid, rootfs=HostLayers(lower=(Path("/nonexistent"),)))
        )
    assert "/nonexistent" not in str(err.value)
    assert _state_entries(gvisor_runtime) == before
    assert not _cgroup_dirs(sid)
    assert _mounts() == mounts


@real
async def test_agent_that_never_starts_cleans_up(gvisor_runtime, host_rootfs, monkeypatch) -> None:
    """runsc boots, but the container's init cannot be executed: no hello, a clean failure, nothing left."""
    monkeypatch.setattr(gvisor_mod, "agent_argv", lambda bundle: ["/.corral/no-such-agent"])
    before, mounts = _state_entries(gvisor_runtime), _mounts()
    sid = SandboxId.new()
    with pytest.raises(RuntimeFailure) as err:
        await gvisor_runtime.create(SandboxSpec(sandbox_id=sid, rootfs=host_rootfs))
    message = str(err.value)
    assert str(gvisor_runtime.config.state_root) not in message and "runsc" not in message
    assert _state_entries(gvisor_runtime) == before
    assert not _cgroup_dirs(sid)
    assert not _host_processes_naming(str(gvisor_runtime.config.state_root / sid))
    assert _mounts() == mounts


@real
async def test_failure_after_boot_tears_the_running_sandbox_down(
    gvisor_runtime, host_rootfs, monkeypatch
) -> None:
    """A check that fails once runsc and the agent are up must still leave nothing behind."""

    def refuse(sandbox_id: str, limits: Limits) -> None:
        assert _host_processes_naming(str(gvisor_runtime.config.state_root / sandbox_id))  # it was running
        raise RuntimeFailure("could not apply the sandbox's memory limit")

    monkeypatch.setattr(gvisor_mod, "_verify_limits", refuse)
    before, mounts = _state_entries(gvisor_runtime), _mounts()
    sid = SandboxId.new()
    with pytest.raises(RuntimeFailure):
        await gvisor_runtime.create(SandboxSpec(sandbox_id=sid, rootfs=host_rootfs))
    assert _state_entries(gvisor_runtime) == before
    assert not _cgroup_dirs(sid)
    assert not _host_processes_naming(str(gvisor_runtime.config.state_root / sid))
    assert _mounts() == mounts


@real
async def test_cancelled_create_leaves_nothing(gvisor_runtime, host_rootfs, monkeypatch) -> None:
    """Cancel create() once runsc and the agent are up (its last step is held until the cancel is issued)."""
    booted, release = anyio.Event(), threading.Event()

    def hold(sandbox_id: str, limits: Limits) -> None:  # runs in create's worker thread
        anyio.from_thread.run_sync(booted.set)
        release.wait(30)

    monkeypatch.setattr(gvisor_mod, "_verify_limits", hold)
    before, mounts = _state_entries(gvisor_runtime), _mounts()
    sid = SandboxId.new()
    async with anyio.create_task_group() as tg:
        tg.start_soon(gvisor_runtime.create, SandboxSpec(sandbox_id=sid, rootfs=host_rootfs))
        await booted.wait()
        assert _host_processes_naming(str(gvisor_runtime.config.state_root / sid))  # it is running
        tg.cancel_scope.cancel()
        release.set()
    assert _state_entries(gvisor_runtime) == before
    assert not _cgroup_dirs(sid)
    assert not _host_processes_naming(str(gvisor_runtime.config.state_root / sid))
    assert _mounts() == mounts


@real
async def test_duplicate_id_is_refused_without_harming_the_first(shared, host_rootfs) -> None:
    with pytest.raises(Conflict):
        await shared.runtime.create(SandboxSpec(sandbox_id=shared.instance.sandbox_id, rootfs=host_rootfs))
    assert (await shared.run(["echo", "ok"])).stdout == b"ok\n"


@real
async def test_check_says_how_to_install_runsc(runtime_config, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeUnavailable) as err:
        await gvisor_mod.GVisorRuntime(runtime_config).check()
    assert "apt-get install runsc" in str(err.value)


# --- root file systems -------------------------------------------------------------------------------------


def _busybox_rootfs(dest: Path) -> Path:
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", dest / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "id", "touch", "mkdir", "wc"):
        (dest / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "root", "home/user", "etc"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    os.chown(dest / "home" / "user", 1000, 1000)
    return dest


@real
@pytest.mark.busybox
async def test_busybox_rootfs_without_python(gvisor_sandbox, tmp_path: Path) -> None:
    rootfs = _images_rootfs.rootfs_from_directory(_busybox_rootfs(tmp_path / "bb"))
    sb = await gvisor_sandbox(rootfs=rootfs)
    result = await sb.run("echo hi; ls /; test -e /usr/bin/python3 || echo no-python")
    assert result.exit_code == 0, result
    lines = result.out.split()
    assert lines[0] == "hi" and "no-python" in lines and "bin" in lines
    assert (await sb.run("echo x > /root/f && cat /root/f")).out == "x\n"
    assert not (tmp_path / "bb" / "root" / "f").exists()  # written to the overlay, not the template


def _runsc_version() -> str:
    out = subprocess.run(["runsc", "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else ""


@real
async def test_coreutils_stat_works(shared) -> None:
    """Debian 12's ls/stat use statx(AT_NO_AUTOMOUNT); runsc 20221219 failed it with EINVAL (we need >= 20240729)."""
    result = await shared.run("ls / && stat -c %a /tmp")
    assert result.exit_code == 0, result


# --- the OCI config, without a sandbox ---------------------------------------------------------------------


def test_oci_config_is_safe_by_default() -> None:
    config = _oci.build_config(
        args=["/agent"],
        root="/r",
        limits=Limits(memory_mb=64, cpus=0.5, pids=50),
        hostname="h",
        env={"A": "1"},
        mounts=[_oci.bind_mount("/usr", "/usr")],
        cgroups_path="/corral/x",
        pids_safety_net=5000,
    )
    process = config["process"]
    assert process["user"] == {"uid": 0, "gid": 0} and process["noNewPrivileges"] is True
    assert "A=1" in process["env"]
    for caps in process["capabilities"].values():
        assert not {"CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_MKNOD", "CAP_SYS_MODULE", "CAP_SYS_PTRACE"} & set(
            caps
        )
    rlimits = {r["type"]: r["hard"] for r in process["rlimits"]}
    assert rlimits["RLIMIT_NPROC"] == 50
    resources = config["linux"]["resources"]
    assert resources["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    assert resources["cpu"] == {"quota": 50_000, "period": 100_000}
    assert resources["pids"] == {"limit": 5000}
    assert config["linux"]["cgroupsPath"] == "/corral/x"
    assert {"type": "network"} in config["linux"]["namespaces"]
    usr = next(m for m in config["mounts"] if m["destination"] == "/usr")
    assert usr["type"] == "bind" and "ro" in usr["options"]
    assert "/proc/kcore" in config["linux"]["maskedPaths"]
    with pytest.raises(ValueError):
        _oci.build_config(
            args=["/a"], root="/r", limits=Limits(), hostname="h", mounts=[_oci.bind_mount("/x", "/tmp")]
        )


def test_oci_config_is_written_atomically_and_privately(tmp_path: Path) -> None:
    config = _oci.build_config(args=["/a"], root="/r", limits=Limits(), hostname="h")
    path = _oci.write_config(tmp_path / "bundle", config)
    assert path.stat().st_mode & 0o777 == 0o600
    assert _oci.linux_resources(Limits(pids=8))["pids"]["limit"] == _oci.MIN_PIDS_SAFETY_NET
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]
