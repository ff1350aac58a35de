"""A server can be killed (``kill -9``) and restarted: running sandboxes are re-attached with their state,
expired ones are cleaned up by the reaper, nothing leaks. With the SQLite store and with PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.root, pytest.mark.bwrap]

CORRAL = [sys.executable, "-m", "corral.cli.main"]


class Server:
    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*CORRAL, "serve", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                    return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-2000:]
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.05)  # polling a port with a bound

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(
    request: pytest.FixtureRequest, tmp_path: Path, corral_data_dir: Path
) -> Iterator[tuple[Server, str]]:
    """A private server (own data dir under the session's, so the leak check covers it) and a tenant key."""
    data_dir = corral_data_dir / f"restart-{request.param}-{os.getpid()}-{tmp_path.name}"
    env = {**os.environ, "CORRAL_DATA_DIR": str(data_dir)}
    if request.param == "postgres":
        env["CORRAL_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    made = subprocess.run(
        [*CORRAL, "keys", "create", "--tenant", "r"], env=env, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    srv = Server(env, _free_port(), tmp_path / "server.log")
    srv.start()
    try:
        yield srv, made.stdout.strip().splitlines()[-1]
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            with httpx.Client(
                base_url=srv.url, headers={"X-API-Key": made.stdout.strip().splitlines()[-1]}
            ) as c:
                for s in c.get("/v1/sandboxes").json().get("sandboxes", []):
                    c.delete(f"/v1/sandboxes/{s['sandbox_id']}")
        srv.stop()


def test_kill_9_and_restart_keeps_running_sandboxes_and_reaps_expired_ones(
    server: tuple[Server, str],
) -> None:
    srv, key = server
    with httpx.Client(base_url=srv.url, headers={"X-API-Key": key}, timeout=60) as c:
        keep = c.post(
            "/v1/sandboxes", json={"isolation": "namespace", "timeout": 600, "metadata": {"k": "v"}}
        ).json()
        short = c.post("/v1/sandboxes", json={"isolation": "namespace", "timeout": 60}).json()
        assert c.post(f"/v1/sandboxes/{short['sandbox_id']}/timeout", json={"timeout": 3}).status_code == 200
        job = c.post(
            f"/v1/sandboxes/{keep['sandbox_id']}/processes",
            json={"cmd": "echo kept; sleep 600", "background": True},
        )
        process_id = next(line for line in job.text.splitlines() if '"started"' in line)
        c.put(f"/v1/sandboxes/{keep['sandbox_id']}/files", params={"path": "/tmp/state"}, content=b"before")

    srv.kill9()  # no shutdown code runs: shims keep the sandboxes alive on their own
    time.sleep(0.5)  # a real gap between the crash and the restart (the deadline clock keeps going)
    srv.start()

    with httpx.Client(base_url=srv.url, headers={"X-API-Key": key}, timeout=60) as c:
        info = c.get(f"/v1/sandboxes/{keep['sandbox_id']}").json()
        assert info["state"] == "running" and info["metadata"] == {"k": "v"}
        assert info["expires_at"] == keep["expires_at"]  # the deadline survived
        out = c.post(f"/v1/sandboxes/{keep['sandbox_id']}/processes", json={"cmd": "cat /tmp/state"}).text
        assert '"data":"before"' in out  # re-attached: same sandbox, same files
        procs = c.get(f"/v1/sandboxes/{keep['sandbox_id']}/processes").json()["processes"]
        assert any(p["running"] and p["process_id"] in process_id for p in procs)  # the background job too

        deadline = time.monotonic() + 30
        while (s := c.get(f"/v1/sandboxes/{short['sandbox_id']}").json())["state"] != "stopped":
            assert time.monotonic() < deadline, s
            time.sleep(0.2)  # waiting for a wall-clock deadline
        assert s["stop_reason"] == "timeout"
        states = {x["sandbox_id"]: x["state"] for x in c.get("/v1/sandboxes").json()["sandboxes"]}
        assert states == {keep["sandbox_id"]: "running"}
