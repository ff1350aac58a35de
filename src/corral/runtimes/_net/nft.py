"""nftables rules of one sandbox: a table of its own, replaced atomically on a policy update.

``table inet corral_<id>`` matches only the sandbox's host-side veth (``iifname``/``oifname``), so sandboxes
never see each other's rules. What it does to packets from the sandbox, in hook order:

- ``c_guard`` (prerouting, before NAT): IPv6 neighbour discovery (on-link only: hop limit 255) let through;
  any other packet not from the sandbox's own ``guest_ip``/``guest_ip6`` dropped (spoofing: a microVM's
  guest can set any address); DNS (port 53, any address) let through to be redirected; destinations in ``blocked``/``blocked6``
  (always-denied ranges, the NAT64 forms of the IPv4 ones, the host's addresses, the sandboxes' own
  subnets, configured cluster and not-routed ranges, deny CIDRs) and anything not TCP rejected; TCP accepted
  under ``internet`` or to ``allowed`` / ``allowed_ports`` (allow CIDRs) / ``pinned`` (addresses the
  sandbox's DNS answered for allowed names, added by the egress process with a timeout), each with its
  IPv6 twin (``…6``), else rejected. Checked on every packet, so a destination taken out of a set is cut
  off at once, even mid-connection.
- ``c_nat`` (prerouting NAT): DNS to the answerer, TCP to the egress proxy, both on ``host_ip`` /
  ``host_ip6``.
- ``c_in`` (input): only those two, only as redirected, and neighbour discovery; ``c_fwd`` (forward):
  nothing, either way; ``c_out``: to the sandbox only from ``host_ip``/``host_ip6`` (and neighbour
  discovery).

Counters on every drop/reject make the kernel's view visible (``nft list table``).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

from corral.netpolicy import ALWAYS_DENIED, IpNetwork, NetworkPolicy
from corral.runtimes import _proc
from corral.runtimes._net.netns import NetPlan

__all__ = [
    "add_pins",
    "apply",
    "counters",
    "delete_pins",
    "remove_table",
    "render",
    "table_exists",
    "table_name",
]

NFT_TIMEOUT = 15.0
DENY_MARK = 0x0C0A1DE  # packets of a denied TCP connection, redirected to the proxy's deny port
COUNTERS = ("ipv6_denied", "udp_denied", "other_denied")  # what never reaches the proxy, by kind


def table_name(sandbox_id: str) -> str:
    return "corral_" + sandbox_id.replace("-", "_")


def _elements(nets: Iterable[str]) -> str:
    items = sorted(set(nets))
    return f"elements = {{ {', '.join(items)} }}" if items else ""


def _set(name: str, kind: str, elements: str, flags: str = "interval") -> str:
    return f"  set {name} {{\n    type {kind}\n    flags {flags}\n    auto-merge\n    {elements}\n  }}\n"


def _nat64(net: IpNetwork) -> IpNetwork:
    """The NAT64 (64:ff9b::/96) form of an IPv4 network: judged as that network (corral.netpolicy)."""
    base = int(ipaddress.IPv6Address("64:ff9b::")) + int(net.network_address)
    return ipaddress.IPv6Network((base, 96 + net.prefixlen))


def _sets(policy: NetworkPolicy, extra_denied: Iterable[IpNetwork]) -> dict[str, list[str]]:
    """The elements of the sandbox's sets, by set name (IPv6 ones end in 6)."""
    blocked: list[IpNetwork] = [n for n, _ in ALWAYS_DENIED] + list(extra_denied)
    allowed: list[IpNetwork] = []
    ports: list[tuple[IpNetwork, int]] = []
    for rule in policy.rules:
        if rule.net is None:
            continue
        if not rule.allow and rule.port is None:
            blocked.append(rule.net)
        elif rule.allow and rule.port is None:
            allowed.append(rule.net)
        elif rule.allow and rule.port is not None:
            ports.append((rule.net, rule.port))
    # an address rule for IPv4 holds for its NAT64 form too, as the policy judges that form
    blocked += [_nat64(n) for n in blocked if n.version == 4]
    allowed += [_nat64(n) for n in allowed if n.version == 4]
    ports += [(_nat64(n), p) for n, p in ports if n.version == 4]
    out: dict[str, list[str]] = {}
    for suffix, version in (("", 4), ("6", 6)):
        out["blocked" + suffix] = [str(n) for n in blocked if n.version == version]
        out["allowed" + suffix] = [str(n) for n in allowed if n.version == version]
        out["allowed_ports" + suffix] = [f"{n} . {p}" for n, p in ports if n.version == version]
    return out


_SET_TYPES = {"": "ipv4_addr", "6": "ipv6_addr"}


def _chain(name: str, hook: str, rules: list[str]) -> str:
    lines = "".join(f"    {r}\n" for r in rules)
    return f"  chain {name} {{\n    type {hook}; policy accept;\n{lines}  }}\n"


_NDP = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255"


def render(
    plan: NetPlan,
    policy: NetworkPolicy,
    *,
    extra_denied: Iterable[IpNetwork],
    proxy_port: int,
    dns_port: int = 53,
    create: bool,
) -> str:
    """The nft script that (re)defines the sandbox's table. ``create=False``: replace an existing one
    atomically, keeping its ``pinned`` sets (the egress process owns those). A plan without IPv6 (a sandbox
    made before IPv6 egress) keeps the old table's shape: every IPv6 packet dropped."""
    table = table_name(plan.sandbox_id)
    v6 = plan.host_ip6 is not None
    suffixes = ("", "6") if v6 else ("",)
    elements = _sets(policy, extra_denied)
    iif = f'iifname "{plan.host_if}"'
    out = []
    if create:
        out.append(f"table inet {table} {{\n}}\n")
    else:
        # replace everything but the pins, in one transaction
        for chain in ("c_guard", "c_nat", "c_in", "c_fwd", "c_out"):
            out.append(f"delete chain inet {table} {chain}\n")
        for suffix in suffixes:
            for name in ("blocked", "allowed", "allowed_ports"):
                out.append(f"delete set inet {table} {name}{suffix}\n")
    body = ""
    for suffix in suffixes:
        kind = _SET_TYPES[suffix]
        body += _set("blocked" + suffix, kind, _elements(elements["blocked" + suffix]))
        body += _set("allowed" + suffix, kind, _elements(elements["allowed" + suffix]))
        body += _set(
            "allowed_ports" + suffix, f"{kind} . inet_service", _elements(elements["allowed_ports" + suffix])
        )
        if create:
            body += f"  set pinned{suffix} {{\n    type {kind}\n    flags timeout\n  }}\n"
    deny = f"meta mark set {DENY_MARK:#x} accept"  # to the proxy's deny port: counted, then reset there
    verdict = "accept" if policy.mode == "internet" else deny
    body += "".join(f"  counter {name} {{\n  }}\n" for name in COUNTERS) if create else ""
    guard = [
        f"{_NDP} accept" if v6 else "meta nfproto ipv6 counter name ipv6_denied drop",
        # only the sandbox's own addresses (a VM's guest kernel is the sandbox's to reconfigure)
        f"ip saddr != {plan.guest_ip} counter name other_denied drop",
        *([f"ip6 saddr != {plan.guest_ip6} counter name ipv6_denied drop"] if v6 else []),
        "meta l4proto { tcp, udp } th dport 53 accept",
        f"ip daddr @blocked meta l4proto tcp {deny}",
        *([f"ip6 daddr @blocked6 meta l4proto tcp {deny}"] if v6 else []),
        "meta l4proto udp counter name udp_denied reject with icmpx admin-prohibited",
        "meta nfproto ipv6 meta l4proto != tcp counter name ipv6_denied drop",
        "meta l4proto != tcp counter name other_denied drop",
        # the egress proxy cuts open connections a policy update denies; pins may expire under a download
        "ct state established,related accept",
    ]
    for family, suffix in (("ip", ""), ("ip6", "6"))[: len(suffixes)]:
        guard += [
            f"{family} daddr @allowed{suffix} accept",
            f"{family} daddr . tcp dport @allowed_ports{suffix} accept",
            f"{family} daddr @pinned{suffix} accept",
        ]
    guard.append(verdict)
    hosts = [("ip", plan.host_ip)] + ([("ip6", f"[{plan.host_ip6}]")] if v6 else [])
    nat = []
    for family, host in hosts:
        nat += [
            f"meta l4proto {{ tcp, udp }} th dport 53 dnat {family} to {host}:{dns_port}",
            f"meta mark {DENY_MARK:#x} meta l4proto tcp dnat {family} to {host}:{proxy_port + 1}",
            f"meta l4proto tcp dnat {family} to {host}:{proxy_port}",
        ]
    inp = []
    for family, host in hosts:
        address = host.strip("[]")
        inp += [
            f"{family} daddr {address} meta l4proto {{ tcp, udp }} th dport {dns_port} accept",
            f"{family} daddr {address} tcp dport {{ {proxy_port}, {proxy_port + 1} }} ct status dnat accept",
        ]
    if v6:
        inp.append(f"{_NDP} accept")
    inp.append("counter drop")
    oif = f'oifname "{plan.host_if}"'
    outp = [f"{oif} ip saddr != {plan.host_ip} counter drop"]
    if v6:
        outp += [f"{oif} {_NDP} accept", f"{oif} ip6 saddr != {plan.host_ip6} counter drop"]

    body += _chain("c_guard", "filter hook prerouting priority -150", [f"{iif} {r}" for r in guard])
    body += _chain("c_nat", "nat hook prerouting priority dstnat", [f"{iif} {r}" for r in nat])
    body += _chain("c_in", "filter hook input priority -150", [f"{iif} {r}" for r in inp])
    body += _chain(
        "c_fwd", "filter hook forward priority -150", [f"{iif} counter drop", f"{oif} counter drop"]
    )
    body += _chain("c_out", "filter hook output priority -150", outp)
    out.append(f"table inet {table} {{\n{body}}}\n")
    return "".join(out)


def apply(script: str) -> None:
    nft = _proc.require_binary("nft")
    _proc.run_blocking(
        [nft, "-f", "-"], timeout=NFT_TIMEOUT, what="apply the sandbox's network rules", input=script.encode()
    )


def counters(sandbox_id: str) -> dict[str, int]:
    """Packets dropped before the proxy (IPv6, UDP but DNS, ICMP and the rest), by kind."""
    nft = _proc.require_binary("nft")
    done = _proc.run_blocking(
        [nft, "-j", "list", "counters", "table", "inet", table_name(sandbox_id)],
        timeout=NFT_TIMEOUT,
        what="read the sandbox's network counters",
        check=False,
    )
    out: dict[str, int] = {}
    for item in json.loads(done.stdout or b"{}").get("nftables", []):
        counter = item.get("counter")
        if counter:
            out[counter["name"]] = int(counter.get("packets", 0))
    return out


def table_exists(sandbox_id: str) -> bool:
    nft = _proc.require_binary("nft")
    done = _proc.run_blocking(
        [nft, "list", "table", "inet", table_name(sandbox_id)],
        timeout=NFT_TIMEOUT,
        what="list nft",
        check=False,
    )
    return done.returncode == 0


def remove_table(sandbox_id: str) -> None:
    """Delete the sandbox's table; idempotent."""
    if table_exists(sandbox_id):
        nft = _proc.require_binary("nft")
        _proc.run_blocking(
            [nft, "delete", "table", "inet", table_name(sandbox_id)],
            timeout=NFT_TIMEOUT,
            what="remove the sandbox's network rules",
        )


def _pin_script(op: str, sandbox_id: str, pins: dict[str, int]) -> str:
    """One command per family: ``pinned`` (IPv4) and ``pinned6``."""
    out = ""
    for version, name in ((4, "pinned"), (6, "pinned6")):
        items = [
            f"{ip} timeout {ttl}s" if op == "add" else ip
            for ip, ttl in pins.items()
            if ipaddress.ip_address(ip).version == version
        ]
        if items:
            out += f"{op} element inet {table_name(sandbox_id)} {name} {{ {', '.join(items)} }}\n"
    return out


def add_pins(sandbox_id: str, pins: dict[str, int]) -> str:
    """The nft command that lets TCP through to ``pins`` (address -> seconds) for a while."""
    return _pin_script("add", sandbox_id, pins)


def delete_pins(sandbox_id: str, ips: Iterable[str]) -> str:
    return _pin_script("delete", sandbox_id, dict.fromkeys(ips, 0))
