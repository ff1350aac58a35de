"""Background processes, attach (replay then live), detach, and what happens when connections close."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from .conftest import TIMEOUT, AgentProcess, Client, ListeningAgent, pid_exited

PRINT_WAIT_PRINT = "echo one; read line; echo two $line"


def _started(client: Client, rid: str) -> tuple[str, int]:
    frame = client.next_frame(rid)
    assert frame.get("ev") == "started", frame.header
    return frame.header["process_id"], frame.header["pid"]


def test_background_answers_started_then_ok(agent: Client) -> None:
    frames = agent.collect(agent.start("exec", argv=["sleep", "300"], background=True))
    assert [f.get("ev") for f in frames] == ["started", "ok"]
    process_id = frames[0].header["process_id"]
    listing = {p["process_id"]: p for p in agent.ok("list_processes")["processes"]}
    assert listing[process_id]["running"] is True
    agent.ok("signal", process_id=process_id, signal=signal.SIGKILL)
    end = agent.collect(agent.start("attach", process_id=process_id))[-1]
    assert end.header["signal"] == signal.SIGKILL


def test_attach_replays_kept_output_then_streams_live(agent: Client) -> None:
    rid = agent.start("exec", cmd=PRINT_WAIT_PRINT, stdin=True, background=True)
    process_id, pid = _started(agent, rid)
    assert agent.next_frame(rid).get("ev") == "ok"
    # a first attach sees "one" (live or replayed: it is produced before the process waits for stdin)
    first = agent.start("attach", process_id=process_id)
    header = agent.next_frame(first)
    assert header.get("ev") == "started" and header.header["pid"] == pid and header.header["dropped"] == 0
    assert agent.next_frame(first).payload == b"one\n"
    # "one" has been produced, so a second attach must get it from the buffer, before anything live
    second = agent.start("attach", process_id=process_id, replay=True)
    assert agent.next_frame(second).get("ev") == "started"
    replayed = agent.next_frame(second)
    assert (replayed.get("ev"), replayed.payload) == ("stdout", b"one\n")
    # a third attach without replay sees only what comes next
    third = agent.start("attach", process_id=process_id, replay=False)
    assert agent.next_frame(third).get("ev") == "started"
    agent.ok("stdin", b"x\n", process_id=process_id)
    for rid in (first, second, third):
        frames = agent.collect(rid)
        assert b"".join(f.payload for f in frames) == b"two x\n"
        assert frames[-1].header["exit_code"] == 0


def test_attach_to_exited_process_replays_then_exits(agent: Client) -> None:
    result = agent.run(cmd="echo a; echo b >&2; exit 4")
    frames = agent.collect(agent.start("attach", process_id=result.started.header["process_id"]))
    assert frames[0].get("ev") == "started"
    assert [(f.get("ev"), f.payload) for f in frames[1:-1]] == [("stdout", b"a\n"), ("stderr", b"b\n")]
    assert frames[-1].header["exit_code"] == 4


def test_attach_unknown_process(agent: Client) -> None:
    assert agent.call("attach", process_id="p-000000000000").header["code"] == "not_found"


def test_background_output_beyond_the_buffer_is_dropped_and_counted(agent: Client) -> None:
    size = 12 * 1024 * 1024
    rid = agent.start("exec", cmd=f"head -c {size} /dev/zero | tr '\\0' x; echo; echo end", background=True)
    process_id, _ = _started(agent, rid)
    agent.next_frame(rid)  # ok
    # wait for the exit through an attach without replay, then replay everything that was kept
    assert agent.collect(agent.start("attach", process_id=process_id, replay=False))[-1].get("ev") == "exit"
    frames = agent.collect(agent.start("attach", process_id=process_id))
    kept = b"".join(f.payload for f in frames[1:-1])
    dropped = frames[0].header["dropped"]
    assert dropped > 0
    assert len(kept) <= 8 * 1024 * 1024
    assert dropped + len(kept) == size + len(b"\nend\n")
    assert kept.endswith(b"x\nend\n")


def test_detach_ends_streams_with_ok_and_keeps_the_process(listening: ListeningAgent) -> None:
    a = listening.connect()
    rid = a.start("exec", cmd=PRINT_WAIT_PRINT, stdin=True)
    process_id, _pid = _started(a, rid)
    assert a.next_frame(rid).payload == b"one\n"
    attached = a.start("attach", process_id=process_id, replay=False)
    assert a.next_frame(attached).get("ev") == "started"
    a.ok("detach", process_id=process_id)
    assert a.next_frame(rid).get("ev") == "ok"
    assert a.next_frame(attached).get("ev") == "ok"
    listening.disconnect(a)
    # the process survived its connection: finish it from another one
    b = listening.connect()
    follow = b.start("attach", process_id=process_id, replay=False)
    assert b.next_frame(follow).get("ev") == "started"
    b.ok("stdin", b"later\n", process_id=process_id)
    frames = b.collect(follow)
    assert b"".join(f.payload for f in frames) == b"two later\n"
    assert frames[-1].header["exit_code"] == 0


def test_foreground_process_dies_with_its_connection(listening: ListeningAgent) -> None:
    a = listening.connect()
    rid = a.start("exec", cmd="sleep 300 & echo $!; wait")
    process_id, _pid = _started(a, rid)
    child = int(a.next_frame(rid).payload)
    b = listening.connect()
    watch = b.start("attach", process_id=process_id, replay=False)
    assert b.next_frame(watch).get("ev") == "started"
    listening.disconnect(a)
    end = b.collect(watch)[-1]
    assert end.header["signal"] == signal.SIGKILL
    assert pid_exited(child)  # the whole group


def test_background_process_survives_its_connection(listening: ListeningAgent) -> None:
    a = listening.connect()
    rid = a.start("exec", cmd=PRINT_WAIT_PRINT, stdin=True, background=True)
    process_id, _ = _started(a, rid)
    a.next_frame(rid)
    listening.disconnect(a)
    b = listening.connect()
    running = {p["process_id"]: p["running"] for p in b.ok("list_processes")["processes"]}
    assert running[process_id] is True
    b.ok("stdin", b"z\n", process_id=process_id, eof=True)
    frames = b.collect(b.start("attach", process_id=process_id))
    assert b"".join(f.payload for f in frames[1:-1]) == b"one\ntwo z\n"


def test_attached_stream_on_another_connection_does_not_own_the_process(listening: ListeningAgent) -> None:
    a = listening.connect()
    rid = a.start("exec", cmd=PRINT_WAIT_PRINT, stdin=True)
    process_id, _ = _started(a, rid)
    b = listening.connect()
    watch = b.start("attach", process_id=process_id)
    assert b.next_frame(watch).get("ev") == "started"
    listening.disconnect(b)
    a.ok("stdin", b"y\n", process_id=process_id)
    frames = a.collect(rid)
    assert b"".join(f.payload for f in frames) == b"one\ntwo y\n"


def test_each_connection_gets_its_own_hello(listening: ListeningAgent) -> None:
    a, b = listening.connect(), listening.connect()
    assert a.hello.header == b.hello.header
    a.ok("ping")
    b.ok("ping")


def test_stdio_eof_stops_the_agent_and_kills_everything(agent_proc: AgentProcess) -> None:
    client = agent_proc.client()
    frames = client.collect(client.start("exec", argv=["sleep", "300"], background=True))
    pid = frames[0].header["pid"]
    fg = client.start("exec", argv=["sleep", "300"])
    fg_pid = client.next_frame(fg).header["pid"]
    assert agent_proc.stop() == 0
    assert pid_exited(pid) and pid_exited(fg_pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_termination_signal_stops_the_agent_and_kills_everything(agent_proc: AgentProcess, sig: int) -> None:
    client = agent_proc.client()
    frames = client.collect(client.start("exec", argv=["sleep", "300"], background=True))
    agent_proc.proc.send_signal(sig)
    client.wait_closed()
    assert agent_proc.proc.wait(timeout=30) == 0
    assert pid_exited(frames[0].header["pid"])


def test_tcp_listener_serves_concurrent_connections(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = AgentProcess(tmp_path, "--listen", f"tcp:127.0.0.1:{port}")
    socks: list[socket.socket] = []
    try:
        for _ in range(2):
            socks.append(_connect_when_listening(proc, port))
        a, b = (Client(s.fileno(), s.fileno()) for s in socks)
        rid = a.start("exec", argv=["cat"], stdin=True)
        process_id = a.next_frame(rid).header["process_id"]
        b.ok("ping")
        a.ok("stdin", b"over tcp", process_id=process_id, eof=True)
        assert b"".join(f.payload for f in a.collect(rid)) == b"over tcp"
    finally:
        for sock in socks:
            sock.close()
        proc.proc.terminate()
        proc.stop()


def _connect_when_listening(proc: AgentProcess, port: int) -> socket.socket:
    deadline = time.monotonic() + TIMEOUT
    while True:  # nothing announces that the agent has bound its port: retry refused connections
        try:
            return socket.create_connection(("127.0.0.1", port))
        except ConnectionRefusedError:
            assert time.monotonic() < deadline and proc.proc.poll() is None, proc.log_text()
            time.sleep(0.01)


def test_a_closed_channel_ends_what_its_client_owned_and_nothing_else(agent: Client) -> None:
    """Channels (``ch``) are virtual connections on one connection, as the host's shim relays its clients:
    ``channel.close`` kills that channel's foreground processes and ends its attaches, like a closed
    connection; another channel's foreground process and the connection itself carry on."""
    agent.send({"id": "a:1", "op": "exec", "cmd": "sleep 300 & echo $!; wait", "ch": "a"})
    process_id, _pid = _started(agent, "a:1")
    child = int(agent.next_frame("a:1").payload)
    agent.send({"id": "b:1", "op": "exec", "cmd": PRINT_WAIT_PRINT, "stdin": True, "ch": "b"})
    other, _ = _started(agent, "b:1")
    assert agent.next_frame("b:1").payload == b"one\n"
    agent.send({"id": "b:2", "op": "attach", "process_id": process_id, "replay": False, "ch": "b"})
    assert agent.next_frame("b:2").get("ev") == "started"
    agent.send({"id": "a:2", "op": "attach", "process_id": other, "replay": False, "ch": "a"})
    assert agent.next_frame("a:2").get("ev") == "started"

    agent.send({"op": "channel.close", "ch": "a"})
    end = agent.collect("b:2")[-1]  # channel b watches a's foreground process die with its channel
    assert end.header["signal"] == signal.SIGKILL
    assert pid_exited(child)  # the whole group
    running = {p["process_id"]: p["running"] for p in agent.ok("list_processes")["processes"]}
    assert running[other] is True  # b's own foreground process lives on
    agent.send({"id": "b:3", "op": "stdin", "process_id": other, "eof": True, "ch": "b"}, b"z\n")
    assert agent.next_frame("b:3").get("ev") == "ok"
    frames = agent.collect("b:1")
    assert frames[-1].header["exit_code"] == 0
    assert not agent.frames["a:2"], "a closed channel's attach still got frames"


def test_a_channel_upload_is_aborted_when_its_channel_closes(agent: Client, tmp_path: Path) -> None:
    target = tmp_path / "partial.bin"
    agent.send({"id": "a:1", "op": "write", "path": str(target), "user": "root", "ch": "a"})
    agent.send({"id": "a:1", "op": "data", "ch": "a"}, b"half of it")
    agent.send({"op": "channel.close", "ch": "a"})
    assert agent.ok("ping")  # the connection is fine
    assert not target.exists(), "an upload of a closed channel was committed"
    # a new client may reuse the name and its ids: the old upload is gone, not "already in flight"
    agent.send({"id": "a:1", "op": "write", "path": str(target), "user": "root", "ch": "a"})
    agent.send({"id": "a:1", "op": "data", "eof": True, "ch": "a"}, b"all of it")
    assert agent.next_frame("a:1").get("ev") == "ok"
    assert target.read_bytes() == b"all of it"


def test_bad_channel_names_are_refused(agent: Client) -> None:
    agent.send({"id": "x", "op": "ping", "ch": ""})
    assert agent.next_frame("x").get("code") == "invalid"
    agent.send({"id": "y", "op": "ping", "ch": 7})
    assert agent.next_frame("y").get("code") == "invalid"
