"""The SDK and the CLI on the microvm runtime (real QEMU under TCG), embedded and through ``corral serve``.

The issue's example, as a user writes it. Each mode boots one VM and forks it once (at most two VMs at a
time, the CI budget); the runtime-level tests restore a golden snapshot instead (tests/runtimes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from corral import Sandbox, SandboxState

pytestmark = [pytest.mark.root, pytest.mark.qemu]


@pytest.fixture(scope="module", params=["embedded", "remote"], autouse=True)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "remote":
            server = request.getfixturevalue("corral_server")
            mp.setenv("CORRAL_URL", server.url)
            mp.setenv("CORRAL_API_KEY", server.api_key)
        else:
            mp.delenv("CORRAL_URL", raising=False)
        yield request.param


def test_the_issue_example_on_a_microvm() -> None:
    with Sandbox.create(isolation="microvm", timeout=900) as sbx:
        assert sbx.commands.run("uname -r").stdout.strip() != os.uname().release
        sbx.files.write("/home/user/a.txt", b"hi")
        sbx.pause()
        assert sbx.get_info().state is SandboxState.PAUSED
        sbx.resume()
        assert sbx.files.read("/home/user/a.txt") == b"hi"
        (twin,) = sbx.fork(1)  # memory and disk copied
        try:
            assert twin.files.read("/home/user/a.txt") == b"hi"
            twin.files.write("/home/user/a.txt", b"twin")
            assert sbx.files.read("/home/user/a.txt") == b"hi"
            assert twin.commands.run("echo $((6*7))").stdout == "42\n"
        finally:
            twin.kill()


def test_corral_run_on_a_microvm(mode: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral.cli.main",
            "run",
            "--isolation",
            "microvm",
            "--",
            "python3",
            "-c",
            "print(1)",
        ],
        capture_output=True,
        timeout=600,
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"1\n"
