"""A server can be killed (``kill -9``) and restarted: running sandboxes are re-attached with their state,
expired ones are cleaned up by the reaper, nothing leaks. With the SQLite store and with PostgreSQL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from _corral_server import Server, new_key

pytestmark = [pytest.mark.root, pytest.mark.bwrap]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(
    request: pytest.FixtureRequest, tmp_path: Path, corral_data_dir: Path
) -> Iterator[tuple[Server, str]]:
    """A private server (own data dir under the session's, so the leak check covers it) and a tenant key."""
    data_dir = corral_data_dir / f"restart-{request.param}-{os.getpid()}-{tmp_path.name}"
    env = {**os.environ, "CORRAL_DATA_DIR": str(data_dir)}
    if request.param == "postgres":
        env["CORRAL_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    key = new_key(env, "--tenant", "r")
    srv = Server(env, tmp_path / "server.log")
    srv.start()
    try:
        yield srv, key
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            with httpx.Client(base_url=srv.url, headers={"X-API-Key": key}) as c:
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
