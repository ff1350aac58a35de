"""Warm pools through the SDK and CLI in embedded mode, on the real runtimes.

What a pool must not change: a sandbox claimed from it behaves like a cold one (the create's env, metadata,
files and timeout apply; it starts clean), and deleting the pool leaves nothing running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Sandbox
from corral.client._sync.pools import Pools

RUNTIMES = [
    pytest.param("namespace", marks=[pytest.mark.root, pytest.mark.bwrap]),
    pytest.param("gvisor", marks=[pytest.mark.root, pytest.mark.runsc]),
]


def state_dirs(data_dir: Path) -> set[str]:
    root = data_dir / "sandboxes"
    return {d for d in os.listdir(root) if d.startswith("sb-")} if root.exists() else set()


@pytest.fixture
def pools() -> Iterator[Pools]:
    with Pools() as p:
        yield p
        for info in p.list():
            p.delete(info.template, isolation=info.isolation)


@pytest.mark.parametrize("isolation", RUNTIMES)
def test_claimed_sandbox_gets_the_request_and_nothing_of_anyone_else(
    pools: Pools, isolation: str, corral_data_dir: Path
) -> None:
    before = state_dirs(corral_data_dir)
    pools.set("base", 2, isolation=isolation)
    progress = list(pools.fill("base", isolation=isolation))
    assert progress[-1].ready == 2
    with Sandbox.create(
        isolation=isolation,
        envs={"TASK_TOKEN": "t-41"},
        metadata={"suite": "pools", "who": "first"},
        files={"/home/user/input.txt": b"payload\n", "/tmp/deep/er/x": b"x"},
        timeout=120,
    ) as first:
        info = first.get_info()
        assert info.from_pool and info.isolation == isolation
        assert info.expires_at is not None and 100 < info.expires_at - time.time() <= 120
        r = first.commands.run(
            "echo $TASK_TOKEN; cat /home/user/input.txt /tmp/deep/er/x; stat -c %u input.txt"
        )
        assert r.stdout == "t-41\npayload\nx1000\n", r.stderr
        assert [s.sandbox_id for s in Sandbox.list(metadata={"who": "first"})] == [first.sandbox_id]
        first.commands.run("echo secret > /tmp/left-behind")
        first.commands.start("sleep 300")
        with Sandbox.create(isolation=isolation, metadata={"suite": "pools", "who": "second"}) as second:
            assert second.get_info().from_pool and second.sandbox_id != first.sandbox_id
            r = second.commands.run("ls /tmp; echo ${TASK_TOKEN:-unset}; pgrep -x sleep || echo none")
            assert r.stdout.endswith("unset\nnone\n") and "left-behind" not in r.stdout, r.stdout
        assert [p.target for p in pools.list()] == [2]
        assert pools.list()[0].ready == 0  # claimed members never come back; embedded mode refills on fill
    # a third create with the pool empty starts cold, and still works
    with Sandbox.create(isolation=isolation) as third:
        assert not third.get_info().from_pool
        assert third.commands.run("echo ok").stdout == "ok\n"
    list(pools.fill("base", isolation=isolation))
    assert pools.list()[0].ready == 2
    pools.delete("base", isolation=isolation)
    assert pools.list() == []
    assert state_dirs(corral_data_dir) == before  # every member went with the pool


def corral(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli.main", *args],
        capture_output=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )


@pytest.mark.root
@pytest.mark.bwrap
def test_cli_pool_set_list_run_delete(corral_data_dir: Path) -> None:
    before = state_dirs(corral_data_dir)
    try:
        done = corral("pool", "set", "base", "--size", "1", "--isolation", "namespace", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "template": "base",
            "isolation": "namespace",
            "target": 1,
            "ready": 1,
            "starting": 0,
            "memory_mb": 512,
            "cpus": 1.0,
        }
        listed = json.loads(corral("pool", "list", "--json").stdout)
        assert [(p["template"], p["isolation"], p["ready"]) for p in listed] == [("base", "namespace", 1)]
        human = corral("pool", "list").stdout.decode()
        assert "TEMPLATE" in human and "namespace" in human
        ran = corral("run", "--isolation", "namespace", "-e", "X=late", "--", "sh", "-c", "echo $X")
        assert (ran.returncode, ran.stdout) == (0, b"late\n"), ran.stderr
        assert json.loads(corral("pool", "list", "--json").stdout)[0]["ready"] == 0  # one short
        bad = corral("pool", "set", "nope", "--size", "1", "--isolation", "namespace")
        assert bad.returncode == 1 and b"template 'nope' not found" in bad.stderr
        assert b"Traceback" not in bad.stderr
    finally:
        gone = corral("pool", "delete", "base", "--isolation", "namespace")
    assert gone.returncode == 0, gone.stderr
    again = corral("pool", "delete", "base", "--isolation", "namespace")
    assert again.returncode == 1 and b"no warm pool for template 'base'" in again.stderr
    assert state_dirs(corral_data_dir) == before


@pytest.mark.root
@pytest.mark.bwrap
def test_a_request_refused_inside_the_sandbox_fails_the_same_pooled_or_cold(
    pools: Pools, corral_data_dir: Path
) -> None:
    from corral import PermissionDenied

    before = state_dirs(corral_data_dir)
    pools.set("base", 1, isolation="namespace")
    list(pools.fill("base", isolation="namespace"))
    for _ in range(2):  # first from the pool, then cold: the same error, and nothing left behind
        with pytest.raises(PermissionDenied):
            Sandbox.create(isolation="namespace", files={"/etc/not-yours": b"x"})
    assert pools.list()[0].ready == 0  # the member it touched was destroyed, not put back
    pools.delete("base", isolation="namespace")
    assert state_dirs(corral_data_dir) == before
