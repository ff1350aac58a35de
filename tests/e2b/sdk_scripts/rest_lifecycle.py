"""The E2B REST lifecycle, as an agent pinned to some e2b release would drive it (run as a subprocess).

Run with the e2b release under test first on sys.path and E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY set; the
key of a second tenant is in E2B_OTHER_KEY. Exits non-zero (with the failing assertion) on any difference.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import sys
import time
from datetime import UTC, datetime, timedelta

from e2b.exceptions import SandboxNotFoundException

from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState


def ids(paginator: object) -> list[str]:
    out: list[str] = []
    while paginator.has_next:  # type: ignore[attr-defined]
        out += [i.sandbox_id for i in paginator.next_items()]  # type: ignore[attr-defined]
    return out


def sync_lifecycle() -> None:
    tag = f"script-{time.time_ns()}"
    sbx = Sandbox.create(timeout=120, metadata={"tag": tag}, envs={"A": "1"})
    more = [Sandbox.create(timeout=120, metadata={"tag": tag}) for _ in range(2)]
    made = [sbx, *more]
    try:
        info = sbx.get_info()
        assert info.state is SandboxState.RUNNING and info.metadata == {"tag": tag}, info
        assert timedelta(seconds=118) <= info.end_at - info.started_at <= timedelta(seconds=122), info
        assert ids(Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=2, order="asc")) == [
            s.sandbox_id for s in made
        ]
        # another tenant sees nothing of it
        other = os.environ["E2B_OTHER_KEY"]
        try:
            Sandbox.get_info(sbx.sandbox_id, api_key=other)
            raise AssertionError("another tenant could read the sandbox")
        except SandboxNotFoundException:
            pass
        assert Sandbox.kill(sbx.sandbox_id, api_key=other) is False

        end = sbx.get_info().end_at
        Sandbox.connect(sbx.sandbox_id, timeout=5)  # never shortens
        assert sbx.get_info().end_at == end
        assert sbx.pause() is True and sbx.pause() is False
        assert sbx.get_info().state is SandboxState.PAUSED
        Sandbox.connect(sbx.sandbox_id, timeout=60)  # resumes
        assert sbx.get_info().state is SandboxState.RUNNING

        snap = sbx.create_snapshot()
        child = Sandbox.create(snap.snapshot_id, timeout=60)
        made.append(child)
        assert child.get_info().template_id == snap.snapshot_id
        child.kill()
        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
        forks = sbx.fork(count=1)
        assert len(forks) == 1 and not isinstance(forks[0], Exception)
        made.append(forks[0])

        more[0].set_timeout(2)
        deadline = time.monotonic() + 30
        while True:  # it really ends at its new end time
            try:
                Sandbox.get_info(more[0].sandbox_id)
            except SandboxNotFoundException:
                break
            assert time.monotonic() < deadline, "the sandbox outlived its timeout"
            time.sleep(0.2)
        assert sbx.kill() is True and sbx.kill() is False
    finally:
        for s in made:
            Sandbox.kill(s.sandbox_id)


async def async_lifecycle() -> None:
    sbx = await AsyncSandbox.create(timeout=60, metadata={"mode": "async"})
    try:
        info = await sbx.get_info()
        assert info.state is SandboxState.RUNNING and info.end_at > datetime.now(UTC)
        assert await sbx.pause() is True
        again = await AsyncSandbox.connect(sbx.sandbox_id)
        assert (await again.get_info()).state is SandboxState.RUNNING
    finally:
        assert await sbx.kill() is True
    assert await AsyncSandbox.kill(sbx.sandbox_id) is False


if __name__ == "__main__":
    sync_lifecycle()
    asyncio.run(async_lifecycle())
    print(f"e2b {importlib.metadata.version('e2b')}: ok", file=sys.stderr, flush=True)
    # Every check passed. Leave without interpreter teardown: the SDK's native HTTP transport (pyqwest) can
    # abort (SIGABRT) while its threads are torn down at exit, which says nothing about the server.
    os._exit(0)
