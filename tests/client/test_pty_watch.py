"""``sbx.pty`` and ``sbx.files.watch_dir`` end to end in embedded mode, on both real runtimes."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from corral import (
    EventKind,
    FilesystemEventType,
    InvalidRequest,
    InvalidState,
    NotFound,
    Sandbox,
    WatchHandle,
)

pytestmark = [pytest.mark.root, pytest.mark.bwrap]


@pytest.fixture(scope="module", params=["namespace", pytest.param("gvisor", marks=pytest.mark.runsc)])
def sbx(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    with Sandbox.create(isolation=request.param, metadata={"suite": "pty-watch"}, timeout=600) as sandbox:
        yield sandbox


def _events_until(handle: WatchHandle, name: str) -> list[tuple[FilesystemEventType, str]]:
    seen = []
    for event in handle:
        seen.append((event.type, event.name))
        if event.name == name and event.type is FilesystemEventType.CREATE:
            return seen
    raise AssertionError(f"the watch ended before {name}: {seen}")


def _inotify_instances(sbx: Sandbox) -> int:
    out = sbx.commands.run("ls -l /proc/[0-9]*/fd/ 2>/dev/null | grep -c inotify", user="root").stdout
    return int(out.strip() or 0)


def test_pty_size_env_cwd_user_input_and_exit_code(sbx: Sandbox) -> None:
    term = sbx.pty.create(cols=91, rows=19, envs={"FOO": "bar"}, cwd="/tmp", user="root")
    assert term.pid and term.process_id.startswith("p-")
    term.send_input("stty size; echo $FOO $(pwd) $(id -u) $TERM; exit 6\n")
    result = term.wait()
    assert result.exit_code == 6
    assert "19 91\r\n" in result.stdout and "bar /tmp 0 xterm-256color\r\n" in result.stdout
    kinds = {e.kind for e in term.events()}  # a finished terminal still replays, then exits
    assert kinds == {EventKind.STARTED, EventKind.PTY, EventKind.EXIT}


def test_pty_reconnect_by_pid_replays_then_resize_and_kill(sbx: Sandbox) -> None:
    term = sbx.pty.create(cmd=["bash", "--norc", "--noprofile", "-i"])
    term.send_input("echo marker-$((6*7))\n")
    for event in term.events():  # first client: read until the marker, then walk away
        if b"marker-42\r\n" in event.data:
            break
    other = Sandbox.connect(sbx.sandbox_id)  # a second client, as after a disconnect
    try:
        again = other.pty.connect(term.pid)  # E2B style: by pid
        assert again.process_id == term.process_id
        other.pty.resize(term.pid, 120, 33)
        other.pty.send_input(term.pid, "stty size\n")
        shown = b""
        for event in again.events():
            shown += event.data
            if b"33 120\r\n" in shown:
                break
        assert b"marker-42" in shown  # replayed from before the re-attach
        other.pty.kill(term.pid)
        assert again.wait().signal == signal.SIGKILL
    finally:
        other.close()
    assert term.process_id not in {p.process_id for p in sbx.commands.list() if p.running}
    with pytest.raises(NotFound):
        sbx.pty.connect(999_999)
    with pytest.raises(InvalidRequest):
        sbx.pty.create(cols=0)


def test_a_flooding_pty_does_not_block_the_sandbox(sbx: Sandbox) -> None:
    term = sbx.pty.create(cmd="yes flood")
    assert sbx.commands.run("echo still-here").stdout == "still-here\n"
    term.kill()
    assert term.wait().signal == signal.SIGKILL


def test_watch_dir_reports_changes_relative_and_typed(sbx: Sandbox) -> None:
    sbx.files.make_dir("/tmp/watched/sub")
    with sbx.files.watch_dir("/tmp/watched") as watch:
        sbx.commands.run(
            "cd /tmp/watched && echo 1 > a && chmod 600 a && mv a b && rm b && echo 2 > sub/deep && mkdir end"
        )
        seen = _events_until(watch, "end")
    T = FilesystemEventType
    assert seen == [
        (T.CREATE, "a"),
        (T.WRITE, "a"),
        (T.CHMOD, "a"),
        (T.RENAME, "a"),
        (T.CREATE, "b"),
        (T.REMOVE, "b"),
        (T.CREATE, "end"),
    ]


def test_recursive_watch_and_typed_errors(sbx: Sandbox) -> None:
    sbx.files.make_dir("/tmp/rec")
    watch = sbx.files.watch_dir("/tmp/rec", recursive=True)
    try:
        sbx.commands.run("mkdir -p /tmp/rec/x/y/z && : > /tmp/rec/x/y/z/f")
        wanted = {(FilesystemEventType.CREATE, n) for n in ("x", "x/y", "x/y/z", "x/y/z/f")}
        seen: set[tuple[FilesystemEventType, str]] = set()
        for event in watch:  # every create is reported, though not necessarily in order
            seen.add((event.type, event.name))
            if wanted <= seen:
                break
    finally:
        watch.stop()
    with pytest.raises(NotFound):
        sbx.files.watch_dir("/no/such/dir")
    with pytest.raises(InvalidRequest):
        sbx.files.watch_dir("/etc/hostname")


def test_a_watch_left_by_a_departed_client_is_released(sbx: Sandbox) -> None:
    before = _inotify_instances(sbx)
    other = Sandbox.connect(sbx.sandbox_id)
    kept = other.files.watch_dir("/tmp")  # never stopped: the client just goes away
    assert _inotify_instances(sbx) == before + 1
    other.close()  # the shim sees the client leave and cancels its watch in the agent
    for _ in range(100):  # each run is a round trip through the agent, after the shim's cancel
        if _inotify_instances(sbx) == before:
            break
    assert _inotify_instances(sbx) == before
    with pytest.raises(InvalidState):  # the handle belongs to a closed client
        kept.stop()
