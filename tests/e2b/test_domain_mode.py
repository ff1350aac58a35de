"""E2B's domain mode end to end: unchanged ``e2b`` / ``e2b_code_interpreter`` code with ``E2B_DOMAIN`` and
``E2B_API_KEY`` only, against a real ``corral serve`` speaking HTTPS, all on this machine.

The setup, made by the test and removed after it:

- a local CA and a certificate for ``sandbox.test``, ``*.sandbox.test`` and ``api.sandbox.test``
  (``corral.server.certs``, the code of ``corral certs make``);
- network namespace ``corral-test-e2bd-<hex>`` with one veth to the host and no other route (checked): the host
  end holds the server's address, the namespace end the test's DNS server (``_dns_server.py``), which answers
  every name under ``sandbox.test`` with the server's address and NXDOMAIN for anything else;
  ``/etc/netns/<name>/resolv.conf`` points the namespace's resolver at it;
- ``corral serve --http2`` on the host end's address, port 443, with ``CORRAL_TLS_CERT``/``_KEY`` and
  ``CORRAL_E2B_DOMAIN=sandbox.test``.

The SDK scripts run inside the namespace with the CA in ``SSL_CERT_FILE`` (which the SDK's transport, pyqwest on
rustls-platform-verifier, and Python's ``ssl`` both read), the current release and the 2.45 line.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _e2b_server import sdk_release

from _corral_server import Server, new_key
from corral.server.certs import make_certs

pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow]

DOMAIN = "sandbox.test"
HERE = Path(__file__).parent
SCRIPT = HERE / "sdk_scripts" / "domain_mode.py"
OLD = ("e2b==2.45.1", "e2b-code-interpreter==2.10.0")  # the 2.45 line and its code interpreter


@dataclass(frozen=True)
class DomainNet:
    netns: str
    server_ip: str
    ca: Path
    key_a: str
    key_b: str
    queries: Path  # "name TYPE" lines the DNS server saw
    log: Path

    def resolved(self) -> set[str]:
        return {line.split()[0] for line in self.queries.read_text().splitlines()}

    def run(self, script: Path | str, *, release: tuple[str, ...] | None = None, **env: str) -> Any:
        """``script`` (a path, or code for ``-c``) in the namespace, with E2B's variables for tenant A."""
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("E2B_", "CORRAL_", "SSL_CERT")) and "proxy" not in k.lower()
        }
        base |= {
            "E2B_DOMAIN": DOMAIN,
            "E2B_API_KEY": self.key_a,
            "OTHER_E2B_API_KEY": self.key_b,
            "SSL_CERT_FILE": str(self.ca),
            **env,
        }
        base = {k: v for k, v in base.items() if v != ""}
        if release is not None:
            base["PYTHONPATH"] = str(sdk_release(*release))
        code = ["-c", script] if isinstance(script, str) else [str(script)]
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-s", *code],
            env=base, capture_output=True, text=True, timeout=1500,
        )  # fmt: skip


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def domain_net(corral_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DomainNet]:
    work = tmp_path_factory.mktemp("e2b-domain")
    certs = make_certs(DOMAIN, work / "certs")
    token = secrets.token_hex(3)
    netns, host_if, ns_if = f"corral-test-e2bd-{token}", f"e2bd{token}h", f"e2bd{token}n"
    third = 200 + secrets.randbelow(50)
    server_ip, dns_ip = f"198.18.{third}.1", f"198.18.{third}.2"  # the benchmarking range: no one's address
    etc = Path("/etc/netns") / netns
    dns = server = None
    _ip("netns", "add", netns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", netns)
        _ip("addr", "add", f"{server_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", netns, "addr", "add", f"{dns_ip}/30", "dev", ns_if)
        _ip("-n", netns, "link", "set", ns_if, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        # THE rule: the namespace reaches the server's /30 and nothing else; no default route, no other link
        assert _ip("-n", netns, "route", "show", "default").strip() == ""
        assert _ip("-n", netns, "-o", "route").split("\n")[0].startswith(f"198.18.{third}.0/30 dev {ns_if}")
        assert len(_ip("-n", netns, "-o", "route").strip().splitlines()) == 1
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text(f"nameserver {dns_ip}\noptions timeout:2 attempts:2\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        queries = work / "queries.log"
        queries.touch()
        dns = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, str(HERE / "_dns_server.py"), dns_ip, DOMAIN,
             server_ip, str(queries)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert dns.stdout is not None and dns.stdout.readline().strip() == b"ready"

        data_dir = corral_data_dir / "e2b-domain-server"  # the session's leak check covers it
        env = {
            **os.environ,
            "CORRAL_DATA_DIR": str(data_dir),
            "CORRAL_TLS_CERT": str(certs.cert),
            "CORRAL_TLS_KEY": str(certs.key),
            "CORRAL_E2B_DOMAIN": DOMAIN,
        }
        key_a = new_key(env, "--tenant", "domain-a", "--e2b")
        key_b = new_key(env, "--tenant", "domain-b", "--e2b")
        health = ssl.create_default_context(cafile=str(certs.ca_cert))
        health.check_hostname = False  # /healthz by address; the chain is still verified
        # --http2, as the deploy configs run it: over TLS the SDK may pick h2 by ALPN (what it picks is checked below)
        server = Server(env, work / "server.log", 443, host=server_ip, tls=health, args=("--http2",))
        server.start()
        yield DomainNet(
            netns=netns, server_ip=server_ip, ca=certs.ca_cert, key_a=key_a, key_b=key_b, queries=queries,
            log=work / "server.log",
        )  # fmt: skip
    finally:
        if server is not None:
            server.stop()
        if dns is not None:
            dns.terminate()
            dns.wait(10)
        # the host end first: deleting it takes its peer with it now, while a deleted netns's links go only
        # when the kernel's cleanup work gets to it (CI saw the host end still there just after `netns del`)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=15)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=15)
        shutil.rmtree(etc, ignore_errors=True)
    assert netns not in _ip("netns", "list")
    assert subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode != 0


@pytest.mark.parametrize("release", [None, OLD], ids=["current", "2.45"])
def test_unchanged_sdk_code_runs_with_e2b_domain_alone(
    domain_net: DomainNet, release: tuple[str, ...] | None
) -> None:
    done = domain_net.run(SCRIPT, release=release)
    assert done.returncode == 0, done.stderr[-4000:]
    version = release[0].split("==")[1] if release else _venv_version()
    assert f"e2b {version}: ok" in done.stderr
    ids = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("sandbox ")]
    assert len(ids) == 2
    # the SDK found every service by its host name: the API's, and envd's and the interpreter's per sandbox
    names = domain_net.resolved()
    assert f"api.{DOMAIN}" in names
    for sandbox_id in ids:
        assert {f"49983-{sandbox_id}.{DOMAIN}", f"49999-{sandbox_id}.{DOMAIN}"} <= names, names
    assert f"8080-{ids[0]}.{DOMAIN}" in names
    # over TLS both SDK lines pick h2 by ALPN for the API and envd's Connect-RPC (the interpreter's client
    # stays on HTTP/1.1): the server, run with --http2 as the deploy configs run it, saw each request so
    seen = [json.loads(line) for line in domain_net.log.read_text().splitlines() if line.startswith("{")]
    starts = [r for r in seen if r.get("route") == "/process.Process/Start" and r.get("sandbox_id") in ids]
    assert starts and {r["http_version"] for r in starts} == {"2"}, starts


def _venv_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("e2b")


UNTRUSTING = """
import sys
from e2b import Sandbox
try:
    Sandbox.create(timeout=60)
except Exception as exc:
    print(type(exc).__name__, str(exc)[:2000])
    sys.exit(3)
sys.exit(0)
"""


@pytest.mark.parametrize("release", [None, OLD], ids=["current", "2.45"])
def test_a_client_that_does_not_trust_the_ca_fails_its_handshake(
    domain_net: DomainNet, release: tuple[str, ...] | None
) -> None:
    done = domain_net.run(UNTRUSTING, release=release, SSL_CERT_FILE="")
    assert done.returncode == 3, (done.stdout, done.stderr[-2000:])
    assert "certificate" in done.stdout.lower() and "UnknownIssuer" in done.stdout, done.stdout
    # and a domain the resolver does not know routes nowhere: no name, no connection
    lost = domain_net.run(UNTRUSTING, release=release, E2B_DOMAIN="other.test")
    assert lost.returncode == 3, (lost.stdout, lost.stderr[-2000:])
    assert "api.other.test" in domain_net.resolved()
    assert "dns error" in lost.stdout.lower() or "resolve" in lost.stdout.lower(), lost.stdout


def _https(
    net: DomainNet, name: str, method: str, path: str, *, context: ssl.SSLContext | None = None, **kw: Any
) -> tuple[int, Any]:
    """One HTTPS request to the server with ``name`` as SNI and Host (what a client resolving it sends)."""
    context = context or ssl.create_default_context(cafile=str(net.ca))
    sock = context.wrap_socket(
        socket.create_connection((net.server_ip, 443), timeout=60), server_hostname=name
    )
    conn = http.client.HTTPConnection(name, timeout=60)
    conn.sock = sock
    try:
        conn.request(method, path, body=kw.get("body"), headers=kw.get("headers") or {})
        answer = conn.getresponse()
        data = answer.read()
    finally:
        conn.close()
    return answer.status, json.loads(data) if data else None


def test_host_names_route_only_to_their_own_tenants_sandbox(domain_net: DomainNet) -> None:
    def create(key: str) -> dict[str, Any]:
        status, body = _https(
            domain_net, f"api.{DOMAIN}", "POST", "/v2/sandboxes",
            body=json.dumps({"templateID": "base", "timeout": 120}),
            headers={"X-API-Key": key, "Content-Type": "application/json"},
        )  # fmt: skip
        assert status == 201, body
        assert body["domain"] == DOMAIN
        return body  # type: ignore[no-any-return]

    a, b = create(domain_net.key_a), create(domain_net.key_b)
    envd_a, envd_b = f"49983-{a['sandboxID']}.{DOMAIN}", f"49983-{b['sandboxID']}.{DOMAIN}"
    rpc = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}
    try:
        assert (
            _https(domain_net, envd_a, "GET", "/health", headers={"X-Access-Token": a["envdAccessToken"]})[0]
            == 204
        )
        status, body = _https(
            domain_net, envd_a, "POST", "/process.Process/List", body="{}",
            headers={**rpc, "X-Access-Token": a["envdAccessToken"]},
        )  # fmt: skip
        assert status == 200, body
        # tenant B's token on A's host; and B's headers naming B's own sandbox on A's host: the host decides
        for headers in (
            {"X-Access-Token": b["envdAccessToken"]},
            {
                "X-Access-Token": b["envdAccessToken"],
                "E2b-Sandbox-Id": b["sandboxID"],
                "E2b-Sandbox-Port": "49983",
            },
        ):
            status, body = _https(
                domain_net, envd_a, "POST", "/process.Process/List", body="{}", headers={**rpc, **headers}
            )
            assert (status, body["message"]) == (502, f"The sandbox {a['sandboxID']} was not found"), body
        status, body = _https(
            domain_net, f"49999-{a['sandboxID']}.{DOMAIN}", "POST", "/execute", body='{"code": "1"}',
            headers={"X-Access-Token": b["envdAccessToken"], "Content-Type": "application/json"},
        )  # fmt: skip
        assert (status, body["message"]) == (502, f"The sandbox {a['sandboxID']} was not found"), body
        # B's key on the API host: A's sandbox does not exist for it
        status, body = _https(
            domain_net,
            f"api.{DOMAIN}",
            "GET",
            f"/sandboxes/{a['sandboxID']}",
            headers={"X-API-Key": domain_net.key_b},
        )
        assert status == 404 and body["code"] == 404, body
        assert (
            _https(domain_net, envd_b, "GET", "/health", headers={"X-Access-Token": b["envdAccessToken"]})[0]
            == 204
        )
        # names that route nowhere: an unknown sandbox, a name under the domain that is no sandbox host
        status, body = _https(domain_net, f"49983-sb-aaaaaaaaaaaaaaaa.{DOMAIN}", "GET", "/health")
        assert (status, body["message"]) == (502, "The sandbox sb-aaaaaaaaaaaaaaaa was not found"), body
        loose = ssl.create_default_context(cafile=str(domain_net.ca))
        loose.check_hostname = False  # "*" covers one label: a client that skips the name check reaches it
        for name in (f"www.{DOMAIN}", f"x.49983-{a['sandboxID']}.{DOMAIN}"):
            status, body = _https(
                domain_net,
                name,
                "GET",
                "/v2/sandboxes",
                context=loose,
                headers={"X-API-Key": domain_net.key_a},
            )
            assert status == 404 and body["code"] == 404 and "no sandbox is served at" in body["message"], (
                body
            )
        # the dashboard is not served on a name that sandbox hosts share a domain with
        assert _https(domain_net, f"api.{DOMAIN}", "GET", "/ui/")[0] == 404
    finally:
        for sbx, key in ((a, domain_net.key_a), (b, domain_net.key_b)):
            _https(
                domain_net,
                f"api.{DOMAIN}",
                "DELETE",
                f"/sandboxes/{sbx['sandboxID']}",
                headers={"X-API-Key": key},
            )
    # a client that does not trust the CA gets no answer at all
    with pytest.raises(ssl.SSLCertVerificationError):
        _https(domain_net, f"api.{DOMAIN}", "GET", "/healthz", context=ssl.create_default_context())
