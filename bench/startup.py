"""Startup and exec latency, per isolation, against raw baselines measured in the same run.

    .venv/bin/python bench/startup.py [--runs 20] [--isolation namespace --isolation gvisor]

Measured, p50 and p95 over ``--runs`` runs each:

- create → first output (cold): from ``Sandbox.create()`` being called to the first stdout byte of ``echo hi``
  run in the new sandbox (the SDK's embedded mode: records, rootfs, limits, shim, agent boot, exec);
- create → first output (warm pool): the same when the create is served by a filled warm pool (a pool of
  ``--runs`` + 1 members with a 256 MiB memory limit, and creates asking for that limit; the cold creates ask
  for none, so no pool can serve them, and the benchmark checks ``from_pool`` both ways);
- exec round trip: ``commands.run(["echo", "hi"])`` in a running sandbox, until its exit is known.

Baselines, same machine, same run:

- bare bwrap: ``bwrap --unshare-all --die-with-parent --ro-bind /usr /usr … /usr/bin/echo hi`` to exit;
- bare runsc run: ``runsc --network=none --platform=ptrace run`` of an OCI bundle whose process is ``echo hi``;
- bare runsc exec: ``runsc --platform=ptrace exec`` of ``echo hi`` into a running bare runsc container (what
  gVisor itself costs to start a process in a sandbox, including the runsc command's own start);
- host subprocess: ``subprocess.run(["echo", "hi"])`` from Python.

Floors, same run: what parts every cold sandbox of this design needs cost on their own, without Corral.

- bare bwrap echo in a new cgroup: the bare bwrap run, its process first joining a memory and a pids cgroup
  made for it (limits need cgroups; on cgroup v1 joining after an idle spell waits for an RCU grace period);
- bare bwrap / bare runsc run: agent interpreter + imports: the agent's Python (its bundle bound at
  ``/.corral``) importing what the agent imports before its first command, then printing ``hi``;
- process start inside bare gVisor: ``subprocess.run(["echo", "hi"])`` timed inside a bare runsc sandbox,
  the cost of starting any process there (no agent, protocol or runsc command around it).

Ratios printed: create → first output (cold and warm) / bare bwrap (namespace) or bare runsc run (gVisor);
exec round trip / host subprocess, and for gVisor also / bare runsc exec. Targets (issue 2): namespace create
≤ 2x bare bwrap, gVisor create ≤ 1.1x bare runsc, exec round trip ≤ 3x host subprocess. Each floor is printed
against the target its path is held to: a floor above a target means no cold path of this design can meet
it. Timings are reported, never asserted: this is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
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
from corral.client._local import LocalBackend
from corral.client._sync.pools import Pools
from corral.core.settings import Settings
from corral.models import EventKind
from corral.runtimes._bundle import MOUNT_POINT, AgentBundle, agent_argv, ensure_bundle


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


BWRAP = [
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
]


def bare_bwrap() -> None:
    subprocess.run([*BWRAP, "/usr/bin/echo", "hi"], check=True, stdout=subprocess.DEVNULL)


def agent_floor_argv(bundle: AgentBundle) -> list[str]:
    """The agent's interpreter importing what the agent imports before it runs a first command, then
    printing: the least any sandbox whose agent is this Python pays before its first output."""
    argv = agent_argv(bundle)
    return [*argv[: argv.index("-m")], "-c", "import corral.agent.__main__, corral.agent._serve; print('hi')"]


def bare_bwrap_agent_floor(bundle: AgentBundle) -> Callable[[], None]:
    argv = [*BWRAP, "--ro-bind", str(bundle.path), MOUNT_POINT, *agent_floor_argv(bundle)]

    def run() -> None:
        done = subprocess.run(argv, check=True, stdout=subprocess.PIPE)
        if done.stdout != b"hi\n":
            raise RuntimeError(f"the agent floor printed {done.stdout!r}")

    return run


def bare_bwrap_in_new_cgroup(runs: int, warmup: int = 2) -> list[float]:
    """``bare bwrap echo`` started inside a cgroup made for it (memory and pids): what joining a new cgroup
    costs a sandbox with limits (cgroup v1: a migration after an idle spell waits for an RCU grace period).
    Making and removing the cgroup is not timed."""
    root = Path("/sys/fs/cgroup")
    parents = [root] if (root / "cgroup.controllers").exists() else [root / "memory", root / "pids"]
    out = []
    for i in range(warmup + runs):
        dirs = [p / f"corral-bench-{uuid.uuid4().hex[:8]}" for p in parents]
        for d in dirs:
            d.mkdir()

        def join(dirs: list[Path] = dirs) -> None:
            for d in dirs:
                (d / "cgroup.procs").write_text(str(os.getpid()))

        try:
            time.sleep(0.1)  # idle, as between two creates
            start = time.perf_counter()
            subprocess.run(
                [*BWRAP, "/usr/bin/echo", "hi"], check=True, stdout=subprocess.DEVNULL, preexec_fn=join
            )
            if i >= warmup:
                out.append(time.perf_counter() - start)
        finally:
            for d in dirs:
                for _ in range(100):  # bwrap's own children may still be exiting
                    try:
                        d.rmdir()
                        break
                    except OSError:
                        time.sleep(0.01)
    return out


class BareRunsc:
    """An OCI bundle run with bare runsc: a skeleton root with /usr bound read-only, process ``argv``."""

    def __init__(
        self, argv: tuple[str, ...] = ("/usr/bin/echo", "hi"), *, binds: dict[str, str] | None = None
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="corral-bench-runsc-"))
        rootfs = self.dir / "rootfs"
        for d in ("proc", "dev", "tmp", "usr"):
            (rootfs / d).mkdir(parents=True)
        for link in ("bin", "lib", "lib64"):
            (rootfs / link).symlink_to(f"usr/{link}")
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "args": list(argv),
                "cwd": "/",
                "env": ["PATH=/usr/bin:/bin"],
                "user": {"uid": 0, "gid": 0},
            },
            "root": {"path": str(rootfs), "readonly": True},
            "hostname": "bench",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
                *(
                    {"destination": dest, "type": "bind", "source": src, "options": ["rbind", "ro"]}
                    for src, dest in (binds or {}).items()
                ),
            ],
            "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]},
        }
        (self.dir / "config.json").write_text(json.dumps(config))

    def __call__(self) -> bytes:
        root = self.dir / f"state-{uuid.uuid4().hex[:8]}"
        done = subprocess.run(
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
            stdout=subprocess.PIPE,
        )
        shutil.rmtree(root, ignore_errors=True)
        return done.stdout

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def gvisor_spawn_floor(bundle: AgentBundle, runs: int) -> list[float]:
    """``subprocess.run(["echo", "hi"])`` timed inside a bare runsc sandbox: what starting one process costs
    under gVisor, with no agent, protocol or runsc command around it (the floor of any exec there)."""
    program = (
        "import subprocess, time, json\n"
        "def once():\n"
        "    t = time.perf_counter()\n"
        "    subprocess.run(['/usr/bin/echo', 'hi'], check=True, stdout=subprocess.DEVNULL)\n"
        "    return time.perf_counter() - t\n"
        f"samples = [once() for _ in range({runs} + 3)][3:]\n"
        "print(json.dumps(samples))\n"
    )
    argv = agent_argv(bundle)
    bare = BareRunsc((*argv[: argv.index("-m")], "-c", program), binds={str(bundle.path): MOUNT_POINT})
    try:
        return [float(x) for x in json.loads(bare())]
    finally:
        bare.close()


class BareRunscExec:
    """``runsc exec … echo hi`` into a running bare runsc container (a bundle whose process sleeps)."""

    def __init__(self) -> None:
        self.bundle = BareRunsc(("/usr/bin/sleep", "3600"))
        self.root = str(self.bundle.dir / "state")
        self.id = "corral-bench-" + uuid.uuid4().hex[:12]
        subprocess.run(
            [*self._runsc(), "run", "--detach", "--bundle", str(self.bundle.dir), self.id],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )

    def _runsc(self) -> list[str]:
        return ["runsc", "--root", self.root, "--network=none", "--platform=ptrace"]

    def __call__(self) -> None:
        done = subprocess.run(
            [*self._runsc(), "exec", self.id, "/usr/bin/echo", "hi"],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            timeout=60,
        )
        if done.stdout != b"hi\n":
            raise RuntimeError(f"runsc exec printed {done.stdout!r}")

    def close(self) -> None:
        subprocess.run([*self._runsc(), "kill", self.id, "KILL"], check=False, timeout=60)
        subprocess.run([*self._runsc(), "delete", "-force", self.id], check=False, timeout=60)
        self.bundle.close()


def corral_create_to_first_output(
    isolation: str, runs: int, *, backend: LocalBackend | None = None, memory_mb: int | None = None
) -> list[float]:
    """Time create → first stdout byte only (the kill that follows each run is not counted). A create must
    come from a warm pool exactly when ``memory_mb`` is given (the pool's limit)."""
    out = []
    for i in range(runs + 1):
        start = time.perf_counter()
        sbx = Sandbox.create(isolation=isolation, timeout=120, memory_mb=memory_mb, backend=backend)
        try:
            for event in sbx.commands.stream(["echo", "hi"]):
                if event.kind is EventKind.STDOUT:
                    break
            elapsed = time.perf_counter() - start
            if sbx.get_info().from_pool is not (memory_mb is not None):
                raise RuntimeError(
                    f"create {i}: from_pool is {sbx.get_info().from_pool}; is a pool in the way?"
                )
        finally:
            sbx.kill()
            sbx.close()
        if i:  # the first run builds caches (agent bundle, base template): a warm-up
            out.append(elapsed)
    return out


POOL_MEMORY_MB = 256


def corral_pool_create_to_first_output(isolation: str, runs: int) -> list[float]:
    """The same, each create served by a warm pool filled beforehand (filling is not timed)."""
    backend = LocalBackend.from_env()
    pools = Pools(backend=backend)
    try:
        pools.set("base", runs + 1, isolation=isolation, memory_mb=POOL_MEMORY_MB)
        for _ in pools.fill("base", isolation=isolation):
            pass
        return corral_create_to_first_output(isolation, runs, backend=backend, memory_mb=POOL_MEMORY_MB)
    finally:
        pools.delete("base", isolation=isolation)
        pools.close()
        backend.close()


def corral_exec(isolation: str, runs: int) -> list[float]:
    with Sandbox.create(isolation=isolation, timeout=600) as sbx:
        return measure(lambda: sbx.commands.run(["echo", "hi"]), runs, warmup=3)


def row(name: str, samples: list[float]) -> tuple[float, float]:
    p50, p95 = percentiles(samples)
    print(f"  {name:<44} p50 {p50 * 1000:8.2f} ms   p95 {p95 * 1000:8.2f} ms   (n={len(samples)})")
    return p50, p95


def ratio(name: str, value: tuple[float, float], base: tuple[float, float], target: float | None) -> None:
    goal = f"(target ≤ {target:g}x: {'met' if value[0] / base[0] <= target else 'NOT met'})" if target else ""
    print(f"  {name:<52} p50 {value[0] / base[0]:6.2f}x  p95 {value[1] / base[1]:6.2f}x   {goal}".rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--isolation", action="append", choices=["namespace", "gvisor"])
    args = parser.parse_args()
    isolations = args.isolation or ["namespace", "gvisor"]
    runs = max(args.runs, 1)

    bundle = ensure_bundle(Settings.load().cache_root)
    print(f"baselines (n={runs})")
    host = row("host subprocess.run(['echo','hi'])", measure(host_subprocess, runs))
    baseline: dict[str, tuple[float, float]] = {}
    floors: dict[str, list[tuple[str, tuple[float, float]]]] = {"namespace": [], "gvisor": []}
    runsc_exec: tuple[float, float] | None = None
    if "namespace" in isolations:
        baseline["namespace"] = row("bare bwrap echo", measure(bare_bwrap, runs))
        floors["namespace"] = [
            (
                "bare bwrap in a new cgroup",
                row("bare bwrap echo in a new cgroup", bare_bwrap_in_new_cgroup(runs)),
            ),
            (
                "bare bwrap agent interpreter",
                row("bare bwrap: agent interpreter + imports", measure(bare_bwrap_agent_floor(bundle), runs)),
            ),
        ]
    if "gvisor" in isolations:
        bare = BareRunsc()
        try:
            baseline["gvisor"] = row("bare runsc run echo", measure(bare, runs))
        finally:
            bare.close()
        bare = BareRunsc(tuple(agent_floor_argv(bundle)), binds={str(bundle.path): MOUNT_POINT})
        try:
            floor = row("bare runsc run: agent interpreter + imports", measure(bare, runs))
            floors["gvisor"] = [("bare runsc agent interpreter", floor)]
        finally:
            bare.close()
        container = BareRunscExec()
        try:
            runsc_exec = row("bare runsc exec echo (running container)", measure(container, runs))
        finally:
            container.close()
        spawn_floor = row("process start inside bare gVisor (echo)", gvisor_spawn_floor(bundle, runs))

    targets = {"namespace": 2.0, "gvisor": 1.1}
    for iso in isolations:
        print(f"\ncorral {iso}")
        cold = row("create → first output (cold)", corral_create_to_first_output(iso, runs))
        warm = row("create → first output (warm pool)", corral_pool_create_to_first_output(iso, runs))
        exec_rt = row("exec round trip (echo hi)", corral_exec(iso, runs))
        base_name = "bare bwrap" if iso == "namespace" else "bare runsc run"
        ratio(f"create → first output (cold) / {base_name}", cold, baseline[iso], targets[iso])
        ratio(f"create → first output (warm pool) / {base_name}", warm, baseline[iso], targets[iso])
        ratio("exec round trip / host subprocess", exec_rt, host, 3.0)
        for name, floor in floors[iso]:
            ratio(f"floor: {name} / {base_name}", floor, baseline[iso], targets[iso])
        if iso == "gvisor" and runsc_exec is not None:
            ratio("exec round trip / bare runsc exec", exec_rt, runsc_exec, None)
            ratio("floor: process start inside gVisor / host subprocess", spawn_floor, host, 3.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
