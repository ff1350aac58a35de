"""Code that runs outside Corral's venv imports only the standard library (DESIGN §3).

The agent and the protocol run inside sandboxes from the agent bundle, which holds the standard library plus
corral/agent and corral/protocol and nothing else; the shim runs as ``python -I -S _shim.py`` with only
corral.protocol importable. import-linter (.importlinter) keeps the rest of Corral out of them, but it cannot
say "standard library only", so this test reads their imports, including those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
CORRAL = SRC / "corral"

# file or package -> the corral packages it may import besides the standard library
OUTSIDE_THE_VENV = {
    "agent": ("corral.agent", "corral.protocol"),
    "protocol": ("corral.protocol",),
    # _shimspec: imported for type checking only (the shim reads its JSON without the dataclasses), but it too
    # must stay standard-library-only so that a run-time import would still work there
    "runtimes/_shim.py": ("corral.protocol", "corral.runtimes._shimspec"),
    "runtimes/_shimspec.py": (),
}


def _files(target: str) -> list[Path]:
    path = CORRAL / target
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _imports(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """(line, absolute name) for every import in the file, at any depth; ``from x import y`` gives x.y."""
    module = ".".join(path.relative_to(src).with_suffix("").parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, node.module] if node.module else parts)
            found.extend((node.lineno, base if a.name == "*" else f"{base}.{a.name}") for a in node.names)
    return sorted(found)


def _allowed(name: str, corral_packages: tuple[str, ...]) -> bool:
    top = name.partition(".")[0]
    if top == "__future__" or (top in sys.stdlib_module_names and top != "corral"):
        return True
    return any(name == p or name.startswith(p + ".") for p in corral_packages)


@pytest.mark.parametrize("target", OUTSIDE_THE_VENV, ids=str)
def test_imports_only_the_standard_library(target: str) -> None:
    files = _files(target)
    if not files or not files[0].exists():
        pytest.skip(f"src/corral/{target} does not exist yet")
    allowed = OUTSIDE_THE_VENV[target]
    bad = [
        f"{path.relative_to(SRC)}:{line}: imports {name}"
        for path in files
        for line, name in _imports(path)
        if not _allowed(name, allowed)
    ]
    assert not bad, f"may import only the standard library and {', '.join(allowed)}:\n" + "\n".join(bad)


def test_the_checker_sees_forbidden_imports(tmp_path: Path) -> None:
    # The test above must be able to fail: imports inside functions and relative imports are resolved.
    pkg = tmp_path / "corral" / "agent"
    pkg.mkdir(parents=True)
    bad = pkg / "x.py"
    bad.write_text(
        "import os\nfrom . import y\nfrom ..protocol import frames\n\n"
        "def f():\n    import anyio\n    from corral import errors\n"
    )
    names = [name for _, name in _imports(bad, src=tmp_path)]
    assert names == ["os", "corral.agent.y", "corral.protocol.frames", "anyio", "corral.errors"]
    assert [n for n in names if not _allowed(n, OUTSIDE_THE_VENV["agent"])] == ["anyio", "corral.errors"]


def test_protocol_and_agent_import_without_site_packages() -> None:
    # The shim runs as `python -I -S _shim.py` with only src/ on the path, and importing corral.protocol runs
    # corral/__init__.py first: the package root must stay importable without any third-party package
    # (its SDK exports are lazy).
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import corral.protocol, corral.agent; "
        "print(sorted(m for m in sys.modules if m.partition('.')[0] not in sys.stdlib_module_names))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(SRC)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded = ast.literal_eval(done.stdout)
    allowed = ("__main__", "corral", "corral.protocol", "corral.agent")
    assert all(m in allowed or m.startswith(allowed[2:]) for m in loaded), loaded
