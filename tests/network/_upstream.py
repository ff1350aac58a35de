"""A test's own "internet", run inside the upstream network namespace the test made (no route out of it).

``python _upstream.py ZONE_JSON CERT KEY`` serves, on every address of its namespace:
- DNS on port 53 (UDP and TCP): the A and AAAA records of ZONE_JSON (``{"name": ["198.18.1.1",
  "2001:db8:1::1", ...]}``, the family told by the address); other names NXDOMAIN. Every query is appended to ``queries.log`` beside the zone file (what reached upstream);
- HTTP on 80 and HTTPS on 443 (CERT, signed by the test's CA): every request (its address, SNI, headers and
  body) is appended to ``requests.log`` as a JSON line; ``GET /headers`` and ``POST /echo`` answer the
  request's headers / body back; ``GET /`` answers ``host=<Host> local=<address>
  sni=<server name>``; ``GET /bytes/N`` answers N bytes; ``GET /dns?name=N`` (DoH-style) answers the
  zone's addresses for N as text;
- a raw TCP service on 7000 that answers ``banner <address>`` and then echoes;
- UDP echo on 7001.
Every TCP/UDP service listens on IPv4 and (separately, IPv6-only sockets) on IPv6.
Prints ``ready`` once listening. Stops on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dns.message
import dns.rcode
import dns.rrset

with open(sys.argv[1]) as _f:
    ZONE: dict[str, list[str]] = json.loads(_f.read())
LOG = os.path.join(os.path.dirname(sys.argv[1]), "queries.log")
REQUESTS = os.path.join(os.path.dirname(sys.argv[1]), "requests.log")
_lock = threading.Lock()


def _answer(packet: bytes) -> bytes:
    query = dns.message.from_wire(packet)
    name = query.question[0].name.to_text(omit_final_dot=True).lower()
    with _lock, open(LOG, "a") as f:
        f.write(name + "\n")
    response = dns.message.make_response(query)
    addrs = ZONE.get(name)
    rdtype = query.question[0].rdtype
    if addrs is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif rdtype in (1, 28):
        family = [a for a in addrs if (":" in a) == (rdtype == 28)]
        if family:
            kind = "A" if rdtype == 1 else "AAAA"
            response.answer.append(dns.rrset.from_text_list(query.question[0].name, 30, "IN", kind, family))
    return response.to_wire()


class _Udp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(_answer(data), self.client_address)


class _Tcp(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        size = struct.unpack("!H", self.rfile.read(2))[0]
        reply = _answer(self.rfile.read(size))
        self.wfile.write(struct.pack("!H", len(reply)) + reply)


class _Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _record(self, body: bytes = b"") -> None:
        entry = {
            "local": self.connection.getsockname()[0],
            "sni": getattr(self.connection, "sni", ""),
            "tls": isinstance(self.connection, ssl.SSLSocket),
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
        }
        with _lock, open(REQUESTS, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._record(body)
        self._reply(body)

    def do_GET(self) -> None:
        self._record()
        sni = getattr(self.connection, "sni", "")
        local = self.connection.getsockname()[0]
        if self.path == "/headers":
            self._reply(json.dumps([[k.lower(), v] for k, v in self.headers.items()]).encode())
            return
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = b"x" * 65536
            while n > 0:
                self.wfile.write(chunk[: min(n, len(chunk))])
                n -= len(chunk)
            return
        if self.path.startswith("/dns?name="):
            body = " ".join(ZONE.get(self.path.split("=", 1)[1], [])).encode()
        elif self.path.startswith("/slow"):
            self.send_response(200)
            self.send_header("Content-Length", "100000000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"y" * 1000)
                    self.wfile.flush()
                    threading.Event().wait(0.05)
            except OSError:
                pass
            return
        else:
            body = f"host={self.headers.get('Host')} local={local} sni={sni}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Tls(ThreadingHTTPServer):
    def __init__(self, addr: tuple[str, int], context: ssl.SSLContext) -> None:
        super().__init__(addr, _Http)
        self.context = context

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        holder: dict[str, str] = {}

        def remember(conn: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
            holder["sni"] = name or ""

        self.context.sni_callback = remember  # type: ignore[assignment]
        tls = self.context.wrap_socket(sock, server_side=True)
        tls.sni = holder.get("sni", "")  # type: ignore[attr-defined]
        return tls, addr


class _Banner(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(f"banner {self.connection.getsockname()[0]}\n".encode())
        while data := self.connection.recv(65536):
            self.connection.sendall(data)


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


def _v6(cls: type) -> type:
    """``cls`` on an IPv6-only socket (its IPv4 twin serves IPv4, so addresses read back unmapped)."""

    class V6(cls):  # type: ignore[valid-type, misc]
        address_family = socket.AF_INET6

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            super().server_bind()

    return V6


def main() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    servers = []
    for any_addr, wrap in (("0.0.0.0", lambda c: c), ("::", _v6)):
        servers += [
            wrap(socketserver.ThreadingUDPServer)((any_addr, 53), _Udp),
            wrap(socketserver.ThreadingTCPServer)((any_addr, 53), _Tcp),
            wrap(ThreadingHTTPServer)((any_addr, 80), _Http),
            wrap(_Tls)((any_addr, 443), context),
            wrap(socketserver.ThreadingTCPServer)((any_addr, 7000), _Banner),
            wrap(socketserver.ThreadingUDPServer)((any_addr, 7001), _UdpEcho),
        ]
    for server in servers:
        server.daemon_threads = True  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
