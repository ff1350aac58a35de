"""The sandbox's DNS answerer: only names the policy allows are answered, and what is answered is pinned.

Every DNS packet from the sandbox (to any address, port 53, UDP or TCP) is redirected here by nftables. For
a name the policy does not allow the answer is NXDOMAIN; an allowed name is resolved upstream (the configured
resolvers, reached from the egress uplink) and answered with its IPv4 (A) or IPv6 (AAAA) addresses minus
any in an always-denied range (a rebinding answer like ``10.0.0.1``, ``127.0.0.1``, ``fd00::1``, an
IPv4-mapped ``::ffff:10.0.0.1`` or a NAT64 ``64:ff9b::a00:1`` is dropped, never passed on). What is
answered is returned as pins (address -> seconds), which the egress process adds to the proxy's and
nftables' view of what the sandbox may connect to. Anything else (TXT, MX, HTTPS, …) gets an empty answer too: only addresses are needed to connect, and other
record types are a way to carry data out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral.netpolicy import Decision, IpNetwork, NetworkPolicy, always_denied

__all__ = ["Answer", "answer"]

MIN_PIN_SECONDS = 600  # clients cache answers longer than their TTL (Java, long-lived pools)
MAX_PIN_SECONDS = 24 * 3600
Resolve = Callable[[bytes], Awaitable[bytes]]
ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


@dataclass(frozen=True, kw_only=True)
class Answer:
    wire: bytes
    name: str | None
    decision: Decision | None
    pins: dict[str, int] = field(default_factory=dict)  # address -> seconds
    dropped: tuple[str, ...] = ()  # upstream addresses withheld (always-denied: rebinding)


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    response.set_rcode(rcode)
    return response


async def answer(
    packet: bytes, policy: NetworkPolicy, resolve: Resolve, *, extra_denied: Iterable[IpNetwork]
) -> Answer:
    """Answer one DNS query from the sandbox. ``resolve`` sends a query upstream and returns the reply."""
    try:
        query = dns.message.from_wire(packet)
    except Exception:  # any malformed packet: no answer at all
        return Answer(wire=b"", name=None, decision=None)
    if len(query.question) != 1:
        return Answer(wire=_reply(query, dns.rcode.FORMERR).to_wire(), name=None, decision=None)
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    decision = policy.resolves(name)
    if not decision.allowed:
        return Answer(wire=_reply(query, dns.rcode.NXDOMAIN).to_wire(), name=name, decision=decision)
    if question.rdtype not in ADDRESS_TYPES or question.rdclass != dns.rdataclass.IN:
        return Answer(wire=_reply(query, dns.rcode.NOERROR).to_wire(), name=name, decision=decision)
    upstream_query = dns.message.make_query(question.name, question.rdtype)
    try:
        upstream = dns.message.from_wire(await resolve(upstream_query.to_wire()))
    except Exception:
        return Answer(wire=_reply(query, dns.rcode.SERVFAIL).to_wire(), name=name, decision=decision)
    if upstream.rcode() != dns.rcode.NOERROR:
        return Answer(wire=_reply(query, upstream.rcode()).to_wire(), name=name, decision=decision)
    pins: dict[str, int] = {}
    dropped: list[str] = []
    response = _reply(query, dns.rcode.NOERROR)
    extra = list(extra_denied)
    addresses = []
    ttl = MAX_PIN_SECONDS
    for rrset in upstream.answer:
        if rrset.rdtype != question.rdtype:
            continue  # CNAMEs are followed by the upstream resolver; their address records follow them
        for rdata in rrset:
            ip = ipaddress.ip_address(rdata.address)
            if always_denied(ip, extra) is not None:
                dropped.append(str(ip))
                continue
            addresses.append(str(ip))
            ttl = min(ttl, rrset.ttl)
    if addresses:
        response.answer.append(
            dns.rrset.from_text_list(
                question.name,
                min(ttl, 300),
                "IN",
                dns.rdatatype.to_text(question.rdtype),
                sorted(set(addresses)),
            )
        )
        seconds = max(MIN_PIN_SECONDS, min(ttl, MAX_PIN_SECONDS))
        pins = dict.fromkeys(addresses, seconds)
    return Answer(wire=response.to_wire(), name=name, decision=decision, pins=pins, dropped=tuple(dropped))
