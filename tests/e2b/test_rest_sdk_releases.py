"""The same REST lifecycle through every pinned E2B SDK release: the current one and the 2.45 line.

Each release runs in its own process (the older one from a cached install apart from the venv, first on
``PYTHONPATH``), configured by environment variables only. The script checks as it goes and exits non-zero on
the first difference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _e2b_server import OLD_SDKS, E2BServer, run_sdk_script

SCRIPT = Path(__file__).parent / "sdk_scripts" / "rest_lifecycle.py"

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("release", [None, *OLD_SDKS], ids=lambda r: r or "current")
def test_rest_lifecycle_through_the_release(e2b_server: E2BServer, release: str | None) -> None:
    run_sdk_script(e2b_server, SCRIPT, release, E2B_OTHER_KEY=e2b_server.key_b)
