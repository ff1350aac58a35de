"""microVM timings and memory, against raw baselines measured in the same run (never asserted: not a test).

    .venv/bin/python bench/microvm.py [--runs 3] [--cache-dir ~/.cache/corral/microvm]

Measured (p50 / p95 over ``--runs``), QEMU under TCG unless ``--accel kvm`` (only where KVM works):

- boot → first output: ``create()`` with no golden image (a real boot: kernel, initramfs, disks, agent)
  until the first stdout byte of ``echo hi`` run through the agent;
- bare QEMU boot: the same QEMU command line (machine, kernel, initramfs Corral builds, console) but an
  initramfs whose ``/init`` only prints ``hi`` on the console: what booting this kernel costs by itself;
- warm claim → first output: ``create()`` of a shape whose golden image exists (a restore, as warm pools and
  every later create do) until the first stdout byte of ``echo hi``;
- exec round trip: ``echo hi`` through the agent in a running microVM, and the same in a namespace sandbox;
- pause / resume (QMP stop / cont), snapshot (stop + migrate to a file + disk copy + cont), fork (a restore
  of that snapshot with its own disk copy, to its first answer);
- idle memory of one VM's QEMU process after boot and after a restore: RSS and PSS (``smaps_rollup``).

Ratios printed: boot → first output / bare QEMU boot (issue target ≤ 1.2x), warm claim (target ≤ 0.5 s under
TCG), exec microvm / namespace, idle PSS after restore (target ≤ 150 MiB under TCG).
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import quantile

from corral.core.agent_client import AgentClient
from corral.ids import SandboxId
from corral.images.rootfs import ensure_host_template
from corral.runtimes._uids import UidAllocator
from corral.runtimes.base import Instance, RuntimeConfig, SandboxSpec
from corral.runtimes.microvm.guest import BUSYBOX, _Cpio, ensure_guest
from corral.runtimes.microvm.hostside import vm_processes as _vm_processes
from corral.runtimes.microvm.qemu import QemuEngine
from corral.runtimes.microvm.runtime import MicroVMOptions, MicroVMRuntime
from corral.runtimes.microvm.vm import VmConfig

ECHO_INIT = b"#!/bin/busybox sh\n/bin/busybox echo corral-bench-hi\n/bin/busybox poweroff -f\n"


def _row(name: str, samples: list[float], unit: str = "ms") -> float:
    p50, p95 = quantile(samples, 0.5), quantile(samples, 0.95)
    scale = 1000 if unit == "ms" else 1
    print(f"{name:<44} p50 {p50 * scale:9.1f} {unit}   p95 {p95 * scale:9.1f} {unit}   (n={len(samples)})")
    return p50


async def _first_output(runtime: MicroVMRuntime, instance: Instance) -> AgentClient:
    client = await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)
    async with client.request("exec", {"argv": ["echo", "hi"], "user": "root"}) as req:
        async for frame in req:
            if frame.get("ev") == "stdout":
                break
    return client


async def _exec_rtt(client: AgentClient) -> float:
    t = time.perf_counter()
    async with client.request("exec", {"argv": ["echo", "hi"], "user": "root"}) as req:
        async for frame in req:
            if frame.get("ev") == "exit":
                break
    return time.perf_counter() - t


def _memory_mib(pid: int) -> tuple[float, float]:
    rss = pss = 0.0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) / 1024
    return rss, pss


def bare_boot(engine: QemuEngine, binary: str, config: VmConfig, work: Path) -> float:
    """The same machine and kernel, an initramfs whose /init prints one line: spawn → that line."""
    archive = _Cpio()
    archive.add_dir("bin")
    archive.add_dir("dev")
    archive.add_file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.add_file("init", ECHO_INIT, 0o755)
    initrd = work / "echo.cpio"
    initrd.write_bytes(archive.finish())
    bare = VmConfig(
        kernel=config.kernel, initramfs=str(initrd), memory_mb=config.memory_mb, vcpus=1, disks=(), args={}
    )
    argv = engine.launch(binary, bare, work, uid=UidAllocator.base(UidAllocator.SLOTS - 1)).argv
    # the console on stdout instead of a file, and nothing on the agent port
    i = argv.index("chardev:console")
    argv[i] = "stdio"
    j = argv.index("stdio,id=agent,signal=off")
    argv[j] = "null,id=agent"
    c = argv.index("-chardev")
    del argv[c : c + 2]  # the console file chardev
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    buf = b""
    try:
        while b"corral-bench-hi" not in buf:
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            if not ready:
                raise RuntimeError("the bare boot printed nothing in 120 s")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the bare boot ended without printing")
            buf += chunk
        return time.perf_counter() - t
    finally:
        proc.kill()
        proc.wait()


async def namespace_exec(config: RuntimeConfig, rootfs: object, runs: int) -> list[float]:
    from corral.runtimes.namespace import NamespaceRuntime

    runtime = NamespaceRuntime(config)
    instance = await runtime.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=rootfs))  # type: ignore[arg-type]
    try:
        client = await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)
        await _exec_rtt(client)
        samples = [await _exec_rtt(client) for _ in range(runs * 10)]
        await client.aclose()
        return samples
    finally:
        await runtime.destroy(instance)


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="corral-bench-microvm-", dir="/var/tmp"))
    config = RuntimeConfig(state_root=work / "state", cache_root=work / "cache")
    cache = str(args.cache_dir)
    cold = MicroVMRuntime(config, MicroVMOptions(cache_dir=cache, golden=False, accel=args.accel))
    warm = MicroVMRuntime(config, MicroVMOptions(cache_dir=cache, golden=True, accel=args.accel))
    rootfs = ensure_host_template(config.cache_root)
    print(f"microvm bench, accel={args.accel}, runs={args.runs}, load {os.getloadavg()[0]:.1f}")
    ensure_guest(Path(cache))
    try:
        boot, bare, claim, rtt, snap_t, fork_t, pause_t, resume_t = [], [], [], [], [], [], [], []
        mem_boot: list[tuple[float, float]] = []
        mem_restore: list[tuple[float, float]] = []
        # prime: builds the disk images and the golden image of the default shape
        first = await warm.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=rootfs))
        await warm.destroy(first)
        for _ in range(args.runs):
            t = time.perf_counter()
            instance = await cold.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=rootfs))
            client = await _first_output(cold, instance)
            boot.append(time.perf_counter() - t)
            state_dir = Path(instance.ref)
            vm = VmConfig.load(state_dir / "vm.json")
            await anyio.sleep(2)
            (pid,) = _vm_processes(state_dir)
            mem_boot.append(_memory_mib(pid))
            rtt += [await _exec_rtt(client) for _ in range(10)]
            t = time.perf_counter()
            await cold.pause(instance)
            pause_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            await cold.resume(instance)
            resume_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            snap = await cold.snapshot(instance, f"bench-{os.getpid()}-{len(snap_t)}")
            snap_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            fork = await cold.create(
                SandboxSpec(
                    sandbox_id=SandboxId.new(), rootfs=rootfs, upper_seed=snap.files, restore_from=snap.memory
                )
            )
            fork_client = await _first_output(cold, fork)
            fork_t.append(time.perf_counter() - t)
            await fork_client.aclose()
            await cold.destroy(fork)
            await cold.discard(snap)
            await client.aclose()
            await cold.destroy(instance)
            bare.append(bare_boot(cold.engine, cold.host, vm, work))
            t = time.perf_counter()
            instance = await warm.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=rootfs))
            client = await _first_output(warm, instance)
            claim.append(time.perf_counter() - t)
            await anyio.sleep(2)
            (pid,) = _vm_processes(Path(instance.ref))
            mem_restore.append(_memory_mib(pid))
            await client.aclose()
            await warm.destroy(instance)
        ns = await namespace_exec(config, rootfs, args.runs) if shutil.which("bwrap") else []
        print()
        b = _row("boot -> first output (no golden image)", boot, "s")
        r = _row("bare QEMU boot, same kernel, echo init", bare, "s")
        c = _row("warm claim (golden restore) -> first output", claim, "s")
        e = _row("exec round trip, microvm", rtt)
        n = _row("exec round trip, namespace", ns) if ns else None
        _row("pause (QMP stop)", pause_t)
        _row("resume (QMP cont)", resume_t)
        _row("snapshot (stop, migrate, disk copy, cont)", snap_t, "s")
        _row("fork -> first answer (restore + disk copy)", fork_t, "s")
        rss_b = sorted(m[0] for m in mem_boot)[len(mem_boot) // 2]
        pss_b = sorted(m[1] for m in mem_boot)[len(mem_boot) // 2]
        rss_r = sorted(m[0] for m in mem_restore)[len(mem_restore) // 2]
        pss_r = sorted(m[1] for m in mem_restore)[len(mem_restore) // 2]
        print(f"{'idle QEMU after boot':<44} RSS {rss_b:7.1f} MiB   PSS {pss_b:7.1f} MiB")
        print(f"{'idle QEMU after a restore':<44} RSS {rss_r:7.1f} MiB   PSS {pss_r:7.1f} MiB")
        print()
        print(f"boot / bare boot: {b / r:.2f}x (target <= 1.2x)")
        print(f"warm claim: {c:.2f} s (target <= 0.5 s under TCG; KVM restores take tens of ms)")
        if n:
            print(f"exec microvm / namespace: {e / n:.1f}x")
        print(f"idle PSS after restore: {pss_r:.0f} MiB (target <= 150 MiB under TCG)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "corral" / "microvm",
    )
    parser.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    anyio.run(main, parser.parse_args())
