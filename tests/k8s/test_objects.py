"""What the kubernetes runtime puts in the cluster: restricted Pods, a deny-all policy, no secret in clear."""

from __future__ import annotations

import base64
import json
import time

import pytest

from corral.ids import SandboxId
from corral.protocol import auth
from corral.runtimes import _k8s_objects as objects
from corral.runtimes.base import Limits, SandboxSpec
from corral.runtimes.kubernetes import KubernetesRuntime

from .apiserver import CrdApiServer
from .standin import StandInController
from .test_runtime import IMAGE


def _blueprint(**overrides: object) -> objects.Blueprint:
    values: dict[str, object] = {
        "image": "registry.example/py:1", "runtime_class": "gvisor", "limits": Limits(memory_mb=256, cpus=0.5,
        disk_mb=1024), "agent_image": "registry.example/agent:1", "agent_port": 7070,
        "loader": "ld-linux-x86-64.so.2", "run_as_user": 1000, "read_only_root": True,
    }  # fmt: skip
    values.update(overrides)
    return objects.Blueprint(**values)  # type: ignore[arg-type]


def test_the_pod_is_restricted_and_sized_from_the_limits() -> None:
    pod = objects.pod_template(_blueprint())["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["runtimeClassName"] == "gvisor"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"] + pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    sandbox = pod["containers"][0]
    assert sandbox["securityContext"]["readOnlyRootFilesystem"] is True
    assert sandbox["resources"]["limits"] == {"cpu": "500m", "memory": "256Mi", "ephemeral-storage": "1024Mi"}
    assert sandbox["resources"]["requests"] == sandbox["resources"]["limits"]
    # the Secret volume is mounted in the init container only; the sandbox's code never sees it
    assert "corral-bootstrap" not in {m["name"] for m in sandbox["volumeMounts"]}
    assert {m["name"]: m.get("readOnly", False) for m in sandbox["volumeMounts"]}["corral-agent"] is True


def test_the_network_policy_denies_all_egress_and_admits_only_corral() -> None:
    policy = objects.network_policy(_blueprint(server_pod_labels={"app.kubernetes.io/name": "corral"}))
    assert policy["egress"] == []  # no RFC 1918, no metadata endpoint, no cluster DNS, no internet
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "corral"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 7070}]


def test_equal_blueprints_share_a_name_and_any_difference_makes_another() -> None:
    assert _blueprint().name == _blueprint().name
    assert _blueprint().name != _blueprint(limits=Limits(memory_mb=512)).name
    assert _blueprint().name != _blueprint(runtime_class="kata-fc").name


@pytest.mark.anyio
@pytest.mark.root
@pytest.mark.bwrap
async def test_no_secret_in_clear_in_any_object_but_its_secret(
    k8s_runtime: KubernetesRuntime, standin: StandInController, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    instance = await k8s_runtime.create(
        SandboxSpec(sandbox_id=SandboxId.new(), rootfs=IMAGE, deadline=time.time() + 120)
    )
    try:
        bootstrap = k8s_runtime._secrets[instance.extra["blueprint"]]
        own = auth.derive(bootstrap, instance.extra["salt"])
        forms = [v for s in (bootstrap, own) for v in (s.hex(), base64.b64encode(s).decode())]
        seen = json.dumps([k8s_api.get(f"/apis/{g}/{v}/namespaces/{k8s_namespace}/{p}")
                           for g, v, _, p in (objects.TEMPLATE_API, objects.POOL_API, objects.CLAIM_API,
                                              objects.SANDBOX_API)])  # fmt: skip
        assert not [f for f in forms if f in seen]
        assert own.hex() not in instance.to_json() and bootstrap.hex() not in instance.to_json()
    finally:
        await k8s_runtime.destroy(instance)
