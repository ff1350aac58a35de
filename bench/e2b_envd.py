"""What E2B's in-sandbox surface (envd, through ``server/e2b/envd``) costs over Corral's own SDK, on one server.

    .venv/bin/python bench/e2b_envd.py [--runs 20] [--isolation namespace]

The server and the two keys of ``bench/e2b_api.py``; calls of the two sides taking turns, p50 / p99, with the
ratio of the medians E2B / Corral (the issue's target is at most 1.3x for exec and files):

- exec: ``sbx.commands.run("true")`` (envd ``process.Process/Start``, a Connect stream) vs Corral's
  ``sbx.commands.run(["/bin/bash", "-l", "-c", "true"])`` (remote): the same process, since E2B's SDK runs
  every command in a login bash (whose start-up, reading /etc/profile, is most of the round trip);
- exec, as-is: the same ``commands.run("true")`` through each SDK, each running it its own way (E2B's in
  ``bash -l``, Corral's in ``/bin/sh -c``): what moving code from one SDK to the other costs;
- write / read 1 MiB: ``sbx.files.write`` / ``read(format="bytes")`` (envd ``/files``) vs Corral's
  ``files.write`` / ``files.read``;
- create → first output: ``e2b.AsyncSandbox.create`` then ``commands.run("echo hi")`` vs the same with
  ``corral.AsyncSandbox.create``.

Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from e2b_api import e2b_key as make_e2b_key
from e2b_api import paired, row, start_server

import corral
from corral.client._async.remote import AsyncRemoteBackend

MIB = os.urandom(1024 * 1024)


async def main(runs: int, isolation: str) -> None:
    from e2b import AsyncSandbox as E2BSandbox

    data_dir = Path(tempfile.mkdtemp(prefix="corral-bench-envd-"))
    proc, url, corral_key = start_server(data_dir, {"CORRAL_ISOLATION": isolation})
    e2b_key = make_e2b_key(data_dir)
    os.environ.update(
        {"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": e2b_key, "E2B_DOMAIN": "localhost"}
    )
    backend = AsyncRemoteBackend(url, api_key=corral_key)
    made: list[object] = []
    try:
        theirs = await E2BSandbox.create(timeout=600)
        ours = await corral.AsyncSandbox.create(timeout=600, backend=backend)
        made += [theirs, ours]
        row(
            "exec",
            *await paired(
                lambda: theirs.commands.run("true"),
                lambda: ours.commands.run(["/bin/bash", "-l", "-c", "true"]),
                runs,
            ),
        )
        row(
            "exec, as-is",
            *await paired(
                lambda: theirs.commands.run("true"),
                lambda: ours.commands.run("true"),
                runs,
            ),
        )
        row(
            "write 1 MiB",
            *await paired(
                lambda: theirs.files.write("/tmp/b.bin", MIB),
                lambda: ours.files.write("/tmp/b.bin", MIB),
                runs,
            ),
        )

        async def read_theirs() -> None:
            assert len(await theirs.files.read("/tmp/b.bin", format="bytes")) == len(MIB)

        async def read_ours() -> None:
            assert len(await ours.files.read("/tmp/b.bin")) == len(MIB)

        row("read 1 MiB", *await paired(read_theirs, read_ours, runs))

        async def first_output_theirs() -> None:
            sbx = await E2BSandbox.create(timeout=120)
            try:
                assert (await sbx.commands.run("echo hi")).stdout == "hi\n"
            finally:
                await sbx.kill()

        async def first_output_ours() -> None:
            sbx = await corral.AsyncSandbox.create(timeout=120, backend=backend)
            try:
                assert (await sbx.commands.run("echo hi")).stdout == "hi\n"
            finally:
                await sbx.kill()

        row("create→out", *await paired(first_output_theirs, first_output_ours, max(3, runs // 4), warmup=1))
    finally:
        for sbx in made:
            await sbx.kill()  # type: ignore[attr-defined]
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
