"""The domain-mode test's resolver, run inside the client's network namespace (no route out of it).

``python _dns_server.py LISTEN DOMAIN ADDRESS LOG`` answers DNS on LISTEN:53 (UDP and TCP): an A query for
DOMAIN or any name under it gets ADDRESS (the Corral server), other types under it an empty answer (there is
no IPv6 path), and every other name NXDOMAIN. Every question's name is appended to LOG, so the test can see
which host names the SDK resolved. Prints ``ready`` once listening; stops on SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import socketserver
import struct
import sys
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

LISTEN, DOMAIN, ADDRESS, LOG = sys.argv[1], sys.argv[2].lower(), sys.argv[3], sys.argv[4]
_lock = threading.Lock()


def answer(packet: bytes) -> bytes:
    query = dns.message.from_wire(packet)
    response = dns.message.make_response(query)
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    with _lock, open(LOG, "a") as log:
        log.write(f"{name} {dns.rdatatype.to_text(question.rdtype)}\n")
    if name != DOMAIN and not name.endswith("." + DOMAIN):
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif question.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text(question.name, 5, "IN", "A", ADDRESS))
    return response.to_wire()  # type: ignore[no-any-return]


class Udp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(answer(data), self.client_address)


class Tcp(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        size = struct.unpack("!H", self.rfile.read(2))[0]
        reply = answer(self.rfile.read(size))
        self.wfile.write(struct.pack("!H", len(reply)) + reply)


class UdpServer(socketserver.ThreadingUDPServer):
    allow_reuse_address = True
    daemon_threads = True


class TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    address_family = socket.AF_INET


servers = [UdpServer((LISTEN, 53), Udp), TcpServer((LISTEN, 53), Tcp)]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
print("ready", flush=True)
stop.wait()
for server in servers:
    server.shutdown()
