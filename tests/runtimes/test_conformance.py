"""Every real runtime passes the same conformance suite (corral.testing.check_runtime)."""

from __future__ import annotations

import pytest

from corral.runtimes.base import HostLayers, RuntimeConfig
from corral.runtimes.fake import FakeRuntime
from corral.runtimes.gvisor import GVisorRuntime
from corral.runtimes.namespace import NamespaceRuntime
from corral.testing import check_runtime

pytestmark = pytest.mark.anyio


@pytest.mark.root
@pytest.mark.bwrap
async def test_namespace_conforms(runtime_config: RuntimeConfig, host_rootfs: HostLayers) -> None:
    await check_runtime(lambda: NamespaceRuntime(runtime_config), rootfs=host_rootfs)


@pytest.mark.root
@pytest.mark.runsc
async def test_gvisor_conforms(runtime_config: RuntimeConfig, host_rootfs: HostLayers) -> None:
    await check_runtime(lambda: GVisorRuntime(runtime_config), rootfs=host_rootfs)


async def test_the_suite_fails_a_runtime_without_isolation(
    runtime_config: RuntimeConfig, host_rootfs: HostLayers
) -> None:
    """check_runtime can fail: the fake runtime runs on the host's network, and the suite says so."""
    with pytest.raises(AssertionError, match="a sandbox without network has interfaces"):
        await check_runtime(lambda: FakeRuntime(runtime_config), rootfs=host_rootfs)
    assert not list(runtime_config.state_root.glob("sb-*/exit.json"))  # and it still cleaned up after itself


async def test_the_fake_runtime_passes_everything_but_isolation(
    runtime_config: RuntimeConfig, host_rootfs: HostLayers
) -> None:
    """Its shim, deadline, re-attach and cleanup are the local skeleton's, like the real runtimes'."""
    await check_runtime(lambda: FakeRuntime(runtime_config), rootfs=host_rootfs, isolated=False)
