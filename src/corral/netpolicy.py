"""A sandbox's network egress policy: what it may connect to, parsed, validated and decided here.

Three forms, the same in the SDK, over REST and in the CLI (:meth:`NetworkPolicy.parse`):

- ``"none"`` (the default): loopback only, no network interface at all.
- ``"internet"``: public unicast destinations only.
- ``{"allow_out": [...], "deny_out": [...]}``: rules. With ``allow_out`` present, nothing else is reached
  (default deny); with only ``deny_out``, everything public but those. A rule is a host name
  (``pypi.org``), a wildcard (``*.files.example.com``: any name below it, not the name itself), an address
  or CIDR (``203.0.113.0/24``, ``2001:db8::/32``; with a port an IPv6 one is bracketed,
  ``[2001:db8::/32]:443``), each optionally with a port (``github.com:22``, ``203.0.113.0/24:443``).
  ``0.0.0.0/0`` / ``::/0`` in ``deny_out`` means "deny
  what is not allowed" (E2B's all-traffic rule), which is already what ``allow_out`` does.

How a connection is decided (:meth:`NetworkPolicy.decide`), in order:

1. A destination in an always-denied range (:data:`ALWAYS_DENIED`: loopback, RFC 1918, CGNAT, link-local and
   the metadata addresses, multicast, ULA, reserved; plus the host's own addresses and the configured
   cluster ranges, which the runtime adds) is denied, whatever the rules say.
2. Among name rules the most specific match decides (an exact name beats a wildcard, a longer wildcard a
   shorter one; a tie is a deny); the same among address rules (a longer prefix wins).
3. Any deny decides. Otherwise an allowing address rule allows; an allowing name rule allows only an
   address its name was answered with by the sandbox's DNS (answers are pinned), so an allowed name on a
   shared CDN address does not open the other names there.
4. Otherwise the default: allow under ``internet`` and deny-only rules, deny with ``allow_out``.

Only the standard library: the SDK validates a policy before sending it, the server again on receipt, and
the egress proxy (:mod:`corral.runtimes._net`) decides with the same code.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from corral.errors import InvalidNetworkPolicy

__all__ = [
    "ALWAYS_DENIED",
    "Decision",
    "IpNetwork",
    "NetworkPolicy",
    "Rule",
    "always_denied",
]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Mode = Literal["none", "internet", "rules"]

MAX_RULES = 512
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_PORT_SUFFIX = re.compile(r"^(?P<host>.+):(?P<port>[0-9]{1,5})$")
_BRACKETED = re.compile(r"^\[(?P<host>[^\]]+)\](?::(?P<port>[0-9]{1,5}))?$")

# (range, why): never reachable from a sandbox, whatever its policy says.
ALWAYS_DENIED: tuple[tuple[IpNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("0.0.0.0/8", "this-network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),  # includes the cloud metadata address 169.254.169.254
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "ietf-protocol"),
        ("192.168.0.0/16", "private"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255
        ("::/127", "loopback"),  # :: and ::1
        ("::ffff:0:0/96", "ipv4-mapped"),
        ("64:ff9b:1::/48", "nat64-local"),
        ("100::/64", "discard"),
        ("fc00::/7", "unique-local"),  # includes the EC2 metadata address fd00:ec2::254
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)
_ALL = {ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")}


def _as_network(value: str) -> IpNetwork | None:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return None
        raise InvalidNetworkPolicy(
            f"{value!r} has host bits set; write the network, like {ipaddress.ip_network(value, strict=False)}",
            details={"rule": value},
        ) from exc


def _embedded_v4(ip: IpAddress) -> IpAddress:
    """An IPv6 address that carries an IPv4 one (mapped, NAT64) is judged as that IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def always_denied(ip: IpAddress, extra: Iterable[IpNetwork] = ()) -> str | None:
    """Why ``ip`` may never be reached (``"private"``, ``"loopback"``, …, ``"host"`` for ``extra``), or None.

    A NAT64 address (64:ff9b::/96) is judged as the IPv4 address it maps to; an IPv4-mapped one
    (::ffff:0:0/96) is never a destination at all: on the wire it is IPv4 (a dual-stack socket sends it as
    such), so an AAAA answer with one is withheld like a rebinding answer."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return "ipv4-mapped"
    ip = _embedded_v4(ip)
    for net, why in ALWAYS_DENIED:
        if ip.version == net.version and ip in net:
            return why
    for net in extra:
        if ip.version == net.version and ip in net:
            return "host"
    return None


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One parsed rule: ``text`` as written; a name rule (``name``, ``wildcard``) or an address rule (``net``)."""

    text: str
    allow: bool
    name: str | None = None
    wildcard: bool = False
    net: IpNetwork | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: object, *, allow: bool) -> Rule:
        if not isinstance(text, str) or not text.strip() or len(text) > 300:
            raise InvalidNetworkPolicy(
                f"a network rule must be a host name, *.wildcard or CIDR with an optional :port, got {text!r}",
                details={"rule": repr(text)[:80]},
            )
        raw = text.strip().lower()
        host, port = raw, None
        bracketed = _BRACKETED.match(raw)
        suffixed = _PORT_SUFFIX.match(raw)
        if bracketed:
            host, port = bracketed["host"], bracketed["port"]
        elif suffixed and raw.count(":") == 1:
            host, port = suffixed["host"], suffixed["port"]
        port_num = None
        if port is not None:
            port_num = int(port)
            if not 1 <= port_num <= 65535:
                raise InvalidNetworkPolicy(f"{text!r}: a port is 1 to 65535", details={"rule": text})
        net = _as_network(host)
        if net is not None:
            return cls(text=text, allow=allow, net=net, port=port_num)
        wildcard = host.startswith("*.")
        name = host[2:] if wildcard else host
        name = name.rstrip(".")
        labels = name.split(".")
        if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels) or "*" in name:
            raise InvalidNetworkPolicy(
                f"{text!r} is neither a host name (pypi.org), a wildcard (*.example.com, in front only) nor "
                "an address or CIDR (203.0.113.0/24), each with an optional :port",
                details={"rule": text},
            )
        return cls(text=text, allow=allow, name=name, wildcard=wildcard, port=port_num)

    def matches_name(self, name: str) -> bool:
        if self.name is None:
            return False
        if self.wildcard:
            return name.endswith("." + self.name)
        return name == self.name

    def specificity(self) -> tuple[int, int]:
        if self.net is not None:
            return (self.net.version, self.net.prefixlen)
        return (0 if self.wildcard else 1, len(self.name or ""))


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What was decided and why: ``rule`` is the rule's text, or ``default``, ``always-denied:<why>``,
    ``not-pinned`` (an allowed name, but at an address its DNS answer did not give)."""

    allowed: bool
    rule: str


def _normalize_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


@dataclass(frozen=True, kw_only=True)
class NetworkPolicy:
    mode: Mode = "none"
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        rules = [Rule.parse(t, allow=True) for t in self.allow_out]
        rules += [Rule.parse(t, allow=False) for t in self.deny_out]
        if len(rules) > MAX_RULES:
            raise InvalidNetworkPolicy(f"a network policy holds at most {MAX_RULES} rules, got {len(rules)}")
        for rule in rules:
            if rule.allow and rule.net is not None:
                why = _inside_denied(rule.net)
                if why is not None:
                    raise InvalidNetworkPolicy(
                        f"allow_out rule {rule.text!r} names only addresses no sandbox may reach ({why}); "
                        "sandboxes never reach the host, other sandboxes, private, link-local or metadata "
                        "addresses",
                        details={"rule": rule.text, "range": why},
                    )
        object.__setattr__(self, "_rules", tuple(r for r in rules if not (r.net in _ALL and not r.allow)))

    # -- forms ----------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, value: object) -> NetworkPolicy:
        """``None``/``"none"``, ``"internet"``, ``{"allow_out": [...], "deny_out": [...]}`` or a policy."""
        if isinstance(value, NetworkPolicy):
            return value
        if value is None or value == "none":
            return cls()
        if value == "internet":
            return cls(mode="internet")
        if isinstance(value, Mapping):
            unknown = set(value) - {"allow_out", "deny_out"}
            if unknown:
                raise InvalidNetworkPolicy(
                    f"unknown network policy keys {sorted(map(str, unknown))}; use allow_out and deny_out",
                    details={"keys": sorted(map(str, unknown))},
                )
            allow, deny = value.get("allow_out"), value.get("deny_out")
            for key, rules in (("allow_out", allow), ("deny_out", deny)):
                if rules is not None and (isinstance(rules, str) or not isinstance(rules, list | tuple)):
                    raise InvalidNetworkPolicy(f"{key} must be a list of rules", details={"key": key})
            has_allow = allow is not None or any(_is_all(r) for r in deny or ())
            return cls(
                mode="rules" if has_allow else "internet",
                allow_out=tuple(allow or ()),
                deny_out=tuple(deny or ()),
            )
        raise InvalidNetworkPolicy(
            f'network must be "none", "internet" or {{"allow_out": [...], "deny_out": [...]}}, got {value!r}'[
                :300
            ]
        )

    def to_wire(self) -> str | dict[str, Any]:
        if self.mode == "rules" or (self.mode == "internet" and self.deny_out):
            out: dict[str, Any] = {"deny_out": list(self.deny_out)}
            if self.mode == "rules":
                out["allow_out"] = list(self.allow_out)
            return out
        return self.mode

    @property
    def enabled(self) -> bool:
        """Whether the sandbox gets a network interface at all."""
        return self.mode != "none"

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules  # type: ignore[attr-defined, no-any-return]

    def check_ranges(self, extra: Iterable[IpNetwork]) -> None:
        """Refuse allow rules inside ``extra`` (the server's cluster/service ranges) as well."""
        extra = list(extra)
        for rule in self.rules:
            if rule.allow and rule.net is not None and any(_covered(rule.net, e) for e in extra):
                raise InvalidNetworkPolicy(
                    f"allow_out rule {rule.text!r} is inside a range this server never lets sandboxes reach",
                    details={"rule": rule.text, "range": "cluster"},
                )

    # -- decisions ------------------------------------------------------------------------------------------
    def name_verdict(self, name: str, port: int | None) -> Rule | None:
        """The deciding name rule for ``name`` (most specific; a tie goes to a deny). ``port=None`` asks for
        DNS: allow rules of any port count, deny rules only when they hold for every port."""
        name = _normalize_name(name)
        hits = [
            r
            for r in self.rules
            if r.matches_name(name) and (r.port is None or (port is None and r.allow) or r.port == port)
        ]
        return _best(hits)

    def ip_verdict(self, ip: IpAddress, port: int | None) -> Rule | None:
        ip = _embedded_v4(ip)
        hits = [
            r
            for r in self.rules
            if r.net is not None
            and r.net.version == ip.version
            and ip in r.net
            and (r.port is None or r.port == port)
        ]
        return _best(hits)

    def default(self) -> bool:
        return self.mode == "internet"

    def resolves(self, name: str) -> Decision:
        """Whether the sandbox's DNS answers ``name`` (otherwise NXDOMAIN)."""
        if not self.enabled:
            return Decision(allowed=False, rule="none")
        rule = self.name_verdict(name, None)
        if rule is not None:
            return Decision(allowed=rule.allow, rule=rule.text)
        # under allow_out only names with an allow rule are answered: an upstream query is itself a way out
        # (data in the labels of a name), so a name no rule allows is not even looked up
        return Decision(allowed=self.default(), rule="default")

    def decide(
        self,
        ip: IpAddress,
        port: int,
        *,
        name: str | None,
        pinned: bool,
        pinned_by_allowed: bool = False,
        extra_denied: Iterable[IpNetwork] = (),
    ) -> Decision:
        """A TCP connection to ``ip:port``, naming ``name`` (TLS SNI / HTTP Host; None when it names none).

        ``pinned``: the sandbox's DNS answered ``name`` with ``ip``. ``pinned_by_allowed``: it answered some
        name allowed at this port with ``ip`` (for connections that name nothing: ssh, git).
        """
        if not self.enabled:
            return Decision(allowed=False, rule="none")
        why = always_denied(ip, extra_denied)
        if why is not None:
            return Decision(allowed=False, rule=f"always-denied:{why}")
        by_name = self.name_verdict(name, port) if name else None
        by_ip = self.ip_verdict(ip, port)
        for rule in (by_name, by_ip):
            if rule is not None and not rule.allow:
                return Decision(allowed=False, rule=rule.text)
        if by_ip is not None:
            return Decision(allowed=True, rule=by_ip.text)
        if by_name is not None:
            return Decision(allowed=pinned, rule=by_name.text if pinned else "not-pinned")
        if name is None and pinned_by_allowed:
            return Decision(allowed=True, rule="pinned")
        return Decision(allowed=self.default(), rule="default")


def _is_all(text: object) -> bool:
    return isinstance(text, str) and text.strip() in ("0.0.0.0/0", "::/0")


def _best(hits: list[Rule]) -> Rule | None:
    if not hits:
        return None
    top = max(r.specificity() for r in hits)
    best = [r for r in hits if r.specificity() == top]
    return next((r for r in best if not r.allow), best[0])


def _covered(net: IpNetwork, outer: IpNetwork) -> bool:
    return net.version == outer.version and net.subnet_of(outer)  # type: ignore[arg-type]


def _inside_denied(net: IpNetwork) -> str | None:
    for denied, why in ALWAYS_DENIED:
        if _covered(net, denied):
            return why
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = _embedded_v4(net.network_address)
        if mapped.version == 4 and always_denied(mapped):
            return always_denied(mapped)
    return None
