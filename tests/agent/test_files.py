"""File operations: read, write, list, stat, mkdir, remove, rename; errors; acting as root or user."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from .conftest import USER_UID, Client, requires_root

ALL_BYTES = bytes(range(256))


def test_write_then_read_roundtrip_binary(agent: Client, shared_dir: Path) -> None:
    path = str(shared_dir / "blob")
    data = ALL_BYTES * 4096 + b"tail"
    assert agent.write_file(path, data, chunk=100_000).header == {"id": "r1", "ev": "ok", "bytes": len(data)}
    assert Path(path).read_bytes() == data
    assert agent.read_file(path) == data


def test_read_chunks_are_bounded(agent: Client, shared_dir: Path) -> None:
    path = shared_dir / "big"
    path.write_bytes(os.urandom(1024 * 1024 + 5))
    frames = agent.collect(agent.start("read", path=str(path)))
    assert all(len(f.payload) <= 128 * 1024 for f in frames)
    assert b"".join(f.payload for f in frames[:-1]) == path.read_bytes()


def test_read_offset_and_length(agent: Client, shared_dir: Path) -> None:
    path = shared_dir / "f"
    path.write_bytes(ALL_BYTES)
    assert agent.read_file(str(path), offset=10, length=5) == ALL_BYTES[10:15]
    assert agent.read_file(str(path), offset=250) == ALL_BYTES[250:]
    assert agent.read_file(str(path), offset=1000) == b""
    assert agent.read_file(str(path), length=0) == b""


def test_read_empty_file(agent: Client, shared_dir: Path) -> None:
    (shared_dir / "empty").write_bytes(b"")
    frames = agent.collect(agent.start("read", path=str(shared_dir / "empty")))
    assert [f.get("ev") for f in frames] == ["ok"] and frames[0].header["bytes"] == 0


@pytest.mark.parametrize(
    ("name", "code"), [("missing", "not_found"), (".", "is_a_directory"), ("file/below", "not_a_directory")]
)
def test_read_errors(agent: Client, shared_dir: Path, name: str, code: str) -> None:
    (shared_dir / "file").write_bytes(b"x")
    frame = agent.call("read", path=str(shared_dir / name))
    assert frame.header["ev"] == "error" and frame.header["code"] == code
    assert str(shared_dir) in frame.header["message"]


def test_read_fifo_is_refused_not_blocking(agent: Client, shared_dir: Path) -> None:
    os.mkfifo(shared_dir / "fifo")
    assert agent.call("read", path=str(shared_dir / "fifo")).header["code"] == "invalid"
    agent.ok("ping")


def test_relative_paths_resolve_against_home(agent: Client) -> None:
    home = agent.run(cmd="printf %s $HOME", user="root").stdout.decode()
    name = f"corral-agent-rel-{os.getpid()}"
    try:
        agent.write_file(name, b"rel", user="root")
        assert Path(home, name).read_bytes() == b"rel"
        assert agent.ok("stat", path=name, user="root")["entry"]["path"] == f"{home.rstrip('/')}/{name}"
    finally:
        Path(home, name).unlink(missing_ok=True)


def test_write_replaces_atomically_and_leaves_no_temp(agent: Client, shared_dir: Path) -> None:
    path = shared_dir / "target"
    path.write_bytes(b"old contents")
    rid = agent.start("write", path=str(path))
    agent.send({"id": rid, "op": "data", "eof": False}, b"new ")
    # the old file is intact until eof: the data goes to a temporary file
    agent.ok("ping")
    assert path.read_bytes() == b"old contents"
    agent.send({"id": rid, "op": "data", "eof": True}, b"contents")
    assert agent.collect(rid)[-1].header["bytes"] == 12
    assert path.read_bytes() == b"new contents"
    assert sorted(p.name for p in shared_dir.iterdir()) == ["target"]


def test_write_mode(agent: Client, shared_dir: Path) -> None:
    agent.write_file(str(shared_dir / "script"), b"#!/bin/sh\n", mode=0o750)
    assert stat.S_IMODE(os.stat(shared_dir / "script").st_mode) == 0o750
    agent.write_file(str(shared_dir / "plain"), b"x")
    assert stat.S_IMODE(os.stat(shared_dir / "plain").st_mode) == 0o644


def test_write_append(agent: Client, shared_dir: Path) -> None:
    path = shared_dir / "log"
    agent.write_file(str(path), b"one\n", append=True)
    agent.write_file(str(path), b"two\n", append=True)
    assert path.read_bytes() == b"one\ntwo\n"


def test_write_parents(agent: Client, shared_dir: Path) -> None:
    agent.write_file(str(shared_dir / "a/b/c.txt"), b"deep")
    assert (shared_dir / "a/b/c.txt").read_bytes() == b"deep"
    frame = agent.write_file(str(shared_dir / "x/y.txt"), b"no", parents=False)
    assert frame.header["code"] == "not_found"
    assert not (shared_dir / "x").exists()


def test_write_onto_directory(agent: Client, shared_dir: Path) -> None:
    (shared_dir / "d").mkdir()
    assert agent.write_file(str(shared_dir / "d"), b"x").header["code"] == "is_a_directory"
    assert list((shared_dir / "d").iterdir()) == []


def test_write_empty_file(agent: Client, shared_dir: Path) -> None:
    assert agent.write_file(str(shared_dir / "empty"), b"").header["bytes"] == 0
    assert (shared_dir / "empty").read_bytes() == b""


def test_write_abort_removes_the_temp_file(agent: Client, shared_dir: Path) -> None:
    path = shared_dir / "aborted"
    path.write_bytes(b"keep me")
    rid = agent.start("write", path=str(path))
    agent.send({"id": rid, "op": "data", "eof": False}, b"partial")
    agent.send({"id": rid, "op": "data", "eof": True, "abort": True})
    assert agent.collect(rid)[-1].header["ev"] == "error"
    agent.ok("ping")
    assert path.read_bytes() == b"keep me"
    assert sorted(p.name for p in shared_dir.iterdir()) == ["aborted"]


def test_write_error_swallows_later_data_frames(agent: Client, shared_dir: Path) -> None:
    (shared_dir / "file").write_bytes(b"")
    rid = agent.start("write", path=str(shared_dir / "file/child"), parents=False)
    agent.send({"id": rid, "op": "data", "eof": False}, b"x" * 1000)
    agent.send({"id": rid, "op": "data", "eof": True}, b"y")
    frames = agent.collect(rid)
    assert frames[-1].header["code"] == "not_a_directory"
    agent.ok("ping")
    assert not agent.frames[rid]  # exactly one terminal frame


def test_interrupted_upload_leaves_no_temp_file(agent_proc, shared_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = agent_proc.client()
    rid = client.start("write", path=str(shared_dir / "never"))
    client.send({"id": rid, "op": "data", "eof": False}, b"x" * 300_000)
    client.ok("ping")
    agent_proc.stop()
    assert list(shared_dir.iterdir()) == []


def test_stat(agent: Client, shared_dir: Path) -> None:
    path = shared_dir / "f"
    path.write_bytes(b"12345")
    os.chmod(path, 0o640)
    entry = agent.ok("stat", path=str(path))["entry"]
    st = os.stat(path)
    assert entry == {
        "name": "f",
        "path": str(path),
        "type": "file",
        "size": 5,
        "mode": 0o640,
        "mtime": st.st_mtime,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    os.symlink("f", shared_dir / "link")
    link = agent.ok("stat", path=str(shared_dir / "link"))["entry"]
    assert link["type"] == "symlink" and link["target"] == "f"
    assert agent.ok("stat", path=str(shared_dir))["entry"]["type"] == "dir"
    assert agent.call("stat", path=str(shared_dir / "nope")).header["code"] == "not_found"


def test_list_depth_and_symlinks_not_followed(agent: Client, shared_dir: Path) -> None:
    (shared_dir / "a/b").mkdir(parents=True)
    (shared_dir / "a/b/deep.txt").write_bytes(b"deep")
    (shared_dir / "top.txt").write_bytes(b"t")
    outside = shared_dir / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    os.symlink(outside, shared_dir / "a/link")
    one = agent.ok("list", path=str(shared_dir))["entries"]
    assert sorted(e["name"] for e in one) == ["a", "outside", "top.txt"]
    all_ = agent.ok("list", path=str(shared_dir / "a"), depth=5)["entries"]
    paths = sorted(e["path"] for e in all_)
    base = str(shared_dir / "a")
    assert paths == [f"{base}/b", f"{base}/b/deep.txt", f"{base}/link"]
    link = next(e for e in all_ if e["name"] == "link")
    assert link["type"] == "symlink" and link["target"] == str(outside)
    two = agent.ok("list", path=str(shared_dir / "a"), depth=1)["entries"]
    assert sorted(e["name"] for e in two) == ["b", "link"]


def test_list_errors(agent: Client, shared_dir: Path) -> None:
    (shared_dir / "f").write_bytes(b"")
    assert agent.call("list", path=str(shared_dir / "f")).header["code"] == "not_a_directory"
    assert agent.call("list", path=str(shared_dir / "none")).header["code"] == "not_found"
    assert agent.call("list", path=str(shared_dir), depth=0).header["code"] == "invalid"


def test_big_listing_is_too_large_unless_streamed(agent: Client, shared_dir: Path) -> None:
    big = shared_dir / "big"
    big.mkdir()
    names = {f"file-with-a-longish-name-{i:05d}" for i in range(2000)}
    for name in names:
        (big / name).write_bytes(b"")
    assert agent.call("list", path=str(big)).header["code"] == "too_large"
    frames = agent.collect(agent.start("list", path=str(big), stream=True))
    assert frames[-1].header["ev"] == "ok" and frames[-1].header["count"] == 2000
    assert len(frames) > 2
    assert {e["name"] for f in frames[:-1] for e in f.header["entries"]} == names


def test_mkdir(agent: Client, shared_dir: Path) -> None:
    assert agent.ok("mkdir", path=str(shared_dir / "x/y/z"))["created"] is True
    assert (shared_dir / "x/y/z").is_dir()
    assert agent.ok("mkdir", path=str(shared_dir / "x/y"))["created"] is False
    (shared_dir / "file").write_bytes(b"")
    assert agent.call("mkdir", path=str(shared_dir / "file")).header["code"] == "not_a_directory"
    assert agent.call("mkdir", path=str(shared_dir / "file/sub")).header["code"] == "not_a_directory"


def test_remove(agent: Client, shared_dir: Path) -> None:
    (shared_dir / "d/e").mkdir(parents=True)
    (shared_dir / "d/e/f").write_bytes(b"")
    (shared_dir / "file").write_bytes(b"")
    agent.ok("remove", path=str(shared_dir / "file"), user="root")
    assert not (shared_dir / "file").exists()
    assert agent.call("remove", path=str(shared_dir / "d"), user="root").header["code"] == "invalid"
    agent.ok("remove", path=str(shared_dir / "d"), recursive=True, user="root")
    assert not (shared_dir / "d").exists()
    assert agent.call("remove", path=str(shared_dir / "d")).header["code"] == "not_found"
    (shared_dir / "empty").mkdir()
    agent.ok("remove", path=str(shared_dir / "empty"), user="root")


def test_remove_symlink_removes_only_the_link(agent: Client, shared_dir: Path) -> None:
    (shared_dir / "keep").mkdir()
    (shared_dir / "keep/f").write_bytes(b"")
    os.symlink(shared_dir / "keep", shared_dir / "link")
    agent.ok("remove", path=str(shared_dir / "link"), recursive=True)
    assert (shared_dir / "keep/f").exists() and not (shared_dir / "link").exists()


def test_rename(agent: Client, shared_dir: Path) -> None:
    (shared_dir / "a").write_bytes(b"A")
    (shared_dir / "b").write_bytes(b"B")
    frame = agent.call("rename", src=str(shared_dir / "a"), dst=str(shared_dir / "b"))
    assert frame.header["code"] == "exists"
    assert (shared_dir / "a").read_bytes() == b"A"
    agent.ok("rename", src=str(shared_dir / "a"), dst=str(shared_dir / "b"), overwrite=True)
    assert (shared_dir / "b").read_bytes() == b"A" and not (shared_dir / "a").exists()
    agent.ok("rename", src=str(shared_dir / "b"), dst=str(shared_dir / "c"))
    assert (shared_dir / "c").read_bytes() == b"A"
    assert (
        agent.call("rename", src=str(shared_dir / "zz"), dst=str(shared_dir / "y")).header["code"]
        == "not_found"
    )


def test_rename_across_file_systems(agent: Client, shared_dir: Path) -> None:
    if os.stat("/dev/shm").st_dev == os.stat(shared_dir).st_dev:
        pytest.skip("/dev/shm is on the same file system as /tmp here")
    src = Path("/dev/shm") / f"corral-agent-xdev-{os.getpid()}"
    src.write_bytes(b"moved")
    try:
        agent.ok("rename", src=str(src), dst=str(shared_dir / "moved"), user="root")
        assert (shared_dir / "moved").read_bytes() == b"moved" and not src.exists()
    finally:
        src.unlink(missing_ok=True)


@pytest.mark.parametrize("fields", [{"path": ""}, {"path": 5}, {"path": "a\x00b"}, {}])
def test_bad_paths_are_invalid(agent: Client, fields: dict[str, object]) -> None:
    for op in ("read", "stat", "list", "mkdir", "remove"):
        assert agent.call(op, **fields).header["code"] == "invalid", op


# --- acting as the unprivileged user ------------------------------------------------------------------------


@requires_root
def test_file_written_as_user_is_owned_by_uid_1000(agent: Client, shared_dir: Path) -> None:
    agent.write_file(str(shared_dir / "mine"), b"x")
    st = os.stat(shared_dir / "mine")
    assert (st.st_uid, st.st_gid) == (USER_UID, USER_UID)
    agent.ok("mkdir", path=str(shared_dir / "dir"))
    assert os.stat(shared_dir / "dir").st_uid == USER_UID
    agent.write_file(str(shared_dir / "root-owned"), b"x", user="root")
    assert os.stat(shared_dir / "root-owned").st_uid == 0


@requires_root
def test_user_cannot_write_into_root_owned_directory(agent: Client, shared_dir: Path) -> None:
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o755)
    os.chmod(locked, 0o755)
    (locked / "existing").write_bytes(b"root's")
    os.chmod(locked / "existing", 0o644)
    for frame in (
        agent.write_file(str(locked / "new"), b"x"),
        agent.write_file(str(locked / "existing"), b"x"),
        agent.write_file(str(locked / "existing"), b"x", append=True),
        agent.call("mkdir", path=str(locked / "sub")),
        agent.call("remove", path=str(locked / "existing")),
        agent.call("rename", src=str(locked / "existing"), dst=str(locked / "moved")),
        agent.write_file(str(locked / "sub/deeper"), b"x"),
    ):
        assert frame.header["ev"] == "error" and frame.header["code"] == "permission_denied", frame.header
    assert sorted(p.name for p in locked.iterdir()) == ["existing"]
    assert (locked / "existing").read_bytes() == b"root's"
    # root can
    agent.write_file(str(locked / "new"), b"x", user="root")
    assert (locked / "new").exists()


@requires_root
def test_user_cannot_read_root_only_file(agent: Client, shared_dir: Path) -> None:
    secret = shared_dir / "secret"
    secret.write_bytes(b"s")
    os.chmod(secret, 0o600)
    assert agent.call("read", path=str(secret)).header["code"] == "permission_denied"
    assert agent.read_file(str(secret), user="root") == b"s"


@requires_root
def test_user_cannot_replace_others_file_in_sticky_directory(agent: Client, shared_dir: Path) -> None:
    sticky = shared_dir / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sticky / "roots").write_bytes(b"root's")
    assert agent.write_file(str(sticky / "roots"), b"mine").header["code"] == "permission_denied"
    assert (sticky / "roots").read_bytes() == b"root's"
    assert [p.name for p in sticky.iterdir()] == ["roots"]


@requires_root
def test_user_recursive_remove_stops_at_what_user_may_not_delete(agent: Client, shared_dir: Path) -> None:
    (shared_dir / "tree/locked").mkdir(parents=True)
    (shared_dir / "tree/locked/f").write_bytes(b"")
    os.chmod(shared_dir / "tree", 0o777)
    frame = agent.call("remove", path=str(shared_dir / "tree"), recursive=True)
    assert frame.header["code"] == "permission_denied"
    assert (shared_dir / "tree/locked/f").exists()
