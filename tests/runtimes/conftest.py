"""Fixtures shared by the runtime tests: runtimes on the session's data dir, and sandbox factories.

A factory fixture owns the cleanup of every sandbox it made (DESIGN §7): at teardown it destroys them and
checks that nothing of them is left on the host (shim process, cgroup directories, state directory).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from corral.core.agent_client import AgentClient
from corral.ids import SandboxId
from corral.images.rootfs import ensure_host_template
from corral.runtimes import _proc
from corral.runtimes.base import Instance, Runtime, RuntimeConfig, SandboxSpec


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def runtime_config(corral_data_dir: Path) -> RuntimeConfig:
    """State and cache roots under the session's data dir (short: agent sockets live below state_root)."""
    return RuntimeConfig(state_root=corral_data_dir / "state", cache_root=corral_data_dir / "cache")


@pytest.fixture(scope="session")
def host_rootfs(runtime_config: RuntimeConfig) -> Any:
    """The ``base`` template (host /usr read-only + skeleton), built once per session."""
    return ensure_host_template(runtime_config.cache_root)


@dataclass(frozen=True, kw_only=True)
class ExecResult:
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")


@dataclass(kw_only=True)
class SandboxHandle:
    """A sandbox made by a factory fixture, with a connected agent client."""

    runtime: Runtime
    instance: Instance
    client: AgentClient
    extra_clients: list[AgentClient] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return Path(self.instance.ref)

    @property
    def upper(self) -> Path:
        """The sandbox's writable layer as the host sees it (namespace runtime)."""
        return self.state_dir / "fs" / "upper"

    async def run(
        self, cmd: str | Sequence[str], *, user: str = "root", timeout: float = 60, **fields: Any
    ) -> ExecResult:
        """Run a command through the agent and collect its output (a non-zero exit is a result)."""
        request = {"argv": list(cmd)} if not isinstance(cmd, str) else {"cmd": cmd}
        request.update(user=user, **fields)
        out, err = bytearray(), bytearray()
        end: dict[str, Any] = {}
        with anyio.fail_after(timeout):
            async with self.client.request("exec", request) as req:
                async for frame in req:
                    ev = frame.get("ev")
                    if ev == "stdout":
                        out += frame.payload
                    elif ev == "stderr":
                        err += frame.payload
                    elif ev == "exit":
                        end = dict(frame.header)
        return ExecResult(
            exit_code=end.get("exit_code"), signal=end.get("signal"), stdout=bytes(out), stderr=bytes(err)
        )

    async def connect(self) -> AgentClient:
        """Another connection (the shim replaces the previous client with it)."""
        stream = await self.runtime.connect(self.instance)
        client = await AgentClient.open(stream, sandbox_id=self.instance.sandbox_id)
        self.extra_clients.append(client)
        return client


SandboxFactory = Callable[..., Awaitable[SandboxHandle]]


def assert_nothing_left(instance: Instance) -> None:
    """Nothing of a destroyed local sandbox remains: no shim, no cgroup dirs, no state dir."""
    assert not _proc.pid_alive(instance.extra["shim_pid"], instance.extra["shim_start_ticks"]) or _is_zombie(
        instance.extra["shim_pid"]
    )
    assert not Path(instance.ref).exists(), f"state dir left: {instance.ref}"
    cgroup = instance.extra.get("cgroup")
    if isinstance(cgroup, dict):
        for d in cgroup["dirs"].values():
            assert not Path(d).exists(), f"cgroup left: {d}"


@pytest.fixture
def nothing_left() -> Callable[[Instance], None]:
    """The check a factory runs after destroy, for tests that destroy sandboxes themselves."""
    return assert_nothing_left


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


async def _sandbox_factory(runtime: Runtime, default_rootfs: Any) -> AsyncIterator[SandboxFactory]:
    made: list[SandboxHandle] = []

    async def make(**spec_fields: Any) -> SandboxHandle:
        spec_fields.setdefault("sandbox_id", SandboxId.new())
        spec_fields.setdefault("rootfs", default_rootfs)
        instance = await runtime.create(SandboxSpec(**spec_fields))
        try:
            stream = await runtime.connect(instance)
            client = await AgentClient.open(stream, sandbox_id=instance.sandbox_id)
        except BaseException:
            await runtime.destroy(instance)
            raise
        handle = SandboxHandle(runtime=runtime, instance=instance, client=client)
        made.append(handle)
        return handle

    try:
        yield make
    finally:
        with anyio.CancelScope(shield=True):
            for handle in made:
                for client in (handle.client, *handle.extra_clients):
                    await client.aclose()
                await runtime.destroy(handle.instance)
                assert_nothing_left(handle.instance)


# --- namespace runtime -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ns_runtime(runtime_config: RuntimeConfig) -> Any:
    from corral.runtimes.namespace import NamespaceRuntime

    return NamespaceRuntime(runtime_config)


@pytest.fixture
async def ns_sandbox(ns_runtime: Any, host_rootfs: Any) -> AsyncIterator[SandboxFactory]:
    """``await ns_sandbox(limits=…, rootfs=…)`` → a running namespace sandbox; destroyed after the test."""
    if os.geteuid() != 0:
        pytest.skip("the namespace runtime needs root")
    async for make in _sandbox_factory(ns_runtime, host_rootfs):
        yield make


# --- gvisor runtime --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gvisor_runtime(runtime_config: RuntimeConfig) -> Any:
    from corral.runtimes.gvisor import GVisorRuntime

    return GVisorRuntime(runtime_config)


@pytest.fixture
async def gvisor_sandbox(gvisor_runtime: Any, host_rootfs: Any) -> AsyncIterator[SandboxFactory]:
    """``await gvisor_sandbox(limits=…, rootfs=…)`` → a running gVisor sandbox; destroyed after the test."""
    if os.geteuid() != 0:
        pytest.skip("the gvisor runtime needs root")
    async for make in _sandbox_factory(gvisor_runtime, host_rootfs):
        yield make


@pytest.fixture(scope="module")
async def gvisor_module_sandbox(gvisor_runtime: Any, host_rootfs: Any) -> AsyncIterator[SandboxFactory]:
    """Like ``gvisor_sandbox``, but the sandboxes live until the end of the module, so read-only checks can
    share one (a gVisor boot costs ~0.4 s). Needs a module-scoped ``anyio_backend`` in the test module."""
    if os.geteuid() != 0:
        pytest.skip("the gvisor runtime needs root")
    async for make in _sandbox_factory(gvisor_runtime, host_rootfs):
        yield make
