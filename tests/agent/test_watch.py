"""Directory watches in the agent: real inotify, event names and types, recursion, limits, cancel, cleanup."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from .conftest import TIMEOUT, AgentProcess, Client, ListeningAgent, requires_root


def _watch(agent: Client, path: Path | str, **fields: Any) -> str:
    rid = agent.start("watch", path=str(path), **fields)
    started = agent.next_frame(rid)
    assert started.get("ev") == "started", started.header
    return rid


def _events_until(agent: Client, rid: str, last: tuple[str, str]) -> list[tuple[str, str]]:
    """(type, name) pairs of watch ``rid`` up to and including ``last``."""
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + TIMEOUT
    while last not in seen:
        frame = agent.next_frame(rid, max(0.01, deadline - time.monotonic()))
        assert frame.get("ev") == "fs_event", frame.header
        seen += [(e["type"], e["name"]) for e in frame.header["events"]]
    return seen


def _events_until_all(agent: Client, rid: str, wanted: set[tuple[str, str]]) -> set[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + TIMEOUT
    while not wanted <= seen:
        frame = agent.next_frame(rid, max(0.01, deadline - time.monotonic()))
        assert frame.get("ev") == "fs_event", (frame.header, seen)
        seen |= {(e["type"], e["name"]) for e in frame.header["events"]}
    return seen


def _inotify_fds(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if "inotify" in os.readlink(fd))


def test_every_kind_of_change_with_relative_names(agent: Client, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    rid = _watch(agent, tmp_path, user="root")
    (tmp_path / "a.txt").write_text("1")  # create, write
    (tmp_path / "sub" / "deep.txt").write_text("x")  # not recursive: not reported
    (tmp_path / "a.txt").chmod(0o600)
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    (tmp_path / "b.txt").unlink()
    (tmp_path / "done").mkdir()
    seen = _events_until(agent, rid, ("create", "done"))
    assert seen == [
        ("create", "a.txt"),
        ("write", "a.txt"),
        ("chmod", "a.txt"),
        ("rename", "a.txt"),
        ("create", "b.txt"),
        ("remove", "b.txt"),
        ("create", "done"),
    ]
    agent.send({"id": rid, "op": "cancel"})
    assert agent.next_frame(rid).header == {"id": rid, "ev": "ok", "reason": "cancelled"}


def test_recursive_watch_never_loses_a_create_in_a_new_directory(agent: Client, tmp_path: Path) -> None:
    rid = _watch(agent, tmp_path, recursive=True, user="root")
    # one process makes the whole tree at once: the files exist before the agent can watch their directory
    subprocess.run(
        ["sh", "-c", "mkdir -p a/b/c && : > a/b/c/f && : > a/g && mkdir end"], cwd=tmp_path, check=True
    )
    # (a directory's listing may be reported after later events elsewhere, e.g. "end")
    _events_until_all(agent, rid, {("create", p) for p in ("a", "a/b", "a/b/c", "a/b/c/f", "a/g", "end")})
    (tmp_path / "a" / "b" / "c" / "late").write_text("z")  # the new directories are watched from now on
    assert ("write", "a/b/c/late") in _events_until(agent, rid, ("write", "a/b/c/late"))
    (tmp_path / "a").rename(tmp_path / "moved")
    (tmp_path / "moved" / "b" / "again").write_text("y")
    # the moved-in tree is watched (and listed) under its new name; its listing may come after later events
    seen2 = _events_until(agent, rid, ("create", "moved/b/again"))
    assert ("rename", "a") in seen2 and ("create", "moved") in seen2


def test_removing_the_watched_directory_ends_the_watch(agent: Client, tmp_path: Path) -> None:
    target = tmp_path / "w"
    target.mkdir()
    rid = _watch(agent, target, user="root")
    target.rmdir()
    frames = agent.collect(rid)
    assert ("remove", "") in [(e["type"], e["name"]) for f in frames[:-1] for e in f.header["events"]]
    assert frames[-1].header == {"id": rid, "ev": "ok", "reason": "removed"}


@requires_root
def test_bad_paths_are_typed_errors(agent: Client, tmp_path: Path, shared_dir: Path) -> None:
    (tmp_path / "file").write_text("x")
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    codes = [
        agent.call("watch", path=str(tmp_path / "missing")).header["code"],
        agent.call("watch", path=str(tmp_path / "file"), user="root").header["code"],
        agent.call("watch", path=str(private)).header["code"],  # as the unprivileged user
        agent.call("watch", path=str(tmp_path)).header["code"],  # pytest's tmp_path is root-only
        agent.call("watch", path="").header["code"],
    ]
    assert codes == ["not_found", "not_a_directory", "permission_denied", "permission_denied", "invalid"]
    assert agent.ok("ping")


def test_a_huge_tree_is_refused_without_stalling_the_agent(
    agent_proc: AgentProcess, agent: Client, tmp_path: Path
) -> None:
    for i in range(90):
        for j in range(100):
            (tmp_path / f"d{i}" / f"e{j}").mkdir(parents=True)  # 9090 directories, over the 8192 limit
    rid = agent.start("watch", path=str(tmp_path), recursive=True, user="root")
    ping = agent.start("ping")  # answered while the walk is under way: the walk is sliced
    assert agent.next_frame(ping).get("ev") == "ok"
    end = agent.next_frame(rid)
    assert (end.get("ev"), end.get("code")) == ("error", "too_large"), end.header
    assert _inotify_fds(agent_proc.pid) == 0


def test_proc_can_be_watched_and_released(agent_proc: AgentProcess, agent: Client) -> None:
    rid = agent.start("watch", path="/proc", recursive=True, user="root")
    first = agent.next_frame(rid)
    assert first.get("ev") in ("started", "error"), first.header  # too large on a busy host: refused
    if first.get("ev") == "started":
        agent.send({"id": rid, "op": "cancel"})
        assert agent.collect(rid)[-1].get("ev") == "ok"
    assert agent.ok("ping") and _inotify_fds(agent_proc.pid) == 0


def test_a_client_that_does_not_read_gets_an_overflow_not_silence(
    agent_proc: AgentProcess, agent: Client, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.touch()
    b.touch()
    rid = _watch(agent, tmp_path, user="root")
    for _ in range(60_000):  # alternate files: inotify merges only identical consecutive events
        os.utime(a)
        os.utime(b)
    seen = _events_until(agent, rid, ("overflow", ""))  # events were lost, and the client is told
    assert len(seen) < 120_000
    (tmp_path / "end").mkdir()  # and the watch goes on
    assert ("create", "end") in _events_until(agent, rid, ("create", "end"))
    agent.send({"id": rid, "op": "cancel"})
    assert agent.collect(rid)[-1].get("ev") == "ok"
    assert agent_proc.memory_kib("VmRSS") < 200 * 1024


def test_closing_the_connection_releases_its_watches(listening: ListeningAgent, tmp_path: Path) -> None:
    client = listening.connect()
    for _ in range(3):
        _watch(client, tmp_path, user="root")
    pid = listening.proc.pid
    assert _inotify_fds(pid) == 3
    listening.disconnect(client)
    other = listening.connect()
    deadline = time.monotonic() + TIMEOUT
    while _inotify_fds(pid):  # each ping is a turn of the agent's loop, which handles the hang-up
        assert time.monotonic() < deadline, "the closed connection's watches were not released"
        other.ok("ping")


def test_creates_found_by_listing_a_new_directory_are_sent_without_further_events(
    agent: Client, tmp_path: Path
) -> None:
    """The last thing that happens is a tree appearing at once: its listing alone must reach the client."""
    rid = _watch(agent, tmp_path, recursive=True, user="root")
    subprocess.run(["sh", "-c", "mkdir -p x/y/z && : > x/y/z/f"], cwd=tmp_path, check=True)
    _events_until_all(agent, rid, {("create", p) for p in ("x", "x/y", "x/y/z", "x/y/z/f")})
