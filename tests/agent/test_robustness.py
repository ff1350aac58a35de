"""Bounded memory under bulk transfers and hostile processes; reaping; odd exits."""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import time
from pathlib import Path

import pytest

from .conftest import AgentProcess, Client, requires_root

MIB = 1024 * 1024
RSS_LIMIT_KIB = 100 * 1024  # the agent's peak resident memory during any of these tests


def _pattern(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * 4096  # 128 KiB, different for every i


@pytest.mark.slow
def test_streamed_write_and_read_of_256_mib_keep_the_agent_small(
    agent_proc: AgentProcess, shared_dir: Path
) -> None:
    client = agent_proc.client()
    path = shared_dir / "big.bin"
    chunks = 256 * MIB // len(_pattern(0))
    rid = client.start("write", path=str(path), user="root")
    for i in range(chunks):
        client.send({"id": rid, "op": "data", "eof": False}, _pattern(i))
    client.send({"id": rid, "op": "data", "eof": True})
    assert client.collect(rid)[-1].header["bytes"] == 256 * MIB
    assert path.stat().st_size == 256 * MIB
    # read it back, checking every byte, in the order the agent sends it
    rid = client.start("read", path=str(path), user="root")
    buf = bytearray()
    i = 0
    while True:
        frame = client.next_frame(rid)
        if frame.get("ev") != "chunk":
            break
        buf += frame.payload
        while len(buf) >= len(_pattern(0)):
            assert buf[: len(_pattern(i))] == _pattern(i), f"chunk {i} differs"
            del buf[: len(_pattern(i))]
            i += 1
    assert frame.header == {"id": rid, "ev": "ok", "bytes": 256 * MIB}
    assert i == chunks and not buf
    assert agent_proc.memory_kib() < RSS_LIMIT_KIB


def _drain(client: Client, rid: str) -> tuple[int, dict[str, object]]:
    total = 0
    while True:
        frame = client.next_frame(rid)
        if frame.get("ev") in ("stdout", "stderr"):
            total += len(frame.payload)
        elif frame.get("ev") != "started":
            return total, frame.header


@pytest.mark.slow
def test_unbounded_output_to_a_stalled_client_is_back_pressured(agent_proc: AgentProcess) -> None:
    """The client stops reading for a while: the agent must stop reading the process, not buffer its output."""
    client = agent_proc.client()
    size = 512 * MIB
    rid = client.start("exec", cmd=f"head -c {size} /dev/zero", user="root")
    assert client.next_frame(rid).get("ev") == "started"
    # Not waiting for any state: this is the stall. Unbounded buffering would take hundreds of MiB in it.
    select.select([], [], [], 1.0)
    assert agent_proc.memory_kib("VmRSS") < RSS_LIMIT_KIB
    total, end = _drain(client, rid)
    assert total == size and end["exit_code"] == 0
    assert agent_proc.memory_kib() < RSS_LIMIT_KIB


def test_unwatched_background_output_is_bounded_by_the_ring(agent_proc: AgentProcess) -> None:
    client = agent_proc.client()
    frames = client.collect(
        client.start("exec", cmd="head -c 300000000 /dev/zero", background=True, user="root")
    )
    process_id = frames[0].header["process_id"]
    end = client.collect(client.start("attach", process_id=process_id, replay=False))[-1]
    assert end.header["exit_code"] == 0
    started = client.next_frame(client.start("attach", process_id=process_id, replay=True))
    assert started.header["dropped"] >= 300000000 - 8 * MIB
    assert agent_proc.memory_kib() < RSS_LIMIT_KIB


def test_tiny_interleaved_writes_do_not_blow_up_bookkeeping(agent: Client, agent_proc: AgentProcess) -> None:
    code = "import os\nfor i in range(200000):\n    os.write(1 + (i & 1), b'x')\n"
    total, end = _drain(agent, agent.start("exec", argv=["/usr/bin/python3", "-c", code], user="root"))
    assert total == 200000 and end["exit_code"] == 0
    assert agent_proc.memory_kib() < RSS_LIMIT_KIB


def test_many_short_processes_and_children(agent: Client) -> None:
    result = agent.run(cmd="for i in $(seq 200); do (true &); done; echo done", user="root")
    assert result.stdout == b"done\n" and result.exit_code == 0
    agent.ok("ping")


def test_process_exiting_while_its_children_hold_the_pipes(agent: Client) -> None:
    """The exit is reported when the process exits, not when every descendant closed its output."""
    rid = agent.start("exec", cmd="sleep 300 & echo parent-done", user="root")
    frames = agent.collect(rid)
    assert b"".join(f.payload for f in frames) == b"parent-done\n"
    assert frames[-1].header["exit_code"] == 0


def test_process_closing_its_output_early(agent: Client) -> None:
    result = agent.run(cmd="exec >&- 2>&-; exit 5", user="root")
    assert result.exit_code == 5


def test_process_killing_itself_with_sigkill(agent: Client) -> None:
    result = agent.run(cmd="kill -9 $$", user="root")
    assert result.end.header["signal"] == 9


def test_garbage_after_valid_frames_only_drops_that_connection(listening) -> None:  # type: ignore[no-untyped-def]
    bad = listening.connect()
    good = listening.connect()
    bad.send_raw(b'{"id":"x","op":"ping","size":-1}\n')
    bad.wait_closed()
    assert bad.eof
    good.ok("ping")


def test_huge_header_only_drops_that_connection(listening) -> None:  # type: ignore[no-untyped-def]
    bad = listening.connect()
    good = listening.connect()
    bad.send_raw(b"{" + b" " * (70 * 1024))
    bad.wait_closed()
    good.ok("ping")


@requires_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_reaps_orphans_as_pid_1(tmp_path: Path) -> None:
    agent_proc = AgentProcess(tmp_path, prefix=("unshare", "--pid", "--fork", "--mount-proc"))
    try:
        client = agent_proc.client()
        assert client.hello.header["pid"] == 1
        # 50 orphans (their parent exits at once) are re-parented to the agent, PID 1 here, and exit
        assert client.run(cmd="for i in $(seq 50); do (sleep 0 &); done", user="root").exit_code == 0
        count = "grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l"
        deadline = time.monotonic() + 30
        while True:  # each attempt is a round trip through the agent's loop, which reaps on SIGCHLD
            zombies = int(client.run(cmd=count, user="root").stdout)
            if zombies == 0:
                break
            assert time.monotonic() < deadline, f"{zombies} zombies left"
    finally:
        agent_proc.stop()
    log = agent_proc.log_text() if not agent_proc.log.closed else agent_proc.log_path.read_text()
    assert "Traceback" not in log, log


def test_agent_survives_a_killed_file_worker(
    agent: Client, agent_proc: AgentProcess, shared_dir: Path
) -> None:
    agent.write_file(str(shared_dir / "a"), b"1")
    workers = [
        int(p) for p in Path(f"/proc/{agent_proc.pid}/task/{agent_proc.pid}/children").read_text().split()
    ]
    assert workers
    for pid in workers:
        os.kill(pid, 9)
    # the next operation may race the worker's death, but the one after must work on a fresh worker
    deadline = time.monotonic() + 30
    while agent.call("stat", path=str(shared_dir / "a")).get("ev") != "ok":
        assert time.monotonic() < deadline
    assert agent.read_file(str(shared_dir / "a")) == b"1"


def test_client_that_does_not_read_answers_is_paused_not_buffered(agent_proc: AgentProcess) -> None:
    """Requests whose answers are not read: the agent stops reading requests instead of queueing answers."""
    client = agent_proc.client()
    request = b'{"id":"h","op":"hello"}\n'  # 24 bytes in, ~300 bytes out
    n = 500_000  # ~150 MiB of answers if every request were read while none is answered
    stream = request * n
    sent = 0
    os.set_blocking(client.wfd, False)
    try:
        while sent < len(stream):
            # The one timed wait: "the agent stopped reading" is an absence, with no event to wait on.
            _, writable, _ = select.select([], [client.wfd], [], 2.0)
            if not writable:
                break
            try:
                sent += os.write(client.wfd, stream[sent : sent + 65536])
            except BlockingIOError:
                continue
    finally:
        os.set_blocking(client.wfd, True)
    assert sent < len(stream), "the agent read every request without its answers being read"
    assert agent_proc.memory_kib() < RSS_LIMIT_KIB
    for _ in range(sent // len(request)):  # reading the answers lets the agent read the requests again
        assert client.next_frame("h").get("ev") == "ok"
    if sent % len(request):
        client.send_raw(request[sent % len(request) :])
        assert client.next_frame("h").get("ev") == "ok"
    client.ok("ping")


def test_oversized_answers_become_errors(agent: Client) -> None:
    frame = agent.call("x" * 60_000)
    assert frame.header["code"] == "unknown_op" and len(frame.header["message"]) < 200


def test_no_fd_leaks(agent: Client, agent_proc: AgentProcess, shared_dir: Path) -> None:
    def fds() -> int:
        return len(os.listdir(f"/proc/{agent_proc.pid}/fd"))

    agent.write_file(str(shared_dir / "warm"), b"x")  # start the file workers
    agent.read_file(str(shared_dir / "warm"))
    for _ in range(2):  # and the user's process spawner (it is made for the second process)
        agent.run(["true"])
    before = fds()
    for i in range(20):
        agent.run(cmd="echo out; echo err >&2", user="root")
        rid = agent.start("exec", argv=["cat"], stdin=True)
        process_id = agent.next_frame(rid).header["process_id"]
        agent.ok("stdin", b"x", process_id=process_id, eof=True)
        agent.collect(rid)
        agent.collect(agent.start("attach", process_id=process_id))
        agent.write_file(str(shared_dir / f"f{i}"), b"data")
        assert agent.read_file(str(shared_dir / f"f{i}")) == b"data"
        agent.call("read", path=str(shared_dir / "missing"))
        agent.write_file(str(shared_dir / "missing-dir/f"), b"x", parents=False)
        agent.ok("list", path=str(shared_dir))
    assert fds() == before
