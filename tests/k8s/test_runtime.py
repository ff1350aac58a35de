"""The Kubernetes runtime against the real CRD API server, with the stand-in controller running the Pods."""

from __future__ import annotations

import time

import pytest

from corral.core.agent_client import AgentClient
from corral.ids import SandboxId
from corral.models import ExecParams
from corral.runtimes.base import ObservedState, OciImage, SandboxSpec
from corral.runtimes.kubernetes import KubernetesRuntime
from corral.testing import check_runtime, run_command

from .standin import StandInController

pytestmark = [pytest.mark.anyio, pytest.mark.root, pytest.mark.bwrap]

IMAGE = OciImage(reference="docker.io/library/python:3.12-slim")


async def test_the_kubernetes_runtime_conforms(k8s_runtime: KubernetesRuntime) -> None:
    await check_runtime(lambda: k8s_runtime, rootfs=IMAGE)


async def test_create_exec_destroy(k8s_runtime: KubernetesRuntime, standin: StandInController) -> None:
    spec = SandboxSpec(sandbox_id=SandboxId.new(), rootfs=IMAGE, deadline=time.time() + 300)
    instance = await k8s_runtime.create(spec)
    try:
        assert (await k8s_runtime.inspect(instance)).state is ObservedState.RUNNING
        client = await AgentClient.open(await k8s_runtime.connect(instance), sandbox_id=str(spec.sandbox_id))
        try:
            out, _, done = await run_command(client, ExecParams(cmd="echo hi; id -u"))
            assert done.exit_code == 0
            assert out == b"hi\n1000\n"
        finally:
            await client.aclose()
    finally:
        await k8s_runtime.destroy(instance)
    assert (await k8s_runtime.inspect(instance)).state is ObservedState.MISSING
