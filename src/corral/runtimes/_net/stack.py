"""Egress for local sandboxes: the network namespace, veth, nftables table and egress process of one sandbox.

A runtime whose sandbox gets network (``SandboxSpec.network`` enabled) calls :func:`setup` before it starts
the sandbox (which then joins ``SandboxNet.plan.netns_path``), :func:`update` for a policy change,
:func:`stats` for its counters, and :func:`teardown` (idempotent, also after a crash or from another process)
when it removes the sandbox. Everything is described by the JSON-able ``SandboxNet`` kept in the
runtime's ``Instance.extra["net"]``. Pieces: :mod:`.netns` (namespace and link), :mod:`.nft` (rules),
:mod:`.egress` (the DNS answerer and SNI/Host proxy process), :mod:`.ledger` (decision counts).

The egress path leaves through ``EgressConfig.uplink_netns``: unset, the host's own network namespace and
its default route; set (tests, or a host with a dedicated egress namespace), the proxy and the answerer open
their upstream sockets inside that namespace, and nothing else of the host is involved.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from corral.errors import InvalidRequest, RuntimeFailure, RuntimeUnavailable
from corral.netpolicy import IpNetwork, NetworkPolicy
from corral.runtimes import _proc
from corral.runtimes._net import netns as _netns
from corral.runtimes._net import nft as _nft
from corral.runtimes._net.config import EgressConfig
from corral.runtimes._shim import unix_path
from corral.runtimes._unixstream import connect_unix

__all__ = [
    "EgressConfig",
    "SandboxNet",
    "decisions",
    "read_decisions",
    "ready",
    "setup",
    "stats",
    "teardown",
    "teardown_blocking",
    "update",
]

log = logging.getLogger("corral.runtimes.net")

READY_TIMEOUT = 30.0  # started -> listening; ~0.3 s normally, generous for a loaded host
STOP_TIMEOUT = 3.0


@dataclass(frozen=True, kw_only=True)
class SandboxNet:
    plan: _netns.NetPlan
    net_dir: str
    pid: int | None = None
    start_ticks: int | None = None
    extra_denied: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "net_dir": self.net_dir,
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "extra_denied": list(self.extra_denied),
        }

    @classmethod
    def from_json(cls, data: Any) -> SandboxNet:
        return cls(
            plan=_netns.NetPlan.from_dict(dict(data["plan"])),
            net_dir=data["net_dir"],
            pid=data.get("pid"),
            start_ticks=data.get("start_ticks"),
            extra_denied=list(data.get("extra_denied", [])),
        )


def _host_resolvers() -> tuple[str, ...]:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return ()
    out = [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1]
    return tuple(ip for ip in out if ipaddress.ip_address(ip).version == 4)


def _host_addresses() -> list[str]:
    """Every address of the host's interfaces (its public ones too): a sandbox never reaches the host."""
    done = _proc.run_blocking(["ip", "-j", "addr", "show"], timeout=10, what="list the host's addresses")
    out = []
    for link in json.loads(done.stdout or b"[]"):
        for addr in link.get("addr_info", []):
            local = addr.get("local")
            if local:
                out.append(str(ipaddress.ip_network(local)))
    return out


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _write_policy(net_dir: Path, policy: NetworkPolicy) -> None:
    tmp = net_dir / "policy.json.tmp"
    _write_private(tmp, json.dumps(policy.to_wire()))
    tmp.rename(net_dir / "policy.json")


_starting: dict[int, Any] = {}  # egress pid -> its Popen, between setup(wait=False) and ready()


def _setup_sync(
    sandbox_id: str,
    net_dir: Path,
    policy: NetworkPolicy,
    config: EgressConfig,
    wait: bool = True,
    secrets: dict[str, Any] | None = None,
) -> SandboxNet:
    resolvers = config.resolvers or _host_resolvers()
    if not resolvers:
        raise InvalidRequest(
            "sandboxes with network need an upstream DNS resolver; set CORRAL_EGRESS_RESOLVERS"
        )
    if config.uplink_netns and not Path(config.uplink_netns).exists():
        raise RuntimeUnavailable(
            "the egress uplink namespace this server is configured with ([network] uplink_netns) does not "
            "exist; create it, or unset the setting to use the host's own network"
        )
    policy.check_ranges(config.denied_networks())
    net_dir.mkdir(mode=0o700, exist_ok=True)
    plan = _netns.allocate(sandbox_id, config.subnet, config.subnet6)
    net = SandboxNet(plan=plan, net_dir=str(net_dir))
    try:
        _netns.create(plan)
        denied = [str(n) for n in config.denied_networks()]
        extra = [*denied, *_host_addresses(), config.subnet, config.subnet6]
        net = SandboxNet(plan=plan, net_dir=str(net_dir), extra_denied=extra)
        extra_nets = [ipaddress.ip_network(n) for n in extra]
        _nft.apply(
            _nft.render(plan, policy, extra_denied=extra_nets, proxy_port=config.proxy_port, create=True)
        )
        _write_policy(net_dir, policy)
        _write_private(
            net_dir / "config.json",
            json.dumps(
                {
                    "sandbox_id": sandbox_id,
                    "host_ip": plan.host_ip,
                    "host_ip6": plan.host_ip6,
                    "proxy_port": config.proxy_port,
                    "uplink_netns": config.uplink_netns,
                    "resolvers": list(resolvers),
                    "extra_denied": extra,
                    "max_connections": config.max_connections,
                    "bandwidth_bytes": config.bandwidth_bytes,
                    "upstream_ca_file": config.upstream_ca_file,
                }
            ),
        )
        proc = _spawn_egress(net_dir, secrets)
        net = SandboxNet(
            plan=plan,
            net_dir=str(net_dir),
            pid=proc.pid,
            start_ticks=_proc.proc_start_ticks(proc.pid),
            extra_denied=extra,
        )
        if wait:
            _wait_ready(proc)
        else:
            _starting[proc.pid] = proc
        return net
    except BaseException:
        _teardown_sync(net)
        raise


def _spawn_egress(net_dir: Path, secrets: dict[str, Any] | None) -> Any:
    """The egress process; the sandbox's secrets (:mod:`corral.secrets`) reach it through a pipe, which it
    reads to the end before anything else, so they are in no file and no command line."""
    argv = [sys.executable, "-I", "-m", "corral.runtimes._net.egress", str(net_dir)]
    if not secrets:
        return _proc.spawn_detached(argv, log_path=net_dir / "egress.log")
    rfd, wfd = os.pipe()
    try:
        proc = _proc.spawn_detached(
            [*argv, "--secrets-fd", str(rfd)], log_path=net_dir / "egress.log", pass_fds=(rfd,)
        )
    finally:
        os.close(rfd)
    try:
        with os.fdopen(wfd, "wb") as pipe:
            pipe.write(json.dumps(secrets).encode())
    except OSError as exc:  # it died before reading them: nothing of it may stay
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        raise RuntimeFailure(
            "the sandbox's egress proxy exited before it took the sandbox's secrets"
        ) from exc
    return proc


def _wait_ready(proc: Any) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            chunk = proc.stdout.read()
            if chunk:
                buf += chunk
            elif chunk == b"":  # EOF
                break
        if b"ready\n" in buf:
            proc.stdout.close()
            return
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    log_path = Path(proc.args[-1]) / "egress.log"
    with contextlib.suppress(OSError):
        log.error("egress process %s did not start: %s", proc.pid, log_path.read_text()[-2000:])
    raise RuntimeFailure("the sandbox's egress proxy did not start")


async def setup(
    sandbox_id: str,
    net_dir: Path,
    policy: NetworkPolicy,
    config: EgressConfig,
    *,
    wait: bool = True,
    secrets: dict[str, Any] | None = None,
) -> SandboxNet:
    """Namespace, link, rules and egress process for one sandbox; all removed again if any step fails.

    ``wait=False``: return once the egress process is started, not ready (it imports and binds while the
    sandbox boots); the caller then awaits :func:`ready` before the sandbox is handed out, and tears the
    whole stack down with :func:`teardown` if that fails. ``secrets``: the egress wire of
    :class:`corral.core.secrets.EgressSecrets`, for TLS interception on their hosts."""
    return await anyio.to_thread.run_sync(_setup_sync, sandbox_id, net_dir, policy, config, wait, secrets)


async def ready(net: SandboxNet) -> None:
    """Wait for an egress process started by ``setup(wait=False)`` to listen."""
    proc = _starting.pop(net.pid, None) if net.pid is not None else None
    if proc is not None:
        await anyio.to_thread.run_sync(_wait_ready, proc)


async def _control(net: SandboxNet, op: str) -> dict[str, Any]:
    try:
        with anyio.fail_after(10), unix_path(str(Path(net.net_dir) / "ctl.sock")) as path:
            stream = await connect_unix(path)
            async with stream:
                await stream.send(json.dumps({"op": op}).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    data += await stream.receive()
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        raise RuntimeFailure("the sandbox's egress proxy is not answering") from exc
    reply: dict[str, Any] = json.loads(data)
    return reply


async def update(net: SandboxNet, policy: NetworkPolicy, config: EgressConfig) -> int:
    """Apply a new policy in place: rules (one nft transaction), then the proxy, which cuts connections
    the new policy denies. Returns how many it cut."""
    policy.check_ranges(config.denied_networks())
    extra = [ipaddress.ip_network(n) for n in net.extra_denied]
    script = _nft.render(net.plan, policy, extra_denied=extra, proxy_port=config.proxy_port, create=False)
    await anyio.to_thread.run_sync(_nft.apply, script)
    await anyio.to_thread.run_sync(_write_policy, Path(net.net_dir), policy)
    reply = await _control(net, "reload")
    return int(reply.get("cut", 0))


async def stats(net: SandboxNet) -> dict[str, Any]:
    """Decision counts of the proxy and the answerer, plus packets nftables dropped before them."""
    reply = await _control(net, "stats")
    reply["dropped"] = await anyio.to_thread.run_sync(_nft.counters, net.plan.sandbox_id)
    return reply


async def decisions(net: SandboxNet, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The audit feed from ``offset`` on, after the egress process wrote out what it still held back."""
    with contextlib.suppress(RuntimeFailure):  # a dead egress process holds nothing any more
        await _control(net, "flush")
    return await anyio.to_thread.run_sync(read_decisions, Path(net.net_dir), offset)


def read_decisions(net_dir: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Decision lines of the audit feed from byte ``offset`` on, and the offset after them."""
    try:
        with open(net_dir / "decisions.jsonl", "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    lines = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return lines, offset + end


def _teardown_sync(net: SandboxNet) -> None:
    starting = _starting.pop(net.pid, None) if net.pid is not None else None
    if starting is not None:
        starting.stdout.close()
    if net.pid is not None and net.start_ticks is not None:
        _proc.kill_pid(net.pid, net.start_ticks, signal.SIGTERM)  # it flushes its counts and exits
        deadline = time.monotonic() + STOP_TIMEOUT
        while _proc.pid_alive(net.pid, net.start_ticks) and time.monotonic() < deadline:
            time.sleep(0.005)
        _proc.kill_pid(net.pid, net.start_ticks, signal.SIGKILL)
    _nft.remove_table(net.plan.sandbox_id)
    _netns.remove(net.plan)


def teardown_blocking(net: SandboxNet) -> None:
    """:func:`teardown` for code already in a worker thread (a runtime's teardown)."""
    _teardown_sync(net)


async def teardown(net: SandboxNet) -> None:
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(_teardown_sync, net)


def extra_networks(nets: Iterable[str]) -> list[IpNetwork]:
    return [ipaddress.ip_network(n) for n in nets]
