"""Run inside a sandbox with secrets: ``python3 _secret_client.py JSON`` sends one HTTP(S) request and prints
``{"ok": bool, "status": int, "head": str, "body": str, "error": str}`` (never raises).

JSON: ``{"ip": ..., "port": 443, "sni": name or null, "tls": true, "verify": true, "raw": "GET / HTTP/1.1..."}``
(``raw`` with ``$NAME`` replaced by the env variable NAME, i.e. the placeholder). ``verify``: check the
server's certificate against the default trust store (SSL_CERT_FILE, which Corral points at the bundle
holding the sandbox's egress CA), for the SNI name.
"""

import contextlib
import json
import os
import re
import socket
import ssl
import sys


def main(spec):
    raw = re.sub(r"\$([A-Z_][A-Z0-9_]*)", lambda m: os.environ.get(m.group(1), ""), spec["raw"])
    for name in spec.get("resolve") or ["allowed.test", "other.test"]:  # pins: the proxy checks them
        with contextlib.suppress(OSError):
            socket.getaddrinfo(name, 443, socket.AF_INET)
    try:
        sock = socket.create_connection((spec["ip"], int(spec.get("port", 443))), timeout=10)
        if spec.get("tls", True):
            ctx = ssl.create_default_context()
            if not spec.get("verify", True):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock, server_hostname=spec.get("sni"))
        sock.sendall(raw.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.") else 0
        return {"ok": status == 200, "status": status, "head": head.decode(errors="replace"),
                "body": body.decode(errors="replace")}  # fmt: skip
    except (OSError, ssl.SSLError, ValueError, IndexError) as exc:
        return {"ok": False, "status": 0, "error": type(exc).__name__ + ": " + str(exc)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
