"""Per-sandbox egress on the kubernetes runtime: each sandbox with network gets a NetworkPolicy of its own.

Against the real CRD API server, where NetworkPolicy is the stand-in CRD of ``apiserver.py`` (same group,
version and path as the built-in API; stored and validated, enforced by nothing: there is no CNI here). What
these tests show is what Corral writes and when it removes it; what the policy then allows is checked,
against the local egress stack's own decisions, by ``tests/unit/test_k8s_netpol.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from corral.client._async.sandbox import AsyncSandbox
from corral.client._local import AsyncLocalBackend
from corral.errors import RuntimeFailure, Unsupported
from corral.ids import SandboxId
from corral.netpolicy import NetworkPolicy
from corral.runtimes import _k8s_objects as objects
from corral.runtimes._k8s_netpol import NETPOL_API
from corral.runtimes.base import OciImage, RuntimeConfig, SandboxSpec
from corral.runtimes.kubernetes import KubernetesRuntime

from .apiserver import CrdApiServer, list_objects
from .conftest import TEMPLATE, k8s_config, k8s_settings
from .standin import StandInController

pytestmark = [pytest.mark.anyio, pytest.mark.root, pytest.mark.bwrap]

IMAGE = OciImage(reference="docker.io/library/python:3.12-slim")
ADDRESSES = {"allow_out": ["203.0.113.0/24:443", "198.51.100.0/24"], "deny_out": ["198.51.100.128/25"]}


def _path(namespace: str, plural: str, name: str, group: str = "networking.k8s.io/v1") -> str:
    return f"/apis/{group}/namespaces/{namespace}/{plural}/{name}"


def netpol(server: CrdApiServer, namespace: str, name: str) -> dict[str, Any] | None:
    """The NetworkPolicy ``name`` as the API server has it (read with the admin's credentials)."""
    found: dict[str, Any] | None = server.get(_path(namespace, "networkpolicies", name))
    return found


def claim(server: CrdApiServer, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] | None = server.get(
        _path(namespace, "sandboxclaims", name, group="extensions.agents.x-k8s.io/v1beta1")
    )
    assert found is not None, f"no SandboxClaim {name}"
    return found


def policies(server: CrdApiServer, namespace: str) -> list[str]:
    return [o for o in list_objects(server, namespace) if o.startswith("NetworkPolicy/")]


def spec(network: object) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=SandboxId.new(),
        rootfs=IMAGE,
        deadline=time.time() + 300,
        network=NetworkPolicy.parse(network),
    )


async def test_none_makes_no_network_policy_and_the_pod_is_labelled(
    k8s_runtime: KubernetesRuntime, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    s = spec("none")
    instance = await k8s_runtime.create(s)
    try:
        name = str(s.sandbox_id)
        assert policies(k8s_api, k8s_namespace) == []  # the template's deny-all holds
        # the label the sandbox's NetworkPolicy would select (here or after an update) is asked for
        assert claim(k8s_api, k8s_namespace, name)["spec"]["additionalPodMetadata"] == {
            "labels": {objects.LABEL_SANDBOX: name}
        }
    finally:
        await k8s_runtime.destroy(instance)


@pytest.mark.parametrize("network", ["internet", ADDRESSES], ids=["internet", "addresses"])
async def test_a_policy_is_a_network_policy_owned_by_the_claim(
    k8s_runtime: KubernetesRuntime, k8s_api: CrdApiServer, k8s_namespace: str, network: object
) -> None:
    s = spec(network)
    instance = await k8s_runtime.create(s)
    name = str(s.sandbox_id)
    try:
        pol = netpol(k8s_api, k8s_namespace, name)
        assert pol is not None
        owner = claim(k8s_api, k8s_namespace, name)
        assert pol["metadata"]["ownerReferences"] == [
            {"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim", "name": name,
             "uid": owner["metadata"]["uid"], "blockOwnerDeletion": False}
        ]  # fmt: skip
        assert pol["metadata"]["labels"][objects.LABEL_MANAGED] == "corral"
        assert pol["metadata"]["labels"][objects.LABEL_SANDBOX] == name
        assert pol["spec"]["podSelector"] == {"matchLabels": {objects.LABEL_SANDBOX: name}}
        assert owner["spec"]["additionalPodMetadata"]["labels"] == {objects.LABEL_SANDBOX: name}
        assert pol["spec"]["policyTypes"] == ["Egress"]
        # exactly what the runtime computes for this policy (the rules themselves: tests/unit/test_k8s_netpol.py)
        want = k8s_runtime.egress_manifest(name, instance.extra["blueprint"], s.network, owner=None)
        assert pol["spec"] == want["spec"]
        egress = pol["spec"]["egress"]
        dns = [r for r in egress if any("podSelector" in p for p in r["to"])]
        if network == "internet":  # cluster DNS only where names resolve locally too
            assert dns and dns[0]["ports"] == [
                {"protocol": "UDP", "port": 53},
                {"protocol": "TCP", "port": 53},
            ]
        else:
            assert not dns
            assert {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
                    "ports": [{"protocol": "TCP", "port": 443}]} in egress  # fmt: skip
    finally:
        await k8s_runtime.destroy(instance)
    assert netpol(k8s_api, k8s_namespace, name) is None


async def test_host_names_are_refused_before_anything_is_made(
    backend: AsyncLocalBackend, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    for network in ({"allow_out": ["pypi.org"]}, {"allow_out": ["203.0.113.0/24", "*.github.com:443"]}):
        with pytest.raises(Unsupported, match="by address only") as err:
            await AsyncSandbox.create(TEMPLATE, isolation="kubernetes", network=network, backend=backend)
        assert "CIDR" in str(err.value)
    assert list_objects(k8s_api, k8s_namespace) == []  # no claim, blueprint, Secret or NetworkPolicy
    assert await AsyncSandbox.list(include_stopped=True, backend=backend) == []  # and no record


async def test_secrets_are_refused_as_there_is_no_egress_proxy_to_put_them_in(
    backend: AsyncLocalBackend, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    """Under "internet" a secret bound to a host passes the policy check; with no proxy to substitute it, the
    sandbox would send its placeholder: refused instead, before anything is made."""
    secrets = {"API_KEY": {"value": "sk-test", "hosts": ["api.example.com"]}}
    with pytest.raises(Unsupported, match="cannot have secrets"):
        await AsyncSandbox.create(
            TEMPLATE, isolation="kubernetes", network="internet", secrets=secrets, backend=backend
        )
    assert list_objects(k8s_api, k8s_namespace) == []
    assert await AsyncSandbox.list(include_stopped=True, backend=backend) == []


async def test_the_runtime_refuses_host_names_itself(
    k8s_runtime: KubernetesRuntime, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    """Not only the service: a caller of the runtime alone cannot get a policy that silently drops a rule."""
    with pytest.raises(Unsupported, match="matches addresses, not names"):
        await k8s_runtime.create(spec({"allow_out": ["pypi.org:443"]}))
    assert list_objects(k8s_api, k8s_namespace) == []


async def test_update_network_makes_replaces_and_deletes_it(
    backend: AsyncLocalBackend, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    sbx = await AsyncSandbox.create(TEMPLATE, isolation="kubernetes", network="none", backend=backend)
    name = sbx.sandbox_id
    try:
        assert netpol(k8s_api, k8s_namespace, name) is None
        await sbx.network.update(allow_out=["203.0.113.0/24:443"])  # from none: made, owned by the claim
        made = netpol(k8s_api, k8s_namespace, name)
        assert made is not None
        assert (
            made["metadata"]["ownerReferences"][0]["uid"]
            == claim(k8s_api, k8s_namespace, name)["metadata"]["uid"]
        )
        assert made["spec"]["egress"] == [
            {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"protocol": "TCP", "port": 443}]}
        ]
        await sbx.network.update(allow_out=["198.51.100.0/24"])  # replaced in place, not added to
        replaced = netpol(k8s_api, k8s_namespace, name)
        assert replaced is not None and replaced["metadata"]["uid"] == made["metadata"]["uid"]
        assert replaced["spec"]["egress"] == [
            {"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"protocol": "TCP"}]}
        ]
        assert sbx.network.policy == NetworkPolicy.parse({"allow_out": ["198.51.100.0/24"]})
        # a name rule is refused, and what was enforced stays as it was
        with pytest.raises(Unsupported, match="by address only"):
            await sbx.network.update(allow_out=["198.51.100.0/24", "pypi.org"])
        kept = netpol(k8s_api, k8s_namespace, name)
        assert kept is not None and kept["spec"] == replaced["spec"]
        assert (await sbx.get_info()).network_policy == NetworkPolicy.parse(
            {"allow_out": ["198.51.100.0/24"]}
        )
        status = await sbx.network.status()  # no counts (the CNI keeps them), but no error either
        assert status.connections == 0 and status.decisions == []
        await sbx.network.update("none")  # back to the template's deny-all
        assert netpol(k8s_api, k8s_namespace, name) is None
        await sbx.network.update("internet")
        assert netpol(k8s_api, k8s_namespace, name) is not None
        assert (await sbx.commands.run("echo up")).stdout == "up\n"  # the sandbox itself is untouched
    finally:
        await sbx.kill()
    assert policies(k8s_api, k8s_namespace) == []  # kill deletes it (no garbage collector here)


async def test_kill_deletes_it(backend: AsyncLocalBackend, k8s_api: CrdApiServer, k8s_namespace: str) -> None:
    sbx = await AsyncSandbox.create(TEMPLATE, isolation="kubernetes", network=ADDRESSES, backend=backend)
    try:
        assert policies(k8s_api, k8s_namespace) == [f"NetworkPolicy/{sbx.sandbox_id}"]
        assert (await sbx.get_info()).network_policy == NetworkPolicy.parse(ADDRESSES)
    finally:
        await sbx.kill()
    assert policies(k8s_api, k8s_namespace) == []


async def test_prune_deletes_orphans_only(
    k8s_runtime: KubernetesRuntime, k8s_api: CrdApiServer, k8s_namespace: str, standin: StandInController
) -> None:
    s = spec("internet")
    instance = await k8s_runtime.create(s)
    try:
        # a NetworkPolicy whose claim went without it (a server that died between the two deletes)
        orphan = k8s_runtime.egress_manifest("sb-gone", instance.extra["blueprint"], s.network, owner=None)
        await k8s_runtime.api().create(NETPOL_API, orphan)
        # and one that is not Corral's, which prune must leave alone
        theirs = {
            **orphan,
            "metadata": {"name": "theirs", "namespace": k8s_namespace, "labels": {"team": "x"}},
        }
        await k8s_runtime.api().create(NETPOL_API, theirs)
        assert sorted(policies(k8s_api, k8s_namespace)) == sorted(
            [f"NetworkPolicy/{s.sandbox_id}", "NetworkPolicy/sb-gone", "NetworkPolicy/theirs"]
        )
        await k8s_runtime.prune()
        assert sorted(policies(k8s_api, k8s_namespace)) == sorted(
            [f"NetworkPolicy/{s.sandbox_id}", "NetworkPolicy/theirs"]
        )
        await k8s_runtime.api().delete(NETPOL_API, "theirs")
    finally:
        await k8s_runtime.destroy(instance)


# --- the shipped Role allows what the runtime does ---------------------------------------------------------
ROLE = Path(__file__).resolve().parents[2] / "deploy" / "kustomize" / "base" / "rbac.yaml"


def shipped_rules() -> list[dict[str, Any]]:
    """deploy/'s Role rules, its core Secrets also granted on the tests' stand-in Secrets group."""
    (role,) = [d for d in yaml.safe_load_all(ROLE.read_text()) if d and d["kind"] == "Role"]
    rules: list[dict[str, Any]] = role["rules"]
    stand_in = [{**r, "apiGroups": ["standin.corral.test"], "resources": ["secrets"]}
                for r in rules if r["apiGroups"] == [""] and "secrets" in r["resources"]]  # fmt: skip
    assert stand_in
    return rules + stand_in


def runtime_as(
    k8s_api: CrdApiServer, namespace: str, local: RuntimeConfig, user: str, rules: list[dict[str, Any]]
) -> KubernetesRuntime:
    identity = k8s_api.identity(user, groups=("corral-servers",))
    k8s_api.bind_role(user, namespace, rules)
    settings = k8s_settings(k8s_api, namespace, kubeconfig=str(identity.kubeconfig))
    return KubernetesRuntime(k8s_config(local), settings)


async def test_the_shipped_role_allows_every_network_call(
    k8s_api: CrdApiServer, k8s_namespace: str, standin: StandInController, local_runtime_config: RuntimeConfig
) -> None:
    runtime = runtime_as(
        k8s_api, k8s_namespace, local_runtime_config, f"rbac-{k8s_namespace}", shipped_rules()
    )
    try:
        await runtime.check()
        s = spec(ADDRESSES)
        instance = await runtime.create(s)
        try:
            await runtime.update_network(instance, NetworkPolicy.parse("internet"))  # patch
            await runtime.update_network(instance, NetworkPolicy.parse("none"))  # delete
            await runtime.update_network(instance, NetworkPolicy.parse(ADDRESSES))  # get the claim, create
            assert policies(k8s_api, k8s_namespace) == [f"NetworkPolicy/{s.sandbox_id}"]
        finally:
            await runtime.destroy(instance)
        assert policies(k8s_api, k8s_namespace) == []
    finally:
        await runtime.prune()  # lists NetworkPolicies too
        await runtime.aclose()
        await standin.settled()


async def test_a_role_without_networkpolicies_is_refused_at_check_saying_so(
    k8s_api: CrdApiServer, k8s_namespace: str, local_runtime_config: RuntimeConfig
) -> None:
    """The test above can fail: the same Role less its networking rule is refused, naming the resource."""
    rules = [r for r in shipped_rules() if r["apiGroups"] != ["networking.k8s.io"]]
    runtime = runtime_as(k8s_api, k8s_namespace, local_runtime_config, f"norbac-{k8s_namespace}", rules)
    try:
        with pytest.raises(RuntimeFailure, match=r"may not list networkpolicies\.networking\.k8s\.io"):
            await runtime.check()
    finally:
        await runtime.aclose()
    assert list_objects(k8s_api, k8s_namespace) == []


async def test_concurrent_updates_from_none_end_with_one_policy_and_no_error(
    k8s_runtime: KubernetesRuntime, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    """Two updates at once from ``none`` both find no policy to patch and both create: one loses the race
    (409) and patches instead, so neither fails and the one NetworkPolicy holds one of the two policies."""
    s = spec("none")
    instance = await k8s_runtime.create(s)
    name = str(s.sandbox_id)
    try:
        for _ in range(3):  # a race: a few rounds so the create/create interleaving is met, not just luck
            wanted = [NetworkPolicy.parse("internet"), NetworkPolicy.parse(ADDRESSES)]
            async with anyio.create_task_group() as tg:
                for policy in wanted:
                    tg.start_soon(k8s_runtime.update_network, instance, policy)
            pol = netpol(k8s_api, k8s_namespace, name)
            assert pol is not None and policies(k8s_api, k8s_namespace) == [f"NetworkPolicy/{name}"]
            specs = [
                k8s_runtime.egress_manifest(name, instance.extra["blueprint"], p, owner=None) for p in wanted
            ]
            assert pol["spec"] in [m["spec"] for m in specs]
            await k8s_runtime.update_network(instance, NetworkPolicy.parse("none"))
            assert netpol(k8s_api, k8s_namespace, name) is None
    finally:
        await k8s_runtime.destroy(instance)
