"""The agent-sandbox objects the kits ship are accepted by a real Kubernetes API server with the agent-sandbox
CRDs (tests/k8s: apiextensions-apiserver 1.36 + etcd): a server-side dry run (``dryRun=All``) runs the CRDs'
schema and CEL validation and persists nothing. A malformed copy is refused, so the check can fail."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from .apiserver import CrdApiServer

ROOT = Path(__file__).resolve().parents[2]  # the checkout
SHIPPED = sorted((ROOT / "deploy").rglob("verify-sandbox.yaml"))


def _plural(doc: dict[str, Any]) -> str:
    return {
        "Sandbox": "sandboxes",
        "SandboxTemplate": "sandboxtemplates",
        "SandboxWarmPool": "sandboxwarmpools",
        "SandboxClaim": "sandboxclaims",
    }[doc["kind"]]


def dry_run(api: CrdApiServer, doc: dict[str, Any]) -> tuple[int, Any]:
    ns = doc["metadata"].get("namespace", "default")
    path = f"/apis/{doc['apiVersion']}/namespaces/{ns}/{_plural(doc)}?dryRun=All&fieldValidation=Strict"
    return api.request("POST", path, doc)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_shipped_sandbox_objects_pass_a_server_side_dry_run(k8s_api: CrdApiServer, path: Path) -> None:
    assert len(SHIPPED) == 2
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    status, body = dry_run(k8s_api, doc)
    assert status == 201, body
    assert body["spec"]["podTemplate"]["spec"]["runtimeClassName"] == path.parent.name
    # a dry run persists nothing
    ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
    assert k8s_api.get(f"/apis/agents.x-k8s.io/v1beta1/namespaces/{ns}/sandboxes/{name}") is None

    bad = copy.deepcopy(doc)
    bad["spec"]["operatingMode"] = "Hibernating"  # not in the CRD's enum
    bad["spec"]["shutdownTimeTypo"] = "soon"  # unknown under strict field validation
    status, body = dry_run(k8s_api, bad)
    assert status in (400, 422), body
