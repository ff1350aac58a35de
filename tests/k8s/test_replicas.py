"""Two Corral servers (replicas) on one PostgreSQL store, both on the kubernetes runtime (issue 11).

Unlike local runtimes, a Pod is reachable from any replica (``node_local=False``): each replica serves every
sandbox of the store, and each reconciles only what it created, so neither marks the other's sandboxes
crashed, and a kill from the other replica ends the Pod and the record alike.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.client._async.sandbox import AsyncSandbox
from corral.client._local import AsyncLocalBackend
from corral.core.records import TemplateRecord
from corral.core.service import SandboxService
from corral.models import SandboxState, StopReason
from corral.wiring import open_service

from .apiserver import CrdApiServer, list_objects
from .conftest import TEMPLATE
from .conftest import sdk_settings as k8s_sdk_settings
from .standin import StandInController

pytestmark = [pytest.mark.anyio, pytest.mark.root, pytest.mark.bwrap, pytest.mark.postgres]


@pytest.fixture
async def replicas(
    k8s_api: CrdApiServer,
    k8s_namespace: str,
    standin: StandInController,
    tmp_path: Path,
    postgres_url: str,
) -> AsyncIterator[tuple[AsyncLocalBackend, AsyncLocalBackend]]:
    services: list[SandboxService] = [
        open_service(
            dataclasses.replace(
                k8s_sdk_settings(k8s_api, k8s_namespace, tmp_path / name, f"replica-{name}"),
                database_url=postgres_url,
            )
        )
        for name in ("a", "b")
    ]
    record = TemplateRecord(name=TEMPLATE, kind="image", rootfs="", created_at=time.time(),
                            image="docker.io/library/python:3.12-slim")  # fmt: skip
    await services[0].store.put_template(record, expect_version=None)  # one store: both see it
    backends = [AsyncLocalBackend(s) for s in services]
    try:
        yield backends[0], backends[1]
    finally:
        for service, backend in zip(services, backends, strict=True):
            runtime = service._runtime("kubernetes")
            await backend.aclose()
            await runtime.prune()  # type: ignore[attr-defined]
            await runtime.aclose()  # type: ignore[attr-defined]
        await standin.settled()


async def test_each_replica_serves_every_sandbox_and_reconciles_its_own(
    replicas: tuple[AsyncLocalBackend, AsyncLocalBackend], k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    a, b = replicas
    made_by_a = await AsyncSandbox.create(TEMPLATE, isolation="kubernetes", backend=a)
    made_by_b = await AsyncSandbox.create(TEMPLATE, isolation="kubernetes", backend=b)
    try:
        for backend in (a, b):  # a reconcile pass on each replica leaves the other's sandbox alone
            await backend.service.reap()
        for sbx in (made_by_a, made_by_b):
            for backend in (a, b):
                seen = await AsyncSandbox.connect(sbx.sandbox_id, backend=backend)
                assert (await seen.get_info()).state is SandboxState.RUNNING
                out = await seen.commands.run("echo $((6 * 7))")
                assert out.stdout == "42\n", out
        await (await AsyncSandbox.connect(made_by_a.sandbox_id, backend=b)).kill()  # b ends a's sandbox
        info = await made_by_a.get_info()  # a's own replica sees it ended, and why
        assert (info.state, info.stop_reason) == (SandboxState.STOPPED, StopReason.KILLED)
        await a.service.reap()
        assert (await made_by_b.get_info()).state is SandboxState.RUNNING
    finally:
        await made_by_a.kill()
        await made_by_b.kill()
    left = [o for o in list_objects(k8s_api, k8s_namespace) if o.startswith(("SandboxClaim/", "Sandbox/"))]
    assert not left, left
