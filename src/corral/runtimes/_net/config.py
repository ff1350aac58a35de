"""Where sandbox traffic leaves this host, and the caps on it: the runtimes' slice of the egress settings."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from corral.errors import InvalidRequest
from corral.netpolicy import IpNetwork

__all__ = ["EgressConfig"]


@dataclass(frozen=True, kw_only=True)
class EgressConfig:
    """Where sandbox traffic leaves and the caps on it (``Settings.egress_*``)."""

    subnet: str = "10.231.0.0/16"  # a /30 of it per sandbox, between the veth ends; never routed
    uplink_netns: str | None = None  # a network namespace file; None: the host's own namespace
    resolvers: tuple[str, ...] = ()  # upstream DNS; empty: the nameservers of the host's /etc/resolv.conf
    denied_ranges: tuple[str, ...] = ()  # cluster/service ranges, never reachable besides the fixed ones
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
        except ValueError as exc:
            raise InvalidRequest(f"network settings: {exc}") from exc
        if subnet.version != 4 or not 8 <= subnet.prefixlen <= 28:
            raise InvalidRequest("network settings: subnet must be an IPv4 network from /8 to /28")
        if self.uplink_netns is not None and not self.uplink_netns.startswith("/"):
            raise InvalidRequest(
                "network settings: uplink_netns is a namespace file path, like /run/netns/egress"
            )
        if self.max_connections < 0 or self.bandwidth_bytes < 0 or not 1024 <= self.proxy_port <= 65534:
            raise InvalidRequest("network settings: caps are >= 0 and proxy_port is 1024-65534")
        del denied

    def denied_networks(self) -> list[IpNetwork]:
        return [ipaddress.ip_network(n) for n in self.denied_ranges]
