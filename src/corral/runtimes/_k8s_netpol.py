"""A Corral egress policy as one ``networking.k8s.io/v1`` NetworkPolicy for one sandbox's Pod (a pure function).

Kubernetes NetworkPolicies only ever add what is allowed: the template's own policy (agent-sandbox manages
one per template, :func:`corral.runtimes._k8s_objects.network_policy`) denies all egress, and this per-sandbox
policy, selecting the sandbox's Pod by :data:`~corral.runtimes._k8s_objects.LABEL_SANDBOX`, allows what the
sandbox's Corral policy allows. The decision is the same as :meth:`corral.netpolicy.NetworkPolicy.decide`
makes for a connection that names nothing (what a packet filter sees):

- ``none``: no egress rule (deny all; the runtime then makes no object at all: the template's deny holds).
- ``internet``: ``0.0.0.0/0`` and ``::/0``, each with ``except`` every range of
  :data:`corral.netpolicy.ALWAYS_DENIED` and of the server's configured denied ranges, plus the deny rules.
- address rules: one ``ipBlock`` per allow rule, except the more specific deny rules inside it (a longer prefix
  wins, as in ``decide``; an equal prefix is a tie, which denies), for the ports the rule holds at.
- TCP only, as the local egress proxy (it carries TCP; UDP but DNS and everything else is dropped there).
- DNS (TCP and UDP 53 to the cluster's DNS Pods) only where the local answerer would answer names a rule
  does not name, i.e. under ``internet``; with address rules alone no name resolves, locally or here.

Not expressible, so refused with :class:`~corral.errors.Unsupported` before anything is made: host names and
wildcards (a NetworkPolicy matches addresses, not names; the local runtimes' DNS pinning and SNI proxy have
no counterpart here). One difference, stricter than local: NAT64 (``64:ff9b::/96``) addresses, which the local
stack judges by the IPv4 address they embed, are never allowed (a NetworkPolicy cannot look inside them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from corral.errors import Unsupported
from corral.netpolicy import ALWAYS_DENIED, IpNetwork, NetworkPolicy, Rule

__all__ = ["NAT64", "NETPOL_API", "egress_policy", "refuse_names"]

NETPOL_API = ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies")
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_ALL = (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0"))
_OTHER = 0  # the port class "every port no rule names"
_MAX_PORT = 65535


def refuse_names(policy: NetworkPolicy) -> None:
    """Unsupported if ``policy`` has a host name or wildcard rule: no NetworkPolicy can express one."""
    names = [r.text for r in policy.rules if r.name is not None]
    if names:
        raise Unsupported(
            "kubernetes sandboxes enforce egress with a Kubernetes NetworkPolicy, which matches addresses, not"
            f" names: {', '.join(map(repr, names[:5]))} cannot be enforced. Use address rules (CIDRs with an"
            ' optional port, like "203.0.113.0/24:443" or "[2001:db8::/32]:443"), "internet" or "none",'
            " or an isolation whose egress proxy checks names (namespace, gvisor, microvm)",
            details={"rules": names[:20]},
        )


def _strictly_inside(inner: IpNetwork, outer: IpNetwork) -> bool:
    return inner.version == outer.version and inner != outer and inner.subnet_of(outer)  # type: ignore[arg-type]


def _minimal(nets: Iterable[IpNetwork]) -> list[IpNetwork]:
    """``nets`` without duplicates and without those inside another one, sorted."""
    unique = sorted(set(nets), key=lambda n: (n.version, n.network_address, n.prefixlen))
    return [n for n in unique if not any(_strictly_inside(n, o) for o in unique)]


def _applies(rule: Rule, port_class: int) -> bool:
    return rule.port is None or rule.port == port_class


def _port_ranges(classes: set[int], named: set[int]) -> list[tuple[int, int]]:
    """The ports of ``classes`` (named ports, and _OTHER: every port not in ``named``) as sorted ranges."""
    ports = {p for p in classes if p != _OTHER}
    if _OTHER not in classes:
        return [(p, p) for p in sorted(ports)]
    holes = sorted(named - ports)
    out, start = [], 1
    for hole in holes:
        if hole > start:
            out.append((start, hole - 1))
        start = hole + 1
    if start <= _MAX_PORT:
        out.append((start, _MAX_PORT))
    return out


def _ports(classes: set[int], named: set[int]) -> list[dict[str, Any]]:
    ranges = _port_ranges(classes, named)
    if ranges == [(1, _MAX_PORT)]:
        return [{"protocol": "TCP"}]
    return [
        {"protocol": "TCP", "port": lo} if lo == hi else {"protocol": "TCP", "port": lo, "endPort": hi}
        for lo, hi in ranges
    ]


def _address_rules(policy: NetworkPolicy, extra_denied: list[IpNetwork]) -> list[dict[str, Any]]:
    rules = [r for r in policy.rules if r.net is not None]
    allows = [r for r in rules if r.allow]
    if policy.mode == "internet":  # the default allow, as the least specific rule there is
        allows = [Rule(text=str(n), allow=True, net=n) for n in _ALL] + allows
    denies = [r for r in rules if not r.allow]
    named = {r.port for r in rules if r.port is not None}
    classes = [_OTHER, *sorted(named)]
    fixed = [n for n, _ in ALWAYS_DENIED] + [NAT64] + extra_denied
    out: list[dict[str, Any]] = []
    for allow in allows:
        net = allow.net
        assert net is not None
        if any(net.version == n.version and net.subnet_of(n) for n in fixed):  # type: ignore[arg-type]
            continue  # never reached (NAT64: judged by its IPv4 address locally; not expressible here)
        by_except: dict[tuple[IpNetwork, ...], set[int]] = {}
        for port_class in classes:
            if not _applies(allow, port_class):
                continue
            deny = [d.net for d in denies if d.net is not None and _applies(d, port_class)]
            if net in deny:  # the same prefix allowed and denied: a tie denies
                continue
            holes = _minimal([n for n in [*deny, *fixed] if _strictly_inside(n, net)])
            by_except.setdefault(tuple(holes), set()).add(port_class)
        for excepted, held in by_except.items():
            block: dict[str, Any] = {"cidr": str(net)}
            if excepted:
                block["except"] = [str(h) for h in excepted]
            out.append({"to": [{"ipBlock": block}], "ports": _ports(held, named)})
    return out


def _dns_rule(dns_peer: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    peer: dict[str, Any] = {}
    if "namespace" in dns_peer:
        peer["namespaceSelector"] = {"matchLabels": dict(dns_peer["namespace"])}
    if "pod" in dns_peer:
        peer["podSelector"] = {"matchLabels": dict(dns_peer["pod"])}
    return {
        "to": [peer],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }


def egress_policy(
    policy: NetworkPolicy,
    *,
    name: str,
    namespace: str,
    selector: Mapping[str, str],
    labels: Mapping[str, str] = {},  # read only
    owner: Mapping[str, Any] | None = None,
    extra_denied: Iterable[IpNetwork] = (),
    dns_peer: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """The NetworkPolicy ``name`` allowing the egress ``policy`` allows to the Pods ``selector`` matches.

    ``extra_denied``: the server's configured denied ranges (cluster, service, node networks), excepted like
    the fixed ones. ``dns_peer``: ``{"namespace": labels, "pod": labels}`` selecting the cluster's DNS Pods
    (None: no DNS rule even under ``internet``). Raises Unsupported for name rules, InvalidNetworkPolicy for
    an allow rule inside ``extra_denied``."""
    refuse_names(policy)
    extra = list(extra_denied)
    policy.check_ranges(extra)
    egress: list[dict[str, Any]] = []
    if policy.enabled:
        if policy.mode == "internet" and dns_peer is not None:
            egress.append(_dns_rule(dns_peer))
        egress += _address_rules(policy, extra)
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None:  # deleted with the claim by the garbage collector (the deadline, or kubectl delete)
        meta["ownerReferences"] = [dict(owner)]
    return {
        "apiVersion": f"{NETPOL_API[0]}/{NETPOL_API[1]}",
        "kind": NETPOL_API[2],
        "metadata": meta,
        "spec": {"podSelector": {"matchLabels": dict(selector)}, "policyTypes": ["Egress"], "egress": egress},
    }
