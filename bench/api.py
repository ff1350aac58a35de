"""What the HTTP API costs over embedded mode, and how it holds up under concurrent clients.

    .venv/bin/python bench/api.py [--runs 30] [--clients 50] [--isolation namespace]

Both modes are measured in the same run, on the same host and runtime, with the same SDK code:

- embedded: ``AsyncSandbox`` over the in-process core (no server);
- remote: ``AsyncSandbox`` over HTTP to a ``corral serve`` subprocess started here (SQLite, its own data dir).

Reported (p50 / p99): exec round trip (``echo hi`` until its exit), create → first output, and the ratio
remote / embedded for each. Then ``--clients`` concurrent clients spread over a few sandboxes, each running
commands that print random bytes and their SHA-256 on stderr; every client checks the digest of what it
received, so a lost, duplicated or reordered byte is counted. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

from _stats import quantile

from corral import AsyncSandbox
from corral.client._async.remote import AsyncRemoteBackend
from corral.client._local import AsyncLocalBackend
from corral.models import EventKind


def fmt(samples: list[float]) -> str:
    return f"p50 {statistics.median(samples) * 1000:7.2f} ms   p99 {quantile(samples, 0.99) * 1000:7.2f} ms"


async def timed(fn: Callable[[], Awaitable[object]], runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


def start_server(
    data_dir: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str, str]:
    """``corral serve`` on a free port over ``data_dir`` (``env``: more of its environment) and a key of tenant
    "bench"; returns the process, its URL and the key."""
    env = {**os.environ, **(env or {}), "CORRAL_DATA_DIR": str(data_dir)}
    corral = [sys.executable, "-m", "corral.cli.main"]
    made = subprocess.run(
        [*corral, "keys", "create", "--tenant", "bench"], env=env, capture_output=True, text=True, check=True
    )
    key = made.stdout.strip().splitlines()[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [*corral, "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).close()
            return proc, url, key
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("corral serve did not start")


async def first_output(make: Callable[[], Awaitable[AsyncSandbox]]) -> None:
    sbx = await make()
    try:
        async with contextlib.aclosing(sbx.commands.stream(["echo", "hi"])) as events:
            async for event in events:
                if event.kind is EventKind.STDOUT:
                    break
    finally:
        await sbx.kill()
        await sbx.aclose()


async def load(url: str, key: str, isolation: str, clients: int, per_client: int, size: int) -> None:
    sandboxes = max(1, clients // 10)
    backend = AsyncRemoteBackend(url, api_key=key)
    boxes = [
        await AsyncSandbox.create(isolation=isolation, timeout=600, backend=backend) for _ in range(sandboxes)
    ]
    latencies: list[float] = []
    bad = 0
    moved = 0
    cmd = f"f=$(mktemp); head -c {size} /dev/urandom > $f; cat $f; sha256sum $f | cut -d' ' -f1 >&2; rm $f"

    async def raw_client(i: int) -> None:
        """Through the byte-exact event stream (not decoded text), so the checksum covers every byte."""
        nonlocal bad, moved
        own = AsyncRemoteBackend(url, api_key=key)
        try:
            sbx = await AsyncSandbox.connect(boxes[i % sandboxes].sandbox_id, backend=own)
            for _ in range(per_client):
                start = time.perf_counter()
                out, err = bytearray(), bytearray()
                async for event in sbx.commands.stream(cmd):
                    if event.kind is EventKind.STDOUT:
                        out += event.data
                    elif event.kind is EventKind.STDERR:
                        err += event.data
                latencies.append(time.perf_counter() - start)
                moved += len(out)
                if hashlib.sha256(out).hexdigest() != err.decode().strip() or len(out) != size:
                    bad += 1
        finally:
            await own.aclose()

    started = time.perf_counter()
    await asyncio.gather(*(raw_client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    for box in boxes:
        await box.kill()
    await backend.aclose()
    print(
        f"\n{clients} concurrent clients over {sandboxes} sandboxes, {per_client} commands each, "
        f"{size // 1024} KiB of random output per command"
    )
    print(f"  per command         {fmt(latencies)}")
    print(f"  throughput          {moved / wall / 1e6:7.1f} MB/s, {len(latencies) / wall:6.1f} commands/s")
    print(f"  checksum mismatches {bad} of {len(latencies)}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--creates", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--size", type=int, default=256 * 1024)
    parser.add_argument("--isolation", default="namespace")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="corral-bench-api-") as tmp:
        data_dir = Path(tmp)
        os.environ["CORRAL_DATA_DIR"] = str(data_dir / "embedded")
        proc, url, key = start_server(data_dir / "server")
        try:
            local = AsyncLocalBackend.from_env()
            remote = AsyncRemoteBackend(url, api_key=key)
            results: dict[str, dict[str, list[float]]] = {}
            for name, backend in (("embedded", local), ("remote", remote)):
                sbx = await AsyncSandbox.create(isolation=args.isolation, timeout=600, backend=backend)
                try:
                    exec_times = await timed(lambda s=sbx: s.commands.run(["echo", "hi"]), args.runs)
                finally:
                    await sbx.kill()

                async def make(b=backend) -> AsyncSandbox:  # type: ignore[no-untyped-def]
                    return await AsyncSandbox.create(isolation=args.isolation, timeout=120, backend=b)

                create_times = await timed(lambda m=make: first_output(m), args.creates, warmup=1)
                results[name] = {"exec": exec_times, "create": create_times}
            await local.aclose()
            await remote.aclose()

            print(f"isolation {args.isolation}; {args.runs} exec runs, {args.creates} creates per mode\n")
            for what, label in (("exec", "exec round trip"), ("create", "create → first output")):
                for mode in ("embedded", "remote"):
                    print(f"{label:24s} {mode:9s} {fmt(results[mode][what])}")
                ratio = statistics.median(results["remote"][what]) / statistics.median(
                    results["embedded"][what]
                )
                extra = (
                    statistics.median(results["remote"][what]) - statistics.median(results["embedded"][what])
                ) * 1000
                print(
                    f"{'':24s} {'remote/embedded':>15s} {ratio:5.2f}x  (API overhead {extra:+.2f} ms at p50)\n"
                )

            await load(url, key, args.isolation, args.clients, args.per_client, args.size)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
