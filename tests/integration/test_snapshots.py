"""Pause/resume with memory, snapshots and forks, end to end on the real runtimes (namespace and gVisor).

Each test runs through the embedded SDK/core on this session's data dir and kills every sandbox it makes.
What the runtime can capture differs (``Capabilities.checkpoint``): gVisor brings back memory and processes,
namespace only files (its pause keeps memory in RAM, frozen). The tests assert exactly that split.

A "memory probe" is a Python process that draws a random token at start and then, every 20 ms, writes
``<token> <counter>`` to /tmp/probe: the same token with a larger counter after a resume or in a fork proves
that the very process, with its variables, came back (a restart would draw a new token).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _sandbox_apps import memory_probe
from corral import Sandbox, SandboxState
from corral.client._local import LocalBackend
from corral.errors import InvalidState, NotFound

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.runsc]


@pytest.fixture(params=["namespace", "gvisor"])
def iso(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend() -> Iterator[LocalBackend]:
    b = LocalBackend.from_env()
    yield b
    b.close()


@pytest.fixture
def made(backend: LocalBackend) -> Iterator[list[Sandbox]]:
    """Sandboxes to kill at the end (the tests add forks and template children here too)."""
    boxes: list[Sandbox] = []
    yield boxes
    for box in boxes:
        box.kill()


def _probe(box: Sandbox) -> tuple[str, int]:
    """(token, counter) of the memory probe, waiting (bounded) until it has written once."""
    end = time.monotonic() + 20
    while True:
        r = box.commands.run("cat /tmp/probe 2>/dev/null")
        if r.stdout:
            token, count = r.stdout.split()
            return token, int(count)
        assert time.monotonic() < end, "the probe never wrote"


def _advanced(box: Sandbox, before: int) -> int:
    """The probe's counter once it is above ``before`` (bounded wait)."""
    end = time.monotonic() + 20
    while (now := _probe(box)[1]) <= before:
        assert time.monotonic() < end, "the probe stopped counting"
    return now


def _start_probe(box: Sandbox) -> tuple[str, int]:
    box.files.write("/home/user/probe.py", memory_probe("/tmp"))
    box.commands.start("python3 /home/user/probe.py", user="root")
    token, count = _probe(box)
    return token, _advanced(box, count)


def _instance_dir(backend: LocalBackend, sandbox_id: str) -> Path:
    settings = backend._call(lambda: _settings(backend))
    return Path(settings.state_root) / sandbox_id


async def _settings(backend: LocalBackend):  # type: ignore[no-untyped-def]
    return backend._backend.service.settings


def _cpu_seconds_of(state_dir: Path, sandbox_id: str) -> float:
    """CPU time of every host process that belongs to the sandbox: those naming it in their argv (its shim;
    gVisor's runsc processes) and all their descendants (namespace: bwrap and below). /proc stat utime+stime,
    in seconds."""
    procs: dict[int, tuple[int, float, bytes]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmdline)
    roots = {pid for pid, (_, _, cmd) in procs.items() if sandbox_id.encode() in cmd}
    members = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in members and pid not in members:
                members.add(pid)
                changed = True
    return sum(procs[p][1] for p in members)


# --- pause / resume ----------------------------------------------------------------------------------------


def test_pause_resume_keeps_memory_files_and_deadline(
    iso: str, backend: LocalBackend, made: list[Sandbox]
) -> None:
    box = Sandbox.create(isolation=iso, timeout=600, backend=backend)
    made.append(box)
    token, count = _start_probe(box)
    box.files.write("/home/user/kept.txt", b"written before the pause")
    burner = box.commands.start("while :; do :; done", user="root")  # burns CPU until paused
    state_dir = _instance_dir(backend, box.sandbox_id)
    cpu_before = _cpu_seconds_of(state_dir, box.sandbox_id)
    time.sleep(1.0)  # a measurement window (not a wait for state): the measurement must see the burner
    assert _cpu_seconds_of(state_dir, box.sandbox_id) - cpu_before > 0.1  # 2 shared cores: often ~0.3
    box.pause()
    info = box.get_info()
    assert info.state is SandboxState.PAUSED and info.expires_at is None
    record = backend._call(lambda: backend._backend.service.store.get_sandbox(box.sandbox_id))  # type: ignore[arg-type]
    assert record is not None and record.deadline is None and 590 < (record.paused_remaining or 0) <= 600

    cpu_before = _cpu_seconds_of(state_dir, box.sandbox_id)
    time.sleep(1.0)  # the same window while paused: the busy loop would use ~1 s of CPU here
    cpu_after = _cpu_seconds_of(state_dir, box.sandbox_id)
    assert cpu_after - cpu_before < 0.05, f"a paused sandbox used {cpu_after - cpu_before:.2f} s of CPU"
    with pytest.raises(InvalidState):
        box.commands.run("true")

    # resume from another process, as a restarted server would
    code = "import sys; from corral import Sandbox; s = Sandbox.connect(sys.argv[1]); s.resume(); s.close()"
    subprocess.run([sys.executable, "-c", code, box.sandbox_id], check=True, timeout=120)
    info = box.get_info()
    assert info.state is SandboxState.RUNNING
    assert info.expires_at is not None and info.expires_at - time.time() > 580  # the time left came back
    assert box.files.read("/home/user/kept.txt") == b"written before the pause"
    burner.kill()
    if iso == "gvisor":  # memory came back: the very same process, its variables intact, counting on
        again, now = _probe(box)
        assert again == token and now >= count
        _advanced(box, now)
    else:  # frozen in RAM: same process too
        assert _probe(box)[0] == token


def test_kill_a_paused_sandbox_removes_its_image(iso: str, backend: LocalBackend) -> None:
    box = Sandbox.create(isolation=iso, timeout=600, backend=backend)
    try:
        _start_probe(box)
        box.pause()
        state_dir = _instance_dir(backend, box.sandbox_id)
        if iso == "gvisor":
            image = state_dir / "checkpoint" / "checkpoint.img"
            assert image.stat().st_size > 0
    finally:
        box.kill()
    assert not state_dir.exists()
    assert _cpu_seconds_of(state_dir, box.sandbox_id) == 0.0


# --- snapshots ---------------------------------------------------------------------------------------------


def test_snapshot_then_create_from_it(iso: str, backend: LocalBackend, made: list[Sandbox]) -> None:
    name = f"snap-{iso}-{os.urandom(3).hex()}"
    box = Sandbox.create(isolation=iso, timeout=600, backend=backend)
    made.append(box)
    token, count = _start_probe(box)
    box.files.write("/home/user/notes.txt", b"from the parent")
    box.commands.run("rm /etc/hostname && mkdir -p /srv/data && echo 1 > /srv/data/x", user="root")
    made_template = box.snapshot(name)
    try:
        assert made_template.kind == "snapshot" and made_template.memory is (iso == "gvisor")
        assert box.commands.run("cat /home/user/notes.txt").stdout == "from the parent"  # still running
        child = Sandbox.create(template=name, isolation=iso, timeout=600, backend=backend)
        made.append(child)
        assert child.files.read("/home/user/notes.txt") == b"from the parent"
        assert child.commands.run("cat /srv/data/x").stdout == "1\n"
        assert child.commands.run("test -e /etc/hostname").exit_code == 1  # the deletion is kept too
        assert child.commands.run("id -un").stdout == "user\n"  # owners came through the layer copy
        assert child.commands.run("stat -c %U /home/user/notes.txt").stdout == "user\n"
        if iso == "gvisor":
            again, now = _probe(child)
            assert again == token and now >= count
            _advanced(child, now)
        else:
            # files only: the probe's output file came along, the probe process did not
            assert child.commands.run("test -e /tmp/probe").exit_code == 0
            assert child.commands.run("pgrep -f '[p]robe.py'").exit_code == 1
        with pytest.raises(Exception) as busy:  # the parent of a live template chain cannot be deleted
            backend.delete_template("base")
        assert busy.type.__name__ in ("InvalidRequest", "Conflict")
    finally:
        for b in made[1:]:
            b.kill()
        del made[1:]
        backend.delete_template(name)
    assert name not in {t.name for t in backend.list_templates()}


def test_fork_two_copies_diverge(iso: str, backend: LocalBackend, made: list[Sandbox]) -> None:
    box = Sandbox.create(isolation=iso, timeout=600, backend=backend)
    made.append(box)
    token, count = _start_probe(box)
    box.files.write("/home/user/shared.txt", b"parent")
    forks = box.fork(2)
    made.extend(forks)
    assert len({f.sandbox_id for f in forks} | {box.sandbox_id}) == 3
    for i, f in enumerate(forks):
        assert f.files.read("/home/user/shared.txt") == b"parent"
        f.files.write("/home/user/shared.txt", f"fork{i}".encode())
        if iso == "gvisor":
            again, now = _probe(f)
            assert again == token and now >= count
    assert [f.files.read("/home/user/shared.txt") for f in forks] == [b"fork0", b"fork1"]
    assert box.files.read("/home/user/shared.txt") == b"parent"
    box.files.write("/home/user/only-parent", b"")
    assert all(not f.files.exists("/home/user/only-parent") for f in forks)
    if iso == "gvisor":  # each fork's probe counts on its own
        for f in forks:
            _advanced(f, _probe(f)[1])


def test_fork_count_is_checked(backend: LocalBackend, made: list[Sandbox]) -> None:
    box = Sandbox.create(isolation="namespace", backend=backend)
    made.append(box)
    for bad in (0, 17, -1):
        with pytest.raises(Exception) as err:
            box.fork(bad)
        assert type(err.value).__name__ == "InvalidRequest" and "count" in str(err.value)
    box.pause()
    with pytest.raises(InvalidState):
        box.fork(1)
    with pytest.raises(InvalidState):
        box.snapshot("never-made")
    box.resume()
    with pytest.raises(NotFound):
        Sandbox.create(template="never-made", backend=backend)


# --- hostile: one sandbox cannot reach another's checkpoint or snapshot ------------------------------------


def test_a_sandbox_cannot_read_another_ones_image_or_snapshot(
    iso: str, backend: LocalBackend, made: list[Sandbox]
) -> None:
    name = f"secret-{iso}-{os.urandom(3).hex()}"
    victim = Sandbox.create(isolation=iso, timeout=600, backend=backend)
    made.append(victim)
    victim.files.write("/home/user/secret.txt", b"TOPSECRET-" + name.encode())
    victim.snapshot(name)
    try:
        if iso == "gvisor":
            victim.pause()
        attacker = Sandbox.create(isolation=iso, timeout=600, backend=backend)
        made.append(attacker)
        settings = backend._call(lambda: _settings(backend))
        host_paths = [
            str(Path(settings.state_root) / victim.sandbox_id),
            str(Path(settings.cache_root) / "snapshots"),
            str(settings.data_dir),
        ]
        for path in host_paths:
            r = attacker.commands.run(f"ls -la {path}; cat {path}/*/checkpoint.img", user="root")
            assert r.exit_code != 0 and "TOPSECRET" not in r.stdout
        r = attacker.commands.run(
            "grep -rl --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr TOPSECRET / 2>/dev/null; true",
            user="root",
            timeout=120,
        )
        assert "TOPSECRET" not in r.stdout and r.stdout.strip() == ""
        # on the host, the snapshot store is private to root (namespace sandboxes run as unprivileged host uids)
        snapshots = Path(settings.cache_root) / "snapshots"
        assert snapshots.stat().st_mode & 0o077 == 0
        if iso == "gvisor":
            victim.resume()
    finally:
        for b in made[1:]:
            b.kill()
        del made[1:]
        backend.delete_template(name)
