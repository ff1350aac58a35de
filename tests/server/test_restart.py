"""A server can be killed (``kill -9``) and restarted: running sandboxes are re-attached with their state,
expired ones are cleaned up by the reaper, paused ones resume where they stopped, nothing leaks. With the
SQLite store and with PostgreSQL (the pause test with SQLite only: what it checks lives in the runtimes).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import httpx
import pytest

from _corral_server import Server, new_key
from _sandbox_apps import memory_probe
from corral import InvalidState, Sandbox, SandboxState
from corral.client._sync.remote import RemoteBackend

pytestmark = [pytest.mark.root, pytest.mark.bwrap]


@contextmanager
def _serve(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, corral_data_dir: Path
) -> Iterator[tuple[Server, str]]:
    """A private server (own data dir under the session's, so the leak check covers it) and a tenant key.

    At the end every sandbox of the tenant is killed through the API, restarting the server first if the test
    left it dead (a failed restart must not leak the sandboxes it was meant to re-attach)."""
    # short: gVisor puts Unix sockets under it (sun_path holds 108 bytes)
    data_dir = corral_data_dir / f"restart-{store}-{secrets.token_hex(3)}"
    env = {**os.environ, "CORRAL_DATA_DIR": str(data_dir)}
    if store == "postgres":
        env["CORRAL_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    key = new_key(env, "--tenant", "r")
    srv = Server(env, tmp_path / "server.log")
    srv.start()
    try:
        yield srv, key
    finally:
        if srv.proc is None or srv.proc.poll() is not None:
            srv.start()
        with httpx.Client(base_url=srv.url, headers={"X-API-Key": key}, timeout=120) as c:
            for s in c.get("/v1/sandboxes").json().get("sandboxes", []):
                c.delete(f"/v1/sandboxes/{s['sandbox_id']}")
        srv.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(
    request: pytest.FixtureRequest, tmp_path: Path, corral_data_dir: Path
) -> Iterator[tuple[Server, str]]:
    with _serve(request.param, request, tmp_path, corral_data_dir) as served:
        yield served


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


# --- pause → kill -9 → restart → resume ----------------------------------------------------------------


def _shim_pids(sandbox_id: str) -> set[int]:
    """Host processes running the shim of ``sandbox_id`` (its argv names the sandbox's state dir)."""
    pids = set()
    for entry in os.scandir("/proc"):
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if any(a.endswith(b"/_shim.py") for a in argv) and any(sandbox_id.encode() in a for a in argv):
            pids.add(int(entry.name))
    return pids


@pytest.fixture
def sqlite_server(
    request: pytest.FixtureRequest, tmp_path: Path, corral_data_dir: Path
) -> Iterator[tuple[Server, str]]:
    with _serve("sqlite", request, tmp_path, corral_data_dir) as served:
        yield served


def _probe(box: Sandbox, *, above: int = -1) -> tuple[str, int]:
    """(token, counter) of the probe once it has written a counter above ``above`` (bounded wait)."""
    end = time.monotonic() + 30
    while True:
        out = box.commands.run("cat /home/user/probe 2>/dev/null").stdout
        if out:
            token, count = out.split()
            if int(count) > above:
                return token, int(count)
        assert time.monotonic() < end, f"the probe did not count past {above}: {out!r}"


# namespace: cgroup freezer, the frozen processes stay in RAM under their shim, which outlives the server;
# gvisor: runsc checkpoint to disk (memory, processes, open files), restored through the shim by the new server
@pytest.mark.parametrize("isolation", ["namespace", pytest.param("gvisor", marks=pytest.mark.runsc)])
def test_pause_kill_9_restart_resume_keeps_memory_and_deadline(
    sqlite_server: tuple[Server, str], isolation: str
) -> None:
    srv, key = sqlite_server
    with closing(RemoteBackend(srv.url, api_key=key)) as api:
        box = Sandbox.create(isolation=isolation, timeout=600, backend=api)
        box.files.write("/home/user/probe.py", memory_probe("/home/user"))
        box.commands.start("python3 /home/user/probe.py", user="root")
        token, count = _probe(box)
        token, count = _probe(box, above=count)  # counting, not just started
        before = box.get_info()
        assert before.expires_at is not None
        paused_at = time.time()
        box.pause()
        remaining_at_most = before.expires_at - paused_at  # the server read its clock after paused_at
        remaining_at_least = before.expires_at - time.time()  # … and before the pause call returned
        assert box.get_info().state is SandboxState.PAUSED and box.get_info().expires_at is None

    srv.kill9()  # the paused sandbox is left to its shim alone
    shim = _shim_pids(box.sandbox_id)
    assert shim, "the sandbox's shim died with the server"
    upper_probe = Path(
        srv.env["CORRAL_DATA_DIR"], "sandboxes", box.sandbox_id, "fs", "upper", "home", "user", "probe"
    )
    frozen = upper_probe.read_text()  # the probe's file in the sandbox's writable layer, seen from the host
    srv.start()
    assert _shim_pids(box.sandbox_id) == shim  # the new server found the same shim
    assert upper_probe.read_text() == frozen  # still paused: starting did not thaw or restore it

    with closing(RemoteBackend(srv.url, api_key=key)) as api:
        box = Sandbox.connect(box.sandbox_id, backend=api)
        info = box.get_info()
        assert info.state is SandboxState.PAUSED and info.expires_at is None  # still paused, no deadline
        with pytest.raises(InvalidState):
            box.commands.run("true")
        resumed_from = time.time()
        box.resume()
        resumed_by = time.time()
        info = box.get_info()
        assert info.state is SandboxState.RUNNING and info.expires_at is not None
        # The deadline was suspended: what was left at the pause is what is left from the resume on, however
        # long the sandbox stayed paused (here: across the restart). Unsuspended, expires_at would still be
        # before.expires_at, which is below the lower bound by the whole pause.
        assert resumed_from + remaining_at_least <= info.expires_at <= resumed_by + remaining_at_most
        again, now = _probe(box, above=count)  # the very same process, counting on from where it was
        assert again == token, "a new process: the probe's memory did not come back"
        assert _probe(box, above=now)[0] == token  # and it keeps running
        procs = box.commands.list()
        assert any(p.running and "/home/user/probe.py" in p.argv[-1] for p in procs), procs
        box.kill()
        assert box.get_info().state is SandboxState.STOPPED
