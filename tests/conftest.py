"""Session-wide test set-up: a private Corral data dir, marker-driven skips, and the leak check (DESIGN §7).

Data dir
    One temporary directory per session (``/var/tmp/corral-test-XXXX``), exported as the ``corral_data_dir``
    fixture and as ``CORRAL_DATA_DIR`` (set at start-up, before test modules are imported). It is removed at
    the end, unless something is still mounted under it: deleting through a mount could delete host files.

Markers
    ``root`` needs euid 0; ``bwrap`` / ``runsc`` / ``busybox`` need that binary on PATH. Missing: the test is
    skipped with the reason and the fix. With ``CI=true`` a missing requirement FAILS the test instead, so CI
    cannot go green by skipping the real-runtime tests (.ci/run sets CI=true).

Leak check
    Snapshot at session start, compare at the end: sandbox processes (runsc*, bwrap, the shim, the agent,
    qemu, firecracker), overlay mounts and any mount under the session's directories, loop devices backed by
    files there, network namespaces (what ``ip netns list`` shows), sandbox veths (``cx…``), nftables tables
    (``corral_…``) and egress processes, cgroups under ``/sys/fs/cgroup/corral*``
    and ``/sys/fs/cgroup/*/corral*``, and state dirs named by a sandbox id under the data dir.
    Anything new that is still there at the end fails the run (an error in the teardown of the last test).

    Several engineers may run tests on one machine at once, so outside CI only leftovers that can be tied to
    this session fail it (a descendant of this process, or naming this session's directories or
    ``CORRAL_TEST_SESSION`` token); the rest are reported as warnings. ``CI=true`` or
    ``CORRAL_LEAK_CHECK=strict`` makes every new leftover a failure.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
STRICT_LEAKS = IN_CI or os.environ.get("CORRAL_LEAK_CHECK", "") == "strict"
# Detached helpers (shim, runsc-sandbox) exit shortly after their runtime's destroy() returns; give them this
# long to go before calling them leaked. Leaks that matter persist, so a short bound is enough.
LEAK_GRACE_SECONDS = float(os.environ.get("CORRAL_LEAK_GRACE", "5"))

# marker -> (binary, Debian package that provides it)
BINARY_MARKERS = {
    "bwrap": ("bwrap", "bubblewrap"),
    "runsc": ("runsc", "runsc"),
    "busybox": ("busybox", "busybox-static"),
    "chromium": ("chromium", "chromium"),
    "qemu": ("qemu-system-x86_64", "qemu-system-x86"),
}

_DATA_DIR = pytest.StashKey[Path]()
_SESSION_TOKEN = pytest.StashKey[str]()
# the form of corral.ids.SandboxId, kept here so the leak check does not depend on the code under test
_SANDBOX_DIR_NAME = re.compile(r"sb-[a-z2-7]{16}")


# --- data dir ---------------------------------------------------------------------------------------------


def _temp_parent() -> str:
    # /var/tmp: on disk (overlay upper dirs and image layers can be large), unlike a tmpfs /tmp
    return "/var/tmp" if os.access("/var/tmp", os.W_OK) else tempfile.gettempdir()


def pytest_configure(config: pytest.Config) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="corral-test-", dir=_temp_parent()))
    token = secrets.token_hex(8)
    config.stash[_DATA_DIR] = data_dir
    config.stash[_SESSION_TOKEN] = token
    # Set before test modules are imported, so code under test and the processes it starts both see them.
    os.environ["CORRAL_DATA_DIR"] = str(data_dir)
    os.environ["CORRAL_TEST_SESSION"] = token
    # No test traffic may leave this machine: a sandbox given network by a test that did not point the
    # egress uplink at its own upstream namespace (tests/network/conftest.py) fails to start instead of
    # reaching the host's real uplink or its resolvers.
    os.environ["CORRAL_EGRESS_UPLINK_NETNS"] = "/run/netns/corral-test-no-uplink-configured"
    os.environ["CORRAL_EGRESS_RESOLVERS"] = "198.18.0.53"
    # the microvm guest and disk images of host trees are keyed by their inputs: keep them across sessions
    # (the erofs image of the host's /usr takes ~1 min to build), for this process and the servers it starts
    os.environ.setdefault(
        "CORRAL_RUNTIME_MICROVM_CACHE_DIR",
        str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "corral" / "microvm"),
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    data_dir = config.stash.get(_DATA_DIR, None)
    if data_dir is None or not data_dir.exists():
        return
    mounted = [m.target for m in _mounts() if _is_under(m.target, (data_dir,))]
    if mounted:
        print(
            f"\nconftest: NOT removing {data_dir}: still mounted under it: {', '.join(mounted)}",
            file=sys.stderr,
        )
        return
    shutil.rmtree(data_dir, onerror=_make_writable_and_retry)
    if data_dir.exists():
        print(f"\nconftest: could not remove {data_dir} completely", file=sys.stderr)


def _make_writable_and_retry(func, path, _exc_info):  # type: ignore[no-untyped-def]
    # overlay work dirs are created mode 000; as root that does not matter, as a user it does
    try:
        os.chmod(os.path.dirname(path), stat.S_IRWXU)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
        func(path)
    except OSError:
        pass


@pytest.fixture(scope="session")
def corral_data_dir(pytestconfig: pytest.Config) -> Path:
    """This session's Corral data root (also in ``CORRAL_DATA_DIR``); removed when the session ends."""
    return pytestconfig.stash[_DATA_DIR]


# --- markers ----------------------------------------------------------------------------------------------


def _missing_requirements(item: pytest.Item) -> list[str]:
    missing = []
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        missing.append("needs root (run the tests as root, as CI does)")
    if item.get_closest_marker("postgres") is not None and _postgres_bin() is None:
        missing.append(
            "PostgreSQL server not installed (Debian package postgresql); run scripts/install-host-deps"
        )
    for marker, (binary, package) in BINARY_MARKERS.items():
        if item.get_closest_marker(marker) is not None and shutil.which(binary) is None:
            missing.append(
                f"{binary} not installed (Debian package {package}); run scripts/install-host-deps"
            )
    return missing


@pytest.hookimpl(tryfirst=True)  # before fixtures are set up: a skipped test should not build sandboxes
def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = _missing_requirements(item)
    if not missing:
        return
    reason = "; ".join(missing)
    if IN_CI:
        pytest.fail(f"{reason} [CI=true: a missing test requirement is a failure, not a skip]", pytrace=False)
    pytest.skip(reason)


# --- PostgreSQL -------------------------------------------------------------------------------------------


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private PostgreSQL cluster for this session, on a Unix socket in its own directory.

    Returns a libpq URL for the ``postgres`` database (tests create their own databases). The server runs as
    the ``postgres`` user when we are root (PostgreSQL refuses to run as root) and is stopped at the end.
    """
    import subprocess

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed")
    base = Path(tempfile.mkdtemp(prefix="corral-pg-", dir=_temp_parent()))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "corral", "--no-sync"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-c listen_addresses='' -k {sock} -c fsync=off -c max_connections=200"
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-w",
            "-l",
            str(base / "log"),
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"postgresql://corral@/postgres?host={sock}"
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL server, dropped after the test."""
    import psycopg

    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield postgres_server.replace("/postgres?", f"/{name}?")
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- a real Corral server ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerHandle:
    url: str
    api_key: str  # a key of tenant "tests"
    admin_key: str


@pytest.fixture(scope="session")
def corral_server(corral_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """``corral serve`` as a real subprocess on a free port, with its own SQLite store.

    Remote-mode tests point the SDK at it with CORRAL_URL/CORRAL_API_KEY, exactly as users do.
    """
    from _corral_server import Server, new_key

    # Its own store under the session's data dir (so the leak check still covers it): a server reconciles
    # every pool in its store in the background, which would race the embedded pool tests on a shared one.
    env = {**os.environ, "CORRAL_DATA_DIR": str(corral_data_dir / "server")}
    api_key, admin_key = new_key(env, "--tenant", "tests"), new_key(env, "--admin")
    server = Server(env, tmp_path_factory.mktemp("server") / "server.log")
    server.start()
    try:
        yield ServerHandle(url=server.url, api_key=api_key, admin_key=admin_key)
    finally:
        server.stop()


# --- leak check -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leftover:
    kind: str  # "process", "mount", "loop device", "network namespace", "veth", "nft table", "cgroup", "state dir"
    key: str  # identity, compared between snapshots
    text: str  # what the report shows
    ours: bool  # tied to this session (see the module docstring)


@dataclass(frozen=True)
class _Mount:
    source: str
    target: str
    fstype: str
    options: str


def _unescape(field: str) -> str:  # /proc/mounts escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[_Mount]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append(_Mount(*(_unescape(p) for p in parts[:4])))
    return out


def _is_under(path: str, roots: tuple[Path, ...]) -> bool:
    return any(path == str(r) or path.startswith(f"{r}/") for r in roots)


def _mentions(text: str, roots: tuple[Path, ...], token: str) -> bool:
    return token in text or any(str(r) in text for r in roots)


_SANDBOX_ARGV0 = ("runsc", "bwrap", "qemu-system", "firecracker")


def _is_sandbox_process(argv: list[str]) -> bool:
    if not argv:
        return False  # kernel threads and zombies have no cmdline
    if os.path.basename(argv[0]).startswith(_SANDBOX_ARGV0):
        return True
    # python … /path/to/_shim.py STATE_DIR, or python -m corral.agent / -m corral.runtimes._shim
    return any(
        os.path.basename(a) == "_shim.py"
        or a in ("corral.agent", "corral.runtimes._shim", "corral.runtimes._net.egress")
        for a in argv[1:]
    )


def _processes() -> dict[int, tuple[int, int, list[str]]]:
    """pid -> (ppid, start time in clock ticks, argv) for every process we can read."""
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw_stat = Path(entry.path, "stat").read_text()
            argv = Path(entry.path, "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # exited meanwhile
        fields = raw_stat[raw_stat.rindex(")") + 2 :].split()  # comm may contain spaces and parentheses
        procs[int(entry.name)] = (int(fields[1]), int(fields[19]), [a for a in argv if a])
    return procs


def _process_leftovers(roots: tuple[Path, ...], token: str) -> list[Leftover]:
    procs = _processes()
    me = os.getpid()

    def descends_from_me(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            pid = procs[pid][0] if pid in procs else 0
            if pid == me:
                return True
        return False

    out = []
    for pid, (ppid, start, argv) in procs.items():
        if pid == me or not _is_sandbox_process(argv):
            continue
        if "--standby" in argv and ppid == me:
            continue  # this process's standby shim (no sandbox yet): it exits with us. An orphaned one counts.
        cmdline = " ".join(argv)
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            environ = ""
        ours = (
            descends_from_me(pid)
            or _mentions(cmdline, roots, token)
            or f"CORRAL_TEST_SESSION={token}" in environ
        )
        short = cmdline if len(cmdline) <= 200 else cmdline[:197] + "..."
        out.append(Leftover("process", f"{pid}:{start}", f"pid {pid} (parent {ppid}): {short}", ours))
    return out


def _mount_leftovers(roots: tuple[Path, ...], token: str) -> list[Leftover]:
    out = []
    for m in _mounts():
        if m.fstype == "overlay" or _is_under(m.target, roots):
            ours = _is_under(m.target, roots) or _mentions(m.options, roots, token)
            out.append(
                Leftover("mount", f"{m.target}|{m.fstype}|{m.source}", f"{m.fstype} on {m.target}", ours)
            )
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            target = backing.read_text().strip()
        except OSError:
            continue
        dev = backing.parent.parent.name
        ours = _is_under(target, roots)
        out.append(Leftover("loop device", f"{dev}|{target}", f"/dev/{dev} backed by {target}", ours))
    return out


def _netns_leftovers() -> list[Leftover]:
    try:
        names = os.listdir("/run/netns")  # what `ip netns list` lists
    except OSError:
        return []
    return [Leftover("network namespace", n, n, False) for n in names]


def _egress_leftovers() -> list[Leftover]:
    """Host ends of sandbox veth pairs (``cx…``) and per-sandbox nftables tables (``corral_…``)."""
    out = []
    for link in Path("/sys/class/net").glob("cx*"):
        out.append(Leftover("veth", link.name, link.name, False))
    nft = shutil.which("nft")
    if nft is not None:
        listed = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, timeout=30).stdout
        for line in listed.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2].startswith("corral_"):
                out.append(Leftover("nft table", parts[2], f"table {parts[1]} {parts[2]}", False))
    return out


def _cgroup_leftovers() -> list[Leftover]:
    # Corral's per-sandbox cgroups live below a corral* directory, at the top of the v2 hierarchy
    # (/sys/fs/cgroup/corral…) or of each v1 controller / the v1 host's unified mount
    # (/sys/fs/cgroup/memory/corral…, /sys/fs/cgroup/unified/corral…). The corral* parent itself may be kept
    # between runs; a directory below it is a sandbox's, and must go with it.
    out = []
    for parent in [*Path("/sys/fs/cgroup").glob("corral*"), *Path("/sys/fs/cgroup").glob("*/corral*")]:
        if not parent.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(parent):
            for d in dirnames:
                path = os.path.join(dirpath, d)
                out.append(Leftover("cgroup", path, path, False))
    return out


def _state_dir_leftovers(data_dir: Path) -> list[Leftover]:
    # Only the data root: tests may make sb-… directories in tmp_path on purpose (fixtures for a store or
    # the reaper); under CORRAL_DATA_DIR such a directory is a sandbox's state and must go with it.
    out: list[Leftover] = []
    try:
        root_dev = data_dir.stat().st_dev
    except OSError:
        return out
    for dirpath, dirnames, _ in os.walk(data_dir):
        for d in list(dirnames):
            path = os.path.join(dirpath, d)
            try:
                if os.lstat(path).st_dev != root_dev:
                    dirnames.remove(d)  # a mount point: reported as a mount, never walked into
                    continue
            except OSError:
                continue
            if _SANDBOX_DIR_NAME.fullmatch(d):
                out.append(Leftover("state dir", path, path, True))
    return out


def _leftovers(roots: tuple[Path, ...], token: str) -> list[Leftover]:
    """Everything the leak check watches; ``roots[0]`` is the data dir, ``roots[1]`` pytest's basetemp."""
    return [
        *_process_leftovers(roots, token),
        *_mount_leftovers(roots, token),
        *_netns_leftovers(),
        *_egress_leftovers(),
        *_cgroup_leftovers(),
        *_state_dir_leftovers(roots[0]),
    ]


def _new_leftovers(before: set[tuple[str, str]], roots: tuple[Path, ...], token: str) -> list[Leftover]:
    return [x for x in _leftovers(roots, token) if (x.kind, x.key) not in before]


_PLURAL = {"process": "processes"}


def _report(leftovers: list[Leftover]) -> str:
    lines = []
    for kind in dict.fromkeys(x.kind for x in leftovers):
        lines.append(f"  {_PLURAL.get(kind, kind + 's')}:")
        lines.extend(f"    {x.text}" for x in leftovers if x.kind == kind)
    return "\n".join(lines)


@pytest.fixture(scope="session", autouse=True)
def _leak_check(
    pytestconfig: pytest.Config, corral_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Fails the session if it leaves sandbox processes, mounts, netns, cgroups or state dirs behind.

    Autouse and session-scoped, so it is set up before, and torn down after, every other session fixture.
    """
    roots = (corral_data_dir, tmp_path_factory.getbasetemp())
    token = pytestconfig.stash[_SESSION_TOKEN]
    before = {(x.kind, x.key) for x in _leftovers(roots, token)}
    yield
    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    while True:
        new = _new_leftovers(before, roots, token)
        failing = [x for x in new if x.ours or STRICT_LEAKS]
        if not failing or time.monotonic() >= deadline:
            break
        time.sleep(0.1)  # polling with a bound: detached processes cannot be waited on from here
    others = [x for x in new if x not in failing]
    if others:
        warnings.warn(
            "leak check: new since the session started, but not tied to this session (another test run on "
            f"this machine?); CI fails on these:\n{_report(others)}",
            stacklevel=1,
        )
    if failing:
        pytest.fail(
            "leak check: the test session left these behind (DESIGN §7: the factory fixture that created a "
            "sandbox owns its cleanup; end only what the tests started, by pid):\n" + _report(failing),
            pytrace=False,
        )
