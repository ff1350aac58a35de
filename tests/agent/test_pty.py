"""Terminals in the agent: a real pty, its size and SIGWINCH, input, replay on re-attach, kill and hostile use."""

from __future__ import annotations

import re
import signal
import sys
import time

from .conftest import TIMEOUT, AgentProcess, Client, pid_exited

SIZE = {"cols": 100, "rows": 30}


def _start(agent: Client, **fields: object) -> tuple[str, int]:
    rid = agent.start("exec", pty=SIZE, background=True, user="root", **fields)
    started = agent.next_frame(rid)
    assert started.get("ev") == "started", started.header
    assert agent.next_frame(rid).get("ev") == "ok"
    return started.header["process_id"], started.header["pid"]


def _read_until(agent: Client, rid: str, pattern: bytes, timeout: float = TIMEOUT) -> bytes:
    """Terminal output of stream ``rid`` until ``pattern`` (a regex) appears in it."""
    out = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, out):
        frame = agent.next_frame(rid, max(0.01, deadline - time.monotonic()))
        assert frame.get("ev") == "pty", (frame.header, out)
        out += frame.payload
    return out


def test_a_terminal_has_its_size_a_tty_and_an_exit_code(agent: Client) -> None:
    process_id, _ = _start(agent, cmd="stty size; tty; test -t 0 && echo in-is-a-tty; read x; exit $x")
    rid = agent.start("attach", process_id=process_id)
    assert agent.next_frame(rid).get("ev") == "started"
    out = _read_until(agent, rid, rb"in-is-a-tty\r\n")
    assert b"30 100\r\n" in out and re.search(rb"/dev/pts/\d+\r\n", out)  # \r\n: the tty's output processing
    agent.ok("stdin", b"7\n", process_id=process_id)
    frames = agent.collect(rid)
    assert b"7\r\n" in b"".join(f.payload for f in frames[:-1])  # the terminal echoed the input
    assert frames[-1].header["exit_code"] == 7
    info = {p["process_id"]: p for p in agent.ok("list_processes")["processes"]}[process_id]
    assert info["running"] is False and info["exit_code"] == 7


def test_resize_delivers_sigwinch_with_the_new_size(agent: Client) -> None:
    script = (
        "import os, signal\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGWINCH])\n"
        "print('ready', flush=True)\n"
        "while signal.sigwait([signal.SIGWINCH]):\n"
        "    print('size', *os.get_terminal_size(0), flush=True)\n"
    )
    process_id, _ = _start(agent, argv=[sys.executable, "-c", script])
    rid = agent.start("attach", process_id=process_id)
    agent.next_frame(rid)
    _read_until(agent, rid, rb"ready")
    agent.ok("resize", process_id=process_id, cols=132, rows=43)
    _read_until(agent, rid, rb"size 132 43\r\n")
    bad = [
        agent.call("resize", process_id=process_id, cols=0, rows=10),
        agent.call("resize", process_id=process_id, cols="80", rows=10),
        agent.call("resize", process_id="p-000000000000", cols=80, rows=10),
        agent.call("stdin", b"", process_id=process_id, eof=True),
    ]
    assert [f.header["code"] for f in bad] == ["invalid", "invalid", "not_found", "invalid"]
    plain = agent.collect(agent.start("exec", argv=["sleep", "60"], background=True))[0].header["process_id"]
    assert agent.call("resize", process_id=plain, cols=80, rows=24).header["code"] == "invalid"
    agent.ok("signal", process_id=plain, signal=9)
    agent.ok("signal", process_id=process_id, signal=9)
    assert agent.collect(rid)[-1].header["signal"] == signal.SIGKILL


def test_reattach_replays_recent_output_and_cancel_ends_only_the_stream(agent: Client) -> None:
    process_id, _ = _start(agent, argv=["bash", "--norc", "--noprofile", "-i"])
    first = agent.start("attach", process_id=process_id)
    agent.next_frame(first)
    agent.ok("stdin", b"echo marker-$((6*7))\n", process_id=process_id)
    _read_until(agent, first, rb"marker-42\r\n")
    agent.send({"id": first, "op": "cancel"})  # the client goes away; the shell stays
    assert agent.collect(first)[-1].header == {"id": first, "ev": "ok", "cancelled": True}
    other = agent  # a new attach (a client coming back) sees what was on the screen
    again = other.start("attach", process_id=process_id)
    assert other.next_frame(again).get("ev") == "started"
    assert b"marker-42" in _read_until(other, again, rb"marker-42\r\n")
    other.ok("stdin", b"exit 5\n", process_id=process_id)
    assert other.collect(again)[-1].header["exit_code"] == 5


def test_sigkill_reaches_the_shells_jobs(agent: Client) -> None:
    process_id, pid = _start(agent, argv=["bash", "--norc", "--noprofile", "-i"])
    rid = agent.start("attach", process_id=process_id)
    agent.next_frame(rid)
    agent.ok("stdin", b"sleep 1001 & echo job=$!\n", process_id=process_id)
    job = int(re.search(rb"job=(\d+)", _read_until(agent, rid, rb"job=\d+\r\n")).group(1))  # type: ignore[union-attr]
    assert job != pid and not pid_exited(job, 0)
    agent.ok("signal", process_id=process_id, signal=9)
    assert agent.collect(rid)[-1].header["signal"] == signal.SIGKILL
    assert pid_exited(job), "a job of the killed terminal's shell survived"


def test_an_escaped_process_loses_the_terminal(agent: Client) -> None:
    """A process that leaves the session keeps running, but the terminal is hung up under it: EIO, not a
    channel into a stream nobody owns any more."""
    escape = "setsid sh -c 'while printf x; do sleep 0.05; done' & echo esc=$!; exit 0"
    process_id, _ = _start(agent, cmd=escape)
    frames = agent.collect(agent.start("attach", process_id=process_id))
    assert frames[-1].header["exit_code"] == 0
    escaped = int(re.search(rb"esc=(\d+)", b"".join(f.payload for f in frames[1:-1])).group(1))  # type: ignore[union-attr]
    assert pid_exited(escaped), "the escaped writer kept a hung-up terminal"


def test_the_terminal_gives_the_program_only_its_three_fds(agent: Client) -> None:
    process_id, _ = _start(agent, argv=["ls", "/proc/self/fd"])
    frames = agent.collect(agent.start("attach", process_id=process_id))
    assert b"".join(f.payload for f in frames[1:-1]).split() == [b"0", b"1", b"2", b"3"]  # 3: ls's own dir


def test_a_flooding_terminal_is_bounded_and_killable(agent_proc: AgentProcess, agent: Client) -> None:
    before = agent_proc.memory_kib("VmRSS")
    process_id, _ = _start(agent, argv=["yes", "flood"])  # nobody attached: the ring drops the oldest bytes
    while True:
        rid = agent.start("attach", process_id=process_id, replay=False)
        started = agent.next_frame(rid)
        agent.send({"id": rid, "op": "cancel"})
        agent.collect(rid)
        if started.header["dropped"] > 4 * 1024 * 1024:
            break
    slow = agent.start("attach", process_id=process_id)  # a reader that takes one frame and stops
    agent.next_frame(slow)
    agent.next_frame(slow)
    assert agent.ok("ping")  # the agent still answers while the terminal floods
    agent.ok("signal", process_id=process_id, signal=9)
    assert agent.collect(slow)[-1].header["signal"] == signal.SIGKILL
    assert agent_proc.memory_kib("VmRSS") - before < 16 * 1024  # 1 MiB ring + 1 MiB queue, with slack
