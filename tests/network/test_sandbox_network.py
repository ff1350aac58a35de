"""Egress policies enforced on real sandboxes (namespace, gVisor and microVM runtimes), against the test's own
upstream. The microVM ones boot a QEMU TCG guest each (several seconds; at most one at a time here)."""

from __future__ import annotations

import anyio
import pytest

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.anyio]

RULES = {"allow_out": ["allowed.test", "a.cdn.test", "198.19.0.1/32:7000"], "deny_out": ["evil.files.test"]}


V6_ALLOWED, V6_OTHER = "2001:db8:1::1", "2001:db8:1::2"  # conftest.ZONE's
ISOLATIONS = [
    "namespace",
    pytest.param("gvisor", marks=pytest.mark.runsc),
    pytest.param("microvm", marks=pytest.mark.qemu),
]


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_sandbox_reaches_allowed_destinations_only(net_sandbox, isolation: str) -> None:
    """The same policy, the same answers, in every runtime (gVisor through its own netstack, the microVM
    through its guest kernel on a tap bridged to the same veth)."""
    from corral.netpolicy import NetworkPolicy

    sbx = await net_sandbox(RULES, isolation=isolation)
    ok = await sbx.probe("url", "allowed.test")
    assert ok["ok"] and ok["body"].startswith("host=allowed.test local=198.18.1.1"), ok
    assert not (await sbx.probe("resolve", "other.test"))["ok"]
    assert (await sbx.probe("banner", "198.19.0.1", "7000"))["ok"]
    assert not (await sbx.probe("banner", "198.19.0.2", "7000", "2"))["ok"]
    assert not (await sbx.probe("http", "198.18.1.3", "443", "b.cdn.test", "/", "b.cdn.test", "1"))["ok"]
    assert not (await sbx.probe("banner", "169.254.169.254", "80", "2"))["ok"]
    assert not (await sbx.probe("udp", "198.18.1.1", "7001"))["ok"]
    # the same over IPv6: the allowed name by its AAAA answer, nothing else
    six = await sbx.probe("url", "allowed.test", "/", "0", "", "6")
    assert six["ok"] and six["body"].startswith(f"host=allowed.test local={V6_ALLOWED}"), six
    assert not (await sbx.probe("resolve", "other.test", "6"))["ok"]
    for ip in (V6_OTHER, "fd00:ec2::254", "::ffff:10.0.0.1", "64:ff9b::a9fe:a9fe"):
        assert not (await sbx.probe("banner", ip, "80", "2"))["ok"], ip
    await sbx.runtime.update_network(sbx.instance, NetworkPolicy.parse({"allow_out": ["other.test"]}))
    assert (await sbx.probe("url", "other.test"))["ok"]
    assert not (await sbx.probe("resolve", "allowed.test"))["ok"]


async def test_root_in_the_sandbox_cannot_reconfigure_its_network(net_sandbox) -> None:
    sbx = await net_sandbox({"allow_out": ["allowed.test"]})
    for argv in (
        ["ip", "addr", "add", "198.19.0.9/24", "dev", "eth0"],
        ["ip", "route", "add", "198.19.0.0/24", "dev", "eth0"],
        ["ip", "link", "set", "eth0", "down"],
        ["ip", "link", "add", "x0", "type", "veth"],
    ):
        code, out, err = await _root(sbx, argv)
        assert code != 0, (argv, out, err)
    code, out, _ = await _root(sbx, ["/usr/bin/python3", "-c", "import socket; socket.socket(2, 3, 1)"])
    assert code != 0  # no raw sockets (no CAP_NET_RAW, and seccomp)
    assert (await sbx.probe("url", "allowed.test"))["ok"]  # still exactly as configured


async def _root(sbx, argv: list[str]) -> tuple[int | None, str, str]:
    out, err = bytearray(), bytearray()
    end: dict = {}
    async with sbx.client.request("exec", {"argv": argv, "user": "root"}) as req:
        async for frame in req:
            if frame.get("ev") == "stdout":
                out += frame.payload
            elif frame.get("ev") == "stderr":
                err += frame.payload
            elif frame.get("ev") == "exit":
                end = dict(frame.header)
    return end.get("exit_code"), out.decode(), err.decode()


async def test_runtime_update_in_place(net_sandbox) -> None:
    from corral.netpolicy import NetworkPolicy

    sbx = await net_sandbox({"allow_out": ["allowed.test"]})
    assert not (await sbx.probe("resolve", "other.test"))["ok"]
    await sbx.runtime.update_network(sbx.instance, NetworkPolicy.parse({"allow_out": ["other.test"]}))
    assert (await sbx.probe("url", "other.test"))["ok"]
    assert not (await sbx.probe("resolve", "allowed.test"))["ok"]
    await sbx.runtime.update_network(sbx.instance, NetworkPolicy.parse("none"))
    assert not (await sbx.probe("url", "other.test"))["ok"]
    await sbx.runtime.update_network(sbx.instance, NetworkPolicy.parse("internet"))
    assert (await sbx.probe("url", "forbidden.test"))["ok"]
    assert not (await sbx.probe("banner", "169.254.169.254", "80", "2"))["ok"]


@pytest.mark.parametrize("isolation", ["namespace", pytest.param("microvm", marks=pytest.mark.qemu)])
async def test_a_sandbox_without_network_cannot_get_it_later(net_sandbox, isolation: str) -> None:
    from corral.errors import Unsupported
    from corral.netpolicy import NetworkPolicy

    sbx = await net_sandbox("none", isolation=isolation)  # a microVM: no NIC at all
    code, out, _ = await sbx.run(["cat", "/proc/net/dev"])
    assert code == 0
    assert "eth0" not in out
    code, out, _ = await sbx.run(["cat", "/proc/net/if_inet6"])  # IPv6: loopback's ::1 at most
    assert code == 0 and all(line.split()[-1] == "lo" for line in out.splitlines()), out
    for ip in (V6_ALLOWED, "198.18.1.1"):
        result = await sbx.probe("banner", ip, "80", "2")
        assert not result["ok"] and "unreachable" in result["error"], result
    with pytest.raises(Unsupported):
        await sbx.runtime.update_network(sbx.instance, NetworkPolicy.parse("internet"))


async def test_cleanup_after_a_crash_and_from_a_new_runtime_object(net_sandbox, egress_config) -> None:
    import os
    import signal

    from corral.runtimes._net import netns as _netns
    from corral.runtimes._net.stack import SandboxNet
    from corral.runtimes.base import ObservedState
    from corral.runtimes.registry import load_runtime

    sbx = await net_sandbox("internet")
    plan = SandboxNet.from_json(sbx.instance.extra["net"]).plan
    os.kill(sbx.instance.extra["shim_pid"], signal.SIGKILL)  # the sandbox's shim dies: the sandbox with it
    for _ in range(200):
        if (await sbx.runtime.inspect(sbx.instance)).state is ObservedState.EXITED:
            break
        await anyio.sleep(0.05)
    assert _netns.exists(plan)  # nothing removed itself …
    fresh = load_runtime("namespace", sbx.runtime.config)  # … until a destroy, here from a "restarted server"
    await fresh.destroy(sbx.instance)
    assert not _netns.exists(plan)


@pytest.mark.qemu
async def test_a_microvm_guest_root_cannot_widen_its_network(net_sandbox) -> None:
    """Root in a microVM owns its guest kernel: it can readdress eth0, add routes and send raw packets. The
    policy is enforced on the host side of the link, so none of that reaches anything more."""
    from corral.errors import Unsupported
    from corral.runtimes._net.stack import SandboxNet

    sbx = await net_sandbox({"allow_out": ["198.19.0.1/32:7000"]}, isolation="microvm")
    assert (await sbx.probe("banner", "198.19.0.1", "7000"))["ok"]
    # the guest takes no address or route from a router advertisement (its /init turned those off)
    conf = "/proc/sys/net/ipv6/conf"
    code, out, err = await _root(
        sbx, ["cat", f"{conf}/eth0/accept_ra", f"{conf}/eth0/autoconf", f"{conf}/default/accept_ra"]
    )
    assert (code, out.split()) == (0, ["0", "0", "0"]), (out, err)
    plan = SandboxNet.from_json(sbx.instance.extra["net"]).plan
    spoofed = str(__import__("ipaddress").ip_address(plan.guest_ip) + 4)  # the next sandbox's address
    for argv in (
        ["ip", "addr", "add", f"{spoofed}/32", "dev", "eth0"],
        ["ip", "route", "add", "198.19.0.2/32", "dev", "eth0"],  # on-link: nothing answers ARP for it
    ):
        code, _, err = await _root(sbx, argv)
        assert code == 0, err  # the guest kernel is the sandbox's …
    script = (
        "import socket\n"
        "def go(src, ip, port):\n"
        "    s = socket.socket(); s.settimeout(3)\n"
        "    if src: s.bind((src, 0))\n"
        "    try: s.connect((ip, port)); return s.recv(100).decode().split()[0]\n"
        "    except OSError as e: return type(e).__name__\n"
        f"print(go('{spoofed}', '198.19.0.1', 7000), go('', '198.19.0.2', 7000), go('', '198.19.0.1', 7000))"
    )
    code, out, err = await _root(sbx, ["/usr/bin/python3", "-c", script])
    spoofed_result, routed, plain = out.split()
    assert spoofed_result == "TimeoutError", out  # … but a spoofed source is dropped on the host side
    assert routed in ("TimeoutError", "OSError", "ConnectionRefusedError"), out  # no other way around
    assert plain == "banner", out  # the policy itself still holds, unchanged
    with pytest.raises(Unsupported):  # its memory image would hold a NIC on a tap only it has
        await sbx.runtime.snapshot(sbx.instance, "net-vm")


@pytest.mark.parametrize("isolation", ["namespace", pytest.param("microvm", marks=pytest.mark.qemu)])
async def test_pause_and_resume_keep_the_policy(net_sandbox, isolation: str) -> None:
    sbx = await net_sandbox({"allow_out": ["allowed.test"]}, isolation=isolation)
    assert (await sbx.probe("url", "allowed.test"))["ok"]
    await sbx.runtime.pause(sbx.instance)
    await sbx.runtime.resume(sbx.instance)
    assert (await sbx.probe("url", "allowed.test"))["ok"]
    assert not (await sbx.probe("resolve", "other.test"))["ok"]
    assert not (await sbx.probe("banner", "198.19.0.2", "7000", "2"))["ok"]


@pytest.mark.runsc
async def test_gvisor_refuses_to_pause_a_sandbox_with_network(net_sandbox) -> None:
    from corral.errors import Unsupported

    sbx = await net_sandbox({"allow_out": ["allowed.test"]}, isolation="gvisor")
    with pytest.raises(Unsupported):
        await sbx.runtime.pause(sbx.instance)
    assert (await sbx.probe("url", "allowed.test"))["ok"]  # untouched, still running with its policy
