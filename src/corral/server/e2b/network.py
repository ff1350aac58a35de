"""E2B's egress options as Corral egress policies (:mod:`corral.netpolicy`), and back.

E2B's rules, from its SDK and documentation: a sandbox reaches the internet unless told otherwise;
``allow_internet_access=false`` is ``denyOut: ["0.0.0.0/0"]``; ``denyOut`` lists what it may not reach and
``allowOut`` carves exceptions out of ``denyOut`` (an allow-list is ``allowOut`` plus the all-traffic
``denyOut``; ``allowOut`` without it allows what was allowed anyway). How they map:

==============================================================  =====================================
E2B                                                             Corral
==============================================================  =====================================
no egress choice (nothing, or ``allow_internet_access=true``)   ``[e2b] internet_by_default``:
                                                                ``"none"`` (default) or ``"internet"``
``allow_internet_access=false`` / ``denyOut`` all, no allowOut  ``"none"`` (no interface at all)
``denyOut`` all + ``allowOut: A`` (+ more ``denyOut: D``)       ``{"allow_out": A, "deny_out": D}``
(``A`` may be ``[]``: nothing reachable, yet updatable later)
``denyOut: D`` (not all)                                        ``{"deny_out": D}``
``denyOut: []`` / ``allowOut`` only                             ``"internet"``
==============================================================  =====================================

A ``"none"`` sandbox has no network interface, the strongest form, so it cannot get egress later
(:data:`UPDATABLE_NONE` says how to make one that can).

``allow_internet_access=true`` on create is no choice because SDKs up to 2.45 send it on every create; on
``update_network`` (newer SDKs only, which send it only when asked) it is one. Corral then enforces what it
enforces for every policy: private, loopback, link-local and metadata addresses stay unreachable, and among
overlapping rules the most specific decides (a tie is a deny), so a rule never opens more than in E2B.

What E2B has and Corral cannot do is refused, never dropped: ``egressProxy``, ``rules`` (header transforms),
``dnsServers`` (Corral's own resolver answers by the policy), ``maskRequestHost``, ``httpsPorts``, and an
``allowOut`` address that would carve an exception out of a partial ``denyOut`` (Corral has no
allow-beats-deny rule outside an allow-list).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from corral.errors import InvalidRequest
from corral.netpolicy import NetworkPolicy, Rule

__all__ = ["ALL_TRAFFIC", "UPDATABLE_NONE", "corral_policy", "e2b_network", "refuse"]

ALL_TRAFFIC = "0.0.0.0/0"  # E2B's ALL_TRAFFIC: every destination
UPDATABLE_NONE = (
    "create it with network={'allow_out': [], 'deny_out': [ALL_TRAFFIC]} (nothing reachable, changeable later) "
    "or with the rules it needs; a sandbox created with no egress has no network interface to change"
)
_ALL = {ALL_TRAFFIC, "::/0"}


def refuse(asked: Mapping[str, bool], why: str) -> None:
    """InvalidRequest naming every option asked for (True) that this server cannot provide, and why."""
    names = [name for name, on in asked.items() if on]
    if names:
        raise InvalidRequest(f"this Corral server cannot provide {', '.join(names)}: {why}")


def _rules(network: Mapping[str, Any], key: str) -> list[str] | None:
    value = network.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"network.{key} must be a list of addresses, CIDRs or host names")
    return [v.strip() for v in value]


def corral_policy(
    network: Mapping[str, Any] | None,
    allow_internet_access: bool | None,
    *,
    internet_by_default: bool,
    internet_is_a_choice: bool = False,
) -> str | dict[str, Any]:
    """The Corral policy (wire form) of E2B's ``network`` and ``allow_internet_access`` (see the table)."""
    network = network or {}
    refuse(
        {
            "network.egressProxy": bool(network.get("egressProxy")),
            "network.rules": bool(network.get("rules")),
            "network.dnsServers": bool(network.get("dnsServers")),
            "network.maskRequestHost": bool(network.get("maskRequestHost")),
            "network.httpsPorts": bool(network.get("httpsPorts")),
        },
        "egress is Corral's own proxy and resolver (no SOCKS upstream, header transforms or other DNS "
        "servers), and sandbox ports are served by their own host names; leave these options unset",
    )
    allow, deny = _rules(network, "allowOut"), _rules(network, "denyOut")
    deny_all = allow_internet_access is False or any(r in _ALL for r in deny or ())
    rest = [r for r in deny or () if r not in _ALL]
    if deny_all:
        return {"allow_out": allow, "deny_out": rest} if allow is not None else "none"
    if allow is None and deny is None and not (internet_is_a_choice and allow_internet_access):
        return "internet" if internet_by_default else "none"
    _check_no_carve_out(allow or [], rest)
    return {"deny_out": rest} if rest else "internet"


def _check_no_carve_out(allow: list[str], deny: list[str]) -> None:
    denied = [r for r in (Rule.parse(t, allow=False) for t in deny) if r.net is not None]
    for text in allow:
        rule = Rule.parse(text, allow=True)
        if rule.net is not None and any(rule.net.overlaps(d.net) for d in denied if d.net is not None):
            raise InvalidRequest(
                f"network.allowOut {text!r} would be an exception to network.denyOut; this server carves "
                f"exceptions only out of all traffic: add {ALL_TRAFFIC!r} to denyOut for an allow-list, or "
                "drop the overlapping denyOut entry",
                details={"rule": text},
            )


def e2b_network(wire: str | dict[str, Any], public_ports: bool) -> tuple[bool, dict[str, Any]]:
    """``allowInternetAccess`` and ``network`` of E2B's ``SandboxDetail``: what the sandbox really has."""
    policy = NetworkPolicy.parse(wire)
    out: dict[str, Any] = {"allowPublicTraffic": public_ports}
    if policy.mode == "none":
        return False, {**out, "denyOut": [ALL_TRAFFIC]}
    if policy.mode == "rules":
        deny = [r for r in policy.deny_out if r.strip() not in _ALL]
        return False, {**out, "allowOut": list(policy.allow_out), "denyOut": [*deny, ALL_TRAFFIC]}
    if policy.deny_out:
        out["denyOut"] = list(policy.deny_out)
    return True, out
