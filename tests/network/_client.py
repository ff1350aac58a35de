"""Client probes run inside a sandbox (or a bare sandbox network namespace): one line of JSON out.

``python3 _client.py PROBE ARGS...``; every probe prints ``{"ok": bool, ...}`` and never raises, so a
test reads exactly what the sandbox saw. Standard library only: it runs on the sandbox's own python3.
"""

import json
import socket
import ssl
import sys
import time


def resolve(name, family="4"):
    af = socket.AF_INET6 if family == "6" else socket.AF_INET
    try:
        return {"ok": True, "addrs": sorted({a[4][0] for a in socket.getaddrinfo(name, 80, af)})}
    except socket.gaierror as exc:
        return {"ok": False, "error": str(exc)}


def http(ip, port, host, path="/", sni=None, tls=False, timeout=5.0):
    try:
        sock = socket.create_connection((ip, int(port)), timeout=float(timeout))
        if tls == "1" or tls is True:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock, server_hostname=sni or None)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
        return {"ok": data.startswith(b"HTTP/1."), "body": body}
    except (OSError, ssl.SSLError) as exc:
        return {"ok": False, "error": type(exc).__name__ + ": " + str(exc)}


def url(name, path="/", tls="0", sni=None, family="4"):
    r = resolve(name, family)
    if not r["ok"] or not r["addrs"]:
        return {"ok": False, "error": "resolve", "resolve": r}
    return http(r["addrs"][0], 443 if tls == "1" else 80, name, path, sni=sni or name, tls=tls)


def keepalive(ip, port, host1, host2):
    """Two requests on one connection, the second naming another host; what each got."""
    got = []
    try:
        sock = socket.create_connection((ip, int(port)), timeout=5)
        for host in (host1, host2):
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("closed")
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[
                    1
                ]
            )
            while len(body) < length:
                body += sock.recv(65536)
            got.append(body.decode())
        return {"ok": True, "bodies": got}
    except OSError as exc:
        return {"ok": False, "bodies": got, "error": type(exc).__name__}


def banner(ip, port, timeout=5.0):
    try:
        with socket.create_connection((ip, int(port)), timeout=float(timeout)) as sock:
            return {"ok": True, "banner": sock.recv(100).decode().strip()}
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__ + ": " + str(exc)}


def udp(ip, port):
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.5)
    try:
        sock.sendto(b"ping", (ip, int(port)))
        return {"ok": True, "reply": sock.recvfrom(100)[0].decode()}
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__ + ": " + str(exc)}


def tcp6(ip, port):
    try:
        with socket.create_connection((ip, int(port)), timeout=3):
            return {"ok": True}
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__ + ": " + str(exc)}


def hold(name, seconds):
    """Stream from a slow URL for up to ``seconds``; how it ended."""
    r = resolve(name)
    if not r["ok"]:
        return {"ok": False, "error": "resolve"}
    got = 0
    start = time.monotonic()
    try:
        sock = socket.create_connection((r["addrs"][0], 80), timeout=10)
        sock.sendall(f"GET /slow HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
        print(json.dumps({"started": True}), flush=True)
        while time.monotonic() - start < float(seconds):
            chunk = sock.recv(65536)
            if not chunk:
                return {"ok": False, "ended": "eof", "bytes": got}
            got += len(chunk)
        return {"ok": True, "bytes": got}
    except OSError as exc:
        return {"ok": False, "ended": type(exc).__name__, "bytes": got}


if __name__ == "__main__":
    probe, *args = sys.argv[1:]
    print(json.dumps(globals()[probe](*args)), flush=True)
