"""Kubernetes API errors become typed Corral errors a person can act on, and leave nothing behind."""

from __future__ import annotations

import time

import anyio
import pytest

from corral.errors import Conflict, RuntimeFailure
from corral.ids import SandboxId
from corral.runtimes import _k8s_objects as objects
from corral.runtimes.base import ObservedState, RuntimeConfig, SandboxSpec
from corral.runtimes.kubernetes import KubernetesRuntime

from .apiserver import CrdApiServer
from .conftest import k8s_config, k8s_settings
from .standin import Claim, Sandbox, StandInController
from .test_runtime import IMAGE

pytestmark = [pytest.mark.anyio]
CLAIMS = "/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/{ns}/sandboxclaims"


def _spec() -> SandboxSpec:
    return SandboxSpec(sandbox_id=SandboxId.new(), rootfs=IMAGE, deadline=time.time() + 120)


async def test_a_schema_error_names_the_field_and_leaves_nothing(
    k8s_api: CrdApiServer, k8s_namespace: str, local_runtime_config: RuntimeConfig
) -> None:
    settings = k8s_settings(k8s_api, k8s_namespace, warm_replicas=-1)  # the pool's schema says minimum 0
    runtime = KubernetesRuntime(k8s_config(local_runtime_config), settings)
    try:
        with pytest.raises(RuntimeFailure, match=r"rejected the SandboxWarmPool .*spec\.replicas") as err:
            await runtime.create(_spec())
        assert err.value.details["kubernetes"]["status"] == 422
        assert "[runtime.kubernetes]" in err.value.message
    finally:
        await runtime.aclose()
    # the template and Secret made before the pool failed are gone again (k8s_namespace checks it)


async def test_a_name_taken_by_someone_else_is_a_conflict_and_their_object_stays(
    k8s_api: CrdApiServer, k8s_namespace: str, k8s_runtime: KubernetesRuntime
) -> None:
    spec = _spec()
    theirs = {"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim",
              "metadata": {"name": str(spec.sandbox_id)}, "spec": {"warmPoolRef": {"name": "theirs"}}}  # fmt: skip
    path = CLAIMS.format(ns=k8s_namespace)
    assert k8s_api.request("POST", path, theirs)[0] == 201
    try:
        with pytest.raises(Conflict, match="already exists") as err:
            await k8s_runtime.create(spec)
        assert err.value.details["kubernetes"]["status"] == 409
        assert k8s_api.get(f"{path}/{spec.sandbox_id}")["spec"]["warmPoolRef"]["name"] == "theirs"
    finally:
        k8s_api.request("DELETE", f"{path}/{spec.sandbox_id}")


async def test_a_refusal_says_which_verb_to_grant(
    k8s_api: CrdApiServer, k8s_namespace: str, local_runtime_config: RuntimeConfig
) -> None:
    """An identity the cluster's authorizer refuses (a SubjectAccessReview answered no) gets a 403."""
    outsider = k8s_api.identity("outsider", groups=("corral-without-rbac",))
    k8s_api.deny("outsider")
    settings = k8s_settings(k8s_api, k8s_namespace, kubeconfig=str(outsider.kubeconfig))
    runtime = KubernetesRuntime(k8s_config(local_runtime_config), settings)
    try:
        with pytest.raises(
            RuntimeFailure, match=r"may not create sandboxtemplates\.extensions\.agents\.x-k8s\.io"
        ) as err:
            await runtime.create(_spec())
        assert err.value.details["kubernetes"]["status"] == 403
        assert "Grant its ServiceAccount" in err.value.message
    finally:
        await runtime.aclose()


async def test_a_wait_survives_the_api_server_restarting_mid_watch(
    k8s_api: CrdApiServer, k8s_namespace: str, local_runtime_config: RuntimeConfig
) -> None:
    runtime = KubernetesRuntime(k8s_config(local_runtime_config), k8s_settings(k8s_api, k8s_namespace))
    api = runtime.api()
    claim = {"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim",
             "metadata": {"name": "waited"}, "spec": {"warmPoolRef": {"name": "p"}}}  # fmt: skip
    await api.create(objects.CLAIM_API, claim)
    seen = anyio.Event()

    def ready(obj: dict) -> str | None:  # type: ignore[type-arg]
        seen.set()
        return (obj.get("status") or {}).get("sandbox", {}).get("name")

    result: list[str] = []
    try:
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                result.append(
                    await api.wait_for(objects.CLAIM_API, "waited", ready, timeout=60, what="a test")
                )

            tg.start_soon(wait)
            await seen.wait()
            await anyio.to_thread.run_sync(k8s_api.stop_apiserver)
            await anyio.to_thread.run_sync(k8s_api.start_apiserver)
            await api.client.patch(Claim.Status, "waited", {"status": {"sandbox": {"name": "bound"}}},
                                   patch_type=__import__("lightkube.types").types.PatchType.MERGE)  # fmt: skip
        assert result == ["bound"]
    finally:
        await api.delete(objects.CLAIM_API, "waited")
        await runtime.aclose()


async def test_an_api_server_that_is_gone_is_a_runtime_failure_naming_it(
    k8s_api: CrdApiServer, k8s_namespace: str, local_runtime_config: RuntimeConfig
) -> None:
    settings = k8s_settings(k8s_api, k8s_namespace)
    runtime = KubernetesRuntime(k8s_config(local_runtime_config), settings)
    await anyio.to_thread.run_sync(k8s_api.stop_apiserver)
    try:
        with pytest.raises(RuntimeFailure, match="API server is unreachable"):
            await runtime.create(_spec())
    finally:
        await anyio.to_thread.run_sync(k8s_api.start_apiserver)
        await runtime.aclose()


@pytest.mark.root
@pytest.mark.bwrap
async def test_a_sandbox_deleted_behind_corrals_back_is_missing(
    k8s_runtime: KubernetesRuntime, standin: StandInController
) -> None:
    instance = await k8s_runtime.create(_spec())
    try:
        await standin.k8s.delete(Sandbox, instance.extra["sandbox"])
        observed = await k8s_runtime.inspect(instance)
        assert observed.state is ObservedState.MISSING and observed.reason == "missing"
    finally:
        await k8s_runtime.destroy(instance)


@pytest.mark.root
@pytest.mark.bwrap
async def test_a_claim_deleted_behind_corrals_back_is_missing_not_expired(
    k8s_runtime: KubernetesRuntime, standin: StandInController
) -> None:
    instance = await k8s_runtime.create(_spec())
    try:
        await standin.k8s.delete(Claim, instance.extra["claim"])  # held by Corral's finalizer until destroy
        observed = await k8s_runtime.inspect(instance)
        assert observed.state is ObservedState.MISSING and observed.reason == "missing"
    finally:
        await k8s_runtime.destroy(instance)


@pytest.mark.root
@pytest.mark.bwrap
async def test_a_pod_whose_agent_exits_at_start_fails_the_create_with_what_it_said(
    k8s_runtime: KubernetesRuntime, standin: StandInController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container ends before it listens (here: an agent told to listen on a port it cannot have): the
    claim's PodFailed ends Corral's wait at once, with the container's own words, and nothing stays."""
    real = objects.agent_command

    def unusable_port(bp: objects.Blueprint) -> list[str]:
        command = real(bp)
        command[command.index("--listen") + 1] = "tcp:0.0.0.0:70000"
        return command

    monkeypatch.setattr(objects, "agent_command", unusable_port)
    with pytest.raises(RuntimeFailure, match="PodFailed") as err:  # not the Timeout of a wait run out
        await k8s_runtime.create(_spec())
    assert "port must be 0-65535" in err.value.message, err.value.message
