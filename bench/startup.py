"""Startup and exec latency, per isolation, against raw baselines measured in the same run.

    .venv/bin/python bench/startup.py [--runs 20] [--isolation namespace --isolation gvisor]

Measured, p50 and p95 over ``--runs`` runs each:

- create → first output: from ``Sandbox.create()`` being called to the first stdout byte of ``echo hi`` run in
  the new sandbox (the SDK's embedded mode: records, rootfs, limits, shim, agent boot, exec).
- exec round trip: ``commands.run(["echo", "hi"])`` in a running sandbox, until its exit is known.

Baselines, same machine, same run:

- bare bwrap: ``bwrap --unshare-all --die-with-parent --ro-bind /usr /usr … /usr/bin/echo hi`` to exit;
- bare runsc: ``runsc --network=none --platform=ptrace run`` of an OCI bundle whose process is ``echo hi``;
- host subprocess: ``subprocess.run(["echo", "hi"])`` from Python.

Ratios printed: namespace create → first output / bare bwrap; gvisor create → first output / bare runsc;
exec round trip / host subprocess. Targets (issue 2): ≤ 2x, ≤ 1.1x and ≤ 3x. Timings are reported, never
asserted: this is not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from _stats import quantile

from corral import Sandbox
from corral.models import EventKind


def percentiles(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), quantile(samples, 0.95)


def measure(fn: Callable[[], object], runs: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def host_subprocess() -> None:
    subprocess.run(["echo", "hi"], check=True, stdout=subprocess.DEVNULL)


def bare_bwrap() -> None:
    subprocess.run(
        [
            "bwrap",
            "--unshare-all",
            "--die-with-parent",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--symlink",
            "usr/bin",
            "/bin",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "/usr/bin/echo",
            "hi",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


class BareRunsc:
    """An OCI bundle run with bare runsc: a skeleton root with /usr bound read-only, process ``echo hi``."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="corral-bench-runsc-"))
        rootfs = self.dir / "rootfs"
        for d in ("proc", "dev", "tmp", "usr"):
            (rootfs / d).mkdir(parents=True)
        for link in ("bin", "lib", "lib64"):
            (rootfs / link).symlink_to(f"usr/{link}")
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "args": ["/usr/bin/echo", "hi"],
                "cwd": "/",
                "env": ["PATH=/usr/bin:/bin"],
                "user": {"uid": 0, "gid": 0},
            },
            "root": {"path": str(rootfs), "readonly": True},
            "hostname": "bench",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
            ],
            "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]},
        }
        (self.dir / "config.json").write_text(json.dumps(config))

    def __call__(self) -> None:
        root = self.dir / f"state-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            [
                "runsc",
                "--root",
                str(root),
                "--network=none",
                "--platform=ptrace",
                "run",
                "--bundle",
                str(self.dir),
                uuid.uuid4().hex,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(root, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def corral_create_to_first_output(isolation: str, runs: int) -> list[float]:
    """Time create → first stdout byte only (the kill that follows each run is not counted)."""
    out = []
    for i in range(runs + 1):
        start = time.perf_counter()
        sbx = Sandbox.create(isolation=isolation, timeout=120)
        try:
            for event in sbx.commands.stream(["echo", "hi"]):
                if event.kind is EventKind.STDOUT:
                    break
            elapsed = time.perf_counter() - start
        finally:
            sbx.kill()
            sbx.close()
        if i:  # the first run builds caches (agent bundle, base template): a warm-up
            out.append(elapsed)
    return out


def corral_exec(isolation: str, runs: int) -> list[float]:
    with Sandbox.create(isolation=isolation, timeout=600) as sbx:
        return measure(lambda: sbx.commands.run(["echo", "hi"]), runs, warmup=3)


def row(name: str, samples: list[float]) -> tuple[float, float]:
    p50, p95 = percentiles(samples)
    print(f"  {name:<44} p50 {p50 * 1000:8.2f} ms   p95 {p95 * 1000:8.2f} ms   (n={len(samples)})")
    return p50, p95


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--isolation", action="append", choices=["namespace", "gvisor"])
    args = parser.parse_args()
    isolations = args.isolation or ["namespace", "gvisor"]
    runs = max(args.runs, 1)

    print(f"baselines (n={runs})")
    host = row("host subprocess.run(['echo','hi'])", measure(host_subprocess, runs))
    baseline: dict[str, tuple[float, float]] = {}
    if "namespace" in isolations:
        baseline["namespace"] = row("bare bwrap echo", measure(bare_bwrap, runs))
    if "gvisor" in isolations:
        bare = BareRunsc()
        try:
            baseline["gvisor"] = row("bare runsc run echo", measure(bare, runs))
        finally:
            bare.close()

    targets = {"namespace": 2.0, "gvisor": 1.1}
    for iso in isolations:
        print(f"\ncorral {iso}")
        first = row("create → first output", corral_create_to_first_output(iso, runs))
        exec_rt = row("exec round trip (echo hi)", corral_exec(iso, runs))
        base = baseline[iso]
        print(
            f"  ratio create→first output / bare {'bwrap' if iso == 'namespace' else 'runsc'}: "
            f"p50 {first[0] / base[0]:.2f}x  p95 {first[1] / base[1]:.2f}x   (target ≤ {targets[iso]}x)"
        )
        print(
            f"  ratio exec round trip / host subprocess:     "
            f"p50 {exec_rt[0] / host[0]:.2f}x  p95 {exec_rt[1] / host[1]:.2f}x   (target ≤ 3x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
