"""``corral sandbox shell`` driven through a real pseudo-terminal, as a person at a terminal would use it."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest

from corral import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.bwrap]
TIMEOUT = 60.0


class Terminal:
    """The CLI on the slave side of a pty that this test holds the master of."""

    def __init__(self, *args: str, cols: int = 100, rows: int = 30) -> None:
        self.master, slave = os.openpty()
        self.slave_path = os.ttyname(slave)
        self.resize(cols, rows)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.cli.main", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # so SIGWINCH reaches it
            env={**os.environ, "NO_COLOR": "1"},
        )
        self.slave = slave  # kept open: its modes are what the CLI set (raw) or restored
        self.seen = b""

    def resize(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: bytes) -> bytes:
        """Wait until everything shown so far matches ``pattern`` somewhere."""
        deadline = time.monotonic() + TIMEOUT
        while not re.search(pattern, self.seen):
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {pattern!r} on the terminal; it showed: {self.seen[-2000:]!r}"
            try:
                self.seen += os.read(self.master, 65536)
            except OSError:  # EIO: the CLI and everything else closed the slave
                raise AssertionError(f"terminal closed before {pattern!r}: {self.seen[-2000:]!r}") from None
        return self.seen

    def canonical(self) -> bool:
        return bool(termios.tcgetattr(self.slave)[3] & termios.ICANON)

    def close(self) -> int:
        try:
            code = self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.restored = self.canonical()  # the terminal's modes as the CLI left them
            os.close(self.master)
            os.close(self.slave)
        return code


@pytest.fixture(scope="module")
def sandbox_id() -> Iterator[str]:
    with Sandbox.create(isolation="namespace", metadata={"suite": "cli-shell"}, timeout=600) as sbx:
        yield sbx.sandbox_id


def _terminals_running(sandbox_id: str) -> list[str]:
    sbx = Sandbox.connect(sandbox_id)
    try:
        return [p.process_id for p in sbx.commands.list() if p.running]
    finally:
        sbx.close()


def test_shell_is_interactive_follows_resizes_and_exits_with_the_shells_code(sandbox_id: str) -> None:
    term = Terminal("sandbox", "shell", sandbox_id)
    try:
        term.expect(rb"\$ ")  # the remote shell's prompt
        term.type("stty size; echo ready-$((40+2))\r")
        term.expect(rb"30 100\r\n.*ready-42")
        assert not term.canonical()  # raw: keys go to the sandbox as typed
        term.resize(120, 40)  # the kernel sends SIGWINCH to the CLI, which resizes the remote terminal
        term.type("sleep 0.2; stty size\r")
        term.expect(rb"40 120\r\n")
        # the marker comes from the job itself: it runs once bash has made it the terminal's foreground group
        # (an echo before it, from bash, could show before that, and a Ctrl-C then went to bash alone)
        term.type("sh -c 'echo sleeping; exec sleep 1000'\r")
        term.expect(rb"sleeping\r\n")
        term.type("\x03")  # Ctrl-C reaches the remote foreground job, not the CLI
        term.expect(rb"sleeping\r\n(?s:.*)\$ ")  # a new prompt: the job was interrupted
        term.type("echo after-$((1+1))\r")
        term.expect(rb"after-2\r\n")
        term.type("exit 7\r")
    finally:
        code = term.close()
    assert code == 7
    assert term.restored  # the local terminal is restored
    assert _terminals_running(sandbox_id) == []


def test_sigterm_restores_the_terminal_and_kills_the_remote_shell(sandbox_id: str) -> None:
    before = _terminals_running(sandbox_id)  # another test's, if one failed: not this one's to judge
    term = Terminal("sandbox", "shell", sandbox_id)
    try:
        term.expect(rb"\$ ")
        term.type("echo up-$((2+3))\r")
        term.expect(rb"up-5\r\n")
        term.proc.send_signal(signal.SIGTERM)
    finally:
        code = term.close()
    assert code == 128 + signal.SIGTERM
    assert term.restored
    assert _terminals_running(sandbox_id) == before


def test_shell_without_a_terminal_is_a_clear_error(sandbox_id: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "sandbox", "shell", sandbox_id],
        input=b"echo hi\n",
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert b"needs a terminal" in done.stderr and b"Traceback" not in done.stderr


def test_files_watch_prints_events_until_interrupted(sandbox_id: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", "files", "watch", sandbox_id, "/tmp", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        assert proc.stderr.readline() == b"watching /tmp\n"  # the watch is in place from here on
        sbx = Sandbox.connect(sandbox_id)
        try:
            sbx.commands.run("echo x > /tmp/cli-watch.txt")
        finally:
            sbx.close()
        lines = []
        while b'"write"' not in b"".join(lines):
            lines.append(proc.stdout.readline())
        assert b'{"type": "create", "name": "cli-watch.txt"}\n' in lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
