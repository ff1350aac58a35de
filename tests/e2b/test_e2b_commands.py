"""Commands and terminals through the E2B SDK (sync and async): envd's ``process.Process`` over Corral's
processes. Every wait is on the process's own output or end, with a bound."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from e2b.sandbox.commands.command_handle import PtySize

from conftest import Box
from e2b import CommandExitException, TimeoutException


def test_run_streams_stdout_and_stderr_as_they_happen(box: Box) -> None:
    sbx = box.e2b()
    seen: list[tuple[float, str]] = []
    result = sbx.commands.run(
        "echo one; echo err >&2; sleep 0.5; echo two",
        on_stdout=lambda s: seen.append((time.monotonic(), s)),
        on_stderr=lambda s: seen.append((time.monotonic(), "E:" + s)),
    )
    assert result.exit_code == 0 and result.stdout == "one\ntwo\n" and result.stderr == "err\n"
    texts = [s for _, s in seen]
    assert texts == ["one\n", "E:err\n", "two\n"]
    assert seen[-1][0] - seen[0][0] >= 0.4  # "one" arrived before the sleep ended: streamed, not buffered


def test_env_cwd_and_user(box: Box) -> None:
    sbx = box.e2b()
    r = sbx.commands.run('echo "$A-$HOME"; pwd; id -un', envs={"A": "x y"})
    assert r.stdout == "x y-/home/user\n/home/user\nuser\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("id -u; echo $HOME", user="root").stdout == "0\n/root\n"
    assert sbx.commands.run("shopt -q login_shell && echo login").stdout == "login\n"  # bash -l


def test_a_failing_command_raises_with_its_output(box: Box) -> None:
    with pytest.raises(CommandExitException) as info:
        box.e2b().commands.run("echo out; echo bad >&2; exit 3")
    assert info.value.exit_code == 3 and info.value.stdout == "out\n" and info.value.stderr == "bad\n"


def test_background_stdin_list_and_close(box: Box) -> None:
    sbx = box.e2b()
    handle = sbx.commands.run("cat; echo done", background=True, stdin=True)
    listed = {p.pid: p for p in sbx.commands.list()}
    assert handle.pid in listed
    assert listed[handle.pid].cmd == "/bin/bash" and listed[handle.pid].args == ["-l", "-c", "cat; echo done"]
    sbx.commands.send_stdin(handle.pid, "hello\n")
    sbx.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "hello\ndone\n" and result.exit_code == 0
    assert handle.pid not in {p.pid for p in sbx.commands.list()}


def test_kill_and_connect_to_a_running_process(box: Box) -> None:
    sbx = box.e2b()
    handle = sbx.commands.run("echo started; touch /tmp/started; sleep 300", background=True)
    deadline = time.monotonic() + 30
    while not sbx.files.exists("/tmp/started") and time.monotonic() < deadline:
        time.sleep(0.05)
    again = sbx.commands.connect(handle.pid)
    assert again.pid == handle.pid
    assert sbx.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        again.wait()
    assert "started" in info.value.stdout  # Corral replays the kept output to a reconnecting client
    assert info.value.exit_code == -1  # Go's ExitCode() of a process ended by a signal
    assert sbx.commands.kill(handle.pid) is False  # gone: envd's NOT_FOUND, which the SDK turns into False
    assert sbx.commands.kill(4_000_000) is False


def test_the_command_timeout_is_its_lifetime(box: Box) -> None:
    sbx = box.e2b()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=1)
    # the server killed it at its deadline too (envd's rule): nothing of it is left running
    deadline = time.monotonic() + 10
    while any(p.args[-1:] == ["sleep 30"] for p in sbx.commands.list()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(p.args[-1:] == ["sleep 30"] for p in sbx.commands.list())


def test_stream_input(box: Box) -> None:
    sbx = box.e2b()
    handle = sbx.commands.run("head -c 6", background=True, stdin=True)
    sbx.commands.stream_input(handle.pid, iter([b"abc", b"def"]))
    assert handle.wait().stdout == "abcdef"


def test_pty_create_resize_input_and_wait(box: Box) -> None:
    sbx = box.e2b()
    term = sbx.pty.create(PtySize(rows=24, cols=80), envs={"PS1": "$ "})
    sbx.pty.resize(term.pid, PtySize(rows=33, cols=101))
    sbx.pty.send_stdin(term.pid, b"stty size; tty; exit 7\n")
    got: list[bytes] = []
    with pytest.raises(CommandExitException) as info:
        term.wait(on_pty=got.append)
    assert info.value.exit_code == 7
    screen = b"".join(got)
    assert b"33 101" in screen and b"/dev/pts/" in screen


def test_pty_connect_and_kill(box: Box) -> None:
    sbx = box.e2b()
    term = sbx.pty.create(PtySize(rows=24, cols=80))
    attached = sbx.pty.connect(term.pid)
    got: list[bytes] = []
    done = threading.Event()

    def follow() -> None:
        with contextlib.suppress(CommandExitException):
            attached.wait(on_pty=got.append)
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    sbx.pty.send_stdin(term.pid, b"echo marker-$((6*7))\n")
    deadline = time.monotonic() + 20
    while b"marker-42" not in b"".join(got) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"marker-42" in b"".join(got)
    assert sbx.pty.kill(term.pid) is True
    assert done.wait(20)


@pytest.mark.anyio
async def test_async_commands(box: Box) -> None:
    sbx = box.e2b_async()
    out: list[str] = []
    r = await sbx.commands.run("echo a; echo b >&2", on_stdout=out.append)
    assert r.stdout == "a\n" and r.stderr == "b\n" and out == ["a\n"]
    handle = await sbx.commands.run("cat", background=True, stdin=True)
    await sbx.commands.send_stdin(handle.pid, "x")
    await sbx.commands.close_stdin(handle.pid)
    assert (await handle.wait()).stdout == "x"
    sleeper = await sbx.commands.run("sleep 300", background=True)
    assert await sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        await sleeper.wait()
    term = await sbx.pty.create(PtySize(rows=10, cols=40), on_data=lambda d: None)
    await sbx.pty.send_stdin(term.pid, b"exit 0\n")
    assert (await term.wait()).exit_code == 0
