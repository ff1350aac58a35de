"""What reaching a server inside a sandbox costs, per path, against the same server run on the host.

    .venv/bin/python bench/ports.py [--runs 50] [--isolation namespace] [--mib 20]

One ``python3 -m http.server`` serves a small page and a ``--mib`` MiB file, in each of:

- host (baseline): the server runs on this machine, the client connects to it directly;
- embedded forward: ``sbx.forward_port`` in embedded mode (client → local listener → agent → server);
- remote forward: ``forward_port`` through a ``corral serve`` started here (one WebSocket per connection);
- proxy: ``sbx.get_url(port)`` through the same server's port proxy (one agent connection per request).

Reported: small-request round trip p50 / p99 with a keep-alive client, and download throughput of the big
file, with ratios to the host baseline. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _stats import quantile
from api import start_server

from corral import AsyncSandbox
from corral.client._async.remote import AsyncRemoteBackend
from corral.client._local import AsyncLocalBackend

PAGE = b"<h1>hello</h1>\n"
PORT = 8000


async def measure(client: httpx.AsyncClient, base: str, runs: int, size: int) -> tuple[list[float], float]:
    for _ in range(5):
        (await client.get(base + "/index.html")).raise_for_status()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        response = await client.get(base + "/index.html")
        samples.append(time.perf_counter() - start)
        assert response.content == PAGE, response.text[:200]
    start = time.perf_counter()
    got = 0
    async with client.stream("GET", base + "/big.bin") as response:
        async for chunk in response.aiter_bytes():
            got += len(chunk)
    assert got == size, got
    return samples, size / (time.perf_counter() - start) / 2**20


async def prepare(sbx: AsyncSandbox, size: int) -> None:
    await sbx.files.write("/tmp/www/index.html", PAGE)
    await sbx.commands.run(f"head -c {size} /dev/zero > /tmp/www/big.bin", check=True)
    handle = await sbx.commands.start(
        f"python3 -u -m http.server {PORT} --bind 127.0.0.1 --directory /tmp/www"
    )
    seen = ""
    async for event in handle.events():
        seen += event.text
        if "Serving" in seen:
            return
    raise SystemExit(f"the server in the sandbox did not start: {seen}")


def row(name: str, samples: list[float], mib_s: float, base: tuple[list[float], float] | None) -> None:
    p50 = statistics.median(samples)
    line = f"{name:<18} p50 {p50 * 1000:7.2f} ms  p99 {quantile(samples, 0.99) * 1000:7.2f} ms  {mib_s:8.1f} MiB/s"
    if base is not None:
        line += f"   {p50 / statistics.median(base[0]):5.2f}x latency, {mib_s / base[1]:5.2f}x throughput"
    print(line, flush=True)


def start_host_server(www: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "http.server", "18080", "--bind", "127.0.0.1", "--directory", str(www)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--isolation", default="namespace")
    parser.add_argument("--mib", type=int, default=20)
    args = parser.parse_args()
    size = args.mib * 2**20
    print(f"{args.runs} small requests per path, one {args.mib} MiB download; isolation {args.isolation}\n")
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        (www / "index.html").write_bytes(PAGE)
        (www / "big.bin").write_bytes(b"\0" * size)
        host = await asyncio.to_thread(start_host_server, www)
        proc, url, key = await asyncio.to_thread(start_server, Path(tmp) / "server")
        try:
            async with httpx.AsyncClient(timeout=60) as client:
                for _ in range(200):  # the host server is a subprocess: wait until it accepts, bounded
                    with contextlib.suppress(httpx.TransportError):
                        await client.get("http://127.0.0.1:18080/index.html")
                        break
                    await asyncio.sleep(0.05)
                base = await measure(client, "http://127.0.0.1:18080", args.runs, size)
                row("host (baseline)", *base, None)

            local = AsyncLocalBackend.from_env()
            async with await AsyncSandbox.create(isolation=args.isolation, backend=local, timeout=600) as sbx:
                await prepare(sbx, size)
                async with sbx.forward_port(PORT) as fwd, httpx.AsyncClient(timeout=60) as client:
                    row("embedded forward", *await measure(client, fwd.url, args.runs, size), base)
            await local.aclose()

            remote = AsyncRemoteBackend(url, api_key=key)
            async with await AsyncSandbox.create(
                isolation=args.isolation, backend=remote, timeout=600
            ) as sbx:
                await prepare(sbx, size)
                async with sbx.forward_port(PORT) as fwd, httpx.AsyncClient(timeout=60) as client:
                    row("remote forward", *await measure(client, fwd.url, args.runs, size), base)
                headers = {"Host": sbx.get_host(PORT), "Corral-Traffic-Token": sbx.traffic_token or ""}
                async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
                    row("proxy (get_url)", *await measure(client, "", args.runs, size), base)
            await remote.aclose()
        finally:
            host.terminate()
            proc.terminate()
            proc.wait(30)
            host.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
