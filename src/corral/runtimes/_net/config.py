"""Where sandbox traffic leaves this host, and the caps on it: the runtimes' slice of the egress settings."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from corral.errors import InvalidRequest
from corral.netpolicy import IpNetwork

__all__ = ["NOT_ROUTED", "EgressConfig"]

# Special-purpose ranges the public internet never routes that no sandbox reaches either, besides the fixed
# always-denied ones (corral.netpolicy): a lab or a test's own upstream on one of them names it in
# ``lab_ranges``. (The IPv4 documentation and benchmarking ranges are left reachable, as before: the issue's
# own examples allow 203.0.113.0/24, and the tests' upstream lives on 198.18.0.0/15.)
NOT_ROUTED = ("2001:db8::/32",)


@dataclass(frozen=True, kw_only=True)
class EgressConfig:
    """Where sandbox traffic leaves and the caps on it (``Settings.egress_*``)."""

    subnet: str = "10.231.0.0/16"  # a /30 of it per sandbox, between the veth ends; never routed
    subnet6: str = "fd63:6f72:7261::/48"  # a /126 of it per sandbox (ULA: never reachable from a sandbox)
    uplink_netns: str | None = None  # a network namespace file; None: the host's own namespace
    resolvers: tuple[str, ...] = ()  # upstream DNS; empty: the nameservers of the host's /etc/resolv.conf
    denied_ranges: tuple[str, ...] = ()  # cluster/service ranges, never reachable besides the fixed ones
    lab_ranges: tuple[
        str, ...
    ] = ()  # of NOT_ROUTED, the ones this server's uplink does route (a test upstream)
    max_connections: int = 256  # open TCP connections per sandbox
    bandwidth_bytes: int = 0  # bytes/s per sandbox, both directions together; 0: unlimited
    proxy_port: int = 15001
    # extra CA certificates (a PEM file) trusted for upstreams of intercepted connections (secrets), besides
    # the system's trust store; None: the system's only
    upstream_ca_file: str | None = None

    def __post_init__(self) -> None:
        try:
            subnet = ipaddress.ip_network(self.subnet)
            for ip in self.resolvers:
                ipaddress.IPv4Address(ip)
            denied = [ipaddress.ip_network(n) for n in self.denied_ranges]
            subnet6 = ipaddress.ip_network(self.subnet6)
            lab = [ipaddress.ip_network(n) for n in self.lab_ranges]
        except ValueError as exc:
            raise InvalidRequest(f"network settings: {exc}") from exc
        if subnet.version != 4 or not 8 <= subnet.prefixlen <= 28:
            raise InvalidRequest("network settings: subnet must be an IPv4 network from /8 to /28")
        if subnet6.version != 6 or not subnet6.subnet_of(ipaddress.IPv6Network("fc00::/7")):
            raise InvalidRequest("network settings: subnet6 must be an IPv6 unique-local network (fc00::/7)")
        if subnet6.prefixlen > 112:
            raise InvalidRequest("network settings: subnet6 must be at most a /112")
        not_routed = [ipaddress.ip_network(n) for n in NOT_ROUTED]
        for net in lab:
            if not any(net.version == n.version and net.subnet_of(n) for n in not_routed):  # type: ignore[arg-type]
                raise InvalidRequest(
                    f"network settings: lab_ranges may only name ranges inside {', '.join(NOT_ROUTED)}, "
                    f"got {net}",
                )
        if self.uplink_netns is not None and not self.uplink_netns.startswith("/"):
            raise InvalidRequest(
                "network settings: uplink_netns is a namespace file path, like /run/netns/egress"
            )
        if self.max_connections < 0 or self.bandwidth_bytes < 0 or not 1024 <= self.proxy_port <= 65534:
            raise InvalidRequest("network settings: caps are >= 0 and proxy_port is 1024-65534")
        del denied

    def denied_networks(self) -> list[IpNetwork]:
        """The configured cluster ranges and the not-routed ranges no lab range opens."""
        lab = [ipaddress.ip_network(n) for n in self.lab_ranges]
        out: list[IpNetwork] = [ipaddress.ip_network(n) for n in self.denied_ranges]
        for text in NOT_ROUTED:
            left = [ipaddress.ip_network(text)]
            for hole in lab:
                left = [
                    part
                    for net in left
                    for part in (
                        net.address_exclude(hole)  # type: ignore[arg-type]
                        if hole.version == net.version and hole.subnet_of(net)  # type: ignore[arg-type]
                        else []
                        if hole.version == net.version and net.subnet_of(hole)  # type: ignore[arg-type]
                        else [net]
                    )
                ]
            out += left
        return out
