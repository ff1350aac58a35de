"""The microvm runtime on real QEMU (TCG): conformance, limits, pause, snapshots and forks, bad input.

Most tests restore the session's golden snapshot (``microvm_sandbox()``, ~1.5 s) instead of booting (~5-10 s
under TCG); the ones about boot itself or boot-time limits boot. At most two VMs run at once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from corral.errors import InvalidRequest, RuntimeFailure, RuntimeUnavailable
from corral.ids import SandboxId
from corral.runtimes.base import HostLayers, Limits, ObservedState, RuntimeConfig, SandboxSpec
from corral.runtimes.microvm.guest import _depends, module_load_order
from corral.runtimes.microvm.hostside import vm_processes as _vm_processes
from corral.runtimes.microvm.runtime import MicroVMOptions, MicroVMRuntime
from corral.testing import check_runtime

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.anyio]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_microvm_conforms(
    runtime_config: RuntimeConfig, host_rootfs: HostLayers, microvm_cache: Path
) -> None:
    await check_runtime(
        lambda: MicroVMRuntime(runtime_config, MicroVMOptions(cache_dir=str(microvm_cache), golden=False)),
        rootfs=host_rootfs,
        timeout=600,
    )


async def test_the_guest_runs_its_own_kernel_without_a_network_device(microvm_sandbox: Any) -> None:
    sb = await microvm_sandbox()
    assert (await sb.run("uname -r")).out.strip() != os.uname().release
    assert (await sb.run("ls /sys/class/net")).out.split() == ["lo"]
    assert (await sb.run("cat /proc/1/cmdline | tr '\\0' ' '")).out.count("corral.agent") == 1
    assert (await sb.run("python3 -c 'print(6*7)'")).out == "42\n"  # the template's /usr, from its erofs


async def test_boot_limits_memory_vcpus_pids_and_disk(microvm_sandbox: Any) -> None:
    sb = await microvm_sandbox(boot=True, limits=Limits(memory_mb=256, cpus=2, pids=64, disk_mb=64))
    mem_kb = int((await sb.run("awk '/MemTotal/ {print $2}' /proc/meminfo")).out)
    assert 180_000 < mem_kb <= 256 * 1024  # the guest's RAM is the limit (minus what the kernel keeps)
    assert (await sb.run("nproc")).out.strip() == "2"
    assert (await sb.run("cat /sys/fs/cgroup/sandbox/pids.max")).out.strip() == "64"
    bomb = await sb.run("for i in $(seq 100); do sleep 3 & done 2>&1; wait", timeout=120)
    said = bomb.stdout + bomb.stderr
    assert b"Cannot fork" in said or b"Resource temporarily unavailable" in said  # the guest's pids.max
    await anyio.sleep(4)  # the sleeps end, and their pids are free again
    full = await sb.run("dd if=/dev/zero of=/root/fill bs=1M count=200 2>&1; sync", timeout=120)
    assert "No space left on device" in full.out  # the writable disk is disk_mb large
    assert (await sb.run("echo still-alive")).out == "still-alive\n"


async def test_pause_stops_the_guest_and_resume_continues_it(microvm_sandbox: Any) -> None:
    sb = await microvm_sandbox()
    # each tick is renamed into place: a plain `>` truncates first, and a read in between sees '' (CI did)
    ticker = "while :; do date +%s%N > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 0.05; done"
    await sb.run(f"({ticker}) >/dev/null 2>&1 &")
    await sb.run("sleep 0.5")
    await sb.runtime.pause(sb.instance)
    assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.PAUSED
    assert await anyio.to_thread.run_sync(sb.runtime.engine.status, sb.state_dir) == "paused"  # QMP says
    await sb.runtime.resume(sb.instance)
    assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.RUNNING
    before = (await sb.run("cat /tmp/tick")).out
    await sb.run("sleep 0.5")
    assert (await sb.run("cat /tmp/tick")).out != before


async def test_pause_to_disk_frees_the_vm_and_resume_restores_it(microvm_disk_sandbox: Any) -> None:
    sb = await microvm_disk_sandbox()
    await sb.run('echo kept > /tmp/note; python3 -c \'open("/dev/shm/m","w").write("x"*1000)\'')
    await sb.runtime.pause(sb.instance)
    assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.PAUSED
    assert not _vm_processes(sb.state_dir)  # no QEMU while paused: the memory is on disk
    assert (sb.state_dir / "checkpoint" / "memory").stat().st_size > 1 << 20
    await sb.runtime.resume(sb.instance)
    # files and RAM (a tmpfs) came back, on the same connection
    assert (await sb.run("cat /tmp/note; wc -c < /dev/shm/m")).out.split() == ["kept", "1000"]


async def test_a_failed_pause_to_disk_logs_qemus_reason_and_the_vm_runs_on(
    microvm_disk_sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sb = await microvm_disk_sandbox()
    checkpoint = sb.state_dir / "checkpoint"
    # a memory image that cannot fit: QEMU's migration fails part-way with ENOSPC
    await anyio.run_process(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "corral-test", str(checkpoint)]
    )
    try:
        with (
            caplog.at_level(logging.ERROR),
            pytest.raises(RuntimeFailure, match=r"^could not pause the microVM$"),
        ):
            await sb.runtime.pause(sb.instance)
    finally:
        await anyio.run_process(["umount", str(checkpoint)])
    # the operator's log says why, in QEMU's words, not only that the shim's helper failed
    assert "'status': 'failed'" in caplog.text and "error-desc" in caplog.text, caplog.text
    assert (await sb.runtime.inspect(sb.instance)).state is ObservedState.RUNNING  # not left stopped
    assert await anyio.to_thread.run_sync(sb.runtime.engine.status, sb.state_dir) == "running"
    assert (await sb.run("echo still-here")).out == "still-here\n"


async def test_forks_copy_memory_and_disk_then_diverge(microvm_sandbox: Any) -> None:
    parent = await microvm_sandbox()
    await parent.run("echo from-parent > /root/a.txt; (sleep 1000 &) ; echo 1 > /dev/shm/counter")
    snap = await parent.runtime.snapshot(parent.instance, f"fork-test-{os.getpid()}")
    try:
        assert (await parent.run("echo parent-runs-on")).out == "parent-runs-on\n"
        child = await microvm_sandbox(upper_seed=snap.files, restore_from=snap.memory)
        assert (await child.run("cat /root/a.txt /dev/shm/counter")).out == "from-parent\n1\n"
        assert (await child.run("pgrep -x sleep")).exit_code == 0  # processes came along
        await child.run("echo from-child > /root/a.txt")
        assert (await parent.run("cat /root/a.txt")).out == "from-parent\n"  # each has its own disk
        # the guest RNG was reseeded at restore: the copies do not draw the same numbers
        draw = "python3 -c 'import os; print(os.urandom(16).hex())'"
        assert (await child.run(draw)).out != (await parent.run(draw)).out
        assert abs(float((await child.run("date +%s.%N")).out) - time.time()) < 10  # its clock is the host's
        store = parent.runtime.config.cache_root / "snapshots"
        assert _mode(store) == _mode(snap.memory.path) == 0o700  # private to root, like the other runtimes'
    finally:
        await parent.runtime.discard(snap)
    assert not (parent.runtime.config.cache_root / "snapshots" / f"fork-test-{os.getpid()}").exists()


async def test_a_second_create_of_one_shape_restores_the_first_ones_golden_image(
    microvm_sandbox: Any,
) -> None:
    limits = Limits(memory_mb=320)  # a shape of its own: its first create boots
    first = await microvm_sandbox(boot=True, limits=limits)
    assert not json.loads((first.state_dir / "shim.json").read_text())["restored"]
    second = await microvm_sandbox(boot=True, limits=limits)
    assert json.loads((second.state_dir / "shim.json").read_text())["restored"]
    draw = "python3 -c 'import os, time; print(os.urandom(16).hex(), time.time())'"
    rand1, _ = (await first.run(draw)).out.split()
    rand2, t2 = (await second.run(draw)).out.split()
    assert rand1 != rand2  # reseeded at restore
    assert abs(float(t2) - time.time()) < 10  # and its clock set to the host's, not the image's
    assert (await second.run("awk '/MemTotal/ {print $2}' /proc/meminfo")).out.strip() == (
        await first.run("awk '/MemTotal/ {print $2}' /proc/meminfo")
    ).out.strip()


async def test_a_guest_that_misses_its_boot_timeout_is_removed_and_logged(
    runtime_config: RuntimeConfig,
    host_rootfs: HostLayers,
    caplog: pytest.LogCaptureFixture,
    microvm_cache: Path,
) -> None:
    class Impatient(MicroVMRuntime):
        ready_timeout = 1.5  # the guest is still in its kernel then

    runtime = Impatient(runtime_config, MicroVMOptions(cache_dir=str(microvm_cache), golden=False))
    spec = SandboxSpec(sandbox_id=SandboxId.new(), rootfs=host_rootfs)
    with (
        caplog.at_level(logging.ERROR, logger="corral.runtimes.microvm"),
        pytest.raises(RuntimeFailure, match=r"did not start its agent within 1\.5 s") as err,
    ):
        await runtime.create(spec)
    assert str(runtime_config.state_root) not in str(err.value)  # no host path for the client
    assert "console ended with" in caplog.text  # the console went to the log instead
    state_dir = runtime_config.state_root / spec.sandbox_id
    assert not state_dir.exists()
    assert not _vm_processes(state_dir)


async def test_missing_tools_name_the_package(runtime_config: RuntimeConfig) -> None:
    runtime = MicroVMRuntime(runtime_config, MicroVMOptions(qemu="corral-no-such-qemu"))
    with pytest.raises(RuntimeUnavailable, match="apt-get install qemu-system-x86"):
        await runtime.check()
    with pytest.raises(InvalidRequest, match="accel"):
        MicroVMOptions(accel="hvf")


def test_initramfs_modules_come_with_their_dependencies(microvm_cache: Path) -> None:
    kernel_dirs = sorted((microvm_cache / "microvm" / "kernel").glob("*/lib/modules/*"))
    if not kernel_dirs:
        pytest.skip("no guest kernel in the cache yet (the boot tests fetch it)")
    order = module_load_order(kernel_dirs[-1], ("virtio_blk", "erofs"))
    names = [p.name.removesuffix(".ko").replace("-", "_") for p in order]
    assert {"virtio", "virtio_ring", "virtio_blk", "erofs"} <= set(names)
    for index, ko in enumerate(order):  # every module after all it depends on
        assert set(_depends(ko)) <= set(names[:index]), (names[index], _depends(ko))
