"""Host directories bound read-only into a sandbox stay unchanged, whatever the sandbox does to them.

Regression test for a real escape: under runsc 20240729 a file on a read-only OCI bind could be truncated
from inside (open with O_TRUNC reached the host file), although creating files there was refused. The host
paths are now read-only at the kernel level before any runtime sees them. The directory bound here is a
sacrificial copy, so a regression cannot damage the host's real /usr.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.core.agent_client import AgentClient
from corral.ids import SandboxId
from corral.models import ExecParams
from corral.runtimes.base import Bind, HostLayers, Runtime, RuntimeConfig, SandboxSpec
from corral.runtimes.gvisor import GVisorRuntime
from corral.runtimes.namespace import NamespaceRuntime
from corral.testing import run_command

pytestmark = [pytest.mark.anyio, pytest.mark.root]

ATTACKS = [
    "echo x > /mnt/host/victim",
    "truncate -s 0 /mnt/host/victim",
    "dd if=/dev/zero of=/mnt/host/victim bs=1 count=1 conv=notrunc",
    "chmod 777 /mnt/host/victim",
    "rm -f /mnt/host/victim",
    "mv /mnt/host/victim /mnt/host/moved",
    "touch /mnt/host/new",
    "ln -s /etc/passwd /mnt/host/link",
]


def _digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize(
    "runtime_cls",
    [
        pytest.param(NamespaceRuntime, marks=pytest.mark.bwrap, id="namespace"),
        pytest.param(GVisorRuntime, marks=pytest.mark.runsc, id="gvisor"),
    ],
)
async def test_read_only_binds_cannot_be_changed(
    runtime_cls: Callable[[RuntimeConfig], Runtime],
    runtime_config: RuntimeConfig,
    host_rootfs: HostLayers,
    tmp_path: Path,
) -> None:
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "victim").write_bytes(b"precious host data\n" * 100)
    (victim_dir / "victim").chmod(0o644)
    before = _digest(victim_dir)
    rootfs = HostLayers(
        lower=host_rootfs.lower, binds=(*host_rootfs.binds, Bind(source=victim_dir, target="/mnt/host"))
    )
    runtime = runtime_cls(runtime_config)
    instance = await runtime.create(
        SandboxSpec(sandbox_id=SandboxId.new(), rootfs=rootfs, deadline=time.time() + 120)
    )
    try:
        client = await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)
        try:
            out, _, done = await run_command(
                client, ExecParams(cmd="cat /mnt/host/victim | head -1", user="root")
            )
            assert out == b"precious host data\n"  # readable
            for attack in ATTACKS:
                _, _, done = await run_command(client, ExecParams(cmd=attack, user="root"))
                assert done.exit_code != 0, f"{attack!r} succeeded inside the sandbox"
                assert _digest(victim_dir) == before, f"{attack!r} changed the host directory"
        finally:
            await client.aclose()
    finally:
        await runtime.destroy(instance)
    assert _digest(victim_dir) == before
