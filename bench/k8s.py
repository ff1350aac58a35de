"""The kubernetes runtime against the real CRD API server, with the test stand-in running the Pods.

    .venv/bin/python bench/k8s.py [--runs 10]

Needs root, bwrap and the test API server (``scripts/k8s-test-apiserver build``). In one run, p50 and p99
(nearest rank: with small n, p99 is the slowest run):

- API server baseline: one GET of a custom object, and one create + delete of a SandboxClaim, through the same
  lightkube client the runtime uses: the floor under everything below;
- warm claim → first exec: ``runtime.create`` with a Ready SandboxWarmPool member waiting (the stand-in
  adopts it), to the output of ``echo hi`` over the authenticated TCP connection;
- cold claim → first exec: the same with an empty pool (the stand-in boots a sandbox for the claim, as a
  kubelet would start a Pod; here that is a namespace sandbox and its TCP agent, not an image pull);
- create throughput: ``--runs`` cold creates started at once, sandboxes per second until all answered.

Cold numbers here measure Corral and the stand-in, not a cluster: a real cold start adds scheduling and an
image pull. Timings are reported, never asserted: this is not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio
from _stats import quantile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.k8s.apiserver import CrdApiServer, find_binaries
from tests.k8s.standin import StandInController

from corral.core.agent_client import AgentClient
from corral.ids import SandboxId
from corral.images.rootfs import ensure_host_template
from corral.models import ExecParams
from corral.runtimes import _k8s_objects as objects
from corral.runtimes.base import Limits, OciImage, RuntimeConfig, SandboxSpec
from corral.runtimes.kubernetes import KubernetesRuntime, KubernetesSettings
from corral.runtimes.namespace import NamespaceRuntime
from corral.testing import run_command

IMAGE = OciImage(reference="docker.io/library/python:3.12-slim")


def _row(name: str, samples: list[float]) -> None:
    print(
        f"{name:<34} p50 {quantile(samples, 0.5) * 1000:8.1f} ms   p99 {quantile(samples, 0.99) * 1000:8.1f} ms"
    )


async def _first_exec(runtime: KubernetesRuntime) -> tuple[float, object]:
    start = time.perf_counter()
    instance = await runtime.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=IMAGE))
    client = await AgentClient.open(await runtime.connect(instance), sandbox_id=str(instance.sandbox_id))
    try:
        out, _, _ = await run_command(client, ExecParams(cmd="echo hi"))
        assert out == b"hi\n"
    finally:
        await client.aclose()
    return time.perf_counter() - start, instance


async def bench(server: CrdApiServer, runs: int, data: Path) -> None:
    local = RuntimeConfig(state_root=data / "state", cache_root=data / "cache")
    rootfs = ensure_host_template(local.cache_root)
    namespace = "bench"

    def runtime(warm: int) -> KubernetesRuntime:
        settings = KubernetesSettings(
            kubeconfig=str(server.admin.kubeconfig), namespace=namespace, warm_replicas=warm,
            secret_api="standin.corral.test/v1/Secret/secrets", ready_timeout=120,
        )  # fmt: skip
        return KubernetesRuntime(
            RuntimeConfig(state_root=local.state_root, cache_root=local.cache_root), settings
        )

    standin = StandInController(
        kubeconfig=server.admin.kubeconfig,
        namespace=namespace,
        runtime=NamespaceRuntime(local),
        rootfs=rootfs,
    )
    async with standin.running():
        api_rt = runtime(0)
        api = api_rt.api()
        claim = {"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim",
                 "metadata": {"name": "baseline"}, "spec": {"warmPoolRef": {"name": "none"}}}  # fmt: skip
        gets, writes = [], []
        await api.create(objects.CLAIM_API, claim)
        for _ in range(runs * 5):
            t = time.perf_counter()
            await api.get(objects.CLAIM_API, "baseline")
            gets.append(time.perf_counter() - t)
        await api.delete(objects.CLAIM_API, "baseline")
        for i in range(runs):
            t = time.perf_counter()
            await api.create(objects.CLAIM_API, {**claim, "metadata": {"name": f"baseline-{i}"}})
            await api.delete(objects.CLAIM_API, f"baseline-{i}")
            writes.append(time.perf_counter() - t)
        await api_rt.aclose()
        _row("API GET (baseline)", gets)
        _row("API create+delete (baseline)", writes)

        for label, warm in (("cold claim -> first exec", 0), ("warm claim -> first exec", 1)):
            rt = runtime(warm)
            bp = rt.blueprint(image=IMAGE.reference, limits=Limits())
            await rt.ensure_blueprint(bp)
            samples = []
            for _ in range(runs):
                if warm:
                    await standin.warm(bp.name)
                took, instance = await _first_exec(rt)
                samples.append(took)
                await rt.destroy(instance)  # type: ignore[arg-type]
            await rt.prune()
            await rt.aclose()
            await standin.settled()
            _row(label, samples)

        rt = runtime(0)
        made: list[object] = []
        t = time.perf_counter()
        async with anyio.create_task_group() as tg:

            async def one() -> None:
                made.append((await _first_exec(rt))[1])

            for _ in range(runs):
                tg.start_soon(one)
        elapsed = time.perf_counter() - t
        for instance in made:
            await rt.destroy(instance)  # type: ignore[arg-type]
        await rt.prune()
        await rt.aclose()
        await standin.settled()
        print(
            f"{'create throughput (cold, parallel)':<34} {runs / elapsed:8.2f} sandboxes/s ({runs} in {elapsed:.1f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    bin_dir = find_binaries()
    if bin_dir is None:
        raise SystemExit("build the test API server first: scripts/k8s-test-apiserver build")
    if os.geteuid() != 0:
        raise SystemExit("run as root: the stand-in starts namespace sandboxes")
    server = CrdApiServer(bin_dir=bin_dir)
    server.start()
    data = Path(tempfile.mkdtemp(prefix="corral-bench-k8s-", dir="/var/tmp"))
    try:
        anyio.run(bench, server, args.runs, data)
    finally:
        server.stop()
        import shutil

        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
