"""nftables rules of one sandbox: a table of its own, replaced atomically on a policy update.

``table inet corral_<id>`` matches only the sandbox's host-side veth (``iifname``/``oifname``), so sandboxes
never see each other's rules. What it does to packets from the sandbox, in hook order:

- ``c_guard`` (prerouting, before NAT): IPv6 dropped; DNS (port 53, any address) let through to be redirected;
  destinations in ``blocked`` (always-denied ranges, the host's addresses, configured cluster ranges, deny
  CIDRs) and anything not TCP rejected; TCP accepted under ``internet`` or to ``allowed`` /
  ``allowed_ports`` (allow CIDRs) / ``pinned`` (addresses the sandbox's DNS answered for allowed names,
  added by the egress process with a timeout), else rejected. Checked on every packet, so a destination
  taken out of a set is cut off at once, even mid-connection.
- ``c_nat`` (prerouting NAT): DNS to the answerer, TCP to the egress proxy, both on ``host_ip``.
- ``c_in`` (input): only those two, and only as redirected; ``c_fwd`` (forward): nothing, either way.

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
    atomically, keeping its ``pinned`` set (the egress process owns that)."""
    table = table_name(plan.sandbox_id)
    blocked = [str(n) for n, _ in ALWAYS_DENIED if n.version == 4]
    blocked += [str(n) for n in extra_denied if n.version == 4]
    allowed: list[str] = []
    allowed_ports: list[str] = []
    for rule in policy.rules:
        if rule.net is None or rule.net.version != 4:
            continue
        if not rule.allow and rule.port is None:
            blocked.append(str(rule.net))
        elif rule.allow and rule.port is None:
            allowed.append(str(rule.net))
        elif rule.allow:
            allowed_ports.append(f"{rule.net} . {rule.port}")
    iif = f'iifname "{plan.host_if}"'
    out = []
    if create:
        out.append(f"table inet {table} {{\n}}\n")
    else:
        # replace everything but the pins, in one transaction
        for chain in ("c_guard", "c_nat", "c_in", "c_fwd", "c_out"):
            out.append(f"delete chain inet {table} {chain}\n")
        for name in ("blocked", "allowed", "allowed_ports"):
            out.append(f"delete set inet {table} {name}\n")
    body = _set("blocked", "ipv4_addr", _elements(blocked))
    body += _set("allowed", "ipv4_addr", _elements(allowed))
    body += _set("allowed_ports", "ipv4_addr . inet_service", _elements(allowed_ports))
    if create:
        body += "  set pinned {\n    type ipv4_addr\n    flags timeout\n  }\n"
    deny = f"meta mark set {DENY_MARK:#x} accept"  # to the proxy's deny port: counted, then reset there
    verdict = "accept" if policy.mode == "internet" else deny
    body += "".join(f"  counter {name} {{\n  }}\n" for name in COUNTERS) if create else ""
    body += (
        "  chain c_guard {\n    type filter hook prerouting priority -150; policy accept;\n"
        f"    {iif} meta nfproto ipv6 counter name ipv6_denied drop\n"
        f"    {iif} meta l4proto {{ tcp, udp }} th dport 53 accept\n"
        f"    {iif} ip daddr @blocked meta l4proto tcp {deny}\n"
        f"    {iif} meta l4proto udp counter name udp_denied reject with icmpx admin-prohibited\n"
        f"    {iif} meta l4proto != tcp counter name other_denied drop\n"
        # the egress proxy cuts open connections a policy update denies; pins may expire under a download
        f"    {iif} ct state established,related accept\n"
        f"    {iif} ip daddr @allowed accept\n"
        f"    {iif} ip daddr . tcp dport @allowed_ports accept\n"
        f"    {iif} ip daddr @pinned accept\n"
        f"    {iif} {verdict}\n"
        "  }\n"
        "  chain c_nat {\n    type nat hook prerouting priority dstnat; policy accept;\n"
        f"    {iif} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {plan.host_ip}:{dns_port}\n"
        f"    {iif} meta mark {DENY_MARK:#x} meta l4proto tcp dnat ip to {plan.host_ip}:{proxy_port + 1}\n"
        f"    {iif} meta l4proto tcp dnat ip to {plan.host_ip}:{proxy_port}\n"
        "  }\n"
        "  chain c_in {\n    type filter hook input priority -150; policy accept;\n"
        f"    {iif} ip daddr {plan.host_ip} meta l4proto {{ tcp, udp }} th dport {dns_port} accept\n"
        f"    {iif} ip daddr {plan.host_ip} tcp dport {{ {proxy_port}, {proxy_port + 1} }} ct status dnat accept\n"
        f"    {iif} counter drop\n"
        "  }\n"
        "  chain c_fwd {\n    type filter hook forward priority -150; policy accept;\n"
        f"    {iif} counter drop\n"
        f'    oifname "{plan.host_if}" counter drop\n'
        "  }\n"
        "  chain c_out {\n    type filter hook output priority -150; policy accept;\n"
        f'    oifname "{plan.host_if}" ip saddr != {plan.host_ip} counter drop\n'
        "  }\n"
    )
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
    items = []
    for ip, ttl in pins.items():
        if ipaddress.ip_address(ip).version == 4:
            items.append(f"{ip} timeout {ttl}s" if op == "add" else ip)
    if not items:
        return ""
    return f"{op} element inet {table_name(sandbox_id)} pinned {{ {', '.join(items)} }}\n"


def add_pins(sandbox_id: str, pins: dict[str, int]) -> str:
    """The nft command that lets TCP through to ``pins`` (address -> seconds) for a while."""
    return _pin_script("add", sandbox_id, pins)


def delete_pins(sandbox_id: str, ips: Iterable[str]) -> str:
    return _pin_script("delete", sandbox_id, dict.fromkeys(ips, 0))
