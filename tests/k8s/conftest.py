"""Fixtures for the Kubernetes tests: one real CRD API server per session, a fresh namespace per test.

The server's binaries are built by ``scripts/k8s-test-apiserver build`` (scripts/test runs it). When they are
missing the tests skip with that command as the reason; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.client._local import AsyncLocalBackend
from corral.core.records import TemplateRecord
from corral.core.settings import Settings
from corral.images.rootfs import ensure_host_template
from corral.runtimes.base import HostLayers, RuntimeConfig
from corral.runtimes.kubernetes import KubernetesRuntime, KubernetesSettings
from corral.runtimes.namespace import NamespaceRuntime
from corral.wiring import open_service

from .apiserver import CrdApiServer, find_binaries, list_objects
from .standin import StandInController

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def k8s_api() -> Iterator[CrdApiServer]:
    """etcd + apiextensions-apiserver on 127.0.0.1 with the agent-sandbox CRDs installed."""
    bin_dir = find_binaries()
    if bin_dir is None:
        reason = "the test CRD API server is not built: run scripts/k8s-test-apiserver build (~4 min, cached)"
        if IN_CI:
            pytest.fail(f"{reason} [CI=true: a missing test requirement is a failure]", pytrace=False)
        pytest.skip(reason)
    server = CrdApiServer(bin_dir=bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def k8s_namespace(k8s_api: CrdApiServer) -> Iterator[str]:
    """A namespace of this test's own (the server has no Namespace objects: any name is usable), checked
    empty at the end: whatever a test's runtime created must be gone by then."""
    namespace = f"t-{secrets.token_hex(4)}"
    yield namespace
    if k8s_api.procs.get("apiserver") is None:  # a test stopped the server and failed before restarting it
        k8s_api.start_apiserver()
    left = list_objects(k8s_api, namespace)
    assert not left, f"Kubernetes objects left behind in {namespace}: {left}"


@pytest.fixture(scope="session")
def local_runtime_config(corral_data_dir: Path) -> RuntimeConfig:
    return RuntimeConfig(state_root=corral_data_dir / "state", cache_root=corral_data_dir / "cache")


@pytest.fixture(scope="session")
def local_rootfs(local_runtime_config: RuntimeConfig) -> HostLayers:
    return ensure_host_template(local_runtime_config.cache_root)


def k8s_settings(server: CrdApiServer, namespace: str, **overrides: Any) -> KubernetesSettings:
    """Settings for the runtime under test against the test server (its Secrets are the stand-in's)."""
    values: dict[str, Any] = {
        "kubeconfig": str(server.admin.kubeconfig),
        "namespace": namespace,
        "secret_api": "standin.corral.test/v1/Secret/secrets",
        "ready_timeout": 90.0,
    }
    values.update(overrides)
    return KubernetesSettings(**values)


def k8s_config(local: RuntimeConfig, node: str = "k8s-node-a") -> RuntimeConfig:
    """The k8s runtime's config: the same roots (it writes nothing there), its own Corral node id."""
    return RuntimeConfig(state_root=local.state_root, cache_root=local.cache_root, node=node)


@pytest.fixture
async def standin(
    k8s_api: CrdApiServer, k8s_namespace: str, local_runtime_config: RuntimeConfig, local_rootfs: HostLayers
) -> AsyncIterator[StandInController]:
    """The STAND-IN controller + kubelet (tests/k8s/standin.py) for this test's namespace."""
    controller = StandInController(
        kubeconfig=k8s_api.admin.kubeconfig,
        namespace=k8s_namespace,
        runtime=NamespaceRuntime(local_runtime_config),
        rootfs=local_rootfs,
    )
    async with controller.running():
        yield controller


@pytest.fixture
async def k8s_runtime(
    k8s_api: CrdApiServer, k8s_namespace: str, standin: StandInController, local_runtime_config: RuntimeConfig
) -> AsyncIterator[KubernetesRuntime]:
    """The runtime under test, on this test's namespace; its blueprints are pruned at the end."""
    runtime = KubernetesRuntime(k8s_config(local_runtime_config), k8s_settings(k8s_api, k8s_namespace))
    try:
        yield runtime
    finally:
        await runtime.prune()
        await runtime.aclose()
        await standin.settled()


TEMPLATE = "py"  # the SDK tests' template: an image with no steps, which the runtime pulls itself


def sdk_settings(
    server: CrdApiServer,
    namespace: str,
    data_dir: Path,
    node: str,
    *,
    levels: tuple[str, ...] = ("kubernetes",),
    **options: Any,
) -> Settings:
    """A Corral server's settings whose only runtime is kubernetes (serving ``levels``, the first the default),
    on the test server and ``namespace``; ``options``: more of its ``[runtime.kubernetes]`` table."""
    table = {k: v for k, v in k8s_settings(server, namespace).__dict__.items() if v is not None}
    table.update(options)
    return Settings(
        data_dir=data_dir,
        node=node,
        enabled_runtimes=levels,
        default_isolation=levels[0],
        runtime_options={"kubernetes": table},
    )


@contextlib.asynccontextmanager
async def sdk_backend(settings: Settings, standin: StandInController) -> AsyncIterator[AsyncLocalBackend]:
    """The SDK's in-process backend on a Corral service made with ``settings`` (a kubernetes one); its
    blueprints are pruned at the end."""
    service = open_service(settings)
    # a template made from an image with no steps offers that image to a runtime that pulls it itself
    record = TemplateRecord(name=TEMPLATE, kind="image", rootfs="", created_at=time.time(),
                            image="docker.io/library/python:3.12-slim")  # fmt: skip
    await service.store.put_template(record, expect_version=None)
    backend = AsyncLocalBackend(service)
    try:
        yield backend
    finally:
        runtime = service._runtime(settings.default_isolation)
        await backend.aclose()
        await runtime.prune()  # type: ignore[attr-defined]
        await runtime.aclose()  # type: ignore[attr-defined]
        await standin.settled()


@pytest.fixture
async def backend(
    k8s_api: CrdApiServer, k8s_namespace: str, standin: StandInController, tmp_path: Path
) -> AsyncIterator[AsyncLocalBackend]:
    """The SDK's in-process backend on a Corral service whose sandboxes are agent-sandbox claims."""
    async with sdk_backend(
        sdk_settings(k8s_api, k8s_namespace, tmp_path / "a", "server-a"), standin
    ) as backend:
        yield backend
