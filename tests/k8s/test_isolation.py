"""Isolation levels in a cluster: ``[runtime.kubernetes] serves`` makes "gvisor" and "kata-fc" Pods with those
RuntimeClasses, so code that asks for ``isolation="kata-fc"`` runs unchanged against a Corral on Kubernetes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.client._async.pools import AsyncPools
from corral.client._async.sandbox import AsyncSandbox
from corral.client._local import AsyncLocalBackend
from corral.errors import InvalidRequest
from corral.runtimes import _k8s_objects as objects

from .apiserver import CrdApiServer, list_objects
from .conftest import TEMPLATE, sdk_backend, sdk_settings
from .standin import StandInController

pytestmark = [pytest.mark.anyio, pytest.mark.root, pytest.mark.bwrap]
# a RuntimeClass per level, named apart from the level so the test sees which one each Pod got
CLASSES = {"gvisor": "rc-gvisor", "kata-fc": "rc-kata-fc"}


@pytest.fixture
async def backend(
    k8s_api: CrdApiServer, k8s_namespace: str, standin: StandInController, tmp_path: Path
) -> AsyncIterator[AsyncLocalBackend]:
    levels = ("gvisor", "kata-fc")  # the first is the server's default
    settings = sdk_settings(k8s_api, k8s_namespace, tmp_path, "server-a", levels=levels,
                            runtime_classes=CLASSES, serves=list(levels))  # fmt: skip
    async with sdk_backend(settings, standin) as backend:
        yield backend


def _runtime_class_of(k8s_api: CrdApiServer, namespace: str, sandbox_id: str) -> Any:
    """The RuntimeClass of the template the sandbox's claim was made from, as stored in the API server."""

    def path(api: tuple[str, str, str, str], name: str) -> str:
        return f"/apis/{api[0]}/{api[1]}/namespaces/{namespace}/{api[3]}/{name}"

    claim = k8s_api.get(path(objects.CLAIM_API, sandbox_id))
    template = k8s_api.get(path(objects.TEMPLATE_API, claim["spec"]["warmPoolRef"]["name"]))
    return template["spec"]["podTemplate"]["spec"].get("runtimeClassName")


async def test_each_level_is_a_pod_with_its_runtime_class(
    backend: AsyncLocalBackend, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    kata = await AsyncSandbox.create(TEMPLATE, isolation="kata-fc", backend=backend)
    try:
        default = await AsyncSandbox.create(TEMPLATE, backend=backend)  # the server's default level: gvisor
        try:
            assert _runtime_class_of(k8s_api, k8s_namespace, kata.sandbox_id) == "rc-kata-fc"
            assert _runtime_class_of(k8s_api, k8s_namespace, default.sandbox_id) == "rc-gvisor"
            assert (await kata.get_info()).isolation == "kata-fc"
            assert (await default.get_info()).isolation == "gvisor"
            assert (await kata.commands.run("echo in the cluster")).stdout == "in the cluster\n"
        finally:
            await default.kill()
    finally:
        await kata.kill()


async def test_a_pool_of_a_served_level_hands_out_pods_of_that_class(
    backend: AsyncLocalBackend, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    pools = AsyncPools(backend)
    await pools.set(TEMPLATE, 1, isolation="kata-fc")
    try:
        async for _ in pools.fill(TEMPLATE, isolation="kata-fc"):
            pass
        sbx = await AsyncSandbox.create(TEMPLATE, isolation="kata-fc", backend=backend)
        try:
            assert (await sbx.get_info()).from_pool
            assert _runtime_class_of(k8s_api, k8s_namespace, sbx.sandbox_id) == "rc-kata-fc"
        finally:
            await sbx.kill()
    finally:
        await pools.delete(TEMPLATE, isolation="kata-fc")


async def test_a_level_this_server_does_not_serve_is_refused_with_the_choices(
    backend: AsyncLocalBackend, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    before = list_objects(k8s_api, k8s_namespace)
    for level in ("microvm", "kubernetes", "namespace"):
        with pytest.raises(
            InvalidRequest, match=rf"unknown isolation '{level}'; choose one of: gvisor, kata-fc$"
        ):
            await AsyncSandbox.create(TEMPLATE, isolation=level, backend=backend)
    assert list_objects(k8s_api, k8s_namespace) == before  # nothing made in the cluster
