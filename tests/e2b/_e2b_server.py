"""What the E2B tests know about their server (the fixture is in this folder's conftest)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class E2BServer:
    url: str
    key_a: str  # tenant e2b-a, E2B's form (e2b_…)
    key_b: str  # tenant e2b-b, E2B's form
    corral_key_a: str  # tenant e2b-a again, Corral's own form (corral_…)
    data_dir: Path


# Older E2B SDK releases that agents still pin, installed apart from the project's venv (their dependency pins
# conflict with the current release's: connectrpc < 0.12, pyqwest < 0.11), cached by release under ~/.cache.
OLD_SDKS = ("e2b==2.45.1",)


def sdk_release(*requirements: str) -> Path:
    """A directory holding ``requirements`` and their dependencies, for ``PYTHONPATH`` of a subprocess."""
    import hashlib
    import shutil
    import subprocess
    import sys
    import tempfile

    key = hashlib.sha256(repr((requirements, sys.version_info[:2])).encode()).hexdigest()[:12]
    name = "-".join(r.replace("==", "-") for r in requirements)
    root = Path.home() / ".cache" / "corral" / "e2b-sdk"
    target = root / f"{name}-py{sys.version_info[0]}{sys.version_info[1]}-{key}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=root))
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-input",
                "--disable-pip-version-check",
                "--target",
                str(tmp),
                *requirements,
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def run_sdk_script(server: E2BServer, script: Path, release: str | None, **env_extra: str) -> None:
    """Run an ``sdk_scripts/`` script with the SDK ``release`` (None: the venv's own), configured by E2B's
    environment variables only, and check it exited 0 having printed ``e2b <version>: ok``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "CORRAL_"))}
    env |= {
        "E2B_API_URL": server.url,
        "E2B_SANDBOX_URL": server.url,
        "E2B_API_KEY": server.key_a,
        "E2B_DOMAIN": "localhost",  # anything formed from a domain stays on this machine
        **env_extra,
    }
    if release is not None:
        env["PYTHONPATH"] = str(sdk_release(release))
    done = subprocess.run(
        [sys.executable, "-s", str(script)], env=env, capture_output=True, text=True, timeout=540
    )
    assert done.returncode == 0, done.stderr[-4000:]
    version = release.split("==")[1] if release else importlib.metadata.version("e2b")
    assert f"e2b {version}: ok" in done.stderr
