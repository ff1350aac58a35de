"""The fake runtime: the real agent under the real shim, as a plain host process, with NO isolation.

For unit tests of the core (lifecycle, deadlines, re-attach, the SDK) on machines without root, bwrap or runsc.
It is not in the default ``enabled_runtimes`` and must never serve untrusted code. It is the smallest user of
the local skeleton (:mod:`._local`): one ``prepare`` and nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

from corral.runtimes._local import LocalRuntime, LocalSandbox
from corral.runtimes._shimspec import ShimSpec
from corral.runtimes.base import Capabilities, SandboxSpec

__all__ = ["FakeRuntime"]

_SRC = Path(__file__).resolve().parents[2]  # the directory that holds the corral package


class FakeRuntime(LocalRuntime[None]):
    name: ClassVar[str] = "fake"
    capabilities: ClassVar[Capabilities] = Capabilities(resource_limits=False)
    uses_bundle: ClassVar[bool] = False  # the agent runs from this source tree
    state_dir_mode: ClassVar[int] = 0o755  # the agent's processes (uid 1000) reach their home below it

    def check_host(self) -> None:
        return None

    def prepare(self, spec: SandboxSpec, sandbox: LocalSandbox) -> ShimSpec:
        home = sandbox.state_dir / "home"
        home.mkdir()
        home.chmod(0o1777)  # the agent acts as uid 1000 ("user") by default; this dir stands in for its home
        bootstrap = (
            f"import sys; sys.path.insert(0, {str(_SRC)!r}); import runpy; "
            "runpy.run_module('corral.agent', run_name='__main__', alter_sys=True)"
        )
        return ShimSpec(
            argv=[sys.executable, "-I", "-S", "-c", bootstrap],
            socket=sandbox.socket,
            control=sandbox.control,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "CORRAL_AGENT_HOME": str(home)},
            deadline=spec.deadline,
        )
