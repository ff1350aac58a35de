"""The link between a sandbox and Corral's egress path: a network namespace and a veth pair per sandbox.

Layout for one sandbox (``NetPlan``), all made by root on the host, so nothing in the sandbox (root of its own
user namespace only) can change an address, a route or a neighbour entry:

- network namespace ``corral-<sandbox id>`` (``ip netns``; the sandbox's processes join it);
- veth ``cx<12 chars of the id>`` on the host, peer ``eth0`` inside, a /30 of the egress subnet each
  (``guest_ip`` inside, ``host_ip`` on the host side, the sandbox's default route) and a /126 of the IPv6
  egress subnet (unique-local: ``guest_ip6``/``host_ip6``, the IPv6 default route); no router
  advertisements, no address autoconfiguration, no duplicate address detection on either end;
- the host side reaches nothing by routing: nftables (:mod:`.nft`) sends DNS to the sandbox's answerer and
  TCP to its egress proxy, both listening on ``host_ip``, and drops everything else.

The /30 comes from a host-wide slot table under ``/run/corral`` (several Corral data dirs may run on one
host); a slot whose namespace is gone is free again.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from corral.errors import ResourceExhausted
from corral.runtimes import _proc

__all__ = ["NETNS_DIR", "TAP", "NetPlan", "allocate", "attach_tap", "create", "exists", "release", "remove"]

NETNS_DIR = Path("/run/netns")
SLOT_TABLE = Path("/run/corral/net-slots.json")
IP_TIMEOUT = 15.0
RECLAIM_AFTER = 300.0  # seconds a slot may be held without its namespace (set-up in progress) before reuse


@dataclass(frozen=True, kw_only=True)
class NetPlan:
    sandbox_id: str
    netns: str
    host_if: str
    guest_if: str
    host_ip: str
    guest_ip: str
    prefix: int
    slot: int
    host_ip6: str | None = None  # None: a sandbox made before IPv6 egress (its record says so)
    guest_ip6: str | None = None
    prefix6: int = 126

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetPlan:
        return cls(**data)


@contextlib.contextmanager
def _slots() -> Iterator[dict[str, str]]:
    SLOT_TABLE.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(SLOT_TABLE.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            slots: dict[str, str] = json.loads(SLOT_TABLE.read_text())
        except (FileNotFoundError, ValueError):
            slots = {}
        yield slots
        tmp = SLOT_TABLE.with_suffix(".tmp")
        tmp.write_text(json.dumps(slots, sort_keys=True))
        tmp.rename(SLOT_TABLE)
    finally:
        os.close(fd)


def allocate(sandbox_id: str, subnet: str, subnet6: str) -> NetPlan:
    """Reserve a /30 of ``subnet`` (and the /126 of the same slot of ``subnet6``) for the sandbox and name
    its namespace and interfaces."""
    net = ipaddress.ip_network(subnet)
    net6 = ipaddress.ip_network(subnet6)
    netns = f"corral-{sandbox_id}"
    count = net.num_addresses // 4
    now = time.time()
    with _slots() as slots:
        for slot, entry in list(slots.items()):
            owner, _, since = entry.partition("|")
            # its sandbox is gone (destroyed by a process that died before releasing); a slot just taken
            # has no namespace yet either, so only one older than RECLAIM_AFTER is reclaimed
            if not (NETNS_DIR / owner).exists() and now - float(since or 0) > RECLAIM_AFTER:
                del slots[slot]
        taken = {int(s) for s in slots}
        free = next((s for s in range(1, count) if s not in taken), None)
        if free is None:
            raise ResourceExhausted("no free address block for another sandbox with network on this host")
        slots[str(free)] = f"{netns}|{now}"
    base = net.network_address + free * 4
    base6 = net6.network_address + free * 4
    return NetPlan(
        sandbox_id=sandbox_id,
        netns=netns,
        host_if="cx" + sandbox_id.removeprefix("sb-")[:12],
        guest_if="eth0",
        host_ip=str(base + 1),
        guest_ip=str(base + 2),
        prefix=30,
        slot=free,
        host_ip6=str(base6 + 1),
        guest_ip6=str(base6 + 2),
    )


def release(plan: NetPlan) -> None:
    with _slots() as slots:
        if slots.get(str(plan.slot), "").partition("|")[0] == plan.netns:
            del slots[str(plan.slot)]


def exists(plan: NetPlan) -> bool:
    return (NETNS_DIR / plan.netns).exists() or Path(f"/sys/class/net/{plan.host_if}").exists()


def create(plan: NetPlan) -> None:
    """Make the namespace and the veth pair, addressed and up (the caller removes them on failure)."""
    ip = _proc.require_binary("ip")
    _proc.run_blocking(
        [ip, "netns", "add", plan.netns], timeout=IP_TIMEOUT, what="create a network namespace"
    )
    v6 = plan.host_ip6 is not None and plan.guest_ip6 is not None
    # before any link exists: nothing inside configures itself from what arrives on it (no RA, no SLAAC)
    sysctls = [
        f"net.ipv6.conf.{scope}.{key}=0" for scope in ("all", "default") for key in ("accept_ra", "autoconf")
    ]
    sysctls.append(f"net.ipv6.conf.all.disable_ipv6={0 if v6 else 1}")
    _proc.run_blocking(
        [ip, "netns", "exec", plan.netns, "sysctl", "-q", "-w", *sysctls],
        timeout=IP_TIMEOUT,
        what="configure IPv6 in the sandbox's network namespace",
    )
    _proc.run_blocking(
        [ip, "link", "add", plan.host_if, "type", "veth", "peer", "name", plan.guest_if, "netns", plan.netns],
        timeout=IP_TIMEOUT,
        what="create the sandbox's network link",
    )
    conf = f"/proc/sys/net/ipv6/conf/{plan.host_if}"
    for key, value in (("accept_ra", "0"), ("autoconf", "0"), ("forwarding", "0")):
        _write_sysctl(f"{conf}/{key}", value)
    _write_sysctl(f"{conf}/disable_ipv6", "0" if v6 else "1")
    batch_host = f"addr add {plan.host_ip}/{plan.prefix} dev {plan.host_if}\nlink set {plan.host_if} up\n"
    batch_guest = (
        f"link set lo up\naddr add {plan.guest_ip}/{plan.prefix} dev {plan.guest_if}\n"
        f"link set {plan.guest_if} up\nroute add default via {plan.host_ip} dev {plan.guest_if}\n"
    )
    if v6:
        batch_host += f"addr add {plan.host_ip6}/{plan.prefix6} dev {plan.host_if} nodad\n"
        batch_guest += (
            f"addr add {plan.guest_ip6}/{plan.prefix6} dev {plan.guest_if} nodad\n"
            f"route add ::/0 via {plan.host_ip6} dev {plan.guest_if}\n"
        )
    _proc.run_blocking(
        [ip, "-batch", "-"],
        timeout=IP_TIMEOUT,
        what="address the sandbox's network link",
        input=batch_host.encode(),
    )
    _proc.run_blocking(
        [ip, "-netns", plan.netns, "-batch", "-"],
        timeout=IP_TIMEOUT,
        what="address the sandbox's network link",
        input=batch_guest.encode(),
    )


TAP = "tap0"  # a VM's NIC inside the namespace (the same name in every namespace: one VM each)
BRIDGE = "br0"


def attach_tap(plan: NetPlan) -> None:
    """For a VM: move the sandbox's addresses off the namespace's end of the veth onto the VM (its guest
    configures ``guest_ip``/``guest_ip6`` itself) by bridging that end with a new tap device, ``TAP``. The
    host side, its rules and its egress process see exactly what they see for any sandbox.
    The namespace itself keeps no address and no IPv6 stack on these links: only the VM speaks on them."""
    ip = _proc.require_binary("ip")
    batch = (
        f"addr flush dev {plan.guest_if}\n"
        f"link add {BRIDGE} type bridge\n"
        f"tuntap add dev {TAP} mode tap\n"
        f"link set {plan.guest_if} master {BRIDGE}\n"
        f"link set {TAP} master {BRIDGE}\n"
    )
    _proc.run_blocking(
        [ip, "-netns", plan.netns, "-batch", "-"],
        timeout=IP_TIMEOUT,
        what="attach the VM's network device",
        input=batch.encode(),
    )
    _proc.run_blocking(
        [ip, "netns", "exec", plan.netns, "sysctl", "-q", "-w",
         *[f"net.ipv6.conf.{dev}.disable_ipv6=1" for dev in (plan.guest_if, BRIDGE, TAP)]],
        timeout=IP_TIMEOUT,
        what="attach the VM's network device",
    )  # fmt: skip
    _proc.run_blocking(
        [ip, "-netns", plan.netns, "-batch", "-"],
        timeout=IP_TIMEOUT,
        what="attach the VM's network device",
        input=f"link set {TAP} up\nlink set {BRIDGE} up\n".encode(),
    )


def remove(plan: NetPlan) -> None:
    """Delete the veth pair and the namespace; idempotent."""
    ip = _proc.require_binary("ip")
    if Path(f"/sys/class/net/{plan.host_if}").exists():
        _proc.run_blocking(
            [ip, "link", "del", plan.host_if],
            timeout=IP_TIMEOUT,
            what="remove the sandbox's link",
            check=False,
        )
    if (NETNS_DIR / plan.netns).exists():
        _proc.run_blocking(
            [ip, "netns", "del", plan.netns],
            timeout=IP_TIMEOUT,
            what="remove the sandbox's network namespace",
        )
    release(plan)


def _write_sysctl(path: str, value: str) -> None:
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(value)
