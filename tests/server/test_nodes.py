"""Two Corral servers (two nodes) on one PostgreSQL store: each reconciles only its own node's sandboxes.

Each server runs in a mount namespace of its own in which the other server's data directory is an empty
tmpfs, as it would be on another machine: a server that inspected the other's sandboxes would find nothing
of them there and mark them crashed. Each must instead see them as the other node stored them (running),
refuse to act on them (they are reachable only through their own node), and still reap its own.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from _corral_server import Server, new_key

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.postgres]

REAP_INTERVAL = 0.2  # seconds between reconcile passes of each server (the default is 5)


def _hiding(path: Path) -> list[str]:
    """A command prefix: run in a private mount namespace where ``path`` is an empty tmpfs."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs -o size=1m corral-hidden "$0" && exec "$@"',
        str(path),
    ]


@pytest.fixture
def two_nodes(
    postgres_url: str, tmp_path: Path, corral_data_dir: Path
) -> Iterator[tuple[Server, Server, str]]:
    tag = secrets.token_hex(3)
    dirs = [corral_data_dir / f"node-{name}-{tag}" for name in ("a", "b")]
    for d in dirs:
        d.mkdir()
    config = tmp_path / "corral.toml"
    config.write_text(f"[runtime]\nreap_interval = {REAP_INTERVAL}\n")
    servers = []
    for name, own, other in (("a", dirs[0], dirs[1]), ("b", dirs[1], dirs[0])):
        env = {
            **os.environ,
            "CORRAL_DATA_DIR": str(own),
            "CORRAL_DATABASE_URL": postgres_url,
            "CORRAL_NODE": f"node-{name}",
            "CORRAL_CONFIG": str(config),
        }
        servers.append(Server(env, tmp_path / f"server-{name}.log", wrap=_hiding(other)))
    key = new_key(servers[0].env, "--tenant", "nodes")  # one store: the key works on both
    try:
        for srv in servers:
            srv.start()
        yield servers[0], servers[1], key
    finally:
        for srv in servers:  # each kills its own node's sandboxes
            if srv.proc is not None and srv.proc.poll() is None:
                with httpx.Client(base_url=srv.url, headers={"X-API-Key": key}, timeout=120) as c:
                    for s in c.get("/v1/sandboxes").json().get("sandboxes", []):
                        c.delete(f"/v1/sandboxes/{s['sandbox_id']}")
        for srv in servers:
            srv.stop()


def _state(c: httpx.Client, sandbox_id: str) -> str:
    response = c.get(f"/v1/sandboxes/{sandbox_id}")
    assert response.status_code == 200, response.text
    return str(response.json()["state"])


def _wait_reaped(c: httpx.Client, sandbox_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (info := c.get(f"/v1/sandboxes/{sandbox_id}").json())["state"] != "stopped":
        assert time.monotonic() < deadline, f"{sandbox_id} was not reaped within {timeout} s"
        time.sleep(REAP_INTERVAL)  # polling another process's reaper with a bound: no event reaches us
    assert info["stop_reason"] == "timeout", info


def test_each_node_sees_the_others_sandboxes_alive_and_reaps_only_its_own(
    two_nodes: tuple[Server, Server, str],
) -> None:
    a, b, key = two_nodes
    headers = {"X-API-Key": key}
    with (
        httpx.Client(base_url=a.url, headers=headers, timeout=60) as ca,
        httpx.Client(base_url=b.url, headers=headers, timeout=60) as cb,
    ):
        on_a = ca.post("/v1/sandboxes", json={"isolation": "namespace", "timeout": 600}).json()
        on_b = cb.post("/v1/sandboxes", json={"isolation": "namespace", "timeout": 600}).json()
        # short-lived ones, each watched through the OTHER server: it reports them as their node stored them,
        # so seeing them stopped there means their own node's reaper ran passes after their deadline
        short_a = ca.post("/v1/sandboxes", json={"isolation": "namespace", "timeout": 2}).json()
        short_b = cb.post("/v1/sandboxes", json={"isolation": "namespace", "timeout": 2}).json()
        _wait_reaped(cb, short_a["sandbox_id"])
        _wait_reaped(ca, short_b["sandbox_id"])

        for c in (ca, cb):  # both servers see both long-lived sandboxes alive, after many reaper passes
            assert _state(c, on_a["sandbox_id"]) == "running"
            assert _state(c, on_b["sandbox_id"]) == "running"
            listed = {s["sandbox_id"]: s["state"] for s in c.get("/v1/sandboxes").json()["sandboxes"]}
            assert listed == {on_a["sandbox_id"]: "running", on_b["sandbox_id"]: "running"}

        # acting on the other node's sandbox is refused, and leaves it running
        refused = cb.delete(f"/v1/sandboxes/{on_a['sandbox_id']}")
        assert refused.status_code == 409, refused.text
        assert "node-a" in refused.json()["error"]["message"]
        ran = cb.post(f"/v1/sandboxes/{on_a['sandbox_id']}/processes", json={"cmd": "true"})
        assert ran.status_code == 409, ran.text
        assert _state(ca, on_a["sandbox_id"]) == "running"
        out = ca.post(f"/v1/sandboxes/{on_a['sandbox_id']}/processes", json={"cmd": "echo alive"})
        assert '"data":"alive\\n"' in out.text  # its own node still runs commands in it

        # each node kills its own
        assert ca.delete(f"/v1/sandboxes/{on_a['sandbox_id']}").status_code in (200, 204)
        assert cb.delete(f"/v1/sandboxes/{on_b['sandbox_id']}").status_code in (200, 204)
        assert _state(ca, on_a["sandbox_id"]) == "stopped"
        assert _state(cb, on_b["sandbox_id"]) == "stopped"
