"""The agent bundle: a self-contained Python that runs the agent in any sandbox image.

Sandbox images may have no Python, an old one, or musl instead of glibc. So the agent never uses the image's
interpreter: every local runtime mounts this bundle read-only at ``/.corral`` and starts the agent with the
bundle's own dynamic loader and libraries::

    /.corral/lib/ld-linux-x86-64.so.2 --library-path /.corral/lib /.corral/bin/python3 -I -S -m corral.agent

``--library-path`` applies to the agent process only; the processes it starts use the image's own libraries.

Layout (under ``cache_root/agent-bundle/<hash>``, built once per host and per Corral version):

    bin/python3                    the host's Debian CPython (/usr/bin/python3)
    lib/                           its dynamic loader and every shared library it and its extensions need
    lib/python3.X/                 the standard library (tests, tkinter, idle, site-packages left out)
    lib/python3.X/corral/          the agent and protocol packages (copied, so the sandbox sees nothing else)
    sbin/sudo                      the sandbox's ``sudo``: a client of the agent (``corral.agent.sudo``)

Python finds its prefix from ``bin/python3`` and the ``lib/python3.X/os.py`` landmark, so no environment
variable is needed (``-I`` ignores them anyway).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import sysconfig
import tempfile
from pathlib import Path

from corral.errors import RuntimeUnavailable
from corral.runtimes import _proc

__all__ = ["MOUNT_POINT", "AgentBundle", "agent_argv", "ensure_bundle"]

log = logging.getLogger("corral.runtimes.bundle")

MOUNT_POINT = "/.corral"
HOST_PYTHON = Path("/usr/bin/python3")
_SKIP_STDLIB = {
    "test",
    "tkinter",
    "idlelib",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "pydoc_data",
    "config-3.11-x86_64-linux-gnu",
    "venv",
    "distutils",
}
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # …/corral


class AgentBundle:
    def __init__(self, path: Path, python_version: str, loader_name: str) -> None:
        self.path = path
        self.python_version = python_version
        self.loader_name = loader_name


def agent_argv(
    bundle: AgentBundle,
    *,
    mount_point: str = MOUNT_POINT,
    memory_limit: int | None = None,
    oom_events_fd: int | None = None,
    memory_usage_fds: tuple[int, int] | None = None,
) -> list[str]:
    """The command that starts the agent inside a sandbox that has ``bundle`` mounted at ``mount_point``.

    ``memory_limit`` (bytes) arms the agent's own OOM killer, for sandboxes whose ``/proc/meminfo`` is their
    own and whose kernel kills nothing (gVisor); ``oom_events_fd`` is the sandbox's memory cgroup events file,
    opened as that fd, from which the agent learns of the kernel's OOM kills (see ``corral.agent.memory``);
    ``memory_usage_fds`` are its memory cgroup's usage and statistics files, for sandboxes whose
    ``/proc/meminfo`` is not their own (see ``corral.agent.usage``)."""
    extra = [] if memory_limit is None else ["--memory-limit", str(memory_limit)]
    if oom_events_fd is not None:
        extra += ["--oom-events-fd", str(oom_events_fd)]
    if memory_usage_fds is not None:
        extra += ["--memory-usage-fd", str(memory_usage_fds[0]), "--memory-stat-fd", str(memory_usage_fds[1])]
    return [
        f"{mount_point}/lib/{bundle.loader_name}",
        "--library-path",
        f"{mount_point}/lib",
        f"{mount_point}/bin/python3",
        "-I",
        "-S",
        "-B",
        "-m",
        "corral.agent",
        "--sudo",
        *extra,
    ]


@functools.cache
def _sources_digest(python: Path) -> str:
    """Per process: the agent sources do not change under a running Corral (tests rebuild in new processes)."""
    h = hashlib.sha256()
    st = python.resolve().stat()
    h.update(f"{python.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(Path(__file__).read_bytes())  # a change to how the bundle is built makes a new bundle
    for sub in ("agent", "protocol"):
        for f in sorted((_PACKAGE_ROOT / sub).rglob("*.py")):
            h.update(f.relative_to(_PACKAGE_ROOT).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def _host_stdlib(python: Path) -> tuple[Path, str]:
    out = _proc.run_blocking(
        [
            str(python),
            "-I",
            "-S",
            "-c",
            "import sys,sysconfig;print(sysconfig.get_paths()['stdlib']);print('%d.%d'%sys.version_info[:2])",
        ],
        timeout=30,
        what="locate the host Python's standard library",
    )
    stdlib, version = out.stdout.decode().split()
    return Path(stdlib), version


_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)")


def _shared_libs(binaries: list[Path]) -> set[Path]:
    libs: set[Path] = set()
    for chunk in (binaries[i : i + 50] for i in range(0, len(binaries), 50)):
        out = _proc.run_blocking(
            ["ldd", *map(str, chunk)], timeout=60, what="list the agent's shared libraries", check=False
        )
        for line in out.stdout.decode(errors="replace").splitlines():
            m = _LDD_LINE.match(line)
            if m:
                libs.add(Path(m.group(2)))
    return libs


def ensure_bundle(cache_root: Path, python: Path = HOST_PYTHON) -> AgentBundle:
    """Return the bundle for this host and Corral version, building it (once, atomically) if needed."""
    if not python.exists():
        raise RuntimeUnavailable(
            "the sandbox agent needs the host's Debian Python; install it with: apt-get install python3",
            details={"install": "apt-get install python3"},
        )
    digest = _sources_digest(python)
    root = cache_root / "agent-bundle"
    target = root / digest
    stdlib, version = _host_stdlib(python)
    loader = _loader_name()
    if (target / "bin" / "python3").exists():
        return AgentBundle(target, version, loader)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the agent runs processes as uid 1000 that need this interpreter
    try:
        _build(tmp, python, stdlib, version)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built agent bundle %s", target)
    return AgentBundle(target, version, loader)


def _loader_name() -> str:
    return "ld-linux-x86-64.so.2" if os.uname().machine == "x86_64" else "ld-linux-aarch64.so.1"


def _sudo_script(mount_point: str = MOUNT_POINT) -> str:
    """``sudo`` for the sandbox's PATH: the bundle's interpreter running the agent's sudo client."""
    lib = f"{mount_point}/lib"
    return (
        "#!/bin/sh\n"
        f"exec {lib}/{_loader_name()} --library-path {lib} {mount_point}/bin/python3 -I -S -B "
        '-m corral.agent.sudo_client "$@"\n'
    )


def _build(dest: Path, python: Path, stdlib: Path, version: str) -> None:
    (dest / "bin").mkdir(parents=True)
    lib = dest / "lib"
    lib.mkdir()
    shutil.copy2(python.resolve(), dest / "bin" / "python3")
    pylib = lib / f"python{version}"

    def ignore(d: str, names: list[str]) -> set[str]:
        return {n for n in names if n in _SKIP_STDLIB} if Path(d) == stdlib else set()

    shutil.copytree(stdlib, pylib, ignore=ignore, symlinks=True)
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or "")
    if not (pylib / "lib-dynload").exists() and dynload.is_dir():
        shutil.copytree(dynload, pylib / "lib-dynload")
    extensions = sorted((pylib / "lib-dynload").glob("*.so"))
    for so in _shared_libs([dest / "bin" / "python3", *extensions]):
        shutil.copy2(so.resolve(), lib / so.name)
    corral_pkg = pylib / "corral"
    corral_pkg.mkdir()
    (corral_pkg / "__init__.py").write_text('"""Agent-side subset of Corral."""\n')
    for sub in ("agent", "protocol"):
        shutil.copytree(
            _PACKAGE_ROOT / sub, corral_pkg / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    _proc.run_blocking(
        [str(python), "-I", "-m", "compileall", "-q", str(corral_pkg)], timeout=120, what="compile the agent"
    )
    (dest / "sbin").mkdir()
    (dest / "sbin" / "sudo").write_text(_sudo_script())
    (dest / "sbin" / "sudo").chmod(0o755)
