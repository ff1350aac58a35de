"""E2B's REST surface on the wire: tenant isolation on every route, keys, error shapes, refused input.

The isolation walk takes its route list from the running server's own OpenAPI document (tag ``e2b``), so an
E2B route added later without an isolation case fails here instead of going unchecked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _e2b_server import E2BServer

from e2b import Sandbox

pytestmark = pytest.mark.timeout(300)

UNKNOWN = "sb-aaaaaaaaaaaaaaaa"

# A valid body for each route that takes one, so that the answer is about the sandbox, not the body.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/sandboxes/{sandbox_id}/connect"): {"timeout": 30},
    ("post", "/v2/sandboxes/{sandbox_id}/connect"): {"timeout": 30},
    ("post", "/sandboxes/{sandbox_id}/timeout"): {"timeout": 5},
    ("post", "/sandboxes/{sandbox_id}/resume"): {"timeout": 30},
    ("post", "/sandboxes/{sandbox_id}/refreshes"): {"duration": 30},
    ("post", "/sandboxes/{sandbox_id}/pause"): {},
    ("post", "/sandboxes/{sandbox_id}/fork"): {"count": 1},
    ("post", "/sandboxes/{sandbox_id}/snapshots"): {"name": "stolen-snapshot"},
    ("put", "/sandboxes/{sandbox_id}/network"): {"denyOut": ["0.0.0.0/0"]},
}


def client(server: E2BServer, key: str | None) -> httpx.Client:
    headers = {"X-API-Key": key} if key is not None else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


def e2b_routes(server: E2BServer) -> list[tuple[str, str]]:
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    return sorted(
        (method, path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if "e2b" in op.get("tags", [])
    )


@pytest.fixture
def victim(e2b_server: E2BServer) -> Iterator[tuple[str, str]]:
    """A running sandbox of tenant e2b-a and a snapshot of it: (sandbox id, snapshot id)."""
    with client(e2b_server, e2b_server.key_a) as a:
        made = a.post("/v2/sandboxes", json={"templateID": "base", "timeout": 300})
        assert made.status_code == 201, made.text
        sandbox_id = made.json()["sandboxID"]
        snap = a.post(f"/sandboxes/{sandbox_id}/snapshots", json={})
        assert snap.status_code == 201, snap.text
        snapshot_id = snap.json()["snapshotID"]
        try:
            yield sandbox_id, snapshot_id
        finally:
            a.delete(f"/templates/{snapshot_id}")
            a.delete(f"/sandboxes/{sandbox_id}")


def test_another_tenants_sandbox_does_not_exist_on_any_route(
    e2b_server: E2BServer, victim: tuple[str, str]
) -> None:
    sandbox_id, snapshot_id = victim
    routes = e2b_routes(e2b_server)
    with client(e2b_server, e2b_server.key_a) as a:
        before = a.get(f"/sandboxes/{sandbox_id}").json()
    walked = 0
    with client(e2b_server, e2b_server.key_b) as b:
        for method, path in routes:
            if "{sandbox_id}" in path:
                targets = {"theirs": sandbox_id, "unknown": UNKNOWN}
                fill = "sandbox_id"
            elif "{template_id}" in path:
                targets = {"theirs": snapshot_id, "unknown": "snapshot-000000000000"}
                fill = "template_id"
            else:
                continue
            answers = {}
            for which, target in targets.items():
                response = b.request(
                    method, path.replace("{" + fill + "}", target), json=BODIES.get((method, path))
                )
                assert response.status_code == 404, (method, path, which, response.text)
                body = response.json()
                assert body["code"] == 404 and isinstance(body["message"], str), body
                answers[which] = body["message"].replace(target, "ID")
            # the same words whether the id is another tenant's or exists nowhere: nothing to probe with
            assert answers["theirs"] == answers["unknown"], (method, path, answers)
            walked += 1

        # lists: none of tenant A's sandboxes or snapshots appear
        for path in ("/sandboxes", "/v2/sandboxes", "/v2/sandboxes?state=running,paused"):
            listed = b.get(path)
            assert listed.status_code == 200 and sandbox_id not in listed.text
        snaps = b.get("/snapshots")
        assert snaps.status_code == 200 and snapshot_id not in snaps.text
        snaps = b.get("/snapshots", params={"sandboxID": sandbox_id})
        assert snaps.status_code == 200 and snaps.json() == []
        # B cannot start a sandbox from A's snapshot either
        stolen = b.post("/v2/sandboxes", json={"templateID": snapshot_id})
        assert stolen.status_code == 404, stolen.text
        # ... nor learn its name from the list of templates an unknown name is answered with
        unknown = b.post("/v2/sandboxes", json={"templateID": "no-such-template"})
        assert unknown.status_code == 404 and "available templates: base" in unknown.text
        assert snapshot_id not in unknown.text
    assert walked >= 13, routes  # every per-sandbox and per-template route the server has

    with client(e2b_server, e2b_server.key_a) as a:  # and A's sandbox is untouched by all of that
        after = a.get(f"/sandboxes/{sandbox_id}").json()
        assert after["state"] == "running" and after["endAt"] == before["endAt"]
        assert [s["snapshotID"] for s in a.get("/snapshots").json()] == [snapshot_id]


def test_the_sdk_raises_not_found_for_another_tenants_sandbox(
    e2b_env: E2BServer, victim: tuple[str, str]
) -> None:
    from e2b.exceptions import SandboxNotFoundException

    sandbox_id, snapshot_id = victim
    other = {"api_key": e2b_env.key_b}
    for call in (Sandbox.get_info, Sandbox.connect, lambda i, **kw: Sandbox.set_timeout(i, 5, **kw)):
        with pytest.raises(SandboxNotFoundException):
            call(sandbox_id, **other)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.pause(sandbox_id, **other)
    assert Sandbox.kill(sandbox_id, **other) is False
    assert Sandbox.delete_snapshot(snapshot_id, **other) is False
    assert sandbox_id not in [i.sandbox_id for i in Sandbox.list(**other).next_items()]
    assert Sandbox.get_info(sandbox_id).state.value == "running"  # tenant A (E2B_API_KEY) still has it


def test_keys_in_either_form_and_who_may_call(e2b_server: E2BServer) -> None:
    with client(e2b_server, e2b_server.corral_key_a) as a:  # Corral's own key form works on E2B routes
        made = a.post("/v2/sandboxes", json={"templateID": "base", "timeout": 60})
        assert made.status_code == 201, made.text
        sandbox = made.json()
        try:
            assert set(sandbox) >= {"sandboxID", "templateID", "clientID", "envdVersion", "envdAccessToken"}
            assert sandbox["envdAccessToken"] and sandbox["trafficAccessToken"] is None  # public ports
            with client(e2b_server, e2b_server.key_a) as same_tenant:  # ... and is the same tenant
                assert same_tenant.get(f"/sandboxes/{sandbox['sandboxID']}").status_code == 200
                # an E2B-form key works on Corral's own API too
                corral_view = same_tenant.get(f"/v1/sandboxes/{sandbox['sandboxID']}")
                assert corral_view.status_code == 200
                assert corral_view.json()["envd_access_token"] == sandbox["envdAccessToken"]
        finally:
            assert a.delete(f"/sandboxes/{sandbox['sandboxID']}").status_code == 204
    for key, status in ((None, 401), ("e2b_" + "0" * 84, 401), ("e2b_123", 401), ("corral_nope", 401)):
        with client(e2b_server, key) as c:
            answer = c.get("/v2/sandboxes")
            assert answer.status_code == status, answer.text
            assert answer.json()["code"] == status and answer.json()["message"]


def test_bad_input_is_a_400_in_e2bs_shape(e2b_server: E2BServer) -> None:
    with client(e2b_server, e2b_server.key_a) as a:
        cases = [
            a.post("/v2/sandboxes", json={}),  # templateID is required
            a.post("/v2/sandboxes", content=b"{not json", headers={"content-type": "application/json"}),
            a.post("/v2/sandboxes", json={"templateID": "base", "timeout": "long"}),
            a.post("/v2/sandboxes", json={"templateID": "base", "metadata": {"k": 1}}),
            a.post(
                "/v2/sandboxes", json={"templateID": "base", "volumeMounts": [{"name": "v", "path": "/v"}]}
            ),
            a.post(
                "/v2/sandboxes", json={"templateID": "base", "network": {"egressProxy": {"address": "p:1"}}}
            ),
            a.post("/v2/sandboxes", json={"templateID": "base", "network": {"denyOut": ["not a rule!"]}}),
            a.post(  # an exception carved out of a partial denyOut: Corral has no allow-beats-deny rule
                "/v2/sandboxes",
                json={
                    "templateID": "base",
                    "network": {"allowOut": ["198.51.100.7"], "denyOut": ["198.51.100.0/24"]},
                },
            ),
            a.post("/v2/sandboxes", json={"templateID": "base", "timeout": 0}),
            a.get("/v2/sandboxes", params={"state": "sleeping"}),
            a.get("/v2/sandboxes", params={"nextToken": "not-a-token"}),
            a.get("/v2/sandboxes", params={"limit": 0}),
            a.get("/v2/sandboxes", params={"order": "sideways"}),
            a.get("/v2/sandboxes", params={"startedAfter": "yesterday"}),
            a.get("/v2/sandboxes", params={"metadata": "no-equals-sign"}),
        ]
        for answer in cases:
            assert answer.status_code == 400, (answer.request.url, answer.text)
            body = answer.json()
            assert body["code"] == 400 and body["message"] and "Traceback" not in body["message"]
        assert a.get("/v2/sandboxes").json() == []  # and nothing was half-created
