"""Secret substitution in the egress proxy: TLS to the hosts a secret is bound to is terminated here.

The egress process (:mod:`.egress`) hands a connection over when its TLS ClientHello names (SNI) a host a
secret of the sandbox is bound to (:mod:`corral.secrets`) and the policy allowed it there. Then:

- the sandbox's TLS is answered with a leaf certificate for that SNI, signed on the fly by the sandbox's own
  CA (:mod:`.tlsterm`: cached per name, the already-read ClientHello fed to an ``ssl.SSLObject`` over memory
  BIOs). Only ``http/1.1`` is offered by ALPN on this leg (HTTP/2 clients fall back to HTTP/1.1);
- the upstream leg is a fresh TLS connection to the address the sandbox asked for, verified against the
  system trust store (plus ``EgressConfig.upstream_ca_file``) *for the SNI name*;
- HTTP/1.1 is parsed with h11 on both legs. Every request must name the SNI host in ``Host`` (otherwise
  421, nothing is sent), be in origin form, and be neither CONNECT nor an Upgrade (405/501). Placeholders of
  secrets bound to the host are replaced by their values in the request headers (and, for ``body``
  secrets, in a request body of up to :data:`MAX_BODY` bytes); placeholders of other secrets stay;
- the value is masked (same length, so framing holds) where the upstream echoes it back in response
  headers or body: a plain echo endpoint does not hand it to the sandbox.

Nothing here logs a value, a placeholder or a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11

from corral.runtimes._net.tlsterm import CHUNK, Leaves, ServerTls
from corral.secrets import SecretBinding

__all__ = ["Interceptor", "load"]

MAX_HEAD = 64 * 1024  # a request's head (line and headers)
MAX_BODY = 1024 * 1024  # a request body a ``body`` secret is substituted in is held whole, up to this
HANDSHAKE_TIMEOUT = 10.0
Take = Callable[[int], Awaitable[None]]


class _Abort(Exception):
    """The exchange ends here; ``status`` (if any) is answered to the sandbox first."""

    def __init__(self, status: int = 0, why: str = "") -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass(frozen=True)
class _Masker:
    """Replaces ``secrets`` in a byte stream by as many ``*`` (the length stays, so the framing does)."""

    values: tuple[bytes, ...]

    def once(self, data: bytes) -> bytes:
        for value in self.values:
            data = data.replace(value, b"*" * len(value))
        return data

    def stream(self) -> _MaskStream:
        return _MaskStream(self, max((len(v) for v in self.values), default=1) - 1)


class _MaskStream:
    def __init__(self, masker: _Masker, keep: int) -> None:
        self.masker, self.keep, self.tail = masker, keep, b""

    def feed(self, data: bytes) -> bytes:
        data = self.masker.once(self.tail + data)
        cut = max(0, len(data) - self.keep)
        out, self.tail = data[:cut], data[cut:]
        return out

    def end(self) -> bytes:
        out, self.tail = self.tail, b""
        return out


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _host_of(value: bytes | None) -> str:
    text = (value or b"").decode("latin-1").strip().lower()
    if text.startswith("["):
        return text
    return text.rsplit(":", 1)[0].rstrip(".") if text.count(":") == 1 else text.rstrip(".")


class Interceptor:
    """The secrets of one sandbox, its CA, and the TLS contexts of both legs."""

    def __init__(self, wire: dict[str, Any], upstream_ca_file: str | None) -> None:
        self.leaves = Leaves(wire["ca_cert"], wire["ca_key"])
        self.secrets = tuple(SecretBinding.from_wire(s) for s in wire["secrets"])
        self.upstream = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if upstream_ca_file:
            self.upstream.load_verify_locations(cafile=upstream_ca_file)
        self.upstream.set_alpn_protocols(["http/1.1"])

    def binds(self, host: str | None) -> bool:
        return host is not None and any(s.binds(host) for s in self.secrets)

    def _bound(self, host: str) -> tuple[SecretBinding, ...]:
        return tuple(s for s in self.secrets if s.binds(host))

    # -- one connection -------------------------------------------------------------------------------------
    async def relay(
        self,
        name: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        head: bytes,
        up_sock: Any,
        writers: list[asyncio.StreamWriter],
        take: Take,
    ) -> str:
        """Serve one intercepted connection; returns how it ended (for the log: never a value)."""
        name = name.rstrip(".").lower()
        tls = ServerTls(self.leaves.context(name), reader, writer, head)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await tls.handshake()
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            return f"client-tls:{type(exc).__name__}"
        try:
            up_reader, up_writer = await asyncio.open_connection(
                sock=up_sock, ssl=self.upstream, server_hostname=name, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except ssl.SSLCertVerificationError:
            await self._answer(
                tls, h11.Connection(h11.SERVER), 502, "the upstream's certificate is not valid"
            )
            return "upstream-cert"
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            await self._answer(tls, h11.Connection(h11.SERVER), 502, "the upstream did not answer")
            return f"upstream-tls:{type(exc).__name__}"
        writers.append(up_writer)
        bound = self._bound(name)
        try:
            return await self._exchange(name, bound, tls, up_reader, up_writer, take)
        finally:
            await tls.close()

    async def _exchange(
        self,
        name: str,
        bound: tuple[SecretBinding, ...],
        tls: ServerTls,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        take: Take,
    ) -> str:
        down = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)  # facing the sandbox
        up = h11.Connection(h11.CLIENT)  # facing the upstream
        masker = _Masker(tuple(b.value.encode() for b in bound))

        async def send_up(event: Any) -> None:
            data = up.send(event) or b""
            await take(len(data))
            up_writer.write(data)
            await up_writer.drain()

        while True:
            try:
                request = await _next(down, tls.recv)
                if not isinstance(request, h11.Request):
                    return "closed"
                headers = _check_request(request, name)
                body_secrets = [b for b in bound if b.body]
                headers = [(k, _substitute(v, bound)) for k, v in headers]
                if body_secrets:
                    body = await _whole_body(down, tls.recv)
                    body = _substitute(body, tuple(body_secrets))
                    headers = [
                        (k, v) for k, v in headers if k not in (b"content-length", b"transfer-encoding")
                    ]
                    if body or request.method not in (b"GET", b"HEAD"):
                        headers.append((b"content-length", str(len(body)).encode()))
                    await send_up(h11.Request(method=request.method, target=request.target, headers=headers))
                    if body:
                        await send_up(h11.Data(data=body))
                    await send_up(h11.EndOfMessage())
                else:
                    await send_up(h11.Request(method=request.method, target=request.target, headers=headers))
                    while True:
                        event = await _next(down, tls.recv)
                        if isinstance(event, h11.Data):
                            await send_up(event)
                        elif isinstance(event, h11.EndOfMessage):
                            await send_up(event)
                            break
                        else:
                            return "closed"
                await self._response(down, up, tls, up_reader, masker, take)
            except _Abort as abort:
                if abort.status:
                    await self._answer(tls, down, abort.status, abort.why)
                return abort.why or "closed"
            except (h11.ProtocolError, ssl.SSLError, OSError) as exc:
                return f"protocol:{type(exc).__name__}"
            if (
                down.our_state is not h11.DONE
                or up.our_state is not h11.DONE
                or up.their_state is not h11.DONE
            ):
                return "closed"
            down.start_next_cycle()
            up.start_next_cycle()

    async def _response(
        self,
        down: h11.Connection,
        up: h11.Connection,
        tls: ServerTls,
        up_reader: asyncio.StreamReader,
        masker: _Masker,
        take: Take,
    ) -> None:
        stream = masker.stream()

        async def recv_up() -> bytes:
            data = await up_reader.read(CHUNK)
            await take(len(data))
            return data

        while True:
            event = await _next(up, recv_up)
            if isinstance(event, h11.InformationalResponse | h11.Response):
                headers = [(k, masker.once(v)) for k, v in event.headers]
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        raise _Abort(0, "upgrade")
                    continue  # a 100 Continue: the whole body is already on its way
                await tls.send(
                    down.send(
                        h11.Response(status_code=event.status_code, headers=headers, reason=event.reason)
                    )
                    or b""
                )
            elif isinstance(event, h11.Data):
                await tls.send(down.send(h11.Data(data=stream.feed(event.data))) or b"")
            elif isinstance(event, h11.EndOfMessage):
                rest = stream.end()
                if rest:
                    await tls.send(down.send(h11.Data(data=rest)) or b"")
                await tls.send(down.send(h11.EndOfMessage()) or b"")
                return
            else:
                raise _Abort(0, "upstream-closed")

    async def _answer(self, tls: ServerTls, down: h11.Connection, status: int, why: str) -> None:
        """A short plain-text error to the sandbox, then the end of the connection."""
        body = f"corral egress: {why}\n".encode()
        with contextlib.suppress(h11.ProtocolError, ssl.SSLError, OSError, RuntimeError):
            if down.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return
            if down.their_state is h11.IDLE:  # nothing parsed yet: h11 needs a request to answer
                return await tls.send(_raw_response(status, body))
            headers = [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            await tls.send(down.send(h11.Response(status_code=status, headers=headers)) or b"")
            await tls.send(down.send(h11.Data(data=body)) or b"")
            await tls.send(down.send(h11.EndOfMessage()) or b"")


def _raw_response(status: int, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status} Error\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body
    )


def _check_request(request: h11.Request, name: str) -> list[tuple[bytes, bytes]]:
    """The request's headers, if it may go to ``name`` at all (else an :class:`_Abort` with the status)."""
    headers = list(request.headers)
    host = _host_of(_header(headers, b"host"))
    if host != name:
        raise _Abort(421, "the request's Host is not the TLS server name; nothing was sent")
    if request.method == b"CONNECT":
        raise _Abort(405, "CONNECT is not relayed; connect to the destination itself")
    if _header(headers, b"upgrade") is not None:
        raise _Abort(501, "protocol upgrades (WebSocket) are not relayed on hosts with secrets")
    if not (request.target.startswith(b"/") or (request.method == b"OPTIONS" and request.target == b"*")):
        raise _Abort(400, "only origin-form request targets (/path) are relayed")
    return headers


def _substitute(data: bytes, bound: tuple[SecretBinding, ...]) -> bytes:
    for secret in bound:
        data = data.replace(secret.placeholder.encode(), secret.value.encode())
    return data


async def _next(conn: h11.Connection, recv: Callable[[], Awaitable[bytes]]) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await recv())
            continue
        if event is h11.PAUSED:
            raise _Abort(0, "paused")
        return event


async def _whole_body(down: h11.Connection, recv: Callable[[], Awaitable[bytes]]) -> bytes:
    body = bytearray()
    while True:
        event = await _next(down, recv)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _Abort(413, f"a request body with a secret in it is at most {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            raise _Abort(0, "closed")


def load(fd: int | None, upstream_ca_file: str | None) -> Interceptor | None:
    """The interceptor from the secrets the stack wrote to pipe ``fd`` (read whole, then closed)."""
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    return Interceptor(json.loads(data), upstream_ca_file) if data else None
