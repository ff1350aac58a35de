"""Pause/resume, snapshot and fork latency per isolation, against bare runsc checkpoint/restore in the same run.

    .venv/bin/python bench/snapshots.py [--runs 10] [--isolation namespace --isolation gvisor]

Measured, p50 and p99 over ``--runs`` runs each, on one running sandbox per isolation (a Python process
holding ~1 MiB inside, like a small agent's interpreter):

- pause / resume: ``sbx.pause()`` / ``sbx.resume()`` through the embedded SDK (records, shim deadline,
  runtime). namespace: cgroup freezer; gvisor: ``runsc checkpoint`` / ``runsc restore`` through the shim.
- checkpoint image: bytes of the pause image on disk (gvisor only; namespace keeps memory in RAM).
- snapshot: ``sbx.snapshot(name)`` (gvisor: checkpoint + copy of the writable layer and image + restore).
- fork: ``sbx.fork(1)`` until the fork is running (capture + create + restore).

Baseline, same machine, same run: bare runsc (ptrace, no network) of a trivial container (``sleep``): ``runsc
checkpoint`` and ``runsc restore -detach`` under a new id. Ratios printed: gvisor pause / bare checkpoint and
resume / bare restore. Timings are reported, never asserted: this is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

from _stats import quantile

from corral import Sandbox
from corral.core.settings import Settings

HOLD = "import time\nblob = bytearray(1 << 20)\nwhile True:\n    time.sleep(0.05)\n"


pct = quantile


def row(name: str, samples: list[float], unit: str = "ms", scale: float = 1000.0) -> float:
    p50, p99 = pct(samples, 0.5), pct(samples, 0.99)
    print(f"  {name:<34} p50 {p50 * scale:9.1f} {unit}   p99 {p99 * scale:9.1f} {unit}   (n={len(samples)})")
    return p50


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class BareRunsc:
    """A trivial container (``sleep``) under bare runsc: checkpoint it, restore the image under a new id."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="corral-bench-ckpt-", dir="/var/tmp"))
        rootfs = self.dir / "rootfs"
        for d in ("proc", "dev", "tmp", "usr"):
            (rootfs / d).mkdir(parents=True)
        for link in ("bin", "lib", "lib64"):
            (rootfs / link).symlink_to(f"usr/{link}")
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "args": ["/usr/bin/sleep", "1000"],
                "cwd": "/",
                "env": ["PATH=/usr/bin"],
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

    def _runsc(self, root: Path, *args: str) -> None:
        subprocess.run(
            ["runsc", f"--root={root}", "--network=none", "--platform=ptrace", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )

    def once(self) -> tuple[float, float, int]:
        root = self.dir / f"root-{uuid.uuid4().hex[:8]}"
        image = self.dir / f"image-{uuid.uuid4().hex[:8]}"
        image.mkdir()
        first, second = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
        try:
            self._runsc(root, "run", "-detach", f"--bundle={self.dir}", first)
            ckpt = timed(lambda: self._runsc(root, "checkpoint", f"--image-path={image}", first))
            size = sum(f.stat().st_size for f in image.iterdir())
            rest = timed(
                lambda: self._runsc(
                    root, "restore", "-detach", f"--image-path={image}", f"--bundle={self.dir}", second
                )
            )
            return ckpt, rest, size
        finally:
            _kill_root(root)
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(image, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _kill_root(root: Path) -> None:
    """SIGKILL every process naming this --root (runsc, gofer, sentry), like the gvisor runtime's teardown."""
    flag = f"--root={root}".encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if flag in Path(entry.path, "cmdline").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def bench_isolation(isolation: str, runs: int, state_root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    print(f"{isolation}:")
    with Sandbox.create(isolation=isolation, timeout=3600) as sbx:
        sbx.files.write("/home/user/hold.py", HOLD.encode())
        sbx.commands.start("python3 /home/user/hold.py")
        pauses, resumes, sizes, snaps, forks = [], [], [], [], []
        for _ in range(runs):
            pauses.append(timed(sbx.pause))
            image = state_root / sbx.sandbox_id / "checkpoint"
            if image.exists():
                sizes.append(float(sum(f.stat().st_size for f in image.iterdir())))
            resumes.append(timed(sbx.resume))
        for _ in range(runs):
            name = f"bench-{uuid.uuid4().hex[:8]}"
            snaps.append(timed(partial(sbx.snapshot, name)))
            _delete_template(name)
        for _ in range(runs):
            made: list[Sandbox] = []
            forks.append(timed(partial(_fork_into, sbx, made)))
            for f in made:
                f.kill()
        out["pause"] = row("pause", pauses)
        out["resume"] = row("resume", resumes)
        if sizes:
            row("checkpoint image", sizes, unit="MiB", scale=1 / (1024 * 1024))
        out["snapshot"] = row("snapshot", snaps)
        out["fork"] = row("fork(1)", forks)
    return out


def _fork_into(sbx: Sandbox, made: list[Sandbox]) -> None:
    made.extend(sbx.fork(1))


def _delete_template(name: str) -> None:
    from corral.client._local import LocalBackend

    backend = LocalBackend.from_env()
    try:
        backend.delete_template(name)
    finally:
        backend.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--isolation", action="append", choices=["namespace", "gvisor"])
    args = parser.parse_args()
    isolations = args.isolation or ["namespace", "gvisor"]
    settings = Settings.load()
    results = {iso: bench_isolation(iso, args.runs, settings.state_root) for iso in isolations}
    if shutil.which("runsc"):
        bare = BareRunsc()
        try:
            print("baseline, bare runsc (trivial container):")
            samples = [bare.once() for _ in range(args.runs)]
            ckpt = row("bare runsc checkpoint", [s[0] for s in samples])
            rest = row("bare runsc restore -detach", [s[1] for s in samples])
            row("bare checkpoint image", [float(s[2]) for s in samples], unit="MiB", scale=1 / (1024 * 1024))
        finally:
            bare.close()
        if "gvisor" in results:
            print(f"  ratio gvisor pause / bare checkpoint: {results['gvisor']['pause'] / ckpt:.2f}x")
            print(f"  ratio gvisor resume / bare restore:   {results['gvisor']['resume'] / rest:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
