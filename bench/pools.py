"""Warm pools: claim → first output against cold create → first output, in the same run; idle density.

    .venv/bin/python bench/pools.py [--runs 20] [--isolation namespace --isolation gvisor]

Per isolation, p50 and p99 over ``--runs`` runs each (n is small, so p99 is in effect the maximum):

- claim: ``Sandbox.create()`` served from a filled pool, until it returns (CAS on a member's record, its
  deadline moved in the shim; no env or files, which would add an agent round trip each);
- claim → first output: from ``Sandbox.create()`` being called to the first stdout byte of ``echo hi`` in the
  claimed sandbox;
- cold create → first output: the same with no pool (the members' limits differ from the request's);
- claim from a second client: the same claim through another embedded backend (a CLI call, say), which has
  to open its own agent connection (the first backend filled the pool and keeps one per member, as a
  server would).

Idle density: with ``--runs`` members booted and idle, the memory of each member's host processes (the shim
and everything below it: bwrap/runsc, the agent, runsc-sandbox and runsc-gofer under gVisor), summed per
member from /proc/PID/smaps_rollup: RSS, and PSS (shared pages divided among their sharers, so PSS sums to
what the members really cost together). Timings are reported, never asserted: this is not a test.

The other numbers issue 4 asks of this benchmark live next to it: template build time, cold vs cached, in
``bench/templates.py`` (it needs a registry on 127.0.0.1, which it starts); pause/resume time and image size in
``bench/snapshots.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from _stats import quantile

from corral import Sandbox
from corral.client._local import LocalBackend
from corral.client._sync.pools import Pools
from corral.core.records import POOL_TENANT
from corral.models import EventKind, SandboxState


def percentiles(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), quantile(samples, 0.99)


def row(name: str, samples: list[float]) -> float:
    p50, p99 = percentiles(samples)
    print(f"  {name:<44} p50 {p50 * 1000:8.2f} ms   p99 {p99 * 1000:8.2f} ms   (n={len(samples)})")
    return p50


def first_output(sbx: Sandbox) -> None:
    for event in sbx.commands.stream(["echo", "hi"]):
        if event.kind is EventKind.STDOUT:
            return
    raise RuntimeError("echo printed nothing")


def timed_creates(
    backend: LocalBackend, isolation: str, runs: int, *, memory_mb: int | None, want_pool: bool
) -> tuple[list[float], list[float]]:
    """(create-returned, first-output) seconds per run; every sandbox is killed after its run (not timed)."""
    created: list[float] = []
    first: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        sbx = Sandbox.create(isolation=isolation, timeout=120, memory_mb=memory_mb, backend=backend)
        try:
            created.append(time.perf_counter() - start)
            first_output(sbx)
            first.append(time.perf_counter() - start)
            if sbx.get_info().from_pool is not want_pool:
                raise RuntimeError(f"expected from_pool={want_pool}; is the pool as big as --runs?")
        finally:
            sbx.kill()
            sbx.close()
    return created, first


def descendants(pid: int) -> Iterator[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        yield p
        todo.extend(children.get(p, []))


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB of ``pid`` and all its descendants."""
    rss = pss = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def idle_density(backend: LocalBackend, isolation: str) -> None:
    store = backend._backend.service.store
    records = backend._portal.call(lambda: store.list_sandboxes(tenant_id=POOL_TENANT))
    shims = [
        r.instance.extra["shim_pid"]
        for r in records
        if r.isolation == isolation and r.state is SandboxState.RUNNING and r.instance is not None
    ]
    per = [memory_kib(pid) for pid in shims]
    rss = statistics.median(r for r, _ in per) / 1024
    pss = statistics.median(p for _, p in per) / 1024
    total = sum(p for _, p in per) / 1024
    print(
        f"  idle member memory ({len(per)} members)            RSS {rss:6.1f} MiB   PSS {pss:6.1f} MiB"
        f"   (median per member; PSS total {total:.0f} MiB)"
    )


def bench(isolation: str, runs: int) -> None:
    print(f"\ncorral {isolation}")
    backend = LocalBackend.from_env()
    other = LocalBackend.from_env()
    pools = Pools(backend=backend)
    try:
        # warm caches (agent bundle, template) so neither side pays for them
        timed_creates(backend, isolation, 2, memory_mb=None, want_pool=False)
        pools.set("base", runs, isolation=isolation, memory_mb=256)
        start = time.perf_counter()
        for _ in pools.fill("base", isolation=isolation):
            pass
        print(f"  fill {runs} members{'':<31} {time.perf_counter() - start:8.2f} s")
        idle_density(backend, isolation)
        claim, claim_first = timed_creates(backend, isolation, runs, memory_mb=256, want_pool=True)
        _, cold_first = timed_creates(backend, isolation, runs, memory_mb=None, want_pool=False)
        for _ in pools.fill("base", isolation=isolation):
            pass
        other_claim, other_first = timed_creates(other, isolation, runs, memory_mb=256, want_pool=True)
        row("claim (create returns)", claim)
        p_claim = row("claim → first output", claim_first)
        p_cold = row("cold create → first output", cold_first)
        row("claim from a second client (create returns)", other_claim)
        row("claim from a second client → first output", other_first)
        print(f"  cold / claim (first output, p50)               {p_cold / p_claim:8.1f}x")
    finally:
        pools.delete("base", isolation=isolation)
        pools.close()
        other.close()
        backend.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--isolation", action="append", choices=["namespace", "gvisor"])
    args = parser.parse_args()
    for isolation in args.isolation or ["namespace", "gvisor"]:
        bench(isolation, max(args.runs, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
