"""envd through every pinned E2B SDK release: the current one and the 2.45 line (whose connectrpc client is
older), each in its own process configured by environment variables only (``sdk_scripts/envd_basics.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _e2b_server import OLD_SDKS, E2BServer, run_sdk_script

SCRIPT = Path(__file__).parent / "sdk_scripts" / "envd_basics.py"

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("release", [None, *OLD_SDKS], ids=lambda r: r or "current")
def test_envd_through_the_release(e2b_server: E2BServer, release: str | None) -> None:
    run_sdk_script(e2b_server, SCRIPT, release)
