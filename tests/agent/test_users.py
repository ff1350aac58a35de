"""The ``user`` account: found, created, or faked when the account files cannot be written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.agent.users import ensure_user

from .conftest import agent_env, requires_root

pytestmark = requires_root


def _root(tmp_path: Path, passwd: str, group: str = "root:x:0:\n") -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(passwd)
    (tmp_path / "etc/group").write_text(group)
    (tmp_path / "home").mkdir()
    return tmp_path


def test_creates_user_group_and_home(tmp_path: Path) -> None:
    root = _root(tmp_path, "root:x:0:0:root:/root:/bin/sh")  # no trailing newline: must not be glued on
    ids = ensure_user(str(root))
    assert (ids.user.uid, ids.user.gid, ids.user.home, ids.user.login) == (1000, 1000, "/home/user", "user")
    passwd = (root / "etc/passwd").read_text().splitlines()
    assert passwd[0] == "root:x:0:0:root:/root:/bin/sh"
    assert passwd[1].startswith("user:x:1000:1000::/home/user:")
    assert "user:x:1000:" in (root / "etc/group").read_text().splitlines()
    home = (root / "home/user").stat()
    assert (home.st_uid, home.st_gid) == (1000, 1000)
    assert ids.root.uid == 0 and ids.user.env()["HOME"] == "/home/user"
    # idempotent: a second start finds the account instead of adding another
    ensure_user(str(root))
    assert (root / "etc/passwd").read_text().count("user:x:1000") == 1


def test_existing_uid_1000_account_is_reused(tmp_path: Path) -> None:
    root = _root(
        tmp_path,
        "root:x:0:0::/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/bash\n",
        "root:x:0:\nnode:x:1000:\ndocker:x:999:node\n",
    )
    ids = ensure_user(str(root))
    assert (ids.user.login, ids.user.uid, ids.user.home) == ("node", 1000, "/home/node")
    assert ids.user.groups == (999,)
    assert "user:" not in (root / "etc/passwd").read_text()
    assert (root / "home/node").is_dir()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_read_only_root_falls_back_to_uid_1000_in_tmp(tmp_path: Path) -> None:
    """On a read-only file system (EROFS, which even root cannot bypass) the agent still gets a ``user``."""
    root = _root(tmp_path, "root:x:0:0::/root:/bin/sh\n")
    code = (
        "import sys; from corral.agent.users import ensure_user; u = ensure_user(sys.argv[1]).user; "
        "print(u.uid, u.gid, u.home)"
    )
    script = (
        f"mount --bind {root} {root} && mount -o remount,bind,ro {root} && "
        f"{sys.executable} -c '{code}' {root}"
    )
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=agent_env(),
        check=True,
        timeout=60,
    )
    assert out.stdout.split() == ["1000", "1000", "/tmp"]
    assert "user" not in (root / "etc/passwd").read_text()


def test_missing_etc_never_raises(tmp_path: Path) -> None:
    ids = ensure_user(str(tmp_path / "nothing-here"))
    assert (ids.user.uid, ids.user.home) == (1000, "/tmp")


@pytest.mark.parametrize("line", ["garbage", "user:x:notanumber:1000::/home/user:/bin/sh", ""])
def test_malformed_passwd_lines_are_skipped(tmp_path: Path, line: str) -> None:
    root = _root(tmp_path, f"root:x:0:0::/root:/bin/sh\n{line}\n")
    assert ensure_user(str(root)).user.uid == 1000
