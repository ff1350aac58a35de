"""The test API server itself is real: it validates, watches and serves status as Kubernetes does."""

from __future__ import annotations

from .apiserver import CrdApiServer

SANDBOXES = "/apis/agents.x-k8s.io/v1beta1/namespaces/{ns}/sandboxes"


def test_it_serves_the_agent_sandbox_crds_and_rejects_invalid_objects(
    k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    path = SANDBOXES.format(ns=k8s_namespace)
    bad = {"apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox", "metadata": {"name": "x"},
           "spec": {"podTemplate": {"spec": {"containers": []}}, "operatingMode": "Sideways"}}  # fmt: skip
    status, body = k8s_api.request("POST", path, bad)
    assert status == 422, body
    assert "operatingMode" in body["message"]
    good = {**bad, "spec": {**bad["spec"], "operatingMode": "Running"}}
    status, body = k8s_api.request("POST", path, good)
    assert status == 201, body
    status, _ = k8s_api.request("POST", path, good)
    assert status == 409
    status, _ = k8s_api.request("DELETE", f"{path}/x")
    assert status == 200
