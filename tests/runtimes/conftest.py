"""Fixtures shared by the runtime tests: runtimes on the session's data dir, and sandbox factories.

A factory fixture owns the cleanup of every sandbox it made (DESIGN §7): at teardown it destroys them and
checks that nothing of them is left on the host (shim process, cgroup directories, state directory).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
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
    oom_killed: bool = False

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
            exit_code=end.get("exit_code"),
            signal=end.get("signal"),
            stdout=bytes(out),
            stderr=bytes(err),
            oom_killed=bool(end.get("oom_killed")),
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


# --- microvm runtime -------------------------------------------------------------------------------------
# The guest kernel, initramfs and the erofs image of the host's /usr (~1 min to build) are kept in the user's
# cache, keyed by their inputs, so only the first session on a host pays for them.
@pytest.fixture(scope="session")
def microvm_cache() -> Path:
    return Path(os.environ["CORRAL_RUNTIME_MICROVM_CACHE_DIR"])  # set by tests/conftest.py at start-up


@pytest.fixture(scope="session")
def microvm_runtime(runtime_config: RuntimeConfig, microvm_cache: Path) -> Any:
    from corral.runtimes.microvm.runtime import MicroVMOptions, MicroVMRuntime

    return MicroVMRuntime(runtime_config, MicroVMOptions(cache_dir=str(microvm_cache)))


@pytest.fixture(scope="session")
def microvm_golden(microvm_runtime: Any, host_rootfs: Any) -> Iterator[Any]:
    """One booted microVM, snapshotted (memory + disk) and destroyed: tests restore it (~1.5 s) instead of
    booting their own (~5-10 s under TCG). Made once per session, discarded at its end."""
    if os.geteuid() != 0:
        pytest.skip("the microvm runtime's tests run as root (the leak check and the shim)")

    async def make() -> Any:
        instance = await microvm_runtime.create(SandboxSpec(sandbox_id=SandboxId.new(), rootfs=host_rootfs))
        try:
            return await microvm_runtime.snapshot(instance, f"golden-{os.getpid()}")
        finally:
            await microvm_runtime.destroy(instance)
            assert_nothing_left(instance)

    snap = anyio.run(make)
    yield snap
    anyio.run(microvm_runtime.discard, snap)


@pytest.fixture
async def microvm_sandbox(
    microvm_runtime: Any, microvm_golden: Any, host_rootfs: Any
) -> AsyncIterator[SandboxFactory]:
    """``await microvm_sandbox()`` → a running microVM restored from the golden snapshot (its own disk copy);
    ``await microvm_sandbox(boot=True, limits=…)`` boots one. Destroyed after the test."""
    async for make in _sandbox_factory(microvm_runtime, host_rootfs):
        yield _restore_or_boot(make, microvm_golden)


@pytest.fixture
async def microvm_disk_sandbox(
    runtime_config: RuntimeConfig, microvm_cache: Path, microvm_golden: Any, host_rootfs: Any
) -> AsyncIterator[SandboxFactory]:
    """Like ``microvm_sandbox``, on a runtime whose pause writes the VM's memory to disk (``pause = "disk"``)."""
    from corral.runtimes.microvm.runtime import MicroVMOptions, MicroVMRuntime

    runtime = MicroVMRuntime(runtime_config, MicroVMOptions(cache_dir=str(microvm_cache), pause="disk"))
    async for make in _sandbox_factory(runtime, host_rootfs):
        yield _restore_or_boot(make, microvm_golden)


def _restore_or_boot(make: SandboxFactory, golden: Any) -> SandboxFactory:
    async def restore_or_boot(boot: bool = False, **spec_fields: Any) -> SandboxHandle:
        if not boot:
            spec_fields.setdefault("upper_seed", golden.files)
            spec_fields.setdefault("restore_from", golden.memory)
        return await make(**spec_fields)

    return restore_or_boot
