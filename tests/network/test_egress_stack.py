"""The egress stack of one sandbox (netns + veth + nftables + DNS answerer + SNI/Host proxy) on its own.

The "sandbox" here is the bare network namespace :func:`corral.runtimes._net.setup` makes, with probes
(``_client.py``) run in it; tests/network/test_sandbox_network.py does the same through real sandboxes.
Every destination is a host of the test's own upstream namespace (conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from corral.errors import InvalidNetworkPolicy
from corral.ids import SandboxId
from corral.netpolicy import NetworkPolicy
from corral.runtimes._net import netns as _netns
from corral.runtimes._net import nft as _nft
from corral.runtimes._net import stack as _net

pytestmark = [pytest.mark.root]
CLIENT = Path(__file__).with_name("_client.py")
V6_ALLOWED, V6_OTHER, V6_BANNER = "2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::1"  # conftest.ZONE's


class BareNet:
    def __init__(self, net: _net.SandboxNet, config: _net.EgressConfig) -> None:
        self.net = net
        self.config = config

    def python(self, *args: str, timeout: float = 60) -> str:
        """``/usr/bin/python3 ARGS`` inside the namespace; its stdout."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.net.plan.netns, "/usr/bin/python3", *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        return done.stdout

    def probe(self, *args: str, timeout: float = 30) -> dict[str, Any]:
        return json.loads(self.python(str(CLIENT), *args, timeout=timeout).strip().splitlines()[-1])  # type: ignore[no-any-return]

    def update(self, policy: object) -> int:
        return anyio.run(_net.update, self.net, NetworkPolicy.parse(policy), self.config)

    def stats(self) -> dict[str, Any]:
        return anyio.run(_net.stats, self.net)


@pytest.fixture
def bare_net(egress_config: _net.EgressConfig, tmp_path: Path) -> Iterator[Callable[..., BareNet]]:
    made: list[_net.SandboxNet] = []

    def make(policy: object, **overrides: Any) -> BareNet:
        config = _net.EgressConfig(**{**egress_config.__dict__, **overrides})
        assert config.uplink_netns == egress_config.uplink_netns  # never the host's uplink
        sid = SandboxId.new()
        net = anyio.run(_net.setup, sid, tmp_path / sid, NetworkPolicy.parse(policy), config)
        made.append(net)
        return BareNet(net, config)

    yield make
    for net in made:
        anyio.run(_net.teardown, net)
        assert not _netns.exists(net.plan)
        assert not _nft.table_exists(net.plan.sandbox_id)


RULES = {
    "allow_out": [
        "allowed.test",
        "a.cdn.test",
        "*.files.test",
        "198.19.0.1/32:7000",
        "rebind.test",
        "mixed.test",
    ],
    "deny_out": ["evil.files.test"],
}


def test_allowed_names_resolve_and_connect_denied_names_get_nxdomain(bare_net, internet) -> None:
    sbx = bare_net(RULES)
    ok = sbx.probe("url", "allowed.test")
    assert ok["ok"] and ok["body"].startswith("host=allowed.test local=198.18.1.1"), ok
    assert sbx.probe("url", "x.files.test")["ok"]  # wildcard
    for name in ("other.test", "evil.files.test", "files.test"):  # not allowed, denied, wildcard apex
        result = sbx.probe("resolve", name)
        assert not result["ok"], (name, result)
    # a denied name never even reached the upstream resolver
    assert "other.test" not in internet.queried() and "evil.files.test" not in internet.queried()
    totals = sbx.stats()["totals"]
    assert totals["dns_denied"] >= 3 and totals["tcp_allowed"] >= 2


def test_raw_ip_without_dns_is_not_enough_and_cidr_rules_hold_their_port(bare_net) -> None:
    sbx = bare_net(RULES)
    # allowed.test's address, used without asking DNS first: the name is allowed, the address not pinned
    assert not sbx.probe("http", "198.18.1.1", "80", "allowed.test")["ok"]
    # an address that no rule names, with an allowed Host: still no
    assert not sbx.probe("http", "198.18.1.2", "80", "allowed.test")["ok"]
    assert sbx.probe("banner", "198.19.0.1", "7000") == {"ok": True, "banner": "banner 198.19.0.1"}
    assert not sbx.probe("banner", "198.19.0.1", "80")["ok"]  # the rule is for port 7000 only
    assert not sbx.probe("banner", "198.19.0.2", "7000")["ok"]  # outside the CIDR


def test_sni_and_host_must_match_the_pinned_name(bare_net) -> None:
    sbx = bare_net(RULES)
    assert sbx.probe("resolve", "a.cdn.test")["addrs"] == ["198.18.1.3"]  # pins a.cdn.test -> 198.18.1.3
    tls_ok = sbx.probe("http", "198.18.1.3", "443", "a.cdn.test", "/", "a.cdn.test", "1")
    assert tls_ok["ok"] and "sni=a.cdn.test" in tls_ok["body"], tls_ok
    # b.cdn.test shares the address but is not allowed: by SNI and by Host, the proxy says no
    assert not sbx.probe("http", "198.18.1.3", "443", "b.cdn.test", "/", "b.cdn.test", "1")["ok"]
    assert not sbx.probe("http", "198.18.1.3", "80", "b.cdn.test")["ok"]
    # a proxy-style request line naming another host than its Host header
    assert not sbx.probe("http", "198.18.1.3", "80", "a.cdn.test", "http://b.cdn.test/")["ok"]
    assert sbx.probe("http", "198.18.1.3", "80", "a.cdn.test")["ok"]
    # keep-alive: a second request on an allowed connection, naming the other host at that address, is cut
    both = sbx.probe("keepalive", "198.18.1.3", "80", "a.cdn.test", "b.cdn.test")
    assert not both["ok"] and both["bodies"] == ["host=a.cdn.test local=198.18.1.3 sni="], both
    same = sbx.probe("keepalive", "198.18.1.3", "80", "a.cdn.test", "a.cdn.test")
    assert same["ok"] and len(same["bodies"]) == 2
    # TLS without SNI at an address pinned for an allowed name: it could pick any virtual host there
    assert not sbx.probe("http", "198.18.1.3", "443", "b.cdn.test", "/", "", "1")["ok"]


def test_dns_rebinding_answers_are_withheld(bare_net) -> None:
    sbx = bare_net(RULES)
    assert (
        sbx.probe("resolve", "rebind.test")
        == {"ok": False, "error": "[Errno -5] No address associated with hostname"}
        or sbx.probe("resolve", "rebind.test")["addrs"] == []
    )
    assert sbx.probe("resolve", "mixed.test")["addrs"] == ["198.18.1.6"]  # the private answer is dropped
    denied = [d for d in sbx.stats()["decisions"] if d["rule"] == "always-denied:answer"]
    assert {d["dest"] for d in denied} == {"10.0.0.1", "127.0.0.1", "169.254.169.254", "192.168.1.1"}


def test_internet_reaches_public_addresses_only(bare_net) -> None:
    sbx = bare_net("internet")
    assert sbx.probe("url", "forbidden.test")["ok"]
    assert sbx.probe("banner", "198.19.0.2", "7000")["ok"]
    host_side = sbx.net.plan.host_ip
    for ip, port in (("169.254.169.254", "80"), (host_side, "15001"), (host_side, "53"), ("10.0.0.1", "80"),
                     ("192.168.1.1", "80"), ("100.64.0.1", "80"), ("172.16.0.1", "80")):  # fmt: skip
        assert not sbx.probe("banner", ip, port, "2")["ok"], ip
    for ip in sbx.net.extra_denied:  # every address of the host itself
        if ":" not in ip and not ip.startswith("127."):
            assert not sbx.probe("banner", ip.split("/")[0], "22", "2")["ok"], ip


def test_no_udp_but_dns(bare_net, internet) -> None:
    sbx = bare_net("internet")
    assert not sbx.probe("udp", "198.18.1.1", "7001")["ok"]  # the upstream echoes UDP; nothing gets there
    assert not sbx.probe("udp", "198.18.0.53", "7001")["ok"]
    assert not sbx.probe("udp", V6_ALLOWED, "7001")["ok"]
    assert sbx.stats()["dropped"]["udp_denied"] >= 3


def test_an_allowed_name_over_ipv6_and_nothing_else(bare_net, internet) -> None:
    sbx = bare_net(RULES)
    assert sbx.probe("resolve", "allowed.test", "6") == {"ok": True, "addrs": [V6_ALLOWED]}
    ok = sbx.probe("url", "allowed.test", "/", "0", "", "6")
    assert ok["ok"] and ok["body"].startswith(f"host=allowed.test local={V6_ALLOWED}"), ok
    tls = sbx.probe("url", "allowed.test", "/", "1", "", "6")
    assert tls["ok"] and "sni=allowed.test" in tls["body"], tls
    assert sbx.probe("resolve", "six.test", "6")["ok"] is False  # not allowed: NXDOMAIN for AAAA too
    assert not sbx.probe("resolve", "other.test", "6")["ok"]
    # other.test's IPv6 address with an allowed Host, and an address no rule names: not pinned, refused
    assert not sbx.probe("http", V6_OTHER, "80", "allowed.test")["ok"]
    assert not sbx.probe("banner", V6_BANNER, "7000", "2")["ok"]
    # the pin is per family and per address: allowed.test's IPv6 address is usable, only by its name
    assert not sbx.probe("http", V6_ALLOWED, "80", "other.test")["ok"]
    decisions = sbx.stats()["decisions"]
    assert any(d["dest"] == V6_ALLOWED and d["allowed"] for d in decisions), decisions
    assert any(d["dest"] == V6_OTHER and not d["allowed"] for d in decisions), decisions


def test_ipv6_rebinding_answers_are_withheld(bare_net) -> None:
    sbx = bare_net({"allow_out": ["rebind6.test"]})
    assert sbx.probe("resolve", "rebind6.test", "6").get("addrs", []) == []
    withheld = {d["dest"] for d in sbx.stats()["decisions"] if d["rule"] == "always-denied:answer"}
    assert withheld == {"fd00::1", "fe80::1", "::1", "::ffff:a00:1", "64:ff9b::a00:1", "fd00:ec2::254"}


def _host_link_local(sbx: BareNet) -> str:
    done = subprocess.run(
        ["ip", "-j", "-6", "addr", "show", "dev", sbx.net.plan.host_if, "scope", "link"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return next(
        a["local"] for a in json.loads(done.stdout)[0]["addr_info"] if a.get("local", "").startswith("fe80:")
    )


def test_ipv6_bypasses_are_refused_under_internet(bare_net) -> None:
    sbx = bare_net("internet")
    assert sbx.probe("banner", V6_BANNER, "7000") == {"ok": True, "banner": f"banner {V6_BANNER}"}
    plan = sbx.net.plan
    assert plan.host_ip6 is not None
    bypasses = [
        ("fd00::1", "80"),  # unique-local
        ("fd00:ec2::254", "80"),  # the EC2 metadata address
        (plan.host_ip6, "15001"),  # the egress path itself, straight
        (plan.host_ip6, "53"),
        (f"{_host_link_local(sbx)}%eth0", "15001"),  # link-local: the host's end of the veth
        ("fe80::1%eth0", "80"),
        ("::ffff:10.0.0.1", "80"),  # IPv4-mapped: leaves as IPv4 to a private address
        ("::ffff:169.254.169.254", "80"),
        ("64:ff9b::a00:1", "80"),  # NAT64 of a private address
        ("64:ff9b::a9fe:a9fe", "80"),  # NAT64 of the metadata address
    ]
    for ip in sbx.net.extra_denied:  # every IPv6 address of the host itself (link-local ones on the link)
        if ":" in ip and ip.endswith("/128") and ip != "::1/128":
            address = ip.split("/")[0]
            bypasses.append((f"{address}%eth0" if address.startswith("fe80:") else address, "22"))
    for ip, port in bypasses:
        result = sbx.probe("banner", ip, port, "2")
        # refused by the egress path: reset at its deny port
        assert not result["ok"] and result["error"].startswith(("ConnectionResetError", "TimeoutError")), (
            ip,
            result,
        )
    # ICMPv6 (but neighbour discovery) is dropped before anything answers it
    before = sbx.stats()["dropped"]["ipv6_denied"]
    sbx.python("-c", "import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_RAW, 58); "
               f"[s.sendto(bytes([128, 0, 0, 0, 0, 1, 0, i]), ('{V6_ALLOWED}', 0)) for i in range(20)]")  # fmt: skip
    assert sbx.stats()["dropped"]["ipv6_denied"] >= before + 20


def test_the_documentation_range_is_denied_unless_opened(bare_net) -> None:
    sbx = bare_net("internet", lab_ranges=())
    assert sbx.probe("resolve", "six.test", "6").get("addrs", []) == []  # the answer is withheld
    assert not sbx.probe("banner", V6_BANNER, "7000", "2")["ok"]
    assert sbx.probe("url", "allowed.test")["ok"]  # IPv4 untouched


def test_doh_to_an_allowed_resolver_does_not_open_other_names(bare_net) -> None:
    sbx = bare_net({"allow_out": ["doh.test"]})
    leaked = sbx.probe("url", "doh.test", "/dns?name=forbidden.test")
    assert leaked["ok"] and leaked["body"] == "198.18.1.8"  # the sandbox learns the address over HTTP…
    assert not sbx.probe("http", "198.18.1.8", "80", "forbidden.test")["ok"]  # … and cannot use it
    assert not sbx.probe("http", "198.18.1.8", "80", "doh.test")["ok"]


def test_update_cuts_open_connections_and_opens_new_names(bare_net) -> None:
    sbx = bare_net({"allow_out": ["allowed.test"]})
    assert not sbx.probe("resolve", "other.test")["ok"]
    holder = subprocess.Popen(
        ["ip", "netns", "exec", sbx.net.plan.netns, "/usr/bin/python3", str(CLIENT), "hold", "allowed.test", "20"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and json.loads(holder.stdout.readline()) == {"started": True}
        time.sleep(0.5)
        t0 = time.monotonic()
        assert sbx.update({"allow_out": ["other.test"]}) == 1
        result = json.loads(holder.stdout.readline())
        assert not result["ok"] and result["bytes"] > 0, result  # it was flowing, and was cut
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()
    assert sbx.probe("url", "other.test")["ok"]
    assert not sbx.probe("resolve", "allowed.test")["ok"]
    assert not sbx.probe("http", "198.18.1.1", "80", "allowed.test")["ok"]  # its pin went with it


def test_denials_are_counted_exactly_and_rate_limited_in_the_feed(bare_net) -> None:
    sbx = bare_net({"allow_out": ["allowed.test"]})
    for _ in range(30):
        sbx.probe("banner", "198.19.0.2", "7000", "2")
    stats = sbx.stats()
    counted = [d for d in stats["decisions"] if d["dest"] == "198.19.0.2"]
    assert sum(d["count"] for d in counted) == 30
    lines, _ = _net.read_decisions(Path(sbx.net.net_dir), 0)
    fed = [ln for ln in lines if ln["dest"] == "198.19.0.2"]
    assert sum(ln["count"] for ln in fed) == 30  # nothing dropped …
    assert len(fed) < 5  # … in far fewer lines


def test_connection_cap(bare_net) -> None:
    sbx = bare_net({"allow_out": ["198.19.0.1/32:7000"]}, max_connections=2)
    script = (
        "import socket,time;"
        "s=[socket.create_connection(('198.19.0.1',7000),timeout=3) for _ in range(2)];"
        "[x.recv(100) for x in s];"
        "t=socket.create_connection(('198.19.0.1',7000),timeout=3);"
        "print(repr(t.recv(100)))"
    )
    out = sbx.python("-c", script)
    assert "banner" not in out, out  # the third one was reset, not served
    assert any(d["rule"] == "connection-cap" for d in sbx.stats()["decisions"])


def test_a_dead_egress_process_fails_closed_and_teardown_still_cleans(bare_net) -> None:
    sbx = bare_net("internet")
    assert sbx.probe("url", "allowed.test")["ok"]
    assert sbx.net.pid is not None
    os.kill(sbx.net.pid, signal.SIGKILL)
    time.sleep(0.2)
    assert not sbx.probe("url", "allowed.test")["ok"]
    assert not sbx.probe("banner", "198.19.0.2", "7000", "2")["ok"]


def test_invalid_policies_are_refused_before_anything_is_made(egress_config) -> None:
    with pytest.raises(InvalidNetworkPolicy):
        NetworkPolicy.parse({"allow_out": ["10.0.0.0/8"]})
    with pytest.raises(InvalidNetworkPolicy):
        anyio.run(
            _net.setup,
            SandboxId.new(),
            Path("/nonexistent"),
            NetworkPolicy.parse({"allow_out": ["203.0.113.0/24"]}),
            _net.EgressConfig(**{**egress_config.__dict__, "denied_ranges": ("203.0.113.0/24",)}),
        )


def test_bandwidth_cap(bare_net) -> None:
    sbx = bare_net({"allow_out": ["198.18.1.1/32:80"]}, bandwidth_bytes=1024 * 1024)
    script = (
        "import socket,time;t=time.monotonic();s=socket.create_connection(('198.18.1.1',80),timeout=30);"
        "s.sendall(b'GET /bytes/3145728 HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n');n=0\n"
        "while (c:=s.recv(65536)): n+=len(c)\n"
        "print(n, time.monotonic()-t)"
    )
    size, took = sbx.python("-c", script).split()
    assert int(size) > 3 * 1024 * 1024  # all of it (plus the response head) …
    assert float(took) >= 1.8  # … at no more than 1 MiB/s after the first second's burst: a cap, not a speed
