"""Warm pools, late binding, and a second Corral server reaching sandboxes the first one made."""

from __future__ import annotations

import time

import pytest

from corral.core.agent_client import AgentClient
from corral.ids import SandboxId
from corral.models import ExecParams
from corral.protocol import Op
from corral.runtimes.base import Instance, Limits, ObservedState, RuntimeConfig, SandboxSpec
from corral.runtimes.kubernetes import KubernetesRuntime
from corral.runtimes.registry import load_runtime
from corral.testing import run_command

from .apiserver import CrdApiServer
from .conftest import k8s_config, k8s_settings
from .standin import Sandbox, StandInController
from .test_runtime import IMAGE

pytestmark = [pytest.mark.anyio, pytest.mark.root, pytest.mark.bwrap]


async def _run(runtime: KubernetesRuntime, instance: Instance, cmd: str) -> bytes:
    client = await AgentClient.open(await runtime.connect(instance), sandbox_id=str(instance.sandbox_id))
    try:
        out, _, done = await run_command(client, ExecParams(cmd=cmd))
        assert done.exit_code == 0
        return out
    finally:
        await client.aclose()


async def test_a_warm_claim_takes_a_pool_pod_and_binds_env_late(
    k8s_api: CrdApiServer, k8s_namespace: str, standin: StandInController, local_runtime_config: RuntimeConfig
) -> None:
    settings = {**k8s_settings(k8s_api, k8s_namespace).__dict__, "warm_replicas": 1}
    runtime = load_runtime("kubernetes", k8s_config(local_runtime_config), options=settings)
    assert isinstance(runtime, KubernetesRuntime)
    try:
        blueprint = runtime.blueprint(image=IMAGE.reference, limits=Limits())
        await runtime.ensure_blueprint(blueprint)
        await standin.warm(blueprint.name)
        first = await runtime.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=IMAGE))
        second = None
        try:
            sandbox = await standin.k8s.get(Sandbox, first.extra["sandbox"])
            assert sandbox.metadata.name != first.extra["claim"], "a cold start, though the pool had a Pod"
            client = await AgentClient.open(await runtime.connect(first), sandbox_id=str(first.sandbox_id))
            try:  # late binding, through the agent: the claim carried no env (that would force a cold start)
                await client.call(Op.CONFIGURE, {"env": {"TENANT_TOKEN": "t-123"}})
                out, _, _ = await run_command(client, ExecParams(cmd="echo $TENANT_TOKEN"))
                assert out == b"t-123\n"
            finally:
                await client.aclose()
            second = await runtime.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=IMAGE))
            assert await _run(runtime, second, "echo ${TENANT_TOKEN:-unset}") == b"unset\n"  # nothing shared
        finally:
            await runtime.destroy(first)
            if second is not None:
                await runtime.destroy(second)
    finally:
        await runtime.prune()  # type: ignore[attr-defined]
        await runtime.aclose()  # type: ignore[attr-defined]
        await standin.settled()


async def test_another_server_reaches_and_ends_a_sandbox_it_did_not_make(
    k8s_api: CrdApiServer,
    k8s_namespace: str,
    k8s_runtime: KubernetesRuntime,
    local_runtime_config: RuntimeConfig,
) -> None:
    """A restarted server (or a second replica) has only the persisted Instance: no caches, no connection."""
    made = await k8s_runtime.create(
        SandboxSpec(sandbox_id=SandboxId.new(), rootfs=IMAGE, deadline=time.time() + 300)
    )
    other = KubernetesRuntime(
        k8s_config(local_runtime_config, node="k8s-node-b"), k8s_settings(k8s_api, k8s_namespace)
    )
    try:
        persisted = Instance.from_json(made.to_json())
        assert await _run(other, persisted, "echo from-b") == b"from-b\n"
        assert await _run(k8s_runtime, made, "echo from-a") == b"from-a\n"
        await other.destroy(persisted)
        assert (await k8s_runtime.inspect(made)).state is ObservedState.MISSING
    finally:
        await k8s_runtime.destroy(made)
        await other.aclose()
