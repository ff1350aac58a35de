"""The fake runtime: the real agent under the real shim, as a plain host process, with NO isolation.

For unit tests of the core (lifecycle, deadlines, re-attach, the SDK) on machines without root, bwrap or runsc.
It is not in the default ``enabled_runtimes`` and must never serve untrusted code.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import ClassVar

import anyio.to_thread

from corral.errors import Conflict, Unsupported
from corral.runtimes import _shimctl
from corral.runtimes._shimspec import ShimSpec
from corral.runtimes.base import (
    ByteStream,
    Capabilities,
    Instance,
    Observed,
    RuntimeConfig,
    SandboxSpec,
    Snapshot,
)

__all__ = ["FakeRuntime"]

_SRC = Path(__file__).resolve().parents[2]  # the directory that holds the corral package


class FakeRuntime:
    name: ClassVar[str] = "fake"
    capabilities: ClassVar[Capabilities] = Capabilities(resource_limits=False)

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config

    async def check(self) -> None:
        return None

    async def create(self, spec: SandboxSpec) -> Instance:
        state_dir = self.config.state_root / spec.sandbox_id
        try:
            state_dir.mkdir(parents=True)
        except FileExistsError as exc:
            raise Conflict(f"sandbox {spec.sandbox_id} already exists") from exc
        home = state_dir / "home"
        home.mkdir()
        home.chmod(0o1777)  # the agent acts as uid 1000 ("user") by default; this dir stands in for its home
        bootstrap = (
            f"import sys; sys.path.insert(0, {str(_SRC)!r}); import runpy; "
            "runpy.run_module('corral.agent', run_name='__main__', alter_sys=True)"
        )
        shim_spec = ShimSpec(
            argv=[sys.executable, "-I", "-S", "-c", bootstrap],
            socket=str(state_dir / "agent.sock"),
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "CORRAL_AGENT_HOME": str(home)},
            deadline=spec.deadline,
        )
        try:
            handle = await _shimctl.launcher.launch(state_dir, shim_spec, what="start the fake sandbox")
        except BaseException:
            await anyio.to_thread.run_sync(shutil.rmtree, state_dir, True)
            raise
        return Instance(
            sandbox_id=spec.sandbox_id,
            runtime=self.name,
            state_dir=str(state_dir),
            shim_pid=handle.pid,
            shim_start_ticks=handle.start_ticks,
            socket_path=shim_spec.socket,
        )

    async def connect(self, instance: Instance) -> ByteStream:
        return await _shimctl.connect(instance.socket_path)

    async def pause(self, instance: Instance) -> None:
        raise Unsupported("the fake runtime cannot pause")

    async def resume(self, instance: Instance) -> None:
        raise Unsupported("the fake runtime cannot resume")

    async def snapshot(self, instance: Instance, dest: Path) -> Snapshot:
        raise Unsupported("the fake runtime cannot take snapshots")

    async def destroy(self, instance: Instance) -> None:
        await _shimctl.stop(_handle(instance))
        await anyio.to_thread.run_sync(shutil.rmtree, Path(instance.state_dir), True)

    async def inspect(self, instance: Instance) -> Observed:
        return _shimctl.observe(Path(instance.state_dir), _handle(instance))


def _handle(instance: Instance) -> _shimctl.ShimHandle:
    return _shimctl.ShimHandle(instance.shim_pid, instance.shim_start_ticks)
