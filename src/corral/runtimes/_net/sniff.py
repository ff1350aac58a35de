"""What a sandbox's first bytes on a TCP connection say about where it wants to go: TLS SNI or HTTP Host.

The egress proxy reads the client's first flight (up to :data:`MAX_PEEK` bytes) and asks :func:`sniff`, which
answers ``None`` while more bytes are needed and a :class:`Sniffed` once it can tell. Nothing is decrypted:
TLS is judged by the ClientHello's server_name, plain HTTP by its Host header (and the absolute URI of a
proxy-style request line, which must name the same host).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MAX_PEEK", "HostWatch", "Sniffed", "sniff"]

MAX_PEEK = 16 * 1024 + 5
# PRI: HTTP/2 with prior knowledge (h2c), whose host is HPACK-coded: an HTTP connection that names nothing
_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI")
_HOST_HEADER = re.compile(rb"\r\nhost:[ \t]*([^\r\n]*)\r\n", re.IGNORECASE)
_HOST_OK = re.compile(r"[a-z0-9._-]{1,253}")


@dataclass(frozen=True, kw_only=True)
class Sniffed:
    protocol: str  # "tls", "http" or "other"
    name: str | None = None  # the host name the client asked for
    conflict: str | None = None  # why the request names two different hosts (always denied)


def _clean(host: str) -> str | None:
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal: no name
        return None
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    host = host.rstrip(".")
    return host if _HOST_OK.fullmatch(host) else None


def _tls(data: bytes) -> Sniffed | None:
    # Reassemble the handshake message from TLS records (a ClientHello may span several).
    handshake = b""
    pos = 0
    while True:
        if len(data) < pos + 5:
            return None if len(data) < MAX_PEEK else Sniffed(protocol="tls")
        if data[pos] != 0x16:
            return Sniffed(protocol="tls")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if len(data) < pos + 5 + length:
            return None if len(data) < MAX_PEEK else Sniffed(protocol="tls")
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
            break
    if handshake[0] != 1:  # not a ClientHello
        return Sniffed(protocol="tls")
    try:
        return Sniffed(protocol="tls", name=_server_name(handshake[4:]))
    except (IndexError, ValueError):
        return Sniffed(protocol="tls", conflict="malformed ClientHello")


def _server_name(hello: bytes) -> str | None:
    p = 2 + 32  # client_version, random
    p += 1 + hello[p]  # session id
    p += 2 + int.from_bytes(hello[p : p + 2], "big")  # cipher suites
    p += 1 + hello[p]  # compression methods
    if p >= len(hello):
        return None
    end = p + 2 + int.from_bytes(hello[p : p + 2], "big")
    p += 2
    names: list[str] = []
    while p + 4 <= end:
        kind = int.from_bytes(hello[p : p + 2], "big")
        size = int.from_bytes(hello[p + 2 : p + 4], "big")
        body = hello[p + 4 : p + 4 + size]
        p += 4 + size
        if kind != 0:
            continue
        q = 2
        while q + 3 <= len(body):
            name_type, name_len = body[q], int.from_bytes(body[q + 1 : q + 3], "big")
            raw = body[q + 3 : q + 3 + name_len]
            q += 3 + name_len
            if name_type == 0:
                names.append(raw.decode("ascii"))
    if len(set(names)) > 1:
        raise ValueError("several server names")
    return _clean(names[0]) if names else None


def _http(data: bytes) -> Sniffed | None:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None if len(data) < MAX_PEEK else Sniffed(protocol="http", conflict="request head too long")
    lines = data[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    hosts = [_clean(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("host:")]
    if len(hosts) > 1:
        return Sniffed(protocol="http", conflict="several Host headers")
    host = hosts[0] if hosts else None
    target = parts[1] if len(parts) == 3 else ""
    if parts[0] == "CONNECT":
        target_host = _clean(target)
    elif "://" in target:
        target_host = _clean(target.split("://", 1)[1].split("/", 1)[0].split("@")[-1])
    else:
        target_host = host
    if host is not None and target_host is not None and host != target_host:
        return Sniffed(protocol="http", conflict="request line and Host name different hosts")
    return Sniffed(protocol="http", name=host or target_host)


class HostWatch:
    """Every ``Host`` header further down a plain HTTP connection (keep-alive, pipelining), as it streams.

    Conservative: it looks for ``\r\nHost:`` anywhere in what the client sends, bodies included, keeping a
    tail across chunks, so a later request naming another host cannot slip past; a body that happens to
    contain such a line is treated the same (the connection is judged again, and cut if that name is not
    allowed).
    """

    def __init__(self) -> None:
        self._tail = b""

    def hosts(self, chunk: bytes) -> list[str | None]:
        """The Host values whose header line is complete in ``chunk`` (with what came before it)."""
        data = self._tail + chunk
        found = [
            _clean(m.group(1).decode("latin-1"))
            for m in _HOST_HEADER.finditer(data)
            if m.end() > len(self._tail)  # one wholly in the tail was complete, and reported, before
        ]
        self._tail = data[-1024:]
        return found


def sniff(data: bytes) -> Sniffed | None:
    """Classify the client's first bytes; None: not enough of them yet."""
    if not data:
        return None
    if data[0] == 0x16:
        return _tls(data)
    first = data.split(b" ", 1)[0]
    if first in _METHODS:
        return _http(data)
    if len(data) < 8 and any(m.startswith(data) for m in _METHODS):
        return None
    return Sniffed(protocol="other")
