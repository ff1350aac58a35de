"""The egress policy model (corral.netpolicy) and the proxy's TLS/HTTP sniffing, without any network."""

from __future__ import annotations

import ipaddress
import ssl

import pytest

from corral.errors import InvalidNetworkPolicy, InvalidRequest
from corral.models import CreateParams
from corral.netpolicy import NetworkPolicy, always_denied
from corral.runtimes._net.sniff import HostWatch, sniff

ip = ipaddress.ip_address


def test_forms_round_trip() -> None:
    assert NetworkPolicy.parse(None).mode == "none" and not NetworkPolicy.parse("none").enabled
    assert NetworkPolicy.parse("internet").to_wire() == "internet"
    rules = NetworkPolicy.parse({"allow_out": ["pypi.org"], "deny_out": ["*.evil.example"]})
    assert rules.mode == "rules" and NetworkPolicy.parse(rules.to_wire()) == rules
    deny_only = NetworkPolicy.parse({"deny_out": ["203.0.113.0/24"]})
    assert deny_only.mode == "internet" and deny_only.to_wire() == {"deny_out": ["203.0.113.0/24"]}
    # E2B's way of writing an allowlist: deny everything, allow some
    e2b = NetworkPolicy.parse({"deny_out": ["0.0.0.0/0"], "allow_out": ["198.51.100.7"]})
    assert e2b.mode == "rules" and e2b.decide(ip("198.51.100.7"), 443, name=None, pinned=False).allowed
    assert CreateParams(network="internet").network == "internet"


@pytest.mark.parametrize(
    "bad",
    [
        "everything",
        {"allow": ["x.test"]},
        {"allow_out": "x.test"},
        {"allow_out": ["bad name"]},
        {"allow_out": ["*.*.x.test"]},
        {"allow_out": ["x.*.test"]},
        {"allow_out": ["x.test:0"]},
        {"allow_out": ["x.test:70000"]},
        {"allow_out": ["10.0.0.1/8"]},  # host bits set
        {"allow_out": ["10.0.0.0/8"]},
        {"allow_out": ["127.0.0.1"]},
        {"allow_out": ["169.254.169.254/32:80"]},
        {"allow_out": ["100.64.0.0/16"]},
        {"allow_out": ["[fd00:ec2::254]:80"]},
        {"allow_out": ["::ffff:10.0.0.1"]},
        {"allow_out": ["fe80::/64"]},
        {"allow_out": ["[64:ff9b::a00:0/104]:443"]},  # NAT64 of 10.0.0.0/8
        {"allow_out": [7]},
        {"allow_out": ["x.test"] * 600},
    ],
)
def test_bad_policies_are_typed_errors(bad: object) -> None:
    with pytest.raises(InvalidNetworkPolicy) as err:
        NetworkPolicy.parse(bad)
    assert isinstance(err.value, InvalidRequest) and err.value.message
    with pytest.raises(InvalidNetworkPolicy):
        CreateParams(network=bad)  # type: ignore[arg-type]


def test_always_denied_whatever_the_policy() -> None:
    internet = NetworkPolicy.parse("internet")
    for addr in ("10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "127.0.0.1", "169.254.169.254",
                 "224.0.0.1", "255.255.255.255", "0.0.0.0", "fd00:ec2::254", "fe80::1", "::1", "ff02::1",
                 "::ffff:10.0.0.1", "64:ff9b::a00:1"):  # fmt: skip
        decision = internet.decide(ip(addr), 443, name=None, pinned=False)
        assert not decision.allowed and decision.rule.startswith("always-denied:"), addr
    host = [ipaddress.ip_network("203.0.113.9/32")]
    assert always_denied(ip("203.0.113.9"), host) == "host"
    assert not internet.decide(ip("203.0.113.9"), 22, name=None, pinned=False, extra_denied=host).allowed
    assert internet.decide(ip("198.18.1.1"), 443, name=None, pinned=False).allowed


def test_ipv6_rules_and_the_not_routed_ranges() -> None:
    from corral.runtimes._net.config import EgressConfig
    from corral.runtimes._net.nft import _sets

    p = NetworkPolicy.parse({"allow_out": ["[2001:db8:1::/48]:443", "198.51.100.0/24"]})
    assert p.decide(ip("2001:db8:1::5"), 443, name=None, pinned=False).allowed
    assert not p.decide(ip("2001:db8:1::5"), 80, name=None, pinned=False).allowed
    assert p.decide(ip("64:ff9b::c633:6405"), 22, name=None, pinned=False).allowed  # NAT64 of 198.51.100.5
    # an IPv4-mapped address is never a destination (on the wire it is IPv4), even of a public address
    assert always_denied(ip("::ffff:198.51.100.5")) == "ipv4-mapped"
    # the documentation range is denied by the server's settings unless a lab opens it
    with pytest.raises(InvalidNetworkPolicy):
        p.check_ranges(EgressConfig().denied_networks())
    p.check_ranges(EgressConfig(lab_ranges=("2001:db8::/32",)).denied_networks())
    assert EgressConfig(lab_ranges=("2001:db8::/32",)).denied_networks() == []
    with pytest.raises(InvalidRequest):
        EgressConfig(lab_ranges=("2001:4860::/32",))  # only inside the not-routed ranges
    with pytest.raises(InvalidRequest):
        EgressConfig(subnet6="2001:db8::/48")  # the sandboxes' own subnet is unique-local
    sets = _sets(p, [])
    assert "64:ff9b::a00:0/104" in sets["blocked6"] and "::ffff:0:0/96" in sets["blocked6"]
    assert "64:ff9b::c633:6400/120" in sets["allowed6"] and sets["allowed_ports6"] == [
        "2001:db8:1::/48 . 443"
    ]


def test_names_wildcards_specificity_and_pins() -> None:
    p = NetworkPolicy.parse(
        {
            "allow_out": ["*.files.test", "api.test:443", "198.51.100.0/24"],
            "deny_out": ["evil.files.test", "198.51.100.66"],
        }
    )
    assert p.resolves("x.files.test").allowed and p.resolves("a.b.files.test").allowed
    assert not p.resolves("files.test").allowed  # a wildcard is not its apex
    assert not p.resolves("evil.files.test").allowed  # the exact deny beats the wildcard allow
    assert p.resolves("api.test").allowed and not p.resolves("other.test").allowed
    pub = ip("198.18.1.1")
    assert p.decide(pub, 443, name="api.test", pinned=True).allowed
    assert not p.decide(pub, 80, name="api.test", pinned=True).allowed  # the rule is for :443
    assert p.decide(pub, 443, name="api.test", pinned=False).rule == "not-pinned"
    assert not p.decide(pub, 443, name=None, pinned=False).allowed
    assert p.decide(pub, 22, name=None, pinned=False, pinned_by_allowed=True).allowed
    assert p.decide(ip("198.51.100.5"), 8080, name=None, pinned=False).allowed
    assert not p.decide(ip("198.51.100.66"), 8080, name=None, pinned=False).allowed  # /32 deny beats /24
    # a denied name is never reached, not even at an allowed address
    assert not p.decide(ip("198.51.100.5"), 443, name="evil.files.test", pinned=True).allowed


def _client_hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sniff_tls_and_http() -> None:
    hello = _client_hello("api.test")
    assert sniff(hello[:20]) is None  # not enough yet
    assert sniff(hello).name == "api.test"  # type: ignore[union-attr]
    assert sniff(_client_hello(None)).name is None  # type: ignore[union-attr]
    http = sniff(b"GET / HTTP/1.1\r\nHost: Api.Test:8080\r\n\r\n")
    assert http is not None and http.protocol == "http" and http.name == "api.test"
    assert sniff(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n").conflict  # type: ignore[union-attr]
    assert sniff(b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n").conflict  # type: ignore[union-attr]
    assert sniff(b"GET / HTTP/1.1\r\n") is None
    assert sniff(b"SSH-2.0-OpenSSH\r\n").protocol == "other"  # type: ignore[union-attr]


def test_host_watch_sees_every_later_host_once() -> None:
    watch = HostWatch()
    assert watch.hosts(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n") == ["a.test"]
    assert watch.hosts(b"GET / HTTP/1.1\r\nHo") == []
    assert watch.hosts(b"st: b.te") == []  # not complete yet
    assert watch.hosts(b"st\r\n\r\n") == ["b.test"]
    assert watch.hosts(b"x" * 2000) == []
    assert sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").protocol == "http"  # type: ignore[union-attr]
