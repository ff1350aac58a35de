"""exec: output streaming, exit status, errors, environment, timeouts, signals, stdin."""

from __future__ import annotations

import os
import signal
import sys

from .conftest import Client, pid_exited, requires_root

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable  # readable by uid 1000


def test_echo(agent: Client) -> None:
    result = agent.run(["echo", "hi"])
    assert result.started.header["process_id"].startswith("p-")
    assert isinstance(result.started.header["pid"], int)
    assert result.stdout == b"hi\n" and result.stderr == b""
    assert result.end.header == {
        "id": result.end.header["id"],
        "ev": "exit",
        "exit_code": 0,
        "signal": None,
        "timed_out": False,
        "oom_killed": False,
    }


def test_frames_in_order_started_output_exit(agent: Client) -> None:
    result = agent.run(cmd="echo out; echo err >&2; exit 3")
    kinds = [f.get("ev") for f in result.frames]
    assert kinds[0] == "started" and kinds[-1] == "exit"
    assert set(kinds[1:-1]) <= {"stdout", "stderr"}
    assert result.stdout == b"out\n" and result.stderr == b"err\n"
    assert result.exit_code == 3


def test_killed_by_signal_reports_signal_not_code(agent: Client) -> None:
    result = agent.run(cmd="kill -TERM $$")
    assert result.end.header["exit_code"] is None
    assert result.end.header["signal"] == signal.SIGTERM


def test_command_not_found(agent: Client) -> None:
    frames = agent.collect(agent.start("exec", argv=["no-such-command-xyz"]))
    assert len(frames) == 1  # no started frame
    assert frames[0].header["code"] == "not_found"
    assert "no-such-command-xyz" in frames[0].header["message"]
    assert "not found in the sandbox" in frames[0].header["message"]


def test_absolute_path_not_found(agent: Client) -> None:
    frame = agent.call("exec", argv=["/nonexistent/bin/tool"])
    assert frame.header["code"] == "not_found"


def test_cwd_not_found(agent: Client) -> None:
    frame = agent.call("exec", argv=["true"], cwd="/nonexistent-dir")
    assert frame.header["code"] == "not_found"
    assert "/nonexistent-dir" in frame.header["message"]


def test_not_executable(agent: Client, shared_dir: os.PathLike[str]) -> None:
    path = os.path.join(shared_dir, "script")
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(path, 0o644)
    frame = agent.call("exec", argv=[path], user="root")
    assert frame.header["code"] == "permission_denied"


def test_env_and_cwd(agent: Client) -> None:
    result = agent.run(cmd='echo "$FOO|$PWD"', env={"FOO": "bar baz"}, cwd="/tmp", user="root")
    assert result.stdout == b"bar baz|/tmp\n"


def test_env_defaults_home_user(agent: Client) -> None:
    result = agent.run(cmd='echo "$HOME|$USER|$PATH"', user="root")
    home, user, path = result.stdout.decode().strip().split("|")
    assert user == "root" and home in ("/root", "/")
    assert "/usr/bin" in path


def test_cmd_runs_through_sh(agent: Client) -> None:
    result = agent.run(cmd="a=1; b=2; echo $((a + b)) | tr 3 x")
    assert result.stdout == b"x\n"


def test_shell_bash(agent: Client) -> None:
    result = agent.run(cmd='echo "${BASH_VERSION:+bash}"', shell="bash")
    assert result.stdout == b"bash\n"


def test_binary_safe_output(agent: Client) -> None:
    every_byte = bytes(range(256)) * 3
    code = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 3); sys.stderr.buffer.write(bytes(range(256)))"
    result = agent.run([PY, "-c", code])
    assert result.stdout == every_byte
    assert result.stderr == bytes(range(256))


def test_output_streams_before_exit(agent: Client) -> None:
    """The first line arrives while the process is still running (it waits for stdin to print the second)."""
    rid = agent.start("exec", cmd="echo first; read line; echo second $line", stdin=True)
    started = agent.next_frame(rid)
    first = agent.next_frame(rid)
    assert (first.get("ev"), first.payload) == ("stdout", b"first\n")
    agent.ok("stdin", b"go\n", process_id=started.header["process_id"])
    rest = agent.collect(rid)
    assert b"".join(f.payload for f in rest) == b"second go\n"
    assert rest[-1].header["exit_code"] == 0


def test_large_output_is_complete_and_ordered(agent: Client) -> None:
    size = 20 * 1024 * 1024
    code = f"import sys\nfor i in range({size // 1024}): sys.stdout.buffer.write(i.to_bytes(4, 'big') * 256)"
    result = agent.run([PY, "-c", code])
    assert result.exit_code == 0
    assert len(result.stdout) == size
    assert all(len(f.payload) <= 128 * 1024 for f in result.frames)
    expected = b"".join(i.to_bytes(4, "big") * 256 for i in range(size // 1024))
    assert result.stdout == expected


def test_timeout_kills_the_process_group(agent: Client) -> None:
    rid = agent.start("exec", cmd="sleep 300 & echo $!; wait", timeout=0.5)
    agent.next_frame(rid)  # started
    child = int(agent.next_frame(rid).payload)
    end = agent.collect(rid)[-1]
    assert end.header["timed_out"] is True
    assert end.header["signal"] == signal.SIGKILL and end.header["exit_code"] is None
    assert pid_exited(child)  # the background child in the same group died too


def test_no_timeout_is_not_timed_out(agent: Client) -> None:
    assert agent.run(["true"], timeout=30).end.header["timed_out"] is False


def test_signal_goes_to_the_process_group(agent: Client) -> None:
    rid = agent.start("exec", cmd="sleep 300 & echo $!; wait")
    process_id = agent.next_frame(rid).header["process_id"]
    child = int(agent.next_frame(rid).payload)
    assert agent.ok("signal", process_id=process_id, signal=signal.SIGTERM)["delivered"] is True
    end = agent.collect(rid)[-1]
    assert end.header["signal"] == signal.SIGTERM
    assert pid_exited(child)


def test_signal_unknown_process(agent: Client) -> None:
    assert agent.call("signal", process_id="p-nope", signal=9).header["code"] == "not_found"


def test_signal_after_exit_is_not_delivered(agent: Client) -> None:
    process_id = agent.run(["true"]).started.header["process_id"]
    assert agent.ok("signal", process_id=process_id, signal=9)["delivered"] is False


def test_each_process_is_a_session_leader(agent: Client) -> None:
    result = agent.run([PY, "-c", "import os; print(os.getsid(0) == os.getpid() == os.getpgrp())"])
    assert result.stdout == b"True\n"


def test_stdin_streaming_binary(agent: Client) -> None:
    rid = agent.start("exec", argv=["cat"], stdin=True)
    process_id = agent.next_frame(rid).header["process_id"]
    sent = b""
    for i in range(10):
        piece = bytes(range(256)) * (i + 1)
        agent.ok("stdin", piece, process_id=process_id)
        sent += piece
    agent.ok("stdin", b"tail", process_id=process_id, eof=True)
    result = agent.collect(rid)
    assert b"".join(f.payload for f in result if f.get("ev") == "stdout") == sent + b"tail"
    assert result[-1].header["exit_code"] == 0


def test_stdin_eof_without_payload(agent: Client) -> None:
    rid = agent.start("exec", cmd="wc -c", stdin=True)
    process_id = agent.next_frame(rid).header["process_id"]
    agent.ok("stdin", b"12345", process_id=process_id)
    agent.ok("stdin", process_id=process_id, eof=True)
    frames = agent.collect(rid)
    assert b"".join(f.payload for f in frames[:-1]).strip() == b"5"


def test_stdin_not_kept_open_is_invalid(agent: Client) -> None:
    rid = agent.start("exec", cmd="cat; echo done")  # stdin is /dev/null: cat ends at once
    process_id = agent.next_frame(rid).header["process_id"]
    frame = agent.call("stdin", b"x", process_id=process_id)
    assert frame.header["code"] == "invalid"
    assert agent.collect(rid)[-1].get("ev") == "exit"


def test_stdin_after_eof_is_invalid(agent: Client) -> None:
    rid = agent.start("exec", argv=["cat"], stdin=True)
    process_id = agent.next_frame(rid).header["process_id"]
    agent.ok("stdin", process_id=process_id, eof=True)
    assert agent.call("stdin", b"late", process_id=process_id).header["code"] == "invalid"
    agent.collect(rid)


def test_stdin_to_unknown_process(agent: Client) -> None:
    assert agent.call("stdin", b"x", process_id="p-unknown").header["code"] == "not_found"


def test_process_that_closes_stdin_fails_pending_writes(agent: Client) -> None:
    rid = agent.start("exec", cmd="exec 0<&-; echo closed; read x", stdin=True)
    process_id = agent.next_frame(rid).header["process_id"]
    assert agent.next_frame(rid).payload == b"closed\n"
    frame = agent.call("stdin", b"x" * (1024 * 1024), process_id=process_id)
    assert frame.get("ev") == "error" and frame.header["code"] == "invalid"
    agent.collect(rid)


@requires_root
def test_user_switching(agent: Client) -> None:
    assert agent.run(["id", "-u"], user="user").stdout == b"1000\n"
    assert agent.run(["id", "-g"], user="user").stdout == b"1000\n"
    assert agent.run(["id", "-u"], user="root").stdout == b"0\n"
    assert agent.run(["id", "-u"]).stdout == b"1000\n"  # the default is the unprivileged user
    groups = agent.run(["id", "-G"], user="user").stdout.split()
    assert b"0" not in groups  # root's groups are not inherited


@requires_root
def test_user_cannot_escalate(agent: Client) -> None:
    result = agent.run(cmd="cat /etc/shadow", user="user")
    assert result.exit_code != 0


def test_exit_record_and_listing(agent: Client) -> None:
    result = agent.run(["sh", "-c", "exit 7"], tag="mine", cwd="/tmp", user="root")
    process_id = result.started.header["process_id"]
    listing = {p["process_id"]: p for p in agent.ok("list_processes")["processes"]}
    info = listing[process_id]
    assert info["argv"] == ["sh", "-c", "exit 7"]
    assert info["tag"] == "mine" and info["cwd"] == "/tmp" and info["user"] == "root"
    assert info["running"] is False and info["exit_code"] == 7 and info["signal"] is None
    assert info["pid"] == result.started.header["pid"]
    assert isinstance(info["started_at"], float)


def test_only_the_256_most_recent_exits_are_kept(agent: Client) -> None:
    first = agent.run(["true"]).started.header["process_id"]
    ids = [agent.run(["true"]).started.header["process_id"] for _ in range(256)]
    listed = {p["process_id"] for p in agent.ok("list_processes")["processes"]}
    assert first not in listed
    assert set(ids) <= listed
    assert agent.call("attach", process_id=first).header["code"] == "not_found"
