"""The `corral` command as a person runs it: real processes, real namespace sandboxes, exit codes and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.bwrap]


def corral(
    *args: str, input: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli.main", *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )


def test_run_streams_output_and_returns_the_exit_code() -> None:
    done = corral("run", "--isolation", "namespace", "--", "python3", "-c", "print(1)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"1\n"
    failed = corral("run", "--isolation", "namespace", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (failed.returncode, failed.stdout, failed.stderr) == (3, b"out\n", b"err\n")


def test_run_json() -> None:
    done = corral("run", "--isolation", "namespace", "--json", "--", "sh", "-c", "echo hi; exit 2")
    result = json.loads(done.stdout)
    assert result["stdout"] == "hi\n" and result["exit_code"] == 2 and result["sandbox_id"].startswith("sb-")
    assert done.returncode == 2


def test_sandbox_lifecycle_and_files(tmp_path: Path) -> None:
    created = corral("sandbox", "create", "--isolation", "namespace", "-m", "owner=cli-test", "--json")
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    sid = info["sandbox_id"]
    try:
        assert info["state"] == "running" and info["metadata"] == {"owner": "cli-test"}
        listed = json.loads(corral("sandbox", "list", "-m", "owner=cli-test", "--json").stdout)
        assert [s["sandbox_id"] for s in listed] == [sid]
        assert json.loads(corral("sandbox", "list", "-m", "owner=nobody", "--json").stdout) == []

        ran = corral("sandbox", "exec", sid, "--", "sh", "-c", "echo $X > /tmp/x; cat /tmp/x", "-e", "X=1")
        assert ran.returncode == 0, ran.stderr
        # options after "--" belong to the command: X is unset, the -e reached sh as an argument
        assert ran.stdout == b"\n"
        ran = corral("sandbox", "exec", sid, "-e", "X=1", "--", "sh", "-c", "echo $X")
        assert ran.stdout == b"1\n"

        local = tmp_path / "in.txt"
        local.write_bytes(b"payload\x00\xff")
        assert corral("files", "put", sid, str(local), "/home/user/in.txt").returncode == 0
        got = corral("files", "get", sid, "/home/user/in.txt")
        assert got.stdout == b"payload\x00\xff"
        assert corral("files", "put", sid, "-", "/tmp/stdin.txt", input=b"from stdin").returncode == 0
        assert corral("files", "get", sid, "/tmp/stdin.txt", str(tmp_path / "out")).returncode == 0
        assert (tmp_path / "out").read_bytes() == b"from stdin"
        entries = json.loads(corral("files", "ls", sid, "/home/user", "--json").stdout)
        assert {"path": "/home/user/in.txt", "size": 9} in [
            {k: e[k] for k in ("path", "size")} for e in entries
        ]
    finally:
        killed = corral("sandbox", "kill", sid)
    assert killed.returncode == 0 and killed.stdout == f"killed {sid}\n".encode()
    assert json.loads(corral("sandbox", "list", "-m", "owner=cli-test", "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ("sandbox", "exec", "sb-aaaaaaaaaaaaaaaa", "--", "true"),
            1,
            b"error: sandbox sb-aaaaaaaaaaaaaaaa not found",
        ),
        (("sandbox", "kill", "not-an-id"), 1, b"error: sandbox 'not-an-id' not found"),
        (("run", "--isolation", "namespace", "--", "no-such-program"), 1, b"no-such-program"),
        (
            ("run", "--isolation", "quantum", "--", "true"),
            1,
            b"error: unknown isolation 'quantum'; choose one of: ",
        ),
        (
            ("run", "--isolation", "namespace", "--template", "nope", "--", "true"),
            1,
            b"error: template 'nope' not found; available templates: base",
        ),
        (
            ("sandbox", "create", "--isolation", "namespace", "-m", "novalue"),
            2,
            b"'novalue' is not KEY=VALUE",
        ),
    ],
)
def test_errors_are_one_clear_line(args: tuple[str, ...], code: int, message: bytes) -> None:
    before = corral("sandbox", "list", "--json").stdout
    done = corral(*args)
    assert done.returncode == code
    assert message in done.stderr
    assert b"Traceback" not in done.stderr and b"/var/tmp" not in done.stderr  # no traceback, no host path
    assert corral("sandbox", "list", "--json").stdout == before  # nothing half-created


def test_template_import_directory_without_python(tmp_path: Path) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.fail("busybox-static is not installed; run scripts/install-host-deps")
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    for d in ("proc", "dev", "tmp", "etc"):
        (root / d).mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "bin" / "busybox").write_bytes(busybox.read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    for applet in ("sh", "echo", "cat", "ls"):
        (root / "bin" / applet).symlink_to("busybox")
    name = f"bb-{os.getpid()}"
    assert corral("template", "import", name, "--dir", str(root)).returncode == 0
    try:
        done = corral(
            "run",
            "--isolation",
            "namespace",
            "--template",
            name,
            "--",
            "sh",
            "-c",
            "echo from busybox; ls /usr/bin/python3 2>&1",
        )
        assert done.stdout.startswith(b"from busybox\n"), done.stderr
        assert b"No such file" in done.stdout  # this image really has no Python: the agent brought its own
    finally:
        corral("template", "delete", name)
