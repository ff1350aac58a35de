"""E2B's REST control plane, driven by the real ``e2b`` SDK (sync and async) against a real ``corral serve``.

Configured by environment variables only, as a user moving from E2B would. What a sandbox holds inside is
checked through Corral's own SDK (same tenant, Corral-form key), so these tests need only the REST surface.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from _e2b_server import E2BServer
from e2b.exceptions import SandboxException, SandboxNotFoundException

import corral
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState

pytestmark = pytest.mark.timeout(300)


def wait_gone(sandbox_id: str, within: float) -> float:
    """Seconds until get_info says the sandbox is gone (polled: the server's reaper and shim end it)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        try:
            Sandbox.get_info(sandbox_id)
        except SandboxNotFoundException:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"sandbox {sandbox_id} still exists after {within} s")


@contextlib.contextmanager
def inside_of(sandbox_id: str) -> Iterator[corral.Sandbox]:
    """Corral's SDK on a sandbox, released (not killed) afterwards."""
    sbx = corral.Sandbox.connect(sandbox_id)
    try:
        yield sbx
    finally:
        sbx.close()


@pytest.fixture
def corral_sdk(e2b_env: E2BServer, monkeypatch: pytest.MonkeyPatch) -> E2BServer:
    """Corral's own SDK on the same server and tenant, to look inside sandboxes the E2B SDK made."""
    monkeypatch.setenv("CORRAL_URL", e2b_env.url)
    monkeypatch.setenv("CORRAL_API_KEY", e2b_env.corral_key_a)
    return e2b_env


@pytest.fixture
def made(e2b_env: E2BServer) -> Iterator[list[str]]:
    """Ids of sandboxes a test made; whatever is still alive is killed afterwards."""
    ids: list[str] = []
    yield ids
    for sandbox_id in ids:
        Sandbox.kill(sandbox_id)


def test_create_get_kill(made: list[str], corral_sdk: E2BServer) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    sbx = Sandbox.create(
        timeout=120, metadata={"app": "lifecycle", "odd": "a b&c=d/é"}, envs={"GREETING": "hi"}
    )
    made.append(sbx.sandbox_id)
    assert sbx.sandbox_id.startswith("sb-")
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.template_id == "base" and info.name == "base"
    assert info.metadata == {"app": "lifecycle", "odd": "a b&c=d/é"}
    assert info.state is SandboxState.RUNNING
    assert before <= info.started_at <= datetime.now(UTC)
    assert timedelta(seconds=118) <= info.end_at - info.started_at <= timedelta(seconds=122)
    assert info.cpu_count >= 1 and info.memory_mb > 0
    assert info.envd_version == "0.6.13"
    # the E2B create really made a Corral sandbox with those env vars
    with inside_of(sbx.sandbox_id) as inside:
        assert inside.commands.run("echo $GREETING").stdout == "hi\n"

    assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False  # already gone: E2B answers 404, the SDK says False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id)


def test_default_timeout_is_300_seconds(made: list[str]) -> None:
    sbx = Sandbox.create()
    made.append(sbx.sandbox_id)
    info = sbx.get_info()
    assert timedelta(seconds=298) <= info.end_at - info.started_at <= timedelta(seconds=302)


def test_set_timeout_really_ends_the_sandbox(made: list[str]) -> None:
    sbx = Sandbox.create(timeout=300)
    made.append(sbx.sandbox_id)
    sbx.set_timeout(2)  # shortening is allowed: the end is now + 2 s
    end = sbx.get_info().end_at
    assert end - datetime.now(UTC) <= timedelta(seconds=3)
    assert wait_gone(sbx.sandbox_id, within=30) < 30
    with pytest.raises(SandboxNotFoundException):
        sbx.set_timeout(60)


def test_connect_extends_but_never_shortens(made: list[str]) -> None:
    sbx = Sandbox.create(timeout=200)
    made.append(sbx.sandbox_id)
    end = sbx.get_info().end_at
    again = Sandbox.connect(sbx.sandbox_id, timeout=10)  # shorter: ignored
    assert again.sandbox_id == sbx.sandbox_id
    assert again.get_info().end_at == end
    Sandbox.connect(sbx.sandbox_id, timeout=600)  # longer: extended
    assert sbx.get_info().end_at - datetime.now(UTC) >= timedelta(seconds=590)


def test_pause_and_resume_by_connect(made: list[str], corral_sdk: E2BServer) -> None:
    sbx = Sandbox.create(timeout=120)
    made.append(sbx.sandbox_id)
    with inside_of(sbx.sandbox_id) as inside:
        inside.files.write("/tmp/kept.txt", b"across the pause")
    assert sbx.pause() is True
    assert sbx.pause() is False  # already paused: E2B's 409
    assert sbx.get_info().state is SandboxState.PAUSED
    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED], metadata={})).next_items()
    assert sbx.sandbox_id in [i.sandbox_id for i in paused]

    resumed = Sandbox.connect(sbx.sandbox_id)  # resumes (E2B answers 201)
    assert resumed.get_info().state is SandboxState.RUNNING
    with inside_of(sbx.sandbox_id) as inside:
        assert inside.files.read("/tmp/kept.txt") == b"across the pause"


def test_list_filters_order_and_pages(made: list[str]) -> None:
    tag = f"list-{time.monotonic_ns()}"
    ids = []
    for n in range(3):
        sbx = Sandbox.create(timeout=120, metadata={"tag": tag, "n": str(n)})
        made.append(sbx.sandbox_id)
        ids.append(sbx.sandbox_id)
    other = Sandbox.create(timeout=120, metadata={"tag": "someone-else"})
    made.append(other.sandbox_id)

    def listed(**kw: object) -> list[str]:
        out: list[str] = []
        paginator = Sandbox.list(**kw)  # type: ignore[arg-type]
        while paginator.has_next:
            out += [i.sandbox_id for i in paginator.next_items()]
        return out

    mine = SandboxQuery(metadata={"tag": tag})
    assert listed(query=mine) == ids[::-1]  # newest first by default
    assert listed(query=mine, order="asc") == ids
    assert listed(query=SandboxQuery(metadata={"tag": tag, "n": "1"})) == [ids[1]]
    assert listed(query=SandboxQuery(metadata={"tag": tag}, template="base")) == ids[::-1]
    assert listed(query=SandboxQuery(metadata={"tag": tag}, template="code-interpreter-v1")) == []
    assert listed(query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED])) == []

    # pages of two: the SDK follows x-next-token until the server sends none
    paginator = Sandbox.list(query=mine, limit=2, order="asc")
    first = paginator.next_items()
    assert [i.sandbox_id for i in first] == ids[:2] and paginator.has_next and paginator.next_token
    second = paginator.next_items()
    assert [i.sandbox_id for i in second] == ids[2:] and not paginator.has_next

    started = Sandbox.get_info(ids[1]).started_at
    later = listed(query=SandboxQuery(metadata={"tag": tag}, started_after=started), order="asc")
    assert later == ids[1:]


def test_snapshot_create_from_it_and_delete(made: list[str], corral_sdk: E2BServer) -> None:
    sbx = Sandbox.create(timeout=120)
    made.append(sbx.sandbox_id)
    with inside_of(sbx.sandbox_id) as inside:
        inside.files.write("/home/user/state.txt", b"snapshotted")
    snap = sbx.create_snapshot()
    assert snap.snapshot_id and snap.names == [snap.snapshot_id]
    try:
        assert sbx.get_info().state is SandboxState.RUNNING  # it keeps running
        mine = sbx.list_snapshots().next_items()
        assert [s.snapshot_id for s in mine] == [snap.snapshot_id]
        assert snap.snapshot_id in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]

        child = Sandbox.create(snap.snapshot_id, timeout=60)
        made.append(child.sandbox_id)
        assert child.get_info().template_id == snap.snapshot_id
        with inside_of(child.sandbox_id) as inside:
            assert inside.files.read("/home/user/state.txt") == b"snapshotted"
        child.kill()
    finally:
        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False
    with pytest.raises(SandboxException):
        Sandbox.create(snap.snapshot_id, timeout=60)


def test_fork(made: list[str], corral_sdk: E2BServer) -> None:
    sbx = Sandbox.create(timeout=120, metadata={"role": "parent"})
    made.append(sbx.sandbox_id)
    with inside_of(sbx.sandbox_id) as inside:
        inside.files.write("/home/user/from-parent.txt", b"forked")
    forks = sbx.fork(count=2, timeout=90)
    assert len(forks) == 2
    for child in forks:
        assert not isinstance(child, Exception)
        made.append(child.sandbox_id)
        assert child.sandbox_id != sbx.sandbox_id
        info = child.get_info()
        assert info.state is SandboxState.RUNNING and info.metadata == {"role": "parent"}
        assert info.end_at - datetime.now(UTC) <= timedelta(seconds=91)
        with inside_of(child.sandbox_id) as inside:
            assert inside.files.read("/home/user/from-parent.txt") == b"forked"


def test_refused_options_say_why(e2b_env: E2BServer) -> None:
    with pytest.raises(SandboxException, match=r"network\.egressProxy"):
        Sandbox.create(network={"egress_proxy": {"address": "proxy.example.com:1080"}})
    with pytest.raises(SandboxException, match=r"network\.dnsServers"):
        Sandbox.create(
            network={"allow_out": ["x.test"], "deny_out": ["0.0.0.0/0"], "dns_servers": ["192.0.2.53"]}
        )
    with pytest.raises(SandboxException, match="autoResume"):
        Sandbox.create(lifecycle={"on_timeout": "pause", "auto_resume": True})
    with pytest.raises(SandboxException, match="timeout must be between"):
        Sandbox.create(timeout=10 * 24 * 3600)
    with pytest.raises(SandboxException, match="template 'no-such-template'"):
        Sandbox.create("no-such-template")


@pytest.mark.anyio
async def test_async_lifecycle(e2b_env: E2BServer) -> None:
    sbx = await AsyncSandbox.create(timeout=60, metadata={"async": "yes"})
    try:
        info = await sbx.get_info()
        assert info.metadata == {"async": "yes"} and info.state is SandboxState.RUNNING
        paginator = AsyncSandbox.list(query=SandboxQuery(metadata={"async": "yes"}))
        assert sbx.sandbox_id in [i.sandbox_id for i in await paginator.next_items()]
        await sbx.set_timeout(200)
        assert (await sbx.get_info()).end_at - datetime.now(UTC) >= timedelta(seconds=190)
        assert await sbx.pause() is True
        assert await sbx.pause() is False
        again = await AsyncSandbox.connect(sbx.sandbox_id, timeout=30)
        assert (await again.get_info()).state is SandboxState.RUNNING
    finally:
        assert await sbx.kill() is True
    assert await AsyncSandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info(sbx.sandbox_id)


def test_code_interpreter_v1_is_built_on_first_use(made: list[str], corral_sdk: E2BServer) -> None:
    """E2B's code-interpreter SDK asks for ``code-interpreter-v1``: Corral's code-interpreter template."""
    sbx = Sandbox.create("code-interpreter-v1", timeout=120)
    made.append(sbx.sandbox_id)
    assert sbx.get_info().template_id == "code-interpreter"
    with inside_of(sbx.sandbox_id) as inside:
        out = inside.commands.run("python3 -c 'import pandas, matplotlib; print(pandas.__name__)'")
        assert out.stdout == "pandas\n", out.stderr
    listed = Sandbox.list(query=SandboxQuery(template="code-interpreter-v1")).next_items()
    assert sbx.sandbox_id in [i.sandbox_id for i in listed]
    again = Sandbox.create("code-interpreter", timeout=60)  # Corral's own name: the same template, built once
    made.append(again.sandbox_id)
    assert again.get_info().template_id == "code-interpreter"


def test_on_timeout_pause_pauses_and_connect_resumes(made: list[str], corral_sdk: E2BServer) -> None:
    sbx = Sandbox.create(timeout=3, lifecycle={"on_timeout": "pause"})
    made.append(sbx.sandbox_id)
    info = sbx.get_info()
    assert info.lifecycle is not None and info.lifecycle["on_timeout"] == "pause"
    with inside_of(sbx.sandbox_id) as inside:
        inside.files.write("/tmp/before.txt", b"kept")
        inside.commands.start("sleep 600")
    started = time.monotonic()
    while Sandbox.get_info(sbx.sandbox_id).state is not SandboxState.PAUSED:  # the server's reaper pauses it
        assert time.monotonic() - started < 30, "not paused at its timeout"
        time.sleep(0.2)
    resumed = Sandbox.connect(sbx.sandbox_id, timeout=60)
    info = resumed.get_info()
    assert info.state is SandboxState.RUNNING
    assert info.end_at - datetime.now(UTC) >= timedelta(seconds=55)
    with inside_of(sbx.sandbox_id) as inside:  # the same sandbox, processes and all: not a fresh one
        assert inside.files.read("/tmp/before.txt") == b"kept"
        assert any("sleep 600" in " ".join(p.argv) and p.running for p in inside.commands.list())


def test_quotas_and_audit_apply_to_e2b_keys(e2b_server: E2BServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess

    from e2b.exceptions import RateLimitException

    from _corral_server import CORRAL, new_key

    env = {**os.environ, "CORRAL_DATA_DIR": str(e2b_server.data_dir)}
    key = new_key(env, "--tenant", "e2b-quota", "--e2b")
    quota = subprocess.run(
        [*CORRAL, "tenants", "set-quotas", "e2b-quota", "--max-sandboxes", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert quota.returncode == 0, quota.stderr
    monkeypatch.setenv("E2B_API_URL", e2b_server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", e2b_server.url)
    monkeypatch.setenv("E2B_API_KEY", key)
    first = Sandbox.create(timeout=60)
    try:
        token = httpx.get(
            f"{e2b_server.url}/sandboxes/{first.sandbox_id}", headers={"X-API-Key": key}, timeout=30
        ).json()["envdAccessToken"]
        with pytest.raises(RateLimitException, match="max_sandboxes"):
            Sandbox.create(timeout=60)
    finally:
        first.kill()
    log = subprocess.run([*CORRAL, "audit", "export"], env=env, capture_output=True, text=True, timeout=60)
    assert log.returncode == 0, log.stderr
    created = [line for line in log.stdout.splitlines() if first.sandbox_id in line]
    assert any('"sandbox.create"' in line for line in created), created
    assert any('"sandbox.kill"' in line for line in created), created
    assert token and token not in log.stdout  # the envd access token never reaches the audit log


def test_idempotency_key_makes_a_retried_create_safe(made: list[str], e2b_env: E2BServer) -> None:
    key = f"retry-{time.monotonic_ns()}"
    first = Sandbox.create(timeout=60, idempotency_key=key)
    made.append(first.sandbox_id)
    again = Sandbox.create(timeout=60, idempotency_key=key)
    assert again.sandbox_id == first.sandbox_id
    other = Sandbox.create(timeout=60, idempotency_key=key + "-2")
    made.append(other.sandbox_id)
    assert other.sandbox_id != first.sandbox_id
    # the key is the tenant's own: another tenant's create with it makes its own sandbox
    theirs = Sandbox.create(timeout=60, idempotency_key=key, api_key=e2b_env.key_b)
    assert theirs.sandbox_id != first.sandbox_id
    theirs.kill()
    first.kill()  # once that sandbox is gone, the key makes a new one
    fresh = Sandbox.create(timeout=60, idempotency_key=key)
    made.append(fresh.sandbox_id)
    assert fresh.sandbox_id != first.sandbox_id
    bad = httpx.post(
        f"{e2b_env.url}/v2/sandboxes",
        json={"templateID": "base"},
        headers={"X-API-Key": e2b_env.key_a, "Idempotency-Key": "Not Valid"},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["code"] == 400
