"""Records written before the runtime contract had nodes and instance references keep working.

The first format of a persisted sandbox had no ``node`` and an instance with host fields at its top level
(``state_dir``, ``shim_pid``, ``shim_start_ticks``, ``socket_path``); snapshot templates with memory had no
``memory_runtime``. A server started on such a store must re-attach to those sandboxes and kill them cleanly.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from corral.core.records import SandboxRecord, TemplateRecord
from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.ids import SandboxId
from corral.models import CreateParams, EventKind, ExecParams, SandboxState
from corral.runtimes import _proc
from corral.runtimes.base import LEGACY_NODE, ArtifactKind, Instance
from corral.wiring import open_service

pytestmark = pytest.mark.anyio


def _old_format(record: SandboxRecord) -> str:
    """The record as the first format stored it."""
    data = json.loads(record.to_json())
    del data["node"]
    inst = data["instance"]
    data["instance"] = {
        "sandbox_id": inst["sandbox_id"],
        "runtime": inst["runtime"],
        "state_dir": inst["ref"],
        "shim_pid": inst["extra"]["shim_pid"],
        "shim_start_ticks": inst["extra"]["shim_start_ticks"],
        "socket_path": str(Path(inst["ref"]) / "agent.sock"),
        "extra": {},
    }
    return json.dumps(data, sort_keys=True)


def test_an_old_instance_moves_its_host_fields_into_ref_and_extra() -> None:
    old = {
        "sandbox_id": "sb-aaaaaaaaaaaaaaaa",
        "runtime": "namespace",
        "state_dir": "/var/lib/corral/sandboxes/sb-aaaaaaaaaaaaaaaa",
        "shim_pid": 42,
        "shim_start_ticks": 7,
        "socket_path": "/var/lib/corral/sandboxes/sb-aaaaaaaaaaaaaaaa/agent.sock",
        "extra": {"uid_slot": 3},
    }
    inst = Instance.from_json(json.dumps(old))
    assert inst.node == LEGACY_NODE and inst.ref == old["state_dir"]
    assert dict(inst.extra) == {"uid_slot": 3, "shim_pid": 42, "shim_start_ticks": 7}
    assert Instance.from_json(inst.to_json()) == inst  # and the new format round-trips


def test_an_old_snapshot_template_with_memory_was_made_by_gvisor() -> None:
    old = {"name": "s", "kind": "snapshot", "rootfs": "/c/layer", "created_at": 1.0, "memory": "/c/memory"}
    record = TemplateRecord.from_json(json.dumps(old))
    artifact = record.memory_artifact()
    assert artifact is not None and artifact.runtime == "gvisor" and artifact.kind is ArtifactKind.MEMORY
    assert artifact.path == Path("/c/memory")


async def test_an_old_format_sandbox_is_reattached_and_killed(tmp_path: Path) -> None:
    settings = Settings.load(
        env={}, data_dir=tmp_path / "data", enabled_runtimes=("fake",), default_isolation="fake"
    )
    async with open_service(settings) as first:
        info = await first.create(CreateParams(timeout=600))
        record = await first.store.get_sandbox(SandboxId(info.sandbox_id))
        assert record is not None and record.node == settings.node
        await first.store.aclose()
    assert record.instance is not None
    state_dir = Path(record.instance.ref)
    shim = (record.instance.extra["shim_pid"], record.instance.extra["shim_start_ticks"])
    db = sqlite3.connect(settings.db_path)  # rewrite it as the first format stored it
    with db:
        db.execute("UPDATE sandboxes SET data = ? WHERE id = ?", (_old_format(record), info.sandbox_id))
    db.close()

    service: SandboxService = open_service(settings)  # a server restarted on the old store
    try:
        again = await service.get(info.sandbox_id)
        assert again.state is SandboxState.RUNNING
        adopted = await service.store.get_sandbox(SandboxId(info.sandbox_id))
        assert adopted is not None and adopted.node == settings.node  # the first reconcile adopted it
        assert adopted.instance is not None and adopted.instance.node == settings.node
        out = b""
        async for ev in await service.exec(info.sandbox_id, ExecParams(cmd="echo still here")):
            if ev.kind is EventKind.STDOUT:
                out += ev.data
        assert out == b"still here\n"
        moved = await service.set_timeout(info.sandbox_id, 120)  # through the shim's control channel
        assert moved.expires_at is not None and moved.expires_at < time.time() + 121
        stopped = await service.kill(info.sandbox_id)
        assert stopped.state is SandboxState.STOPPED
    finally:
        await service.aclose()
        await service.store.aclose()
    assert not await anyio.Path(state_dir).exists()
    assert not _proc.pid_alive(*shim) or _zombie(shim[0])


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z" or not os.path.exists(f"/proc/{pid}")
