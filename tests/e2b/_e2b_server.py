"""What the E2B tests know about their server (the fixture is in this folder's conftest)."""

from __future__ import annotations

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
