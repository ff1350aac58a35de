"""A private "internet" for egress tests: an upstream network namespace with no route out.

``internet`` (module-scoped) makes namespace ``corral-test-inet-<token>`` with only a loopback interface, holding
addresses of 198.18.0.0/15 (the benchmarking range) and of 2001:db8::/32 (the IPv6 documentation range), a
DNS server (198.18.0.53) and HTTP/HTTPS/raw TCP/UDP servers on every address (``_upstream.py``).
``egress_config`` points Corral's egress uplink at that namespace, its resolver at that DNS server and opens
the documentation range (``lab_ranges``, denied by default) for the upstream's IPv6 addresses, and asserts
all three, and that the namespace has no route of either family leaving it, before any sandbox gets
network: no test traffic can reach the host's real uplink.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from corral.runtimes._net.config import EgressConfig

sys.path.insert(0, str(Path(__file__).parent))
from _pki import make_pki

UPSTREAM = Path(__file__).with_name("_upstream.py")
DNS_IP = "198.18.0.53"
V6_ALLOWED, V6_OTHER, V6_BANNER = "2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::1"
LAB_RANGES = ("2001:db8::/32",)
ZONE = {
    "allowed.test": ["198.18.1.1", V6_ALLOWED],
    "other.test": ["198.18.1.2", V6_OTHER],
    "six.test": [V6_ALLOWED],  # IPv6 only
    # AAAA rebinding: unique-local, link-local, loopback, IPv4-mapped private, NAT64 of private, metadata
    "rebind6.test": ["fd00::1", "fe80::1", "::1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "fd00:ec2::254"],
    "a.cdn.test": ["198.18.1.3"],
    "b.cdn.test": ["198.18.1.3"],
    "x.files.test": ["198.18.1.4"],
    "evil.files.test": ["198.18.1.5"],
    "rebind.test": ["10.0.0.1", "127.0.0.1", "169.254.169.254"],
    "mixed.test": ["198.18.1.6", "192.168.1.1"],
    "doh.test": ["198.18.1.7"],
    "forbidden.test": ["198.18.1.8"],
}
ADDRESSES = [
    DNS_IP,
    *{a for v in ZONE.values() for a in v if a.startswith("198.")},
    "198.19.0.1",
    "198.19.0.2",
    V6_ALLOWED,
    V6_OTHER,
    V6_BANNER,
]


@dataclass(frozen=True)
class Internet:
    netns: str
    path: str
    queries: Path  # names that reached the upstream DNS server, one a line
    ca: Path  # the test CA the upstream's HTTPS certificate is signed by
    requests: Path  # every HTTP(S) request the upstream received: one JSON line each (_upstream.py)

    def queried(self) -> list[str]:
        return self.queries.read_text().split() if self.queries.exists() else []

    def received(self) -> list[dict[str, Any]]:
        if not self.requests.exists():
            return []
        return [json.loads(line) for line in self.requests.read_text().splitlines() if line.strip()]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=15)


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internet]:
    if os.geteuid() != 0:
        pytest.skip("egress tests need root (network namespaces, nftables)")
    name = f"corral-test-inet-{secrets.token_hex(4)}"
    work = tmp_path_factory.mktemp("internet")
    (work / "zone.json").write_text(json.dumps(ZONE))
    make_pki(work, sorted(ZONE))  # a test CA, and the servers' certificate for every name of the zone
    _ip("netns", "add", name)
    proc = None
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        for addr in ADDRESSES:  # on its loopback: the namespace has no other interface at all
            _ip("-n", name, "addr", "add", f"{addr}/{128 if ':' in addr else 32}", "dev", "lo")
        # the test's internet: addresses of its own and nothing else; no default route, no link out
        for family in ("-4", "-6"):
            routes = subprocess.run(
                ["ip", family, "-n", name, "route", "show", "default"], capture_output=True, text=True
            )
            assert routes.returncode == 0 and routes.stdout.strip() == "", (family, routes.stdout)
        links = subprocess.run(["ip", "-n", name, "-o", "link"], capture_output=True, text=True).stdout
        assert {ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()} == {"lo"}
        with open(work / "upstream.log", "wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", name, sys.executable, str(UPSTREAM), str(work / "zone.json"),
                 str(work / "cert.pem"), str(work / "key.pem")],
                stdout=subprocess.PIPE, stderr=log,
            )  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield Internet(
            netns=name,
            path=f"/run/netns/{name}",
            queries=work / "queries.log",
            ca=work / "ca.pem",
            requests=work / "requests.log",
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)


@pytest.fixture
def egress_config(internet: Internet) -> EgressConfig:
    config = EgressConfig(
        uplink_netns=internet.path,
        resolvers=(DNS_IP,),
        max_connections=64,
        subnet="10.231.0.0/16",
        lab_ranges=LAB_RANGES,
    )
    # THE rule: sandbox traffic goes only to the test's own upstream namespace, never the host's uplink
    assert config.uplink_netns == internet.path and Path(config.uplink_netns).exists()
    assert config.resolvers == (DNS_IP,)
    # the documentation range is opened for the upstream's IPv6 addresses, and nothing else is
    assert config.lab_ranges == LAB_RANGES and all(a.startswith("2001:db8:") for a in ADDRESSES if ":" in a)
    return config


@dataclass(kw_only=True)
class NetSandbox:
    """A real sandbox with network, made by ``net_sandbox``; ``probe`` runs _client.py inside it."""

    runtime: Any
    instance: Any
    client: Any

    async def run(self, argv: list[str], timeout: float = 60) -> tuple[int | None, str, str]:
        out, err = bytearray(), bytearray()
        end: dict[str, Any] = {}
        with anyio.fail_after(timeout):
            async with self.client.request("exec", {"argv": argv, "user": "user"}) as req:
                async for frame in req:
                    ev = frame.get("ev")
                    if ev == "stdout":
                        out += frame.payload
                    elif ev == "stderr":
                        err += frame.payload
                    elif ev == "exit":
                        end = dict(frame.header)
        return end.get("exit_code"), out.decode(errors="replace"), err.decode(errors="replace")

    async def probe(self, *args: str) -> dict[str, Any]:
        code, out, err = await self.run(["/usr/bin/python3", "-c", CLIENT_SOURCE, *args])
        assert code == 0, err
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


CLIENT_SOURCE = Path(__file__).with_name("_client.py").read_text()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def net_sandbox(
    egress_config: EgressConfig, corral_data_dir: Path
) -> AsyncIterator[Callable[..., Awaitable[NetSandbox]]]:
    """Sandboxes of ``isolation`` with ``network`` (a policy in any accepted form), destroyed at the end
    with a check that their namespace, link and nftables table are gone."""
    from corral.core.agent_client import AgentClient
    from corral.ids import SandboxId
    from corral.images.rootfs import ensure_host_template
    from corral.netpolicy import NetworkPolicy
    from corral.runtimes._net import netns as _netns
    from corral.runtimes._net import nft as _nft
    from corral.runtimes._net.stack import SandboxNet
    from corral.runtimes.base import RuntimeConfig, SandboxSpec
    from corral.runtimes.registry import load_runtime

    config = RuntimeConfig(
        state_root=corral_data_dir / "state", cache_root=corral_data_dir / "cache", egress=egress_config
    )
    assert config.egress.uplink_netns == egress_config.uplink_netns
    rootfs = await anyio.to_thread.run_sync(ensure_host_template, config.cache_root)
    made: list[NetSandbox] = []

    async def make(network: object, isolation: str = "namespace") -> NetSandbox:
        runtime = load_runtime(isolation, config)
        spec = SandboxSpec(sandbox_id=SandboxId.new(), rootfs=rootfs, network=NetworkPolicy.parse(network))
        instance = await runtime.create(spec)
        try:
            client = await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)
        except BaseException:
            await runtime.destroy(instance)
            raise
        sbx = NetSandbox(runtime=runtime, instance=instance, client=client)
        made.append(sbx)
        return sbx

    try:
        yield make
    finally:
        with anyio.CancelScope(shield=True):
            for sbx in made:
                await sbx.client.aclose()
                await sbx.runtime.destroy(sbx.instance)
                net = sbx.instance.extra.get("net")
                if net is not None:
                    plan = SandboxNet.from_json(net).plan
                    assert not _netns.exists(plan), plan
                    assert not await anyio.to_thread.run_sync(_nft.table_exists, plan.sandbox_id)
                assert not await anyio.to_thread.run_sync(Path(sbx.instance.ref).exists)
