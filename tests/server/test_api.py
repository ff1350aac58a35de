"""The REST API over a real ``corral serve`` (namespace runtime): auth, tenant isolation on every endpoint,
quotas, robustness against bad input, streams that stop when the client leaves, audit, metrics.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from _corral_server import check_ws_process_stdin

pytestmark = [pytest.mark.root, pytest.mark.bwrap]

ISO = "namespace"


@dataclass
class Tenant:
    name: str
    http: httpx.Client


@pytest.fixture(scope="module")
def admin(corral_server) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    with httpx.Client(
        base_url=corral_server.url, headers={"Authorization": f"Bearer {corral_server.admin_key}"}, timeout=60
    ) as client:
        yield client


def new_tenant(admin: httpx.Client, **quotas: float) -> Tenant:
    name = "t-" + secrets.token_hex(4)
    r = admin.post("/v1/tenants", json={"name": name, "quotas": quotas})
    assert r.status_code == 201, r.text
    key = admin.post(f"/v1/tenants/{name}/keys", json={"name": "test"}).json()["key"]
    return Tenant(name, httpx.Client(base_url=str(admin.base_url), headers={"X-API-Key": key}, timeout=60))


@pytest.fixture(scope="module")
def alice(admin: httpx.Client) -> Iterator[Tenant]:
    t = new_tenant(admin)
    yield t
    kill_all(t)
    t.http.close()


def kill_all(t: Tenant) -> None:
    for s in t.http.get("/v1/sandboxes").json()["sandboxes"]:
        t.http.delete(f"/v1/sandboxes/{s['sandbox_id']}")


def create(t: Tenant, **body: object) -> dict[str, object]:
    r = t.http.post("/v1/sandboxes", json={"isolation": ISO, **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def run(t: Tenant, sandbox_id: str, cmd: str) -> list[dict[str, object]]:
    r = t.http.post(f"/v1/sandboxes/{sandbox_id}/processes", json={"cmd": cmd})
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


@pytest.fixture(scope="module")
def box(alice: Tenant) -> str:
    return str(create(alice, metadata={"who": "alice"}, timeout=600)["sandbox_id"])


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["code"] == code and body["message"], body
    assert "/var/" not in body["message"] and "Traceback" not in body["message"]
    return str(body["message"])


def test_needs_a_valid_key(corral_server) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=corral_server.url) as anon:
        error(anon.get("/v1/sandboxes"), 401, "unauthenticated")
        error(anon.get("/v1/sandboxes", headers={"Authorization": "Bearer nope"}), 401, "unauthenticated")
        forged = "corral_key-aaaaaaaaaaaaaaaa_" + secrets.token_urlsafe(32)
        error(anon.get("/v1/sandboxes", headers={"X-API-Key": forged}), 401, "unauthenticated")
        assert anon.get("/healthz").status_code == 200  # probes need no key


def test_admin_and_tenant_keys_have_separate_powers(admin: httpx.Client, alice: Tenant) -> None:
    error(admin.post("/v1/sandboxes", json={}), 403, "permission_denied")  # admins do not run sandboxes
    error(alice.http.get("/v1/tenants"), 403, "permission_denied")
    error(alice.http.get("/v1/audit"), 403, "permission_denied")
    error(alice.http.post(f"/v1/tenants/{alice.name}/keys", json={}), 403, "permission_denied")
    error(alice.http.delete("/v1/templates/base"), 403, "permission_denied")


def test_revoked_key_stops_working(admin: httpx.Client) -> None:
    t = new_tenant(admin)
    assert t.http.get("/v1/sandboxes").status_code == 200
    key_id = t.http.headers["x-api-key"].split("_")[1]
    assert admin.delete(f"/v1/keys/{key_id}").json()["revoked_at"] is not None
    assert "revoked" in error(t.http.get("/v1/sandboxes"), 401, "unauthenticated")


def test_a_tenant_cannot_see_or_touch_another_tenants_sandbox(
    admin: httpx.Client, alice: Tenant, box: str
) -> None:
    mallory = new_tenant(admin)
    base = f"/v1/sandboxes/{box}"
    attempts = [
        ("GET", base, None),
        ("DELETE", base, None),
        ("POST", base + "/timeout", {"timeout": 1}),
        ("POST", base + "/pause", None),
        ("POST", base + "/resume", None),
        ("POST", base + "/processes", {"cmd": "id"}),
        ("GET", base + "/processes", None),
        ("GET", base + "/processes/p-000000000000/events", None),
        ("POST", base + "/processes/p-000000000000/signal", {"signal": 9}),
        ("GET", base + "/files?path=/etc/hostname", None),
        ("GET", base + "/files/list?path=/", None),
        ("GET", base + "/files/stat?path=/", None),
        ("POST", base + "/files/mkdir", {"path": "/tmp/x"}),
        ("POST", base + "/files/rename", {"src": "/tmp/a", "dst": "/tmp/b"}),
        ("DELETE", base + "/files?path=/tmp/a", None),
    ]
    for method, url, body in attempts:
        r = mallory.http.request(method, url, json=body)
        assert r.status_code == 404, (
            method,
            url,
            r.status_code,
            r.text,
        )  # 404, not 403: ids cannot be probed
    error(mallory.http.put(base + "/files?path=/tmp/owned", content=b"x"), 404, "not_found")
    error(mallory.http.post(base + "/processes/p-000000000000/stdin", content=b"x"), 404, "not_found")
    assert mallory.http.get("/v1/sandboxes").json()["sandboxes"] == []
    from websockets.sync.client import connect  # the raw TCP route of remote port forwarding

    ws_url = str(mallory.http.base_url).replace("http", "ws", 1) + base + "/ports/22/connect"
    with connect(ws_url, additional_headers={"X-API-Key": mallory.http.headers["x-api-key"]}) as ws:
        assert json.loads(ws.recv())["error"]["code"] == "not_found"
    # ... and alice's sandbox is untouched
    info = alice.http.get(base).json()
    assert info["state"] == "running"
    assert alice.http.get(base + "/files/stat?path=/tmp/owned").status_code == 404
    mallory.http.close()


def test_processes_files_and_listing(alice: Tenant, box: str) -> None:
    events = run(alice, box, "echo out; printf '\\377\\000bin' >&2; exit 4")
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "exit" and events[-1]["exit_code"] == 4
    assert (
        "".join(str(e.get("data", "")) for e in events if e["kind"] == "stderr").encode("latin-1")
        == b"\xff\x00bin"
    )
    payload = secrets.token_bytes(3 * 1024 * 1024)
    r = alice.http.put(f"/v1/sandboxes/{box}/files", params={"path": "/tmp/p.bin"}, content=payload)
    assert r.json()["bytes"] == len(payload)
    with alice.http.stream("GET", f"/v1/sandboxes/{box}/files", params={"path": "/tmp/p.bin"}) as down:
        got = b"".join(down.iter_bytes())
    assert got == payload
    error(alice.http.get(f"/v1/sandboxes/{box}/files", params={"path": "/nope"}), 404, "not_found")
    page = alice.http.get("/v1/sandboxes", params={"metadata": "who=alice"}).json()
    assert [s["sandbox_id"] for s in page["sandboxes"]] == [box]


def test_pagination_walks_every_sandbox_once(admin: httpx.Client) -> None:
    t = new_tenant(admin)
    try:
        made = {create(t, timeout=120)["sandbox_id"] for _ in range(3)}
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = t.http.get("/v1/sandboxes", params=params).json()
            seen += [s["sandbox_id"] for s in page["sandboxes"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert sorted(seen) == sorted(made) and len(seen) == 3
        error(t.http.get("/v1/sandboxes", params={"cursor": "!!"}), 400, "invalid_request")
    finally:
        kill_all(t)
        t.http.close()


def test_quotas_say_which_limit(admin: httpx.Client) -> None:
    t = new_tenant(admin, max_sandboxes=1, max_memory_mb=768, max_timeout=120)
    try:
        first = create(t, memory_mb=512, timeout=60)
        assert "max_sandboxes" in error(
            t.http.post("/v1/sandboxes", json={"isolation": ISO}), 429, "resource_exhausted"
        )
        admin.put(
            f"/v1/tenants/{t.name}/quotas",
            json={"max_sandboxes": 5, "max_memory_mb": 768, "max_timeout": 120},
        )
        msg = error(
            t.http.post("/v1/sandboxes", json={"isolation": ISO, "memory_mb": 512}), 429, "resource_exhausted"
        )
        assert "max_memory_mb" in msg
        msg = error(
            t.http.post("/v1/sandboxes", json={"isolation": ISO, "timeout": 500, "memory_mb": 64}),
            429,
            "resource_exhausted",
        )
        assert "max_timeout" in msg
        r = t.http.post(f"/v1/sandboxes/{first['sandbox_id']}/timeout", json={"timeout": 999})
        assert "max_timeout" in error(r, 429, "resource_exhausted")
        assert len(t.http.get("/v1/sandboxes").json()["sandboxes"]) == 1  # nothing half-created
    finally:
        kill_all(t)
        t.http.close()


def test_bad_input_gets_4xx_never_5xx(alice: Tenant, box: str) -> None:
    h = alice.http
    headers = {"content-type": "application/json"}
    error(h.post("/v1/sandboxes", content=b"{not json", headers=headers), 400, "invalid_request")
    error(h.post("/v1/sandboxes", json={"timeout": "soon"}), 400, "invalid_request")
    assert "bogus" in error(h.post("/v1/sandboxes", json={"bogus": 1}), 400, "invalid_request")
    error(h.post("/v1/sandboxes", json={"isolation": "quantum"}), 400, "invalid_request")
    error(h.post("/v1/sandboxes", json={"metadata": {"a": 1}}), 400, "invalid_request")
    error(h.post("/v1/sandboxes", json=[1, 2]), 400, "invalid_request")
    huge = b'{"metadata": {"a": "' + b"x" * (2 * 1024 * 1024) + b'"}}'
    error(h.post("/v1/sandboxes", content=huge, headers=headers), 413, "too_large")
    error(h.get("/v1/sandboxes/sb-bad"), 404, "not_found")
    error(h.get("/v1/sandboxes/../../etc/passwd"), 404, "not_found")
    error(h.post(f"/v1/sandboxes/{box}/processes", json={}), 400, "invalid_request")  # neither cmd nor argv
    error(h.post(f"/v1/sandboxes/{box}/processes", json={"argv": []}), 400, "invalid_request")
    error(h.post(f"/v1/sandboxes/{box}/processes", json={"argv": ["/no/such"]}), 404, "not_found")
    error(h.post(f"/v1/sandboxes/{box}/processes/p-nope/signal", json={"signal": 99}), 400, "invalid_request")
    error(h.get(f"/v1/sandboxes/{box}/files/list", params={"path": "/", "depth": 0}), 400, "invalid_request")
    error(h.get(f"/v1/sandboxes/{box}/files", params={"path": "a\x00b"}), 400, "invalid_request")
    error(h.patch("/v1/sandboxes"), 405, "method_not_allowed")
    error(h.get("/v1/nothing-here"), 404, "not_found")


def test_an_expired_sandbox_answers_invalid_state(alice: Tenant) -> None:
    sandbox_id = create(alice, timeout=60)["sandbox_id"]
    assert alice.http.post(f"/v1/sandboxes/{sandbox_id}/timeout", json={"timeout": 1}).status_code == 200
    deadline = time.monotonic() + 30
    while (info := alice.http.get(f"/v1/sandboxes/{sandbox_id}").json())["state"] != "stopped":
        assert time.monotonic() < deadline, info
        time.sleep(0.2)  # waiting for a wall-clock deadline: there is no event to wait on from outside
    assert info["stop_reason"] == "timeout"
    r = alice.http.post(f"/v1/sandboxes/{sandbox_id}/processes", json={"cmd": "true"})
    assert "stopped" in error(r, 409, "invalid_state")


def test_a_client_that_leaves_mid_stream_stops_the_command(alice: Tenant, box: str) -> None:
    body = {"cmd": "echo started; exec sleep 1000", "tag": "abandoned"}
    with alice.http.stream("POST", f"/v1/sandboxes/{box}/processes", json=body) as r:
        for line in r.iter_lines():
            if json.loads(line).get("data") == "started\n":
                break
    # the connection is closed now; the server must kill the foreground command
    deadline = time.monotonic() + 20
    while True:
        procs = alice.http.get(f"/v1/sandboxes/{box}/processes").json()["processes"]
        if not any(p.get("tag") == "abandoned" and p["running"] for p in procs):
            break
        assert time.monotonic() < deadline, procs
        time.sleep(0.1)  # the kill happens in the server after the disconnect; nothing to wait on here
    assert run(alice, box, "echo still fine")[1]["data"] == "still fine\n"


def test_websocket_process_with_stdin(corral_server, alice: Tenant, box: str) -> None:  # type: ignore[no-untyped-def]
    from websockets.sync.client import connect

    check_ws_process_stdin(corral_server.url, box, alice.http.headers["x-api-key"])
    url = corral_server.url.replace("http", "ws") + f"/v1/sandboxes/{box}/processes/ws"
    with connect(url, additional_headers={"X-API-Key": "corral_bad"}) as ws:  # refused before it may start
        assert json.loads(ws.recv())["error"]["code"] == "unauthenticated"


def test_audit_records_who_did_what(admin: httpx.Client, alice: Tenant) -> None:
    sandbox_id = str(create(alice, timeout=60)["sandbox_id"])
    run(alice, sandbox_id, "exit 5")
    alice.http.put(f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/tmp/a"}, content=b"abc")
    alice.http.delete(f"/v1/sandboxes/{sandbox_id}")
    lines = [json.loads(x) for x in admin.get("/v1/audit").text.splitlines()]
    mine = [e for e in lines if e["sandbox_id"] == sandbox_id]
    assert [e["action"] for e in mine] == [
        "sandbox.create",
        "process.start",
        "process.exit",
        "file.write",
        "sandbox.kill",
    ]
    assert mine[1]["details"]["cmd"] == "exit 5" and mine[2]["details"]["exit_code"] == 5
    assert mine[3]["details"] == {"path": "/tmp/a", "bytes": 3, "user": None}
    tenants = {e["tenant_id"] for e in mine}
    assert len(tenants) == 1 and tenants.pop().startswith("tn-")
    verdict = admin.get("/v1/audit/verify").json()
    assert verdict["ok"] and verdict["entries"] == len(lines)


def test_metrics_and_probes(corral_server, alice: Tenant, box: str) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=corral_server.url) as anon:
        text = anon.get("/metrics").text
        ready = anon.get("/readyz").json()
    assert ready["status"] == "ready" and "namespace" in ready["checks"]["runtimes"]
    assert 'corral_sandboxes{isolation="namespace",state="running"}' in text
    assert "corral_sandbox_create_seconds_bucket" in text
    assert "corral_process_starts_total" in text
    assert "# TYPE corral_pool_ready gauge" in text
    assert 'corral_errors_total{code="not_found"}' in text
    assert 'corral_http_requests_total{method="POST",route="/v1/sandboxes",status="201"}' in text


def test_a_snapshot_is_its_tenants_alone(admin: httpx.Client, alice: Tenant, box: str) -> None:
    alice.http.put(f"/v1/sandboxes/{box}/files", params={"path": "/home/user/secret"}, content=b"alice's")
    name = "snap-" + secrets.token_hex(3)
    r = alice.http.post(f"/v1/sandboxes/{box}/snapshot", json={"name": name})
    assert r.status_code == 201, r.text
    mallory = new_tenant(admin)
    try:
        assert name not in {t["name"] for t in mallory.http.get("/v1/templates").json()["templates"]}
        error(mallory.http.post("/v1/sandboxes", json={"isolation": ISO, "template": name}), 404, "not_found")
        assert name in {t["name"] for t in alice.http.get("/v1/templates").json()["templates"]}
        mine = create(alice, template=name, timeout=60)
        out = run(alice, str(mine["sandbox_id"]), "cat /home/user/secret")
        alice.http.delete(f"/v1/sandboxes/{mine['sandbox_id']}")
        assert out[1]["data"] == "alice's"
        # only its owner (or an admin) deletes it; shared templates are not a tenant's to delete
        error(mallory.http.delete(f"/v1/templates/{name}"), 404, "not_found")
        error(alice.http.delete("/v1/templates/base"), 403, "permission_denied")
        assert alice.http.delete(f"/v1/templates/{name}").status_code == 204
        assert name not in {t["name"] for t in alice.http.get("/v1/templates").json()["templates"]}
    finally:
        mallory.http.close()
        assert admin.delete(f"/v1/templates/{name}").status_code in (204, 404)


def test_warm_pool_over_the_api_with_late_binding(admin: httpx.Client, alice: Tenant) -> None:
    import base64

    error(
        alice.http.put("/v1/pools", json={"template": "base", "size": 1, "isolation": ISO}),
        403,
        "permission_denied",
    )
    assert admin.put("/v1/pools", json={"template": "base", "size": 1, "isolation": ISO}).status_code == 200
    try:
        filled = [
            json.loads(x)
            for x in admin.post("/v1/pools/base/fill", params={"isolation": ISO}).text.splitlines()
        ]
        # >= 1: the server's own pool loop may be booting it at the same time
        assert filled[-1]["ready"] + filled[-1]["starting"] >= 1
        deadline = time.monotonic() + 60
        while not any(p["ready"] for p in admin.get("/v1/pools").json()["pools"] if p["template"] == "base"):
            assert time.monotonic() < deadline
            time.sleep(0.1)  # the member boots in the server's background pass; nothing to wait on from here
        body = {
            "isolation": ISO,
            "env": {"WHO": "alice"},
            "metadata": {"via": "pool"},
            "files": {"/home/user/hello.txt": base64.b64encode(b"late-bound").decode()},
        }
        info = create(alice, **body)
        assert info["from_pool"] is True and info["metadata"] == {"via": "pool"}
        out = run(alice, str(info["sandbox_id"]), "echo $WHO; cat /home/user/hello.txt")
        assert "".join(str(e.get("data", "")) for e in out if e["kind"] == "stdout") == "alice\nlate-bound"
        alice.http.delete(f"/v1/sandboxes/{info['sandbox_id']}")
        pools = {(p["template"], p["isolation"]): p for p in alice.http.get("/v1/pools").json()["pools"]}
        assert pools[("base", ISO)]["target"] == 1
    finally:
        assert admin.delete("/v1/pools/base", params={"isolation": ISO}).status_code == 204


def test_terminal_and_watch_over_the_api(alice: Tenant, box: str) -> None:
    base = f"/v1/sandboxes/{box}"
    started = alice.http.post(base + "/pty", json={"cols": 100, "rows": 30, "cmd": "stty size; exit 3"})
    assert started.status_code == 201, started.text
    pid = started.json()["process_id"]
    events = [json.loads(x) for x in alice.http.get(f"{base}/processes/{pid}/events").text.splitlines()]
    assert "30 100" in "".join(str(e.get("data", "")) for e in events)
    assert events[-1]["kind"] == "exit" and events[-1]["exit_code"] == 3
    error(
        alice.http.post(f"{base}/processes/{pid}/resize", json={"cols": 0, "rows": 5}), 400, "invalid_request"
    )

    alice.http.post(base + "/files/mkdir", json={"path": "/tmp/watched"})
    error(alice.http.get(base + "/files/watch", params={"path": "/tmp/nope"}), 404, "not_found")
    with alice.http.stream("GET", base + "/files/watch", params={"path": "/tmp/watched"}) as stream:
        lines = stream.iter_lines()
        assert json.loads(next(lines))["type"] == "started"  # in place: changes from now on are seen
        alice.http.put(base + "/files", params={"path": "/tmp/watched/new.txt"}, content=b"x")
        seen = set()
        for line in lines:
            event = json.loads(line)
            seen.add((event["type"], event["name"]))
            if any(name == "new.txt" for _, name in seen):
                break
    assert any(name == "new.txt" for _, name in seen), seen
