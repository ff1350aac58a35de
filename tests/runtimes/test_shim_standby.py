"""The standby shim (runtimes/_shimctl.ShimLauncher): a shim started ahead of need takes the next sandbox.

Checked on real namespace sandboxes: the next create is served by the standby that was waiting, which then
looks and behaves like a shim started for its state dir (command line, priority, log); a standby that died
meanwhile costs nothing but speed; closing the launcher ends the standby and the next create starts one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from corral.runtimes import _proc, _shimctl

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.anyio]


def _standby() -> Any:
    standby = _shimctl.launcher._standby
    assert standby is not None and standby.poll() is None, "no standby waiting after a create"
    return standby


def _cmdline(pid: int) -> list[str]:
    return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") if a]


async def test_the_next_create_is_served_by_the_waiting_standby(ns_sandbox: Any) -> None:
    await ns_sandbox()  # whichever way this one started, a standby waits once it is ready
    standby = _standby()
    assert "--standby" in _cmdline(standby.pid)
    assert os.getpriority(os.PRIO_PROCESS, standby.pid) == 10  # it imports without slowing a sandbox's boot

    sb = await ns_sandbox()
    assert sb.instance.extra["shim_pid"] == standby.pid
    # from here on it is the shim of that state dir, as if started for it
    assert _cmdline(standby.pid)[-2:] == [str(_shimctl.SHIM_SCRIPT), str(sb.state_dir)]
    assert os.getpriority(os.PRIO_PROCESS, standby.pid) == 0
    result = await sb.run(["sh", "-c", "echo from-standby; id -u"])
    assert result.exit_code == 0 and result.stdout == b"from-standby\n0\n"
    assert (sb.state_dir / "shim.log").exists()
    assert _standby().pid != standby.pid  # and another one waits for the create after


async def test_a_dead_standby_falls_back_to_a_new_shim(ns_sandbox: Any) -> None:
    await ns_sandbox()
    standby = _standby()
    os.kill(standby.pid, signal.SIGKILL)
    standby.wait()
    sb = await ns_sandbox()
    assert sb.instance.extra["shim_pid"] != standby.pid
    assert _proc.pid_alive(sb.instance.extra["shim_pid"], sb.instance.extra["shim_start_ticks"])
    assert (await sb.run(["echo", "ok"])).stdout == b"ok\n"


async def test_close_ends_the_standby_and_the_next_create_starts_one(ns_sandbox: Any) -> None:
    await ns_sandbox()
    standby = _standby()
    _shimctl.launcher.close()
    assert standby.poll() is not None  # exited (EOF on its stdin) and reaped
    assert _shimctl.launcher._standby is None
    sb = await ns_sandbox()  # started the slow way
    assert sb.instance.extra["shim_pid"] != standby.pid
    assert _standby().pid != sb.instance.extra["shim_pid"]
