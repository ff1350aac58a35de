"""The SDK end to end on a Corral whose sandboxes are agent-sandbox Pods (the stand-in runs them here)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from corral.client._async.pools import AsyncPools
from corral.client._async.sandbox import AsyncSandbox
from corral.client._local import AsyncLocalBackend
from corral.errors import Unsupported
from corral.models import SandboxState, StopReason
from corral.wiring import open_service

from .apiserver import CrdApiServer, list_objects
from .conftest import TEMPLATE, sdk_settings
from .standin import Claim, Sandbox, StandInController

pytestmark = [pytest.mark.anyio, pytest.mark.root, pytest.mark.bwrap]


async def test_create_exec_files_kill(
    backend: AsyncLocalBackend, k8s_api: CrdApiServer, k8s_namespace: str
) -> None:
    sbx = await AsyncSandbox.create(
        TEMPLATE, isolation="kubernetes", envs={"GREETING": "hello"}, files={"/tmp/in.txt": b"from the sdk"},
        backend=backend,
    )  # fmt: skip
    try:
        result = await sbx.commands.run("echo $GREETING; cat /tmp/in.txt")
        assert result.stdout == "hello\nfrom the sdk"
        await sbx.files.write("/tmp/out.bin", bytes(range(256)))
        assert await sbx.files.read("/tmp/out.bin") == bytes(range(256))
        assert any(o.startswith("SandboxClaim/") for o in list_objects(k8s_api, k8s_namespace))
    finally:
        await sbx.kill()
    assert not [
        o for o in list_objects(k8s_api, k8s_namespace) if o.startswith(("SandboxClaim/", "Sandbox/"))
    ]


async def test_the_deadline_ends_it_in_the_cluster(backend: AsyncLocalBackend) -> None:
    sbx = await AsyncSandbox.create(TEMPLATE, isolation="kubernetes", timeout=3, backend=backend)
    try:
        with anyio.fail_after(30):
            while (info := await sbx.get_info()).state is not SandboxState.STOPPED:  # noqa: ASYNC110
                await anyio.sleep(0.5)  # the cluster's clock runs out; nothing tells us, so look (bounded)
        assert info.stop_reason is StopReason.TIMEOUT
    finally:
        await sbx.kill()


async def test_a_restarted_server_reconnects(
    backend: AsyncLocalBackend, k8s_api: CrdApiServer, k8s_namespace: str, tmp_path: Path
) -> None:
    sbx = await AsyncSandbox.create(TEMPLATE, isolation="kubernetes", backend=backend)
    try:
        await sbx.commands.run("echo kept > /tmp/state")
        restarted = AsyncLocalBackend(
            open_service(sdk_settings(k8s_api, k8s_namespace, tmp_path / "a", "server-a"))
        )
        try:
            again = await AsyncSandbox.connect(sbx.sandbox_id, backend=restarted)
            assert (await again.commands.run("cat /tmp/state")).stdout == "kept\n"
        finally:
            await restarted.aclose()
    finally:
        await sbx.kill()


async def test_a_pod_deleted_behind_corrals_back_is_stopped_missing(
    backend: AsyncLocalBackend, standin: StandInController
) -> None:
    sbx = await AsyncSandbox.create(TEMPLATE, isolation="kubernetes", backend=backend)
    try:
        claim = await standin.k8s.get(Claim, sbx.sandbox_id)
        await standin.k8s.delete(Sandbox, claim.status["sandbox"]["name"])  # an operator's kubectl delete
        info = await sbx.get_info()
        assert info.state is SandboxState.STOPPED and info.stop_reason is StopReason.MISSING
    finally:
        await sbx.kill()


async def test_a_corral_pool_serves_claims_with_late_bound_env_and_files(backend: AsyncLocalBackend) -> None:
    pools = AsyncPools(backend)
    await pools.set(TEMPLATE, 1, isolation="kubernetes")
    async for _ in pools.fill(TEMPLATE, isolation="kubernetes"):
        pass
    sbx = await AsyncSandbox.create(
        TEMPLATE, isolation="kubernetes", envs={"WHO": "tenant-a"}, files={"/tmp/who": b"a"}, backend=backend
    )
    try:
        assert (await sbx.get_info()).from_pool
        assert (await sbx.commands.run("echo $WHO; cat /tmp/who")).stdout == "tenant-a\na"
    finally:
        await sbx.kill()
        await pools.delete(TEMPLATE, isolation="kubernetes")


async def test_pause_is_refused_saying_the_pod_and_its_memory_would_be_lost(
    backend: AsyncLocalBackend,
) -> None:
    sbx = await AsyncSandbox.create(TEMPLATE, isolation="kubernetes", backend=backend)
    try:
        with pytest.raises(
            Unsupported, match=r"cannot be paused: agent-sandbox suspends .* deleting its Pod"
        ):
            await sbx.pause()
        assert (await sbx.commands.run("echo still")).stdout == "still\n"  # refused, not half-paused
    finally:
        await sbx.kill()
