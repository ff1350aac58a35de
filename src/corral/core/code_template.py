"""The ``code-interpreter`` template: the ``base`` template plus Jupyter kernels and the data-science stack.

Built from what this host can reach: PyPI wheels (ipykernel, jupyter_client, matplotlib, pandas, numpy and
their dependencies) installed with pip into one extra read-only layer that sits on top of ``base`` (which binds
the host's ``/usr``, so ``node`` and ``bash`` come from the host). The layer holds

- ``/opt/corral/python``: the wheels, installed with ``pip --python <sandbox python> --target`` so their ABI
  is the sandbox interpreter's (Debian's ``/usr/bin/python3``, not the interpreter running Corral);
- ``/etc/python3.X/sitecustomize.py``: Debian's hook (kept) plus ``site.addsitedir`` of that directory, so
  every ``python3`` in the sandbox, the kernels and plain commands alike, imports pandas with no environment
  variable. (Debian's ``/usr/lib/python3.X/sitecustomize.py`` is a symlink into ``/etc``, which the template
  owns; the agent runs with ``-I -S`` and is unaffected.)

Idempotent and cached: the layer's directory name is a digest of the recipe (pinned packages, the sandbox
interpreter's version, RECIPE_VERSION); an existing layer is reused and only the template record is
(re)written. Built in a temporary directory and renamed, so a crash leaves no half layer behind. It is one
small recipe that a general image builder can later absorb.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import anyio.to_thread

from corral.core.records import TemplateRecord
from corral.core.templates import TemplateRegistry
from corral.runtimes import _proc

__all__ = ["CODE_INTERPRETER_TEMPLATE", "PACKAGES", "build_code_interpreter_template"]

CODE_INTERPRETER_TEMPLATE = "code-interpreter"
RECIPE_VERSION = 1
SANDBOX_PYTHON = "/usr/bin/python3"  # the interpreter sandboxes of the base template run (the host's /usr)
SITE_DIR = "opt/corral/python"
PACKAGES = (
    "ipykernel==7.4.0",
    "jupyter_client==8.10.0",
    "matplotlib==3.11.2",
    "pandas==3.1.1",
    "numpy==2.4.6",
    "e2b-charts==1.0.0",  # a matplotlib figure's data as E2B's chart JSON (MIT; brings pydantic)
)
PIP_TIMEOUT = 1800.0  # seconds: ~350 MB of wheels from an index on a slow link

_SITECUSTOMIZE = """\
# Added by Corral's code-interpreter template: the kernels' packages, for every python3 in the sandbox.
import site as _corral_site

_corral_site.addsitedir("/{site}")
del _corral_site
"""


async def build_code_interpreter_template(
    templates: TemplateRegistry, cache_root: Path, *, name: str = CODE_INTERPRETER_TEMPLATE
) -> TemplateRecord:
    """Build (once) and register the code-interpreter template; returns its record."""
    probe = await _proc.run(
        [SANDBOX_PYTHON, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        timeout=30,
        what="find the sandbox's python3",
    )
    version = probe.stdout.decode().strip()
    recipe = json.dumps({"v": RECIPE_VERSION, "python": version, "packages": PACKAGES}, sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    root = cache_root / "templates"
    layer = root / f"code-interpreter-{digest}"
    if not await anyio.Path(layer).is_dir():
        await _build(layer, root, version)
    return await templates.register_layer(
        name,
        layer,
        description=f"base + IPython/Node/Bash kernels, pandas, matplotlib (python {version})",
    )


async def _build(layer: Path, root: Path, version: str) -> None:
    tmp = await anyio.to_thread.run_sync(_make_build_dir, root)
    try:
        await _proc.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                SANDBOX_PYTHON,
                "install",
                "--no-input",
                "--disable-pip-version-check",
                "--no-warn-script-location",
                "--only-binary=:all:",
                "--no-compile",
                "--target",
                str(tmp / SITE_DIR),
                *PACKAGES,
            ],
            timeout=PIP_TIMEOUT,
            what="install the code interpreter's Python packages (pip)",
        )
        await anyio.to_thread.run_sync(_finish, tmp, layer, version)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))
        raise


def _make_build_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-ci-", dir=root))
    tmp.chmod(0o755)
    return tmp


def _finish(tmp: Path, layer: Path, version: str) -> None:
    """Add the sitecustomize hook and move the finished layer into place (atomically)."""
    major_minor = ".".join(version.split(".")[:2])
    etc = tmp / "etc" / f"python{major_minor}"
    etc.mkdir(parents=True)
    debian_hook = Path("/etc") / f"python{major_minor}" / "sitecustomize.py"
    text = debian_hook.read_text() + "\n" if debian_hook.is_file() else ""
    (etc / "sitecustomize.py").write_text(text + _SITECUSTOMIZE.format(site=SITE_DIR))
    for path in (tmp / "opt", tmp / "opt" / "corral", tmp / "etc", etc):
        path.chmod(0o755)
    try:
        tmp.rename(layer)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
