"""Egress policies through the SDK (sync and async), REST and the CLI, embedded and against a real
``corral serve``: both configured with the test's upstream namespace as the egress uplink."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral import AsyncSandbox, InvalidRequest, Sandbox
from corral.errors import InvalidNetworkPolicy, Unsupported

pytestmark = [pytest.mark.root, pytest.mark.bwrap]
CLIENT = Path(__file__).with_name("_client.py").read_text()
ISO = "namespace"


def probe(sbx: Sandbox, *args: str) -> dict:
    result = sbx.commands.run(["/usr/bin/python3", "-c", CLIENT, *args], timeout=60)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def egress_env(internet, corral_data_dir: Path) -> dict[str, str]:
    env = {
        "CORRAL_EGRESS_UPLINK_NETNS": internet.path,
        "CORRAL_EGRESS_RESOLVERS": "198.18.0.53",
        "CORRAL_EGRESS_LAB_RANGES": "2001:db8::/32",  # the upstream's IPv6 addresses, and only those
    }
    # the uplink is the test's own namespace, and it has no route out, of either family
    for family in ("-4", "-6"):
        routes = subprocess.run(
            ["ip", family, "-n", internet.netns, "route", "show", "default"], capture_output=True, text=True
        )
        assert routes.returncode == 0 and routes.stdout.strip() == "", routes.stdout
    assert Path(env["CORRAL_EGRESS_UPLINK_NETNS"]).exists()
    from corral.core.settings import Settings

    egress = Settings.load(env=env).egress  # what the embedded service and the server are configured with
    assert egress.uplink_netns == internet.path and egress.lab_ranges == ("2001:db8::/32",)
    return env


@pytest.fixture(scope="module")
def net_server(
    egress_env, corral_data_dir: Path, tmp_path_factory
) -> Iterator[tuple[object, dict[str, str]]]:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from _corral_server import Server, new_key

    env = {**__import__("os").environ, **egress_env, "CORRAL_DATA_DIR": str(corral_data_dir / "net-server")}
    key = new_key(env, "--tenant", "net")
    server = Server(env, tmp_path_factory.mktemp("net-server") / "server.log")
    server.start()
    try:
        yield server, {"CORRAL_URL": server.url, "CORRAL_API_KEY": key}
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["embedded", "remote"])
def mode(request: pytest.FixtureRequest, egress_env) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in egress_env.items():
            mp.setenv(k, v)
        if request.param == "remote":
            _, client_env = request.getfixturevalue("net_server")
            for k, v in client_env.items():
                mp.setenv(k, v)
        else:
            mp.delenv("CORRAL_URL", raising=False)
        yield request.param


def test_create_update_status_kill(mode: str) -> None:
    with Sandbox.create(isolation=ISO, network={"allow_out": ["allowed.test"]}, timeout=120) as sbx:
        assert sbx.get_info().network == {"allow_out": ["allowed.test"], "deny_out": []}
        assert probe(sbx, "url", "allowed.test")["ok"]
        assert not probe(sbx, "resolve", "other.test")["ok"]
        assert sbx.network.update(allow_out=["other.test"]).allow_out == ("other.test",)
        assert probe(sbx, "url", "other.test")["ok"]
        assert not probe(sbx, "resolve", "allowed.test")["ok"]
        status = sbx.network.status()
        assert status.network == {"allow_out": ["other.test"], "deny_out": []}
        assert status.totals["dns_denied"] >= 2 and status.totals["tcp_allowed"] >= 2
        assert {d["name"] for d in status.decisions if d["allowed"] and d["kind"] == "tcp"} == {
            "allowed.test",
            "other.test",
        }
        sbx.network.update("internet")
        assert sbx.get_info().network == "internet"
        assert not probe(sbx, "banner", "169.254.169.254", "80", "2")["ok"]
        assert probe(sbx, "url", "forbidden.test")["ok"]


def test_ports_into_the_sandbox_work_with_any_policy(mode: str) -> None:
    with Sandbox.create(isolation=ISO, network={"allow_out": []}, timeout=120) as sbx:
        sbx.commands.start("python3 -m http.server 8000 --bind 127.0.0.1")
        with sbx.forward_port(8000) as fwd:
            for _ in range(100):
                try:
                    with urllib.request.urlopen(fwd.url + "/", timeout=5) as reply:
                        assert reply.status == 200
                        break
                except OSError:
                    import time

                    time.sleep(0.05)
            else:
                raise AssertionError("the forwarded port never answered")
        assert not probe(sbx, "resolve", "allowed.test")["ok"]


def test_bad_policies_are_typed_errors_and_create_nothing(mode: str) -> None:
    before = {s.sandbox_id for s in Sandbox.list()}
    for bad in ({"allow_out": ["10.0.0.0/8"]}, {"allow_out": ["169.254.169.254"]}, {"allow_out": ["bad name"]},
                {"allow": ["x.test"]}, "everything", {"allow_out": "x.test"}, {"allow_out": ["10.0.0.1/8"]}):  # fmt: skip
        with pytest.raises(InvalidNetworkPolicy) as err:
            Sandbox.create(isolation=ISO, network=bad)
        assert isinstance(err.value, InvalidRequest) and err.value.message
    with Sandbox.create(isolation=ISO, timeout=60) as sbx, pytest.raises(Unsupported):
        sbx.network.update("internet")  # none has nothing to update
    assert {s.sandbox_id for s in Sandbox.list()} == before


@pytest.mark.anyio
async def test_async_surface(mode: str) -> None:
    async with await AsyncSandbox.create(isolation=ISO, network="internet", timeout=120) as sbx:
        await sbx.network.update(deny_out=["forbidden.test"])
        assert sbx.network.policy.mode == "internet" and sbx.network.policy.deny_out == ("forbidden.test",)
        status = await sbx.network.status()
        assert status.network == {"deny_out": ["forbidden.test"]}


def test_audit_holds_every_decision(egress_env, monkeypatch) -> None:
    import anyio

    for k, v in egress_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CORRAL_URL", raising=False)
    with Sandbox.create(isolation=ISO, network={"allow_out": ["allowed.test"]}, timeout=120) as sbx:
        for _ in range(5):
            assert not probe(sbx, "banner", "198.19.0.2", "7000", "2")["ok"]
        assert probe(sbx, "url", "allowed.test")["ok"]
        sandbox_id = sbx.sandbox_id
    # killed: the feed was copied into the audit log before the state dir went
    from corral.core.audit import iter_entries
    from corral.core.settings import Settings
    from corral.wiring import open_service

    async def entries() -> list:
        async with open_service(Settings.load()) as service:
            return [e async for e in iter_entries(service.store) if e.sandbox_id == sandbox_id]

    found = anyio.run(entries)
    denied = [e for e in found if e.action == "network.deny" and e.details.get("dest") == "198.19.0.2"]
    assert sum(e.details["count"] for e in denied) == 5
    assert any(e.action == "network.allow" and e.details.get("name") == "allowed.test" for e in found)


def test_rest_and_cli(net_server) -> None:
    _, client_env = net_server
    headers = {"Authorization": f"Bearer {client_env['CORRAL_API_KEY']}"}
    with httpx.Client(base_url=client_env["CORRAL_URL"], headers=headers, timeout=60) as http:
        bad = http.post(
            "/v1/sandboxes", json={"isolation": ISO, "network": {"allow_out": ["192.168.0.0/16"]}}
        )
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_network_policy", bad.text
        made = http.post("/v1/sandboxes", json={"isolation": ISO, "network": {"allow_out": ["allowed.test"]}})
        assert made.status_code == 201, made.text
        sid = made.json()["sandbox_id"]
        try:
            env = {**__import__("os").environ, **client_env}
            cli = [sys.executable, "-m", "corral.cli.main", "sandbox", "network", sid]
            done = subprocess.run(
                [*cli, "--allow-out", "other.test", "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["network"] == {"allow_out": ["other.test"], "deny_out": []}
            got = http.get(f"/v1/sandboxes/{sid}/network").json()
            assert got["network"] == {"allow_out": ["other.test"], "deny_out": []}
            bad = http.put(f"/v1/sandboxes/{sid}/network", json={"network": {"allow_out": ["fd00:ec2::254"]}})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_network_policy"
            metrics = http.get("/metrics").text
            assert 'corral_egress_decisions{kind="dns",verdict="denied"}' in metrics, metrics[-3000:]
        finally:
            http.delete(f"/v1/sandboxes/{sid}")


def test_a_restarted_server_updates_and_cleans_up(egress_env, corral_data_dir: Path, tmp_path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from _corral_server import Server, new_key
    from corral.runtimes._net import netns as _netns

    env = {**__import__("os").environ, **egress_env, "CORRAL_DATA_DIR": str(corral_data_dir / "net-restart")}
    key = new_key(env, "--tenant", "restart")
    server = Server(env, tmp_path / "server.log")
    server.start()
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            made = http.post(
                "/v1/sandboxes", json={"isolation": ISO, "network": {"allow_out": ["allowed.test"]}}
            )
            assert made.status_code == 201, made.text
            sid = made.json()["sandbox_id"]
        server.kill9()  # the sandbox, its netns and its egress process outlive the server …
        server.start()
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            # … and the new server changes its policy and removes all of it
            put = http.put(f"/v1/sandboxes/{sid}/network", json={"network": "internet"})
            assert put.status_code == 200 and put.json()["network"] == "internet", put.text
            assert _netns.NETNS_DIR.joinpath(f"corral-{sid}").exists()
            assert http.delete(f"/v1/sandboxes/{sid}").status_code == 200
            assert not _netns.NETNS_DIR.joinpath(f"corral-{sid}").exists()
            assert not any(p.name.startswith("cx" + sid[3:15]) for p in Path("/sys/class/net").iterdir())
    finally:
        server.stop()


def test_without_a_configured_uplink_no_sandbox_gets_network(monkeypatch) -> None:
    """The session points the uplink at a namespace that does not exist (tests/conftest.py): a test that
    forgets its own upstream gets a clear error and nothing half-made, never the host's real uplink."""
    from corral.errors import RuntimeUnavailable

    monkeypatch.delenv("CORRAL_URL", raising=False)
    monkeypatch.setenv(
        "CORRAL_EGRESS_UPLINK_NETNS", "/run/netns/corral-test-no-uplink-configured"
    )  # the session's
    assert not Path(__import__("os").environ["CORRAL_EGRESS_UPLINK_NETNS"]).exists()

    def ours() -> set[str]:
        netns = Path("/run/netns")
        return (
            {p.name for p in netns.iterdir() if p.name.startswith("corral-sb-")} if netns.exists() else set()
        )

    before = ours()
    with pytest.raises(RuntimeUnavailable):
        Sandbox.create(isolation=ISO, network="internet", timeout=60)
    assert ours() <= before


@pytest.mark.runsc
def test_gvisor_with_network_refuses_pause_fork_and_auto_pause_up_front(mode: str) -> None:
    """runsc 20240729 restores its netstack without the namespace's interfaces (loopback only), so a gVisor
    sandbox with network says so (Capabilities.pause_network/snapshot_network) instead of coming back
    without its network, or being stopped at an auto-pause timeout."""
    with Sandbox.create(isolation="gvisor", network={"allow_out": ["allowed.test"]}, timeout=120) as sbx:
        with pytest.raises(Unsupported, match="with network cannot be paused"):
            sbx.pause()
        with pytest.raises(Unsupported, match="with network cannot be snapshotted or forked"):
            sbx.fork()
        assert sbx.get_info().state == "running"
        assert probe(sbx, "url", "allowed.test")["ok"]  # untouched


def test_auto_pause_with_network_is_refused_where_pause_loses_it(egress_env) -> None:
    import anyio

    from corral.core.records import LOCAL_TENANT
    from corral.core.settings import Settings
    from corral.models import CreateParams
    from corral.wiring import open_service

    async def create() -> None:
        async with open_service(Settings.load(env={**__import__("os").environ, **egress_env})) as service:
            params = CreateParams(isolation="gvisor", network="internet", auto_pause=True, timeout=60)
            await service.create(params, tenant=LOCAL_TENANT)

    with pytest.raises(InvalidRequest, match="cannot pause at their timeout"):
        anyio.run(create)
