"""Template builds from a registry image with a ``--run`` step: cold, cached, and with a changed step, against a
bare pull + unpack measured in the same run.

    .venv/bin/python bench/templates.py [--runs 5] [--isolation namespace --isolation gvisor]

Set-up (not timed): a real Docker registry (Debian's ``docker-registry``) on 127.0.0.1, started the way the
image tests start it (tests/_registry.py), holding an image this script builds with umoci and pushes with
skopeo: a busybox layer, then a layer with a copy of this host's Python standard library (~40 MB, ~1,000
files; a layer the size of a small language runtime). Nothing comes from the internet. Corral runs embedded on
a private data dir under /var/tmp, removed at the end.

Per isolation (the one the step's sandbox runs under), each of ``--runs`` rounds measures, in this order:

- baseline: bare ``skopeo copy docker://… oci:…`` into an empty layout, then ``umoci unpack`` of it: pulling
  and unpacking the same image with the usual tools, nothing else (no step);
- cold: ``Templates().build(name, image, run=[step])`` with an empty layer store and blob cache (both removed
  before the build): pull every blob, unpack every layer, boot a sandbox for the step, export its layer;
- cached: the same build again under another name: the manifest is fetched, nothing else is downloaded,
  unpacked or run;
- changed step: the same image with a step never built before: the image layers are cached, the step runs.

Each build's progress events are checked (cold: nothing cached; cached: everything; changed step: all but
the step), so a number is never reported for a build that did something else. The very first build in the
fresh data dir is shown on its own (n=1): it also makes the per-install agent bundle that later builds reuse.
p50 and p95 are nearest-rank (with the default 5 runs, p95 is the slowest). Timings are reported, never
asserted: this is not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from _stats import quantile

from corral.client._local import LocalBackend
from corral.client._sync.templates import Templates
from corral.models import BuildEvent, BuildEventKind

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _registry import Registry, busybox_tree, start_registry, umoci

STEP = "echo built > /opt/built && ls -R /usr/lib > /opt/listing"
REPO = "bench/app:1"


def build_image(registry: Registry, tmp: Path) -> tuple[str, int, int]:
    """Push the two-layer image; (reference, compressed bytes of its layers, files in it)."""
    layout, bundle = tmp / "layout", tmp / "bundle"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:t")
    umoci("unpack", "--image", f"{layout}:t", str(bundle))
    rootfs = bundle / "rootfs"
    busybox_tree(rootfs)
    umoci("repack", "--refresh-bundle", "--image", f"{layout}:t", str(bundle))
    shutil.copytree(
        sysconfig.get_paths()["stdlib"],
        rootfs / "usr" / "lib" / "python3",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "site-packages", "dist-packages"),
    )
    umoci("repack", "--image", f"{layout}:t", str(bundle))
    umoci("config", "--image", f"{layout}:t", "--config.env", "PATH=/bin")
    files = sum(len(names) for _, _, names in os.walk(rootfs))
    blobs = sum(f.stat().st_size for f in (layout / "blobs" / "sha256").iterdir())
    return registry.push(layout, "t", REPO), blobs, files


def bare_pull_unpack(image: str, tmp: Path) -> float:
    """skopeo copy into an empty OCI layout + umoci unpack, timed; the result is removed (untimed)."""
    work = Path(tempfile.mkdtemp(prefix="baseline-", dir=tmp))
    try:
        start = time.perf_counter()
        pull = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false"]
        subprocess.run([*pull, f"docker://{image}", f"oci:{work / 'layout'}:t"], check=True, timeout=300)
        umoci("unpack", "--image", f"{work / 'layout'}:t", str(work / "bundle"))
        return time.perf_counter() - start
    finally:
        shutil.rmtree(work)


class Builds:
    """Template builds through the embedded SDK on one private data dir."""

    def __init__(self, data_dir: Path, image: str) -> None:
        self.data_dir, self.image, self.count = data_dir, image, 0
        self.backend = LocalBackend.from_env(data_dir=data_dir)
        self.templates = Templates(backend=self.backend)

    def wipe_caches(self) -> None:
        """Empty the layer store and the OCI blob cache: what a build reuses (the agent bundle stays)."""
        for name in ("layers", "oci"):
            shutil.rmtree(self.data_dir / "cache" / name, ignore_errors=True)

    def build(self, step: str, isolation: str, *, expect: Callable[[list[bool]], bool], what: str) -> float:
        """One timed build; ``expect`` checks the cached flags of its layers (bottom first, step last)."""
        self.count += 1
        name = f"bench-{self.count}"
        events: list[BuildEvent] = []
        start = time.perf_counter()
        self.templates.build(name, self.image, run=[step], isolation=isolation, on_progress=events.append)
        took = time.perf_counter() - start
        self.templates.delete(name)  # the record only: its layers stay in the store
        cached = [e.cached for e in events if e.kind is BuildEventKind.LAYER]
        if not expect(cached):
            raise RuntimeError(f"the {what} build was not what it should be: layers cached {cached}")
        return took

    def close(self) -> None:
        self.templates.close()
        self.backend.close()


def row(name: str, samples: list[float], baseline: float | None = None) -> float:
    p50, p95 = quantile(samples, 0.5), quantile(samples, 0.95)
    ratio = f"   {p50 / baseline:6.2f}x baseline" if baseline else ""
    print(f"  {name:<38} p50 {p50 * 1000:8.0f} ms   p95 {p95 * 1000:8.0f} ms   (n={len(samples)}){ratio}")
    return p50


def bench(builds: Builds, isolation: str, runs: int, tmp: Path) -> None:
    print(f"\ncorral {isolation} (step sandboxes under {isolation})")
    baseline, cold, cached, changed = [], [], [], []
    for i in range(runs):
        baseline.append(bare_pull_unpack(builds.image, tmp))
        builds.wipe_caches()
        cold.append(builds.build(STEP, isolation, expect=lambda c: not any(c), what="cold"))
        cached.append(builds.build(STEP, isolation, expect=all, what="cached"))
        cached_base = lambda c: all(c[:-1]) and not c[-1]  # noqa: E731
        changed.append(
            builds.build(
                f"{STEP} && echo {isolation} {i} > /opt/changed",
                isolation,
                expect=cached_base,
                what="changed",
            )
        )
    base = row("baseline: skopeo copy + umoci unpack", baseline)
    p_cold = row("cold build (empty caches)", cold, base)
    p_cached = row("cached build (same build again)", cached, base)
    p_changed = row("changed step (cached image layers)", changed, base)
    print(f"  cold / cached (p50){'':<26}{p_cold / p_cached:8.1f}x")
    print(f"  cold / changed step (p50){'':<20}{p_cold / p_changed:8.1f}x")


def mounted_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        return [m.split()[1] for m in mounts if m.split()[1].startswith(f"{path}/")]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--isolation", action="append", choices=["namespace", "gvisor"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/templates.py: run as root (build steps run in sandboxes)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-templates-", dir="/var/tmp"))
    try:
        with ExitStack() as stack:
            registry = stack.enter_context(start_registry(tmp / "registry"))
            image, blob_bytes, files = build_image(registry, tmp / "image")
            print(
                f"image {image}: 2 layers, {blob_bytes / 2**20:.1f} MiB compressed, {files} files; step: {STEP!r}"
            )
            builds = Builds(tmp / "data", image)
            stack.callback(builds.close)
            isolations = args.isolation or ["namespace", "gvisor"]
            first = builds.build(STEP, isolations[0], expect=lambda c: not any(c), what="first")
            print(
                f"first build in a fresh data dir ({isolations[0]}; makes the agent bundle too): {first * 1000:.0f} ms"
            )
            for isolation in isolations:
                bench(builds, isolation, max(args.runs, 1), tmp)
    finally:
        leftover = mounted_under(tmp)
        if leftover:  # removing through a mount could delete what is mounted there
            print(f"NOT removing {tmp}: still mounted under it: {', '.join(leftover)}", file=sys.stderr)
        else:
            shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
