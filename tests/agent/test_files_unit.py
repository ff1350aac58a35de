"""File operations called directly (in this process), where an interleaving must be controlled exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.agent import files
from corral.agent.errors import AgentError


def test_upload_commit_is_relative_to_the_directory_opened_first(tmp_path: Path) -> None:
    """A directory swapped for a symlink between open and commit cannot redirect the write."""
    state = files.WorkerState(str(tmp_path))
    work, protected = tmp_path / "work", tmp_path / "protected"
    work.mkdir()
    protected.mkdir()
    reply = files.op_open_write(state, {"path": str(work / "file"), "mode": 0o644})
    assert reply.fd is not None and reply.fields["token"]
    os.write(reply.fd, b"data")
    os.close(reply.fd)
    work.rename(tmp_path / "moved")
    os.symlink(protected, work)
    files.op_commit(state, {"token": reply.fields["token"], "path": str(work / "file")})
    assert list(protected.iterdir()) == []
    assert (tmp_path / "moved/file").read_bytes() == b"data"
    assert state.uploads == {}


def test_abort_removes_the_temp_file(tmp_path: Path) -> None:
    state = files.WorkerState(str(tmp_path))
    reply = files.op_open_write(state, {"path": str(tmp_path / "f")})
    assert reply.fd is not None
    os.close(reply.fd)
    assert len(list(tmp_path.iterdir())) == 1
    files.op_abort(state, {"token": reply.fields["token"]})
    assert list(tmp_path.iterdir()) == []


def test_open_write_refuses_directories(tmp_path: Path) -> None:
    state = files.WorkerState(str(tmp_path))
    with pytest.raises(AgentError) as info:
        files.op_open_write(state, {"path": str(tmp_path) + "/"})
    assert info.value.code == "is_a_directory"


def test_list_too_many_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "MAX_ENTRIES", 3)
    for i in range(4):
        (tmp_path / str(i)).write_bytes(b"")
    with pytest.raises(AgentError) as info:
        files.op_list(files.WorkerState(str(tmp_path)), {"path": str(tmp_path)})
    assert info.value.code == "too_large"
