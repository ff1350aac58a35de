"""The SDK surface, sync and async, on the real namespace runtime, in BOTH modes: embedded (no server) and
remote (``corral serve`` in a subprocess, reached through CORRAL_URL/CORRAL_API_KEY, as users do).

The same calls work on gVisor (tests/runtimes/test_conformance.py checks the runtime side); namespace keeps
this suite fast.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import (
    AsyncSandbox,
    CommandFailed,
    EventKind,
    InvalidRequest,
    InvalidState,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Sandbox,
    SandboxState,
)
from corral.client._local import LocalBackend

pytestmark = [pytest.mark.root, pytest.mark.bwrap]

ISO = "namespace"


@pytest.fixture(scope="module", params=["embedded", "remote"], autouse=True)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs once per mode; remote mode only changes the environment, like a user would."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "remote":
            server = request.getfixturevalue("corral_server")
            mp.setenv("CORRAL_URL", server.url)
            mp.setenv("CORRAL_API_KEY", server.api_key)
        else:
            mp.delenv("CORRAL_URL", raising=False)
        yield request.param


@pytest.fixture(scope="module")
def sbx(mode: str) -> Iterator[Sandbox]:
    with Sandbox.create(isolation=ISO, metadata={"suite": "sdk"}, timeout=600) as sandbox:
        yield sandbox


def test_the_issue_example() -> None:
    with Sandbox.create(isolation=ISO) as box:
        r = box.commands.run("python3 -c 'print(6*7)'")
        assert r.stdout == "42\n" and r.exit_code == 0
        box.files.write("/tmp/data.csv", b"a,b\n1,2\n")
        assert box.files.read("/tmp/data.csv") == b"a,b\n1,2\n"
        sandbox_id = box.sandbox_id
    assert sandbox_id not in {i.sandbox_id for i in Sandbox.list()}  # the with-block killed it


def test_commands_results_env_cwd_users(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo out; echo err >&2; exit 7")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 7)
    assert sbx.commands.run("echo $A-$B", envs={"A": "1", "B": "two"}).stdout == "1-two\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("id -u").stdout == "1000\n"  # the unprivileged user by default
    assert sbx.commands.run("id -u", user="root").stdout == "0\n"
    assert sbx.commands.run(["printf", "%s|", "a b", "$HOME"]).stdout == "a b|$HOME|"  # argv: no shell
    with pytest.raises(CommandFailed) as failed:
        sbx.commands.run("exit 3", check=True)
    assert failed.value.exit_code == 3


def test_missing_program_is_a_clear_error(sbx: Sandbox) -> None:
    with pytest.raises(NotFound, match="nosuchprogram"):
        sbx.commands.run(["nosuchprogram", "--help"])
    assert sbx.commands.run("nosuchprogram").exit_code == 127  # through a shell it is the shell's answer


def test_timeout_kills_the_command(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo before; sleep 30", timeout=1)
    assert r.timed_out and r.exit_code is None and r.signal == signal.SIGKILL
    assert r.stdout == "before\n"


def test_stream_delivers_output_before_exit(sbx: Sandbox) -> None:
    kinds = []
    for event in sbx.commands.stream("echo one; read _ < /dev/null; sleep 0.3; echo two"):
        kinds.append((event.kind, event.text))
    assert kinds[0][0] is EventKind.STARTED
    assert kinds[-1][0] is EventKind.EXIT
    outputs = [text for kind, text in kinds if kind is EventKind.STDOUT]
    assert outputs == ["one\n", "two\n"]  # two chunks: the first arrived while the command was still running


def test_background_list_reattach_stdin_kill(sbx: Sandbox) -> None:
    job = sbx.commands.start("cat", stdin=True, tag="cat-job")
    job.send_stdin("hello ")
    job.send_stdin(b"world")
    job.close_stdin()
    result = job.wait()
    assert result.stdout == "hello world" and result.exit_code == 0

    sleeper = sbx.commands.start("echo up; sleep 60", tag="sleeper")
    listed = {p.process_id: p for p in sbx.commands.list()}
    assert listed[sleeper.process_id].running and listed[sleeper.process_id].tag == "sleeper"
    again = Sandbox.connect(sbx.sandbox_id)  # another client re-attaches and sees kept output
    try:
        handle = again.commands.connect(sleeper.process_id)
        handle.kill()
        done = handle.wait()
    finally:
        again.close()
    assert done.stdout == "up\n" and done.signal == signal.SIGKILL


def test_files(sbx: Sandbox, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    assert sbx.files.write("/home/user/dir/a.bin", payload) == len(payload)  # parents created
    assert sbx.files.read("/home/user/dir/a.bin") == payload
    assert b"".join(sbx.files.iter_read("/home/user/dir/a.bin")) == payload
    entry = sbx.files.stat("/home/user/dir/a.bin")
    assert entry.size == len(payload) and entry.type.value == "file" and entry.uid == 1000
    assert sbx.files.make_dir("/home/user/dir/sub") is True
    assert sbx.files.make_dir("/home/user/dir/sub") is False
    sbx.files.write("/home/user/dir/sub/t.txt", "text")
    names = {e.path for e in sbx.files.list("/home/user/dir", depth=2)}
    assert {"/home/user/dir/a.bin", "/home/user/dir/sub", "/home/user/dir/sub/t.txt"} <= names
    sbx.files.rename("/home/user/dir/sub/t.txt", "/home/user/t.txt")
    assert sbx.files.read_text("/home/user/t.txt") == "text"
    sbx.files.remove("/home/user/dir", recursive=True)
    assert not sbx.files.exists("/home/user/dir")

    local = tmp_path / "up.txt"
    local.write_bytes(b"uploaded\n")
    sbx.files.upload(local, "/tmp/up.txt")
    sbx.files.download("/tmp/up.txt", tmp_path / "down.txt")
    assert (tmp_path / "down.txt").read_bytes() == b"uploaded\n"


def test_file_errors(sbx: Sandbox) -> None:
    with pytest.raises(NotFound):
        sbx.files.read("/no/such/file")
    with pytest.raises(PermissionDenied, match="reserved"):
        sbx.files.write("/.corral/x", b"x")
    with pytest.raises(PermissionDenied):
        sbx.files.write("/etc/passwd", b"x")  # as the unprivileged user
    with pytest.raises(InvalidRequest):
        sbx.files.read("bad\x00path")


def test_file_too_large_is_refused_and_nothing_is_left(mode: str) -> None:
    if mode == "remote":
        pytest.skip(
            "needs a server with a small max_file_bytes: tests/server/test_api.py checks that over HTTP"
        )
    backend = LocalBackend.from_env(max_file_bytes=1000)
    try:
        box = Sandbox.create(isolation=ISO, backend=backend)
        try:
            with pytest.raises(ResourceExhausted, match="1000 byte"):
                box.files.write("/tmp/big", b"x" * 5000)
            assert not box.files.exists("/tmp/big")
            assert box.commands.run("ls -A /tmp").stdout == ""  # no partial or temporary file
        finally:
            box.kill()
    finally:
        backend.close()


def test_connect_list_metadata_timeout_kill(sbx: Sandbox) -> None:
    other = Sandbox.create(isolation=ISO, metadata={"suite": "sdk", "role": "other"})
    try:
        ids = {i.sandbox_id for i in Sandbox.list(metadata={"suite": "sdk"})}
        assert {sbx.sandbox_id, other.sandbox_id} <= ids
        assert [i.sandbox_id for i in Sandbox.list(metadata={"role": "other"})] == [other.sandbox_id]
        other.set_timeout(5)
        info = other.get_info()
        assert info.expires_at is not None
        same = Sandbox.connect(other.sandbox_id)
        try:
            assert same.commands.run("echo $((1+1))").stdout == "2\n"
        finally:
            same.close()
    finally:
        other.kill()
        other.close()
    with pytest.raises(InvalidState, match="client was closed"):
        other.get_info()
    stopped = {i.sandbox_id: i for i in Sandbox.list(include_stopped=True)}[other.sandbox_id]
    assert stopped.state is SandboxState.STOPPED
    with pytest.raises(NotFound, match="no longer running"):
        Sandbox.connect(other.sandbox_id)
    again = Sandbox.create(isolation=ISO)
    again.kill()
    with pytest.raises(InvalidState, match="stopped"):
        again.commands.run("true")
    again.close()


def test_bad_create_arguments_create_nothing() -> None:
    before = {i.sandbox_id for i in Sandbox.list()}
    with pytest.raises(InvalidRequest, match="unknown isolation 'quantum'"):
        Sandbox.create(isolation="quantum")
    with pytest.raises(NotFound, match="template 'missing'"):
        Sandbox.create(isolation=ISO, template="missing")
    with pytest.raises(InvalidRequest, match="timeout"):
        Sandbox.create(isolation=ISO, timeout=10**9)
    assert {i.sandbox_id for i in Sandbox.list()} == before


@pytest.mark.anyio
async def test_async_surface() -> None:
    async with await AsyncSandbox.create(isolation=ISO) as box:
        r = await box.commands.run("python3 -c 'print(6*7)'")
        assert r.stdout == "42\n"
        await box.files.write("/tmp/a", b"async")
        assert await box.files.read("/tmp/a") == b"async"
        events = [e.kind async for e in box.commands.stream(["sh", "-c", "echo x"])]
        assert events == [EventKind.STARTED, EventKind.STDOUT, EventKind.EXIT]
        job = await box.commands.start("sleep 60")
        await job.kill()
        assert (await job.wait()).signal == signal.SIGKILL
        assert box.sandbox_id in {i.sandbox_id for i in await AsyncSandbox.list()}
    assert box.sandbox_id not in {i.sandbox_id for i in await AsyncSandbox.list()}


def test_listing_a_large_directory(sbx: Sandbox) -> None:
    """More entries than one protocol header can hold: the listing streams."""
    sbx.commands.run("mkdir -p /tmp/many && cd /tmp/many && for i in $(seq 1 1500); do : > f$i; done")
    names = {e.name for e in sbx.files.list("/tmp/many")}
    assert len(names) == 1500 and "f1" in names and "f1500" in names


def test_every_byte_value_survives_process_output(sbx: Sandbox) -> None:
    """Binary output, including bytes that some line splitters treat as line breaks (0x85, 0x0b, 0x1c)."""
    payload = bytes(range(256)) * 64
    sbx.files.write("/tmp/allbytes", payload)
    got = b"".join(
        e.data for e in sbx.commands.stream(["cat", "/tmp/allbytes"]) if e.kind is EventKind.STDOUT
    )
    assert got == payload
