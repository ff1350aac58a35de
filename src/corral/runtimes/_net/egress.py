"""The egress process of one sandbox: its DNS answerer and its SNI/Host-checking TCP proxy, on the host.

``python -m corral.runtimes._net.egress NET_DIR`` (started detached by :mod:`corral.runtimes._net`, so it
outlives a server restart like the sandbox's shim). ``NET_DIR/config.json`` says where to listen (the
sandbox's ``host_ip``), where to go out (the uplink network namespace, the upstream resolvers) and the
caps; ``NET_DIR/policy.json`` is the policy, read again on every ``reload`` over the control socket
``NET_DIR/ctl.sock``. It prints ``ready`` once listening.

Every TCP connection from the sandbox arrives here (nftables redirects it, :mod:`.nft`); its original
destination comes from ``SO_ORIGINAL_DST``. The proxy reads the client's first bytes (TLS ClientHello or
HTTP head, :mod:`.sniff`), decides with :meth:`NetworkPolicy.decide` against the DNS pins, and either
relays to the destination from the uplink namespace or resets the connection. On a policy reload every
open connection is decided again and those now denied are cut. Every decision is counted (:mod:`.ledger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from corral.netpolicy import IpNetwork, NetworkPolicy
from corral.runtimes import _proc
from corral.runtimes._net import dns as _dns
from corral.runtimes._net import intercept as _intercept
from corral.runtimes._net import nft as _nft
from corral.runtimes._net.ledger import Ledger
from corral.runtimes._net.sniff import MAX_PEEK, HostWatch, Sniffed, sniff

log = logging.getLogger("corral.egress")

SO_ORIGINAL_DST = 80
CLONE_NEWNET = 0x40000000
PEEK_TIMEOUT = 1.0  # a client that says nothing first (ssh, smtp) is decided without a name after this
CONNECT_TIMEOUT = 10.0
DNS_TIMEOUT = 3.0
CHUNK = 256 * 1024
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns(net) failed")


@dataclass(eq=False)
class _Conn:
    ip: str
    port: int
    name: str | None
    web: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


class _Bucket:
    """A token bucket of bytes per second shared by all of the sandbox's connections (0: unlimited)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= min(n, self.rate):
                self.tokens -= n
                return
            await asyncio.sleep((min(n, self.rate) - self.tokens) / self.rate)


class Egress:
    def __init__(self, net_dir: str, secrets_fd: int | None = None) -> None:
        self.net_dir = net_dir
        with open(os.path.join(net_dir, "config.json")) as f:
            cfg = json.loads(f.read())
        self.cfg = cfg
        self.sandbox_id: str = cfg["sandbox_id"]
        self.host_ip: str = cfg["host_ip"]
        self.hosts: list[str] = [self.host_ip, *([cfg["host_ip6"]] if cfg.get("host_ip6") else [])]
        self.extra: list[IpNetwork] = [ipaddress.ip_network(n) for n in cfg.get("extra_denied", [])]
        self.resolvers: list[str] = cfg["resolvers"]
        self.max_connections: int = int(cfg.get("max_connections", 0))
        self.bucket = _Bucket(int(cfg.get("bandwidth_bytes", 0)))
        self.home_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        uplink = cfg.get("uplink_netns")
        self.uplink_fd = os.open(uplink, os.O_RDONLY | os.O_CLOEXEC) if uplink else None
        self.policy = self._read_policy()
        self.pins: dict[str, dict[str, float]] = {}  # name -> address -> expiry (monotonic)
        self.conns: set[_Conn] = set()
        self.ledger = Ledger(os.path.join(net_dir, "decisions.jsonl"), self.sandbox_id)
        self.stopping = asyncio.Event()
        # the sandbox's secrets and CA, from a pipe (never a file): TLS to their hosts is intercepted
        self.intercept = _intercept.load(secrets_fd, cfg.get("upstream_ca_file"))

    def _read_policy(self) -> NetworkPolicy:
        with open(os.path.join(self.net_dir, "policy.json")) as f:
            return NetworkPolicy.parse(json.loads(f.read()))

    def uplink_socket(self, kind: int, family: int = socket.AF_INET) -> socket.socket:
        """A socket of the egress uplink's network namespace (the host's own unless configured)."""
        if self.uplink_fd is None:
            return socket.socket(family, kind)
        _setns(self.uplink_fd)
        try:
            return socket.socket(family, kind)
        finally:
            _setns(self.home_fd)

    # -- DNS ------------------------------------------------------------------------------------------------
    async def resolve(self, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        last: Exception = OSError("no resolver")
        for server in self.resolvers:
            sock = self.uplink_socket(socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (server, 53))
                await loop.sock_sendall(sock, query)
                async with asyncio.timeout(DNS_TIMEOUT):
                    while True:
                        reply = await loop.sock_recv(sock, 65535)
                        if reply[:2] == query[:2]:
                            return reply
            except (OSError, TimeoutError) as exc:
                last = exc
            finally:
                sock.close()
        raise last

    async def answer(self, packet: bytes) -> bytes:
        result = await _dns.answer(packet, self.policy, self.resolve, extra_denied=self.extra)
        if result.decision is not None and result.name is not None:
            self.ledger.record(
                "dns", result.decision.allowed, result.name, 53, result.decision.rule, result.name
            )
        for ip in result.dropped:
            self.ledger.record("dns", False, ip, 53, "always-denied:answer", result.name)
        if result.pins and result.name:
            now = time.monotonic()
            slot = self.pins.setdefault(result.name, {})
            for ip, seconds in result.pins.items():
                slot[ip] = now + seconds
            await self._nft(_nft.add_pins(self.sandbox_id, result.pins))
        return result.wire

    async def _nft(self, script: str) -> None:
        if script:
            await _proc.run(
                ["nft", "-f", "-"], input=script.encode(), timeout=10, what="update pins", check=False
            )

    # -- pins -----------------------------------------------------------------------------------------------
    def pinned(self, name: str | None, ip: str) -> bool:
        if name is None:
            return False
        return self.pins.get(name, {}).get(ip, 0) > time.monotonic()

    def pinned_by_allowed(self, ip: str, port: int) -> bool:
        now = time.monotonic()
        for name, addrs in self.pins.items():
            if addrs.get(ip, 0) > now:
                rule = self.policy.name_verdict(name, port)
                if rule is not None and rule.allow:
                    return True
        return False

    def decide(self, ip: str, port: int, name: str | None, *, web: bool = False) -> tuple[bool, str]:
        """``web``: TLS or HTTP, which carry the name they want (SNI, Host); such a connection that names
        nothing is allowed only by an address rule, never by another name's pin (it could pick any virtual
        host at a shared address). Other protocols (ssh, git) may use an address pinned for an allowed name."""
        decision = self.policy.decide(
            ipaddress.ip_address(ip),
            port,
            name=name,
            pinned=self.pinned(name, ip),
            pinned_by_allowed=not web and self.pinned_by_allowed(ip, port),
            extra_denied=self.extra,
        )
        return decision.allowed, decision.rule

    # -- TCP proxy ------------------------------------------------------------------------------------------
    async def refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection nftables already denied (redirected to the deny port): count it and reset it."""
        dest = _original_dst(writer)
        if dest is not None:
            allowed, rule = self.decide(*dest, None)
            self.ledger.record("tcp", False, dest[0], dest[1], rule if not allowed else "not-pinned", None)
        _reset(writer)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dest = _original_dst(writer)
        if dest is None:
            writer.close()
            return
        ip, port = dest
        if self.max_connections and len(self.conns) >= self.max_connections:
            self.ledger.record("tcp", False, ip, port, "connection-cap", None)
            _reset(writer)
            return
        head, sniffed = await _peek(reader)
        name = sniffed.name if sniffed else None
        web = sniffed is not None and sniffed.protocol in ("tls", "http")
        if sniffed is not None and sniffed.conflict:
            allowed, rule = False, f"mismatch:{sniffed.conflict}"
        else:
            allowed, rule = self.decide(ip, port, name, web=web)
        self.ledger.record("tcp", allowed, ip, port, rule, name)
        if not allowed:
            _reset(writer)
            return
        conn = _Conn(ip=ip, port=port, name=name, web=web, writers=[writer])
        self.conns.add(conn)
        try:
            up = self.uplink_socket(socket.SOCK_STREAM, socket.AF_INET6 if ":" in ip else socket.AF_INET)
            up.setblocking(False)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await asyncio.get_running_loop().sock_connect(up, (ip, port))
            except (OSError, TimeoutError):
                up.close()
                _reset(writer)
                return
            if (
                sniffed is not None
                and sniffed.protocol == "tls"
                and self.intercept
                and self.intercept.binds(name)
            ):
                assert name is not None
                ended = await self.intercept.relay(
                    name, reader, writer, head, up, conn.writers, self.bucket.take
                )
                log.info("intercepted connection to %s:%s ended: %s", ip, port, ended)
                return
            up_reader, up_writer = await asyncio.open_connection(sock=up)
            conn.writers.append(up_writer)
            watch = HostWatch() if sniffed is not None and sniffed.protocol == "http" else None
            if watch is not None:
                watch.hosts(head)  # the first request's Host was decided above
            if head:
                up_writer.write(head)
            await asyncio.gather(
                self._pipe(reader, up_writer, conn=conn, watch=watch), self._pipe(up_reader, writer)
            )
        finally:
            self.conns.discard(conn)
            for w in conn.writers:
                w.close()

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        *,
        conn: _Conn | None = None,
        watch: HostWatch | None = None,
    ) -> None:
        try:
            while data := await src.read(CHUNK):
                if watch is not None and conn is not None and not self._hosts_ok(conn, watch.hosts(data)):
                    for w in conn.writers:
                        _reset(w)
                    return
                await self.bucket.take(len(data))
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (OSError, RuntimeError):
            for w in (dst,):
                _reset(w)

    def _hosts_ok(self, conn: _Conn, hosts: list[str | None]) -> bool:
        """A later request on a plain HTTP connection: its Host must be allowed at this address too."""
        for host in hosts:
            if host == conn.name:
                continue
            allowed, rule = self.decide(conn.ip, conn.port, host, web=True)
            self.ledger.record("tcp", allowed, conn.ip, conn.port, rule if allowed else f"cut:{rule}", host)
            if not allowed:
                return False
        return True

    # -- control --------------------------------------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        self.policy = self._read_policy()
        stale: list[str] = []
        for name, addrs in list(self.pins.items()):
            if not self.policy.resolves(name).allowed:
                stale += list(addrs)
                del self.pins[name]
        still = {ip for addrs in self.pins.values() for ip in addrs}
        await self._nft(_nft.delete_pins(self.sandbox_id, [ip for ip in stale if ip not in still]))
        cut = 0
        for conn in list(self.conns):
            allowed, rule = self.decide(conn.ip, conn.port, conn.name, web=conn.web)
            if not allowed:
                cut += 1
                self.ledger.record("tcp", False, conn.ip, conn.port, f"cut:{rule}", conn.name)
                for w in conn.writers:
                    _reset(w)
        return {"ok": True, "cut": cut}

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline() or b"{}")
            op = request.get("op")
            if op == "reload":
                reply = await self.reload()
            elif op == "flush":
                self.ledger.flush()
                reply = {"ok": True}
            elif op == "stats":
                self.ledger.flush()
                reply = {"ok": True, "connections": len(self.conns), **self.ledger.totals()}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, ValueError) as exc:
            log.warning("control request failed: %s", exc)
        finally:
            writer.close()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        dns_port = int(self.cfg.get("dns_port", 53))
        udp = [
            await loop.create_datagram_endpoint(lambda: _DnsUdp(self), local_addr=(host, dns_port))
            for host in self.hosts
        ]
        dns_tcp = await asyncio.start_server(self._dns_tcp, self.hosts, dns_port)
        port = int(self.cfg["proxy_port"])
        proxy = await asyncio.start_server(self.handle, self.hosts, port, backlog=512)
        refuser = await asyncio.start_server(self.refuse, self.hosts, port + 1, backlog=512)
        os.chdir(self.net_dir)  # a relative socket name: the state dir may be deeper than sun_path allows
        with contextlib.suppress(FileNotFoundError):
            os.unlink("ctl.sock")
        ctl = await asyncio.start_unix_server(self.control, "ctl.sock")
        os.chmod("ctl.sock", 0o600)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdout.close()
        flusher = asyncio.create_task(self._flush_loop())
        await self.stopping.wait()
        flusher.cancel()
        for server in (dns_tcp, proxy, refuser, ctl):
            server.close()
        for transport, _ in udp:
            transport.close()
        self.ledger.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.ledger.flush()

    async def _dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                while True:
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    reply = await self.answer(await reader.readexactly(size))
                    if not reply:
                        break
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class _DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, egress: Egress) -> None:
        self.egress = egress
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        task = asyncio.create_task(self._reply(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = await self.egress.answer(data)
        if reply and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _peek(reader: asyncio.StreamReader) -> tuple[bytes, Sniffed | None]:
    """The client's first bytes and what they name; (b"", None) for a client that waits for the server."""
    data = b""
    deadline = time.monotonic() + PEEK_TIMEOUT
    while len(data) < MAX_PEEK:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            async with asyncio.timeout(remaining):
                chunk = await reader.read(MAX_PEEK - len(data))
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
        sniffed = sniff(data)
        if sniffed is not None:
            return data, sniffed
    return data, sniff(data) if data else None


def _original_dst(writer: asyncio.StreamWriter) -> tuple[str, int] | None:
    """Where the sandbox sent the connection before nftables redirected it here."""
    sock = writer.get_extra_info("socket")
    try:
        if sock.family == socket.AF_INET6:  # IP6T_SO_ORIGINAL_DST (also 80): a sockaddr_in6
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the peer sees the connection refused or cut, not a clean end."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s egress %(levelname)s %(message)s")
    net_dir = sys.argv[1]
    secrets_fd = int(sys.argv[3]) if sys.argv[2:3] == ["--secrets-fd"] else None
    if secrets_fd is not None:  # no core dumps or same-user ptrace of a process holding secrets
        _libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    egress = Egress(net_dir, secrets_fd)
    asyncio.run(egress.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
