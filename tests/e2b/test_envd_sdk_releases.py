"""envd through every pinned E2B SDK release: the current one and the 2.45 line (whose connectrpc client is
older), each in its own process configured by environment variables only (``sdk_scripts/envd_basics.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _e2b_server import OLD_SDKS, E2BServer, sdk_release

SCRIPT = Path(__file__).parent / "sdk_scripts" / "envd_basics.py"

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("release", [None, *OLD_SDKS], ids=lambda r: r or "current")
def test_envd_through_the_release(e2b_server: E2BServer, release: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "CORRAL_"))}
    env |= {
        "E2B_API_URL": e2b_server.url,
        "E2B_SANDBOX_URL": e2b_server.url,
        "E2B_API_KEY": e2b_server.key_a,
        "E2B_DOMAIN": "localhost",
    }
    if release is not None:
        env["PYTHONPATH"] = str(sdk_release(release))
    done = subprocess.run(
        [sys.executable, "-s", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=540
    )
    assert done.returncode == 0, done.stderr[-4000:]
    version = release.split("==")[1] if release else "2.63.0"
    assert f"e2b {version}: ok" in done.stderr
