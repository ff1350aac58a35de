"""Server logs: JSON for machines, a human format on a terminal, a file for scripts/serve (issue 14, item 5).

``scripts/serve`` used to show the demo's table with a JSON access-log line between every row: the server
logged JSON to the terminal it shared with the demo. Now its logs go to a file that scripts/serve names, and
``corral serve`` itself writes text on a terminal and JSON to anything else.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from _corral_server import free_port

CORRAL = [sys.executable, "-m", "corral.cli.main"]
REPO = Path(__file__).resolve().parents[2]


def _is_json_log(line: str) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "logger" in record


def _get(url: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=5):
            pass
    except urllib.error.HTTPError:
        pass  # a 404 is logged like any request


def _wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get(url + "/healthz")
            return
        except OSError:
            assert proc.poll() is None, "corral serve exited"
            assert time.monotonic() < deadline, "corral serve did not start"
            time.sleep(0.05)  # polling a port, bounded by the deadline


def _serve(tmp_path: Path, *args: str, stderr: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "CORRAL_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([*CORRAL, "serve", "--port", str(port), *args], env=env, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    _wait_up(url, proc)
    _get(url + "/v1/no-such-route")
    return proc, url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def test_json_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    proc, _ = _serve(tmp_path, stderr=subprocess.PIPE)
    _stop(proc)
    assert proc.stderr is not None
    lines = [line for line in proc.stderr.read().decode().splitlines() if line.startswith("{")]
    assert lines and all(_is_json_log(line) for line in lines), lines
    assert any(json.loads(line)["logger"] == "corral.server.access" for line in lines)


def test_text_on_a_terminal(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        proc, _ = _serve(tmp_path, stderr=slave)
        os.close(slave)
        slave = -1
        _stop(proc)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    lines = out.decode(errors="replace").splitlines()
    access = [line for line in lines if "corral.server.access" in line]
    assert access, lines
    assert not any(_is_json_log(line) for line in lines), lines
    assert "route=" in access[0] and "status=404" in "".join(access), access


def test_log_file_keeps_stderr_for_people(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc, _ = _serve(tmp_path, "--log-file", str(log), stderr=subprocess.PIPE)
    _stop(proc)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    assert not any(_is_json_log(line) for line in stderr.splitlines()), stderr
    assert f"logs: {log}" in stderr.replace("\n", "")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(r["logger"] == "corral.server.access" and r["status"] == 404 for r in records), records


def test_an_unwritable_log_file_is_a_clear_error(tmp_path: Path) -> None:
    made = subprocess.run(
        [*CORRAL, "serve", "--port", str(free_port()), "--log-file", str(tmp_path / "no" / "such" / "log")],
        env={**os.environ, "CORRAL_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode != 0
    assert "cannot write the log file" in made.stderr and "Traceback" not in made.stderr, made.stderr


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.runsc
@pytest.mark.slow
def test_scripts_serve_shows_the_demo_without_log_lines(corral_data_dir: Path) -> None:
    """The whole of scripts/serve on this (ready) machine, its output read as a user's terminal shows it."""
    # short (gVisor's agent socket lives below it) and under the session's dir, so the leak check covers it
    data = corral_data_dir / "serve"
    env = {**os.environ, "CORRAL_DATA_DIR": str(data)}
    env.pop("CORRAL_URL", None)
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "serve"), "--port", str(free_port())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so the test can stop the script and its server together
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 600
    try:
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace").rstrip("\n"))
            if "/metrics | grep corral_sandboxes" in lines[-1] or time.monotonic() > deadline:
                break  # the last line it prints before it only serves
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    text = "\n".join(lines)
    assert "Corral is serving on" in text, text
    assert not [line for line in lines if _is_json_log(line)], text
    log = data / "server.log"
    assert f"Its log (JSON lines): {log}" in text
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(r["logger"] == "corral.server.access" for r in records)
