"""Conversation-level behaviour: hello, ping, unknown ops, malformed requests, configure."""

from __future__ import annotations

import os

import pytest

from corral.protocol import PROTOCOL_VERSION

from .conftest import AgentGone, AgentProcess, Client


def test_hello_is_sent_first_and_describes_the_agent(agent: Client, agent_proc: AgentProcess) -> None:
    hello = agent.hello.header
    assert hello["version"] == PROTOCOL_VERSION
    assert hello["pid"] == agent_proc.pid
    assert hello["agent"].startswith("corral-agent/")
    assert {"exec", "read", "write", "attach"} <= set(hello["capabilities"])
    assert "id" not in hello


def test_hello_op_answers_the_same_fields(agent: Client) -> None:
    answer = agent.ok("hello", version=PROTOCOL_VERSION)
    assert {k: answer[k] for k in ("version", "capabilities", "agent", "pid")} == {
        k: agent.hello.header[k] for k in ("version", "capabilities", "agent", "pid")
    }


def test_ping(agent: Client) -> None:
    assert agent.ok("ping") == {"id": "r1", "ev": "ok"}


def test_unknown_op(agent: Client) -> None:
    frame = agent.call("teleport")
    assert frame.header["ev"] == "error"
    assert frame.header["code"] == "unknown_op"
    agent.ok("ping")  # still serving


@pytest.mark.parametrize("header", [{"op": "ping"}, {"op": "ping", "id": 7}])
def test_request_without_string_id_is_invalid(agent: Client, header: dict[str, object]) -> None:
    agent.send(header)
    frame = agent.next_frame(header.get("id"))
    assert frame.header["ev"] == "error" and frame.header["code"] == "invalid"


def test_duplicate_inflight_id_is_invalid(agent: Client) -> None:
    agent.send({"id": "same", "op": "exec", "argv": ["cat"], "stdin": True})
    started = agent.next_frame("same")
    assert started.get("ev") == "started"
    agent.send({"id": "same", "op": "ping"})
    dup = agent.next_frame("same")
    assert dup.header["ev"] == "error" and dup.header["code"] == "invalid"
    agent.ok("stdin", process_id=started.header["process_id"], eof=True)
    assert agent.next_frame("same").get("ev") == "exit"
    # once terminated, the id may be reused
    agent.send({"id": "same", "op": "ping"})
    assert agent.next_frame("same").get("ev") == "ok"


@pytest.mark.parametrize(
    "fields",
    [
        {},  # neither argv nor cmd
        {"argv": ["true"], "cmd": "true"},
        {"argv": []},
        {"argv": "true"},
        {"argv": ["true", 3]},
        {"cmd": 5},
        {"argv": ["true"], "user": "nobody"},
        {"argv": ["true"], "env": {"A": 1}},
        {"argv": ["true"], "env": ["A=1"]},
        {"argv": ["true"], "timeout": -1},
        {"argv": ["true"], "timeout": "soon"},
        {"argv": ["true"], "cwd": 3},
    ],
)
def test_malformed_exec_is_invalid(agent: Client, fields: dict[str, object]) -> None:
    frame = agent.call("exec", **fields)
    assert frame.header["ev"] == "error", frame.header
    assert frame.header["code"] == "invalid", frame.header


def test_invalid_frame_closes_the_connection(agent_proc: AgentProcess) -> None:
    client = agent_proc.client()
    client.send_raw(b"this is not json\n")
    with pytest.raises(AgentGone):
        client.next_frame("anything")
    assert agent_proc.proc.wait(timeout=30) == 0  # stdio: connection gone, agent gone


def test_configure_sets_exec_defaults(agent: Client) -> None:
    agent.ok("configure", env={"GREETING": "hi", "PATH": os.environ["PATH"]}, user="root", cwd="/tmp")
    result = agent.run(cmd='echo "$GREETING $(id -u) $PWD"')
    assert result.stdout == b"hi 0 /tmp\n"
    # request fields still win over the defaults
    result = agent.run(cmd='echo "$GREETING $PWD"', env={"GREETING": "yo"}, cwd="/")
    assert result.stdout == b"yo /\n"
    # null removes a default
    agent.ok("configure", env={"GREETING": None})
    assert agent.run(cmd='echo "[$GREETING]"').stdout == b"[]\n"


def test_configure_rejects_unknown_user(agent: Client) -> None:
    frame = agent.call("configure", user="mallory")
    assert frame.header["code"] == "invalid"
