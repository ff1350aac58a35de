"""Secrets that never enter the sandbox, end to end against the test's own upstream namespace.

The sandbox holds a placeholder; the egress proxy terminates TLS to the bound host with the sandbox's CA
(which the sandbox trusts), verifies the upstream against the test CA (``CORRAL_EGRESS_UPSTREAM_CA_FILE``)
and substitutes the value there only. The upstream records every request it got (``Internet.received``), so
each test reads exactly what reached which host.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral import AsyncSandbox, InvalidRequest, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.bwrap]
CLIENT = Path(__file__).with_name("_secret_client.py").read_text()
ISO = "namespace"
ALLOWED, OTHER = "198.18.1.1", "198.18.1.2"  # allowed.test, other.test (conftest.ZONE)


def send(sbx: Sandbox, raw: str, *, ip: str = ALLOWED, sni: str | None = "allowed.test", **kw: Any) -> dict:
    spec = {"ip": ip, "sni": sni, "raw": raw, **kw}
    result = sbx.commands.run(["/usr/bin/python3", "-c", CLIENT, json.dumps(spec)], timeout=60)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def get(path: str, host: str, *headers: str) -> str:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"


def value() -> str:
    return "sk-test-" + secrets.token_hex(20)


def seen(internet: Any, needle: str) -> list[dict]:
    """The upstream's records of requests that carried ``needle`` anywhere (headers or body)."""
    return [r for r in internet.received() if needle in json.dumps(r)]


@pytest.fixture(scope="module")
def egress_env(internet) -> dict[str, str]:
    routes = subprocess.run(
        ["ip", "-n", internet.netns, "route", "show", "default"], capture_output=True, text=True
    )
    assert routes.stdout.strip() == "" and Path(internet.path).exists()  # the test's own, no route out
    return {
        "CORRAL_EGRESS_UPLINK_NETNS": internet.path,
        "CORRAL_EGRESS_RESOLVERS": "198.18.0.53",
        "CORRAL_EGRESS_UPSTREAM_CA_FILE": str(internet.ca),
    }


@pytest.fixture(scope="module")
def secret_server(
    egress_env, corral_data_dir: Path, tmp_path_factory
) -> Iterator[tuple[Any, dict[str, str]]]:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from _corral_server import Server, new_key

    env = {**os.environ, **egress_env, "CORRAL_DATA_DIR": str(corral_data_dir / "secret-server")}
    key = new_key(env, "--tenant", "secrets")
    server = Server(env, tmp_path_factory.mktemp("secret-server") / "server.log")
    server.start()
    try:
        yield server, {"CORRAL_URL": server.url, "CORRAL_API_KEY": key}
    finally:
        server.stop()


@pytest.fixture
def embedded(egress_env, monkeypatch) -> None:
    for k, v in egress_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CORRAL_URL", raising=False)


@pytest.fixture(params=["embedded", "remote"])
def mode(request: pytest.FixtureRequest, egress_env, monkeypatch) -> str:
    for k, v in egress_env.items():
        monkeypatch.setenv(k, v)
    if request.param == "remote":
        _, client_env = request.getfixturevalue("secret_server")
        for k, v in client_env.items():
            monkeypatch.setenv(k, v)
    else:
        monkeypatch.delenv("CORRAL_URL", raising=False)
    return request.param


def test_the_value_reaches_only_the_bound_host(mode: str, internet) -> None:
    real = value()
    network = {"allow_out": ["allowed.test", "other.test"]}
    with Sandbox.create(
        isolation=ISO,
        network=network,
        secrets={"API_KEY": {"value": real, "hosts": ["allowed.test"]}},
        timeout=120,
    ) as sbx:
        placeholder = sbx.commands.run('printf %s "$API_KEY"').stdout
        assert placeholder.startswith("CORRAL_SECRET_API_KEY_") and real not in placeholder
        assert sbx.get_info().secrets == ["API_KEY"]
        # HTTPS to the bound host, the certificate verified by the sandbox (it trusts its egress CA)
        got = send(sbx, get("/headers", "allowed.test", "Authorization: Bearer $API_KEY"))
        assert got["status"] == 200, got
        assert [h[1] for h in json.loads(got["body"]) if h[0] == "authorization"] == [
            "Bearer " + "*" * len(real)
        ]
        carried = seen(internet, real)
        assert [(r["local"], r["sni"], r["tls"]) for r in carried] == [(ALLOWED, "allowed.test", True)]
        assert ["authorization", "Bearer " + real] in carried[0]["headers"]
        # an allowed host the secret is not bound to: passed through untouched (the sandbox talks TLS with the
        # upstream itself), and it gets the placeholder
        got = send(
            sbx,
            get("/", "other.test", "Authorization: Bearer $API_KEY"),
            ip=OTHER,
            sni="other.test",
            verify=False,
        )
        assert got["status"] == 200, got
        # plain HTTP to the bound host: nothing is substituted outside TLS
        got = send(sbx, get("/", "allowed.test", "X-Key: $API_KEY"), port=80, tls=False, sni=None)
        assert got["status"] == 200, got
        assert len(seen(internet, real)) == 1
        with_placeholder = seen(internet, placeholder)
        assert {(r["local"], r["tls"]) for r in with_placeholder} == {(OTHER, True), (ALLOWED, False)}
        # a second sandbox gets a placeholder of its own
        with Sandbox.create(isolation=ISO, network=network, secrets={"API_KEY": real}, timeout=120) as second:
            assert second.commands.run('printf %s "$API_KEY"').stdout not in (placeholder, real)
            # the first sandbox's placeholder means nothing to the second's proxy, even on a bound host
            got = send(second, get("/", "allowed.test", "X-Key: " + placeholder))
            assert got["status"] == 200, got
        assert len(seen(internet, real)) == 1
        assert {(r["local"], r["tls"]) for r in seen(internet, placeholder)} == {
            (OTHER, True),
            (ALLOWED, False),
            (ALLOWED, True),
        }


@pytest.mark.anyio
async def test_async_sdk_binds_to_allow_out_names_by_default(embedded, internet) -> None:
    real = value()
    async with await AsyncSandbox.create(
        isolation=ISO, network={"allow_out": ["allowed.test"]}, secrets={"TOKEN": real}, timeout=120
    ) as sbx:
        assert (await sbx.get_info()).secrets == ["TOKEN"]
        env = (await sbx.commands.run("env")).stdout
        assert real not in env and "TOKEN=CORRAL_SECRET_TOKEN_" in env
        # curl, with the trust the sandbox's env gives it
        done = await sbx.commands.run('curl -sS -H "X-Token: $TOKEN" https://allowed.test/headers')
        assert done.exit_code == 0, done.stderr
        assert real not in done.stdout and "*" * len(real) in done.stdout
        # Python's own client: two requests on one kept-alive connection, both substituted
        script = (
            "import http.client, os\n"
            "c = http.client.HTTPSConnection('allowed.test', timeout=10)\n"
            "for path in ('/headers', '/'):\n"
            "    c.request('GET', path, headers={'X-Token': os.environ['TOKEN']})\n"
            "    print(c.getresponse().read().decode())\n"
        )
        done = await sbx.commands.run(["/usr/bin/python3", "-c", script])
        assert done.exit_code == 0, done.stderr
        # HTTP/2 is asked for, HTTP/1.1 is what the intercepted leg offers (ALPN)
        done = await sbx.commands.run(
            "curl -sS --http2 -o /dev/null -w '%{http_version}' https://allowed.test/"
        )
        assert done.exit_code == 0 and done.stdout == "1.1", (done.stdout, done.stderr)
        # Node (NODE_EXTRA_CA_CERTS)
        js = "fetch('https://allowed.test/headers',{headers:{'x-token':process.env.TOKEN}}).then(r=>r.text()).then(console.log)"
        done = await sbx.commands.run(["node", "-e", js])
        assert done.exit_code == 0, done.stderr
        assert "*" * len(real) in done.stdout and real not in done.stdout
    carried = seen(internet, real)
    assert [r["sni"] for r in carried] == ["allowed.test"] * 4
    assert [r["path"] for r in carried] == ["/headers", "/headers", "/", "/headers"]  # not the bare curl


def test_hostile_sandbox_cannot_get_the_value_out(embedded, internet) -> None:
    real = value()
    network = {"allow_out": ["allowed.test", "other.test", "a.cdn.test"]}
    with Sandbox.create(
        isolation=ISO, network=network, secrets={"K": {"value": real, "hosts": ["allowed.test"]}}, timeout=120
    ) as sbx:
        sbx.commands.run("getent hosts allowed.test other.test")  # pin both names
        # the bound SNI with another Host: answered by the proxy, nothing sent upstream
        got = send(sbx, get("/", "other.test", "X-K: $K"))
        assert got["status"] == 421, got
        # another SNI with the bound Host: not intercepted; the upstream sees the placeholder
        got = send(sbx, get("/", "allowed.test", "X-K: $K"), sni="other.test", ip=OTHER, verify=False)
        assert got["status"] == 200, got
        placeholder = sbx.commands.run('printf %s "$K"').stdout
        assert [(r["local"], r["sni"]) for r in seen(internet, placeholder)] == [(OTHER, "other.test")]
        # CONNECT through the intercepted connection, and an absolute-form target naming another host
        assert (
            send(sbx, "CONNECT other.test:443 HTTP/1.1\r\nHost: allowed.test\r\nX-K: $K\r\n\r\n")["status"]
            == 405
        )
        got = send(
            sbx,
            "GET http://other.test/ HTTP/1.1\r\nHost: allowed.test\r\nX-K: $K\r\nConnection: close\r\n\r\n",
        )
        assert got["status"] == 400, got
        # pipelined: a good request, then one for another Host on the same connection
        first = "GET /first HTTP/1.1\r\nHost: allowed.test\r\nX-K: $K\r\n\r\n"
        got = send(sbx, first + get("/second", "other.test", "X-K: $K"))
        assert got["status"] == 200 and "421" in got["body"], got
        assert [r["path"] for r in seen(internet, real)] == ["/first"]
        # the bound SNI at another allowed host's address: refused (not the bound name's address)
        assert not send(sbx, get("/", "allowed.test", "X-K: $K"), ip=OTHER)["ok"]
        # a WebSocket upgrade (the rest of the stream would not be HTTP any more)
        got = send(sbx, get("/", "allowed.test", "X-K: $K", "Upgrade: websocket", "Connection: Upgrade"))
        assert got["status"] == 501, got
        # the proxy is not in the sandbox's world: no process of it, no file of it, nothing in any env
        probe = sbx.commands.run(
            "for p in /proc/[0-9]*; do cat $p/cmdline $p/environ 2>/dev/null; echo; done; ls /proc | head -50",
            user="root",
        )
        assert "_net.egress" not in probe.stdout and real not in probe.stdout
        net_dir = Path(json.loads(json.dumps(_instance_extra(sbx)))["net"]["net_dir"])
        assert sbx.commands.run(f"ls {net_dir}").exit_code != 0
        # the upstream saw the value in the one request meant for it, nowhere else
        assert [(r["local"], r["path"]) for r in seen(internet, real)] == [(ALLOWED, "/first")]
        # and it is in no file of the sandbox's state (writable layer, egress dir, shim spec)
        state = net_dir.parent
        hits = subprocess.run(["grep", "-rl", "--", real, str(state)], capture_output=True, text=True)
        assert hits.stdout == "", hits.stdout
        assert (
            "BEGIN PRIVATE KEY"
            not in subprocess.run(
                ["grep", "-rl", "--", "PRIVATE KEY", str(state)], capture_output=True, text=True
            ).stdout
        )


def test_a_policy_update_cuts_an_intercepted_connection(embedded, internet) -> None:
    import time

    real = value()
    with Sandbox.create(
        isolation=ISO, network={"allow_out": ["allowed.test", "other.test"]}, secrets={"K": real}, timeout=120
    ) as sbx:
        # /slow takes ~50 s; secrets bound to both names, so this connection is intercepted
        handle = sbx.commands.start(
            'curl -sS -o /dev/null -H "X-K: $K" https://allowed.test/slow; echo rc=$?'
        )
        for _ in range(100):
            if seen(internet, real):
                break
            time.sleep(0.1)
        started = time.monotonic()
        assert sbx.network.update(allow_out=["other.test"]).allow_out == ("other.test",)
        result = handle.wait()
        assert time.monotonic() - started < 20 and "rc=0" not in result.stdout, result.stdout
    assert [r["path"] for r in seen(internet, real)] == ["/slow"]


def _instance_extra(sbx: Sandbox) -> dict:
    import anyio

    from corral.core.settings import Settings
    from corral.wiring import open_service

    async def extra() -> dict:
        async with open_service(Settings.load()) as service:
            record = await service.store.get_sandbox(sbx.sandbox_id)
            assert record is not None and record.instance is not None
            return dict(record.instance.extra)

    return anyio.run(extra)


def test_an_upstream_with_an_untrusted_certificate_gets_nothing(embedded, internet, monkeypatch) -> None:
    monkeypatch.delenv("CORRAL_EGRESS_UPSTREAM_CA_FILE")  # the system trust store knows no test CA
    real = value()
    with Sandbox.create(
        isolation=ISO, network={"allow_out": ["allowed.test"]}, secrets={"K": real}, timeout=120
    ) as sbx:
        got = send(sbx, get("/", "allowed.test", "X-K: $K"))
        assert got["status"] == 502 and "certificate" in got["body"], got
    assert seen(internet, real) == []


def test_body_substitution_when_asked(embedded, internet) -> None:
    real = value()
    with Sandbox.create(
        isolation=ISO,
        network={"allow_out": ["allowed.test"]},
        secrets={"B": {"value": real, "hosts": ["allowed.test"], "body": True}, "H": value()},
        timeout=120,
    ) as sbx:
        done = sbx.commands.run(
            'curl -sS -X POST --data "$(printf \'{"key": "%s"}\' "$B")" https://allowed.test/echo'
        )
        assert done.exit_code == 0, done.stderr
        assert done.stdout == '{"key": "' + "*" * len(real) + '"}'
    carried = seen(internet, real)
    assert len(carried) == 1 and carried[0]["body"] == '{"key": "' + real + '"}'


def test_secrets_at_rest_logs_audit_and_api(
    embedded, internet, corral_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    real = value()
    with Sandbox.create(
        isolation=ISO, network={"allow_out": ["allowed.test"]}, secrets={"OPENAI_KEY": real}, timeout=120
    ) as sbx:
        assert send(sbx, get("/", "allowed.test", "Authorization: Bearer $OPENAI_KEY"))["ok"]
        info = sbx.get_info()
        assert info.secrets == ["OPENAI_KEY"] and real not in json.dumps(info.to_wire())
        extra = _instance_extra(sbx)
        net_dir = Path(extra["net"]["net_dir"])
        egress_pid = extra["net"]["pid"]
        assert Path(f"/proc/{egress_pid}").exists()
        # the store: names in clear, the value only sealed
        db = b"".join(p.read_bytes() for p in corral_data_dir.glob("corral.db*"))
        assert b"OPENAI_KEY" in db and real.encode() not in db
        key_file = corral_data_dir / "secrets.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert real not in (net_dir / "egress.log").read_text()
        sandbox_id = sbx.sandbox_id
    # killed: the egress process (the only holder of the CA key) and every file of it are gone
    assert not Path(f"/proc/{egress_pid}").exists() and not net_dir.exists()
    assert not net_dir.parent.exists()  # the writable layer with the CA bundle went with the state dir
    assert real not in caplog.text
    import anyio

    from corral.core.audit import iter_entries
    from corral.core.settings import Settings
    from corral.wiring import open_service

    async def entries() -> list:
        async with open_service(Settings.load()) as service:
            return [e async for e in iter_entries(service.store) if e.sandbox_id == sandbox_id]

    found = anyio.run(entries)
    create = [e for e in found if e.action == "sandbox.create"]
    assert create and create[0].details["secrets"] == ["OPENAI_KEY"]
    assert real not in json.dumps([e.details for e in found])


def test_a_fork_or_snapshot_gets_no_secrets(embedded, internet) -> None:
    real = value()
    network = {"allow_out": ["allowed.test"]}
    with Sandbox.create(isolation=ISO, network=network, secrets={"K": real}, timeout=120) as sbx:
        placeholder = sbx.commands.run('printf %s "$K"').stdout
        sbx.files.write("/home/user/token", placeholder.encode())
        name = f"secret-snap-{secrets.token_hex(3)}"
        sbx.snapshot(name)
        forks = sbx.fork()
        try:
            assert forks[0].get_info().secrets == []
            assert real not in forks[0].commands.run("env").stdout
        finally:
            for f in forks:
                f.kill()
    # a sandbox started from the snapshot with network but no secrets: the origin's placeholder resolves to
    # nothing (there is no interception at all: the sandbox talks TLS with the upstream itself)
    with Sandbox.create(name, isolation=ISO, network=network, timeout=120) as restored:
        assert restored.get_info().secrets == []
        assert restored.files.read("/home/user/token") == placeholder.encode()
        got = send(restored, get("/", "allowed.test", "X-K: " + placeholder), verify=False)
        assert got["status"] == 200, got
    assert seen(internet, real) == [] and len(seen(internet, placeholder)) == 1


def test_bad_secrets_are_typed_errors_that_echo_no_value(embedded) -> None:
    real = value()
    before = {s.sandbox_id for s in Sandbox.list()}
    cases = [
        ({"K": real}, "none"),  # no network to substitute on
        ({"K": real}, "internet"),  # no name to bind it to
        ({"K": {"value": real, "hosts": ["other.test"]}}, {"allow_out": ["allowed.test"]}),  # not allowed
        ({"K": {"value": real, "hosts": ["198.18.1.1"]}}, {"allow_out": ["198.18.1.1"]}),  # an address
        ({"bad name": real}, {"allow_out": ["allowed.test"]}),
        ({"K": real + "\r\nX-Evil: 1"}, {"allow_out": ["allowed.test"]}),  # header injection
        ({"K": {"value": real, "oops": 1}}, {"allow_out": ["allowed.test"]}),
    ]
    for given, network in cases:
        with pytest.raises(InvalidRequest) as err:
            Sandbox.create(isolation=ISO, network=network, secrets=given, timeout=60)
        assert real not in str(err.value) and real not in json.dumps(err.value.details)
    with pytest.raises(InvalidRequest):  # a secret's name is also an env variable
        Sandbox.create(
            isolation=ISO, network={"allow_out": ["allowed.test"]}, secrets={"K": real}, envs={"K": "x"}
        )
    assert {s.sandbox_id for s in Sandbox.list()} == before


def test_rest_and_cli(secret_server, internet) -> None:
    _, client_env = secret_server
    real = value()
    headers = {"Authorization": f"Bearer {client_env['CORRAL_API_KEY']}"}
    with httpx.Client(base_url=client_env["CORRAL_URL"], headers=headers, timeout=120) as http:
        bad = http.post(
            "/v1/sandboxes", json={"isolation": ISO, "secrets": {"K": {"value": real, "hosts": 3}}}
        )
        assert bad.status_code == 400 and real not in bad.text, bad.text
        made = http.post(
            "/v1/sandboxes",
            json={"isolation": ISO, "network": {"allow_out": ["allowed.test"]}, "secrets": {"K": real}},
        )
        assert made.status_code == 201, made.text
        assert made.json()["secrets"] == ["K"] and real not in made.text
        sid = made.json()["sandbox_id"]
        try:
            got = http.get(f"/v1/sandboxes/{sid}")
            assert got.json()["secrets"] == ["K"] and real not in got.text
        finally:
            http.delete(f"/v1/sandboxes/{sid}")
    env = {**os.environ, **client_env, "CLI_SECRET": real}
    cli = [sys.executable, "-m", "corral.cli.main", "sandbox", "create", "--isolation", ISO, "--json",
           "--allow-out", "allowed.test", "--secret", "CLI_SECRET@allowed.test"]  # fmt: skip
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    assert made["secrets"] == ["CLI_SECRET"] and real not in done.stdout
    subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "sandbox", "kill", made["sandbox_id"]], env=env, timeout=60
    )
    missing = subprocess.run(
        [*cli[:-1], "NOT_SET_ANYWHERE"], env=env, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode != 0 and "NOT_SET_ANYWHERE" in missing.stderr


@pytest.mark.runsc
def test_gvisor_sandboxes_get_the_same_substitution(embedded, internet) -> None:
    real = value()
    with Sandbox.create(
        isolation="gvisor", network={"allow_out": ["allowed.test"]}, secrets={"K": real}, timeout=120
    ) as sbx:
        assert real not in sbx.commands.run("env").stdout
        done = sbx.commands.run('curl -sS -H "X-K: $K" https://allowed.test/headers')
        assert done.exit_code == 0, done.stderr
        assert "*" * len(real) in done.stdout and real not in done.stdout
    assert [(r["local"], r["sni"]) for r in seen(internet, real)] == [(ALLOWED, "allowed.test")]


def test_substitution_outlives_a_server_restart_and_goes_with_the_sandbox(
    egress_env, internet, corral_data_dir: Path, tmp_path, monkeypatch
) -> None:
    """The values live in the sandbox's egress process, which outlives the server like the shim does; the
    restarted server's kill removes it (and with it the only copy of the CA key)."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from _corral_server import Server, new_key

    env = {**os.environ, **egress_env, "CORRAL_DATA_DIR": str(corral_data_dir / "secret-restart")}
    key = new_key(env, "--tenant", "restart")
    server = Server(env, tmp_path / "server.log")
    server.start()
    real = value()
    try:
        monkeypatch.setenv("CORRAL_URL", server.url)
        monkeypatch.setenv("CORRAL_API_KEY", key)
        sbx = Sandbox.create(
            isolation=ISO, network={"allow_out": ["allowed.test"]}, secrets={"K": real}, timeout=120
        )
        sandbox_id = sbx.sandbox_id
        sbx.close()
        server.kill9()
        server.start()
        with Sandbox.connect(sandbox_id) as sbx:
            assert send(sbx, get("/", "allowed.test", "X-K: $K"))["status"] == 200
            sbx.kill()
        assert [r["path"] for r in seen(internet, real)] == ["/"]
        assert real not in (tmp_path / "server.log").read_text()
        egress = [p for p in Path("/proc").glob("[0-9]*") if sandbox_id.encode() in _cmdline(p)]
        assert egress == []
    finally:
        server.stop()


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
