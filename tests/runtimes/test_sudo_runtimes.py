"""Passwordless ``sudo`` (served by the agent, :mod:`corral.agent.sudo`) in every local runtime, and what it
must not give: the host's files, or root to a uid that may not sudo. The E2B SDK's view is tests/e2b."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.anyio]


async def _sudo_runs_as_root_for_user(sandbox: Any, corral_data_dir: Path) -> None:
    async def login(cmd: str) -> str:
        result = await sandbox.run(["/bin/bash", "-l", "-c", cmd], user="user")
        assert result.exit_code == 0, result.stderr
        return result.out

    assert (
        await login("id -un; sudo whoami; sudo -n true && echo n-ok; sudo -u user id -u")
        == "user\nroot\nn-ok\n1000\n"
    )
    assert await login("echo piped | sudo cat; sudo sh -c 'exit 5'; echo rc=$?") == "piped\nrc=5\n"
    assert (
        await login(
            "sudo sh -c 'echo r > /root/r'; stat -c %U /root/r 2>&1 | tail -c 18; sudo stat -c %U /root/r"
        )
        == "Permission denied\nroot\n"
    )
    # non-login processes find it too (the agent's PATH), and a killed sudo takes its root command along
    plain = await sandbox.run(
        "sudo sleep 777 & p=$!; sleep 1; pgrep -u 0 -x sleep >/dev/null && echo running; kill -9 $p; sleep 1; "
        "pgrep -u 0 -x sleep || echo gone",
        user="user",
    )
    assert plain.out == "running\ngone\n", plain.stderr
    for path in (str(corral_data_dir), f"/proc/1/root{corral_data_dir}", "/work"):
        assert await login(f"sudo test -e {path} && echo visible || echo absent") == "absent\n", path


async def _only_root_and_user_may_sudo(sandbox: Any) -> None:
    result = await sandbox.run(
        ["python3", "-c", "import os; os.setgid(4321); os.setuid(4321); os.execvp('sudo', ['sudo', 'id'])"]
    )
    assert result.exit_code == 1 and result.stderr == b"sudo: uid 4321 is not in the sudoers file.\n"


@pytest.mark.bwrap
async def test_namespace(ns_sandbox: Any, corral_data_dir: Path) -> None:
    sandbox = await ns_sandbox()
    await _sudo_runs_as_root_for_user(sandbox, corral_data_dir)
    await _only_root_and_user_may_sudo(sandbox)


@pytest.mark.runsc
async def test_gvisor(gvisor_sandbox: Any, corral_data_dir: Path) -> None:
    sandbox = await gvisor_sandbox()
    await _sudo_runs_as_root_for_user(sandbox, corral_data_dir)
    await _only_root_and_user_may_sudo(sandbox)


@pytest.mark.qemu
async def test_microvm(microvm_sandbox: Any, corral_data_dir: Path) -> None:
    sandbox = await microvm_sandbox()
    await _sudo_runs_as_root_for_user(sandbox, corral_data_dir)
    await _only_root_and_user_may_sudo(sandbox)
