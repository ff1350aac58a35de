"""The live change stream (GET /v1/events), one sandbox's audit entries, and how /ui is served, over a real
``corral serve`` with real (namespace) sandboxes."""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.root, pytest.mark.bwrap]


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def admin(corral_server) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    with client(corral_server.url, corral_server.admin_key) as c:
        yield c


def tenant_key(admin: httpx.Client) -> tuple[str, str]:
    """A new tenant's (key id, key)."""
    name = "ev-" + secrets.token_hex(4)
    assert admin.post("/v1/tenants", json={"name": name}).status_code == 201
    made = admin.post(f"/v1/tenants/{name}/keys", json={"name": "events"}).json()
    return made["key_id"], made["key"]


class Listener:
    """Reads GET /v1/events in a thread; every parsed line lands in ``lines``."""

    def __init__(self, url: str, key: str) -> None:
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.http = client(url, key)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    def _run(self) -> None:
        try:
            with self.http.stream("GET", "/v1/events", timeout=httpx.Timeout(60, read=None)) as r:
                self.status = r.status_code
                self.ready.set()
                for line in r.iter_lines():
                    if line:
                        self.lines.put(json.loads(line))
        except httpx.HTTPError:
            pass  # closed by the test
        finally:
            self.ready.set()
            self.lines.put({"type": "closed"})

    def next(self, timeout: float = 60) -> dict[str, Any]:
        return self.lines.get(timeout=timeout)

    def until(self, pred: Any, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(max(0.1, deadline - time.monotonic()))
            if pred(item):
                return item
            assert item["type"] != "closed", "the stream ended first"

    def close(self) -> None:
        self.http.close()
        self.thread.join(10)


def test_a_tenant_sees_its_own_sandboxes_change_and_no_one_else_sees_them(corral_server, admin) -> None:  # type: ignore[no-untyped-def]
    _, alice_key = tenant_key(admin)
    _, bob_key = tenant_key(admin)
    alice, bob = Listener(corral_server.url, alice_key), Listener(corral_server.url, bob_key)
    pools = Listener(corral_server.url, corral_server.admin_key)
    try:
        assert alice.next() == {"type": "snapshot", "sandboxes": []}
        assert bob.next() == {"type": "snapshot", "sandboxes": []}
        assert "pools" in pools.next()
        with client(corral_server.url, alice_key) as http:
            made = http.post("/v1/sandboxes", json={"isolation": "namespace", "metadata": {"k": "v"}})
            assert made.status_code == 201, made.text
            sid = made.json()["sandbox_id"]
            running = alice.until(lambda e: e.get("sandbox", {}).get("state") == "running")
            assert running["sandbox"]["sandbox_id"] == sid and running["sandbox"]["metadata"] == {"k": "v"}
            assert running["sandbox"]["domain"]  # the same shape as GET /v1/sandboxes/{id}
            assert http.post(f"/v1/sandboxes/{sid}/pause").status_code == 200
            assert alice.until(lambda e: e.get("type") == "sandbox")["sandbox"]["state"] == "paused"
            assert http.delete(f"/v1/sandboxes/{sid}").status_code == 200
            stopped = alice.until(lambda e: e.get("sandbox", {}).get("state") == "stopped")
            assert stopped["sandbox"]["stop_reason"] == "killed"
            # a new stream starts with what is live now: the killed sandbox is not in it
            again = Listener(corral_server.url, alice_key)
            try:
                assert again.next() == {"type": "snapshot", "sandboxes": []}
            finally:
                again.close()
        time.sleep(0.5)
        seen_by_bob = []
        while not bob.lines.empty():
            seen_by_bob.append(bob.lines.get())
        assert sid not in json.dumps(seen_by_bob), seen_by_bob
        assert all(e["type"] == "ping" for e in seen_by_bob), seen_by_bob
        seen_by_admin = []
        while not pools.lines.empty():
            seen_by_admin.append(pools.lines.get())
        assert sid not in json.dumps(seen_by_admin)  # an admin's stream carries pool numbers only
    finally:
        for listener in (alice, bob, pools):
            listener.close()


def test_no_key_no_stream_and_a_revoked_key_ends_it(corral_server, admin) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(corral_server.url + "/v1/events", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    key_id, key = tenant_key(admin)
    listener = Listener(corral_server.url, key)
    try:
        assert listener.next()["type"] == "snapshot"
        assert admin.delete(f"/v1/keys/{key_id}").status_code == 200
        # checked again at the next heartbeat (15 s): the stream says why and ends
        end = listener.until(lambda e: "error" in e, timeout=40)
        assert end["error"]["code"] == "unauthenticated" and "revoked" in end["error"]["message"]
        assert listener.next(10)["type"] == "closed"
    finally:
        listener.close()


def test_a_sandboxes_audit_entries_are_its_tenants_alone(corral_server, admin) -> None:  # type: ignore[no-untyped-def]
    _, alice_key = tenant_key(admin)
    _, bob_key = tenant_key(admin)
    with client(corral_server.url, alice_key) as alice, client(corral_server.url, bob_key) as bob:
        sid = alice.post("/v1/sandboxes", json={"isolation": "namespace"}).json()["sandbox_id"]
        try:
            run = alice.post(f"/v1/sandboxes/{sid}/processes", json={"cmd": "true"})
            assert run.status_code == 200
            entries = alice.get(f"/v1/sandboxes/{sid}/audit").json()["entries"]
            actions = [e["action"] for e in entries]
            assert actions[0] == "sandbox.create" and "process.start" in actions and "process.exit" in actions
            assert all(e["sandbox_id"] == sid for e in entries)
            r = bob.get(f"/v1/sandboxes/{sid}/audit")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        finally:
            alice.delete(f"/v1/sandboxes/{sid}")
        # still readable once stopped: the record stays
        actions = [e["action"] for e in alice.get(f"/v1/sandboxes/{sid}/audit").json()["entries"]]
        assert actions[-1] == "sandbox.kill"


def test_the_dashboard_is_served_with_headers_that_keep_other_origins_out(corral_server) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(corral_server.url + "/ui", timeout=30, follow_redirects=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js">' in r.text
    csp = r.headers["content-security-policy"]
    for directive in (
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ):
        assert directive in csp
    assert "unsafe-eval" not in csp and "script-src 'self' " not in csp  # scripts from this origin only
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-frame-options"] == "DENY"
    assert "set-cookie" not in r.headers
    js = httpx.get(corral_server.url + "/ui/vendor/xterm.mjs", timeout=30)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert js.headers["content-security-policy"] == csp
    for bad in ("/ui/../pyproject.toml", "/ui/%2e%2e/app.py", "/ui/nope.js", "/ui/.hidden"):
        r = httpx.get(corral_server.url + bad, timeout=30)
        assert r.status_code == 404, (bad, r.status_code)
        assert "corral" not in r.text.lower() or r.json()["error"]["code"] == "not_found"


def test_sandbox_port_host_names_never_get_the_dashboard(corral_server) -> None:  # type: ignore[no-untyped-def]
    port = corral_server.url.rsplit(":", 1)[1]
    # a port URL's host goes to the port proxy before any route: the answer is the proxy's, not the page
    r = httpx.get(corral_server.url + "/ui/", headers={"host": f"8000-sb-aaaaaaaaaaaaaaaa.localhost:{port}"})
    assert r.status_code == 404 and "sandbox sb-aaaaaaaaaaaaaaaa" in r.json()["error"]["message"]
    # and no other name under the ports domain is the dashboard's either
    for host in (f"x.localhost:{port}", f"8000-sb-AAAA.localhost:{port}", f"a.b.localhost:{port}"):
        r = httpx.get(corral_server.url + "/ui/", headers={"host": host})
        assert r.status_code == 404 and "content-security-policy" not in r.headers, host
        assert "sandbox port host names" in r.json()["error"]["message"]
    ok = httpx.get(corral_server.url + "/ui/", headers={"host": f"localhost:{port}"})
    assert ok.status_code == 200


@pytest.mark.busybox
def test_a_template_build_streams_to_its_end_and_a_taken_name_is_refused_up_front(
    admin: httpx.Client, tmp_path: Any
) -> None:
    # The build's events once broke off after "done" (its task group was entered in the request's task and
    # left in the response's): browsers saw ERR_INCOMPLETE_CHUNKED_ENCODING, httpx a RemoteProtocolError.
    from _registry import busybox_tree

    busybox_tree(tmp_path)
    name = "ev-bb-" + secrets.token_hex(3)
    body = {"name": name, "source": str(tmp_path), "steps": ["echo from-the-step"]}
    try:
        with admin.stream("POST", "/v1/templates/build", json=body) as r:
            assert r.status_code == 200
            events = [json.loads(line) for line in r.iter_lines() if line]
        assert [e["kind"] for e in events][-1] == "done"
        assert any(e["kind"] == "log" and "from-the-step" in e["data"] for e in events)
        again = admin.post("/v1/templates/build", json=body)
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    finally:
        admin.delete(f"/v1/templates/{name}")
