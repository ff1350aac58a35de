"""The ``user`` identity's process spawner (agent/spawner.py): same processes, no fork of the agent.

The first ``user`` process is forked by the agent (the old way); from the second on they come from a spawner
running as uid 1000. These tests check that both ways give the same process, that the spawner is locked down,
and that killing it (the user's processes can: it is theirs) loses no process and no exit status.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .conftest import AgentProcess, Client, requires_root

pytestmark = requires_root


def _ppid(agent: Client, **fields: object) -> int:
    result = agent.run(["sh", "-c", "echo $PPID"], **fields)
    assert result.exit_code == 0, result.stderr
    return int(result.stdout)


def _spawner_pid(agent: Client, agent_proc: AgentProcess) -> int:
    _ppid(agent)  # the first user process: forked by the agent
    ppid = _ppid(agent)
    assert ppid != agent_proc.pid  # started by the spawner…
    assert Path(f"/proc/{ppid}/status").read_text().count("\t1000") >= 2  # …which runs as uid 1000
    return ppid


def test_the_first_user_process_is_forked_and_the_next_come_from_the_spawner(
    agent: Client, agent_proc: AgentProcess
) -> None:
    assert _ppid(agent) == agent_proc.pid
    spawner = _ppid(agent)
    assert spawner != agent_proc.pid
    assert _ppid(agent) == spawner  # one long-lived spawner
    assert _ppid(agent, user="root") == agent_proc.pid  # root's processes never switch identity: vfork


def test_both_ways_give_the_same_identity_environment_and_cwd(agent: Client) -> None:
    probe = ["sh", "-c", 'id -u; id -g; id -G; echo "$HOME|$USER|$PWD|$FOO"; umask']
    forked = agent.run(probe, env={"FOO": "x"}, cwd="/tmp")
    spawned = agent.run(probe, env={"FOO": "x"}, cwd="/tmp")
    again = agent.run(probe, env={"FOO": "x"}, cwd="/tmp")
    assert forked.exit_code == spawned.exit_code == again.exit_code == 0
    assert forked.stdout == spawned.stdout == again.stdout
    assert forked.stdout.startswith(b"1000\n1000\n")


def test_the_spawner_is_locked_down(agent: Client, agent_proc: AgentProcess) -> None:
    spawner = _spawner_pid(agent, agent_proc)
    status = dict(
        line.split(":\t", 1)
        for line in Path(f"/proc/{spawner}/status").read_text().splitlines()
        if ":\t" in line
    )
    assert status["Uid"].split() == ["1000"] * 4 and status["Gid"].split() == ["1000"] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    # it holds its socket, its signal pipe and stdio (/dev/null, the agent log): none of the agent's fds
    assert len(os.listdir(f"/proc/{spawner}/fd")) <= 6
    # not dumpable: the user's processes cannot read its memory or environment
    result = agent.run(["cat", f"/proc/{spawner}/environ"])
    assert result.exit_code != 0 and b"ermission denied" in result.stderr


def test_a_killed_spawner_loses_no_exit_status(agent: Client, agent_proc: AgentProcess) -> None:
    spawner = _spawner_pid(agent, agent_proc)
    rid = agent.start("exec", argv=["cat"], stdin=True)  # a process of the spawner that outlives it
    process_id = agent.next_frame(rid).header["process_id"]
    # root kills it (a process of the spawner could too, but might do it before the spawner reported starting
    # that very process, whose request then fails with busy: see the module docstring)
    assert agent.run(["kill", "-9", str(spawner)], user="root").exit_code == 0
    agent.ok("stdin", b"still here", process_id=process_id, eof=True)
    frames = agent.collect(rid)
    assert b"".join(f.payload for f in frames if f.get("ev") == "stdout") == b"still here"
    assert frames[-1].get("ev") == "exit" and frames[-1].get("exit_code") == 0
    # later processes get a new spawner
    assert agent.run(["id", "-u"]).stdout == b"1000\n"
    assert _ppid(agent) not in (spawner, agent_proc.pid)


def test_errors_are_the_same_both_ways(agent: Client, shared_dir: Path) -> None:
    for _ in range(3):  # the first is forked, the others come from the spawner
        frame = agent.call("exec", argv=["no-such-command-xyz"])
        assert frame.get("ev") == "error" and frame.get("code") == "not_found", frame.header
        frame = agent.call("exec", argv=["true"], cwd="/nonexistent-dir")
        assert frame.get("ev") == "error" and frame.get("code") == "not_found", frame.header
        script = shared_dir / "not-executable"
        script.write_text("#!/bin/sh\n")
        frame = agent.call("exec", argv=[str(script)])
        assert frame.get("ev") == "error" and frame.get("code") == "permission_denied", frame.header


def test_a_directory_only_root_can_enter_still_works_as_cwd(agent: Client, tmp_path: Path) -> None:
    """The fork path enters the cwd as root before switching; the spawner retries such a cwd that way."""
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    for _ in range(3):
        result = agent.run(["sh", "-c", "id -u; pwd"], cwd=str(private))
        assert result.exit_code == 0 and result.stdout == f"1000\n{private}\n".encode()


def test_a_stopped_spawner_is_replaced_and_its_exits_recovered(
    agent: Client, agent_proc: AgentProcess
) -> None:
    """A stopped spawner would neither start nor reap: the agent kills it and reaps its children itself."""
    spawner = _spawner_pid(agent, agent_proc)
    result = agent.run(["sh", "-c", f"kill -STOP {spawner}; echo stopped it; exit 4"])
    assert result.stdout == b"stopped it\n" and result.exit_code == 4
    assert agent.run(["id", "-u"]).stdout == b"1000\n"
    assert "was stopped" in agent_proc.log_text()


def test_a_spawner_stopped_with_a_request_in_flight_is_continued_to_answer_it(
    agent: Client, agent_proc: AgentProcess
) -> None:
    """The process that stops the spawner may be the one it just started and not yet reported: the agent
    continues it to hear about that process, then replaces it. Here the request is sent while it is stopped."""
    spawner = _spawner_pid(agent, agent_proc)
    os.kill(spawner, signal.SIGSTOP)
    result = agent.run(["sh", "-c", "echo started anyway; exit 5"])
    assert result.stdout == b"started anyway\n" and result.exit_code == 5
    assert "was stopped" in agent_proc.log_text()
    assert _ppid(agent) not in (spawner, agent_proc.pid)
