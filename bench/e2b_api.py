"""What E2B's REST surface costs over Corral's own, for the same operations on the same server.

    .venv/bin/python bench/e2b_api.py [--runs 20] [--isolation namespace]

One ``corral serve`` subprocess (its own data dir, the given isolation as its default); one tenant with a key
in each form. Measured in the same run, the two sides' calls taking turns, p50 / p99, with the ratio of the
medians E2B / Corral for each row:

- create: ``e2b.AsyncSandbox.create`` (``POST /v2/sandboxes``) vs ``corral.AsyncSandbox.create`` (remote);
- get: ``AsyncSandbox.get_info`` vs the remote backend's ``get_sandbox`` (``GET`` of one sandbox);
- list of ``--runs``: ``AsyncSandbox.list(...).next_items()`` vs ``list_sandboxes``, filtered by metadata;
- kill.

The in-sandbox operations (exec, files) through E2B's envd are measured where envd lives. Timings are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from _stats import quantile
from api import start_server, timed

import corral
from corral.client._async.remote import AsyncRemoteBackend

CORRAL = [sys.executable, "-m", "corral.cli.main"]


def fmt(samples: list[float]) -> str:
    return f"p50 {statistics.median(samples) * 1000:8.2f} ms  p99 {quantile(samples, 0.99) * 1000:8.2f} ms"


def e2b_key(data_dir: Path) -> str:
    """A key of the same tenant, in E2B's form (made in the server's store while it runs)."""
    env = {**os.environ, "CORRAL_DATA_DIR": str(data_dir)}
    made = subprocess.run(
        [*CORRAL, "keys", "create", "--tenant", "bench", "--e2b"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return made.stdout.strip().splitlines()[-1]


async def paired(
    e2b: Callable[[], Awaitable[object]], own: Callable[[], Awaitable[object]], runs: int, warmup: int = 2
) -> tuple[list[float], list[float]]:
    """Both sides, one call each in turn, so that the machine's load (it is shared) hits them alike."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(runs):
        a += await timed(e2b, 1, warmup)
        b += await timed(own, 1, warmup)
        warmup = 0
    return a, b


def row(name: str, e2b: list[float], own: list[float]) -> None:
    ratio = statistics.median(e2b) / statistics.median(own)
    print(f"{name:12} e2b {fmt(e2b)}   corral {fmt(own)}   e2b/corral {ratio:5.2f}x")


async def main(runs: int, isolation: str) -> None:
    from e2b import AsyncSandbox as E2BSandbox
    from e2b import SandboxQuery

    data_dir = Path(tempfile.mkdtemp(prefix="corral-bench-e2b-"))
    proc, url, corral_key = start_server(data_dir, {"CORRAL_ISOLATION": isolation})
    os.environ.update(
        {
            "E2B_API_URL": url,
            "E2B_SANDBOX_URL": url,
            "E2B_API_KEY": e2b_key(data_dir),
            "E2B_DOMAIN": "localhost",
        }
    )
    backend = AsyncRemoteBackend(url, api_key=corral_key)
    try:
        made_e2b: list[str] = []
        made_own: list[str] = []

        async def create_e2b() -> None:
            made_e2b.append((await E2BSandbox.create(timeout=300, metadata={"bench": "e2b"})).sandbox_id)

        async def create_own() -> None:
            sbx = await corral.AsyncSandbox.create(timeout=300, metadata={"bench": "corral"}, backend=backend)
            made_own.append(sbx.sandbox_id)

        row("create", *await paired(create_e2b, create_own, runs, warmup=1))  # warm: SDK set-up, first boot
        one_e2b, one_own = made_e2b[0], made_own[0]
        row(
            "get",
            *await paired(lambda: E2BSandbox.get_info(one_e2b), lambda: backend.get_sandbox(one_own), runs),
        )
        row(
            f"list of {len(made_e2b)}",
            *await paired(
                lambda: E2BSandbox.list(query=SandboxQuery(metadata={"bench": "e2b"})).next_items(),
                lambda: backend.list_sandboxes(metadata={"bench": "corral"}),
                runs,
            ),
        )
        kills = len(made_e2b) - 1
        row(
            "kill",
            *await paired(
                lambda: E2BSandbox.kill(made_e2b.pop()),
                lambda: backend.kill_sandbox(made_own.pop()),
                kills,
                0,
            ),
        )
        for sandbox_id in made_e2b:
            await E2BSandbox.kill(sandbox_id)
        for sandbox_id in made_own:
            await backend.kill_sandbox(sandbox_id)
    finally:
        await backend.aclose()
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--isolation", default="namespace")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.isolation))
