"""The port proxy: HTTP and WebSocket traffic for servers listening inside sandboxes.

A request is for a sandbox port, not for the API, when either

- its ``Host`` is ``{port}-{sandbox_id}.{domain}`` (``Settings.ports_domain``; any domain is accepted, since
  the route grants nothing by itself), or
- it carries the headers ``Corral-Sandbox-Id`` and ``Corral-Sandbox-Port`` (for clients that cannot resolve a
  wildcard name: any host, the API's included).

Everything else goes on to the API. Access is per sandbox (``SandboxInfo.public_ports``): public, or only with
the sandbox's traffic token in ``Corral-Traffic-Token``. No API key is needed or looked at: a URL plus token
reaches that sandbox's ports and nothing else, so the token can be handed to a browser or a tool.

Each proxied request or WebSocket gets its own TCP connection into the sandbox (``SandboxService.
open_port_for_traffic``, the agent's ``port.connect``), over which the proxy speaks HTTP/1.1 with h11 or the
WebSocket protocol with wsproto. Bodies stream in both directions as they come, so server-sent events and
chunked uploads pass through unbuffered; the inside server sees ``Host: localhost:{port}`` (as it would behind
``kubectl port-forward``; development servers and MCP servers reject unknown hosts) and the original host in
``X-Forwarded-Host``. The routing and token headers are removed before the request goes in.

Errors are JSON (``{"error": {"code", "message"}}``), distinct per cause: 404 ``not_found`` "sandbox … was not
found", 502 ``port_closed`` "port … is not open in sandbox …", 401/403 for a missing or wrong token, 409 for a
paused sandbox, 502 ``bad_upstream`` when what answers is not HTTP, 504 when it does not answer.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import h11
import wsproto
import wsproto.events as ws
from anyio.abc import ByteStream
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from corral.core.service import SandboxService
from corral.errors import CorralError
from corral.server._asgi import send_error
from corral.server.metrics import Metrics

__all__ = ["TOKEN_HEADER", "PortProxy", "Target", "target_of"]

log = logging.getLogger("corral.server.proxy")

SANDBOX_ID_HEADER = b"corral-sandbox-id"
SANDBOX_PORT_HEADER = b"corral-sandbox-port"
TOKEN_HEADER = b"corral-traffic-token"
RESPONSE_TIMEOUT = 120.0  # seconds for the inside server to start answering (streaming may then go on)
READ_SIZE = 64 * 1024

_HOST_LABEL = re.compile(rb"([0-9]{1,5})-(sb-[a-z2-7]{16})")
# Hop-by-hop headers (RFC 9110 §7.6.1) and ours: never passed through
_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"host",
        SANDBOX_ID_HEADER,
        SANDBOX_PORT_HEADER,
        TOKEN_HEADER,
    }
)


@dataclass(frozen=True, kw_only=True)
class Target:
    sandbox_id: str
    port: int
    token: str | None


def target_of(headers: list[tuple[bytes, bytes]]) -> Target | None:
    """Where a request goes: a sandbox port (by host name or headers), or None for the API."""
    found = dict(headers)
    token = found.get(TOKEN_HEADER)
    token_text = token.decode("latin-1") if token else None
    sandbox_id, port = found.get(SANDBOX_ID_HEADER), found.get(SANDBOX_PORT_HEADER)
    if sandbox_id is not None and port is not None:
        return Target(
            sandbox_id=sandbox_id.decode("latin-1").strip(),
            port=int(port) if port.strip().isdigit() else 0,
            token=token_text,
        )
    label = found.get(b"host", b"").split(b".", 1)[0].lower()
    match = _HOST_LABEL.fullmatch(label)
    if match is None:
        return None
    return Target(sandbox_id=match[2].decode(), port=int(match[1]), token=token_text)


class PortProxy:
    """Outermost ASGI middleware: sandbox-port requests are relayed here, the rest go to ``app``."""

    def __init__(
        self, app: ASGIApp, *, service: SandboxService, metrics: Callable[[], Metrics | None]
    ) -> None:
        self.app = app
        self.service = service
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = target_of(scope["headers"]) if scope["type"] in ("http", "websocket") else None
        if target is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
            elif message["type"] == "websocket.accept":
                status = 101
            await send(message)

        try:
            await self.relay(scope, receive, sending, target)
        finally:
            m = self.metrics()
            if m is not None:
                m.proxied.labels(scope["type"], str(status)).inc()
            log.info(
                "proxied",
                extra={
                    "sandbox_id": target.sandbox_id,
                    "port": target.port,
                    "kind": scope["type"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )

    async def relay(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        target: Target,
        *,
        refuse: Callable[[Send, CorralError], Awaitable[None]] | None = None,
    ) -> None:
        """Relay one request or WebSocket to ``target``; ``refuse`` answers a failed open (default: Corral's
        error body), so another surface (the E2B adapter) can word it its own way."""
        if scope["type"] == "http":
            await self._http(scope, receive, send, target, refuse=refuse)
        else:
            await self._websocket(scope, receive, send, target)

    async def _open(self, target: Target) -> ByteStream:
        return await self.service.open_port_for_traffic(
            target.sandbox_id, target.port, traffic_token=target.token
        )

    # -- HTTP ------------------------------------------------------------------------------------------------
    async def _http(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        target: Target,
        *,
        refuse: Callable[[Send, CorralError], Awaitable[None]] | None = None,
    ) -> None:
        try:
            stream = await self._open(target)
        except CorralError as exc:
            if refuse is not None:
                await refuse(send, exc)
            else:
                await send_error(send, exc.status, exc.code, exc.message)
            return
        async with stream:
            first = await receive()
            if first["type"] != "http.request":
                return  # the client left before sending its request
            body, more = first.get("body", b""), first.get("more_body", False)
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method=scope["method"],
                target=_target_path(scope),
                headers=_request_headers(scope, target.port, length=None if more else len(body)),
            )
            await stream.send(conn.send(request) + (conn.send(h11.Data(data=body)) if body else b""))
            async with anyio.create_task_group() as tg:
                tg.start_soon(_send_body, stream, conn, receive, more, tg.cancel_scope)
                await _relay_response(stream, conn, send)
                tg.cancel_scope.cancel()

    # -- WebSocket -------------------------------------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send, target: Target) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            stream = await self._open(target)
        except CorralError as exc:
            await _refuse(scope, send, exc.status, exc.code, exc.message)
            return
        async with stream:
            conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            handshake = ws.Request(
                host=f"localhost:{target.port}",
                target=_target_path(scope),
                subprotocols=list(scope.get("subprotocols", [])),
                extra_headers=[
                    (k, v)
                    for k, v in _request_headers(scope, target.port)
                    if k != b"host" and not k.startswith(b"sec-websocket")
                ],
            )
            await stream.send(conn.send(handshake))
            answer = await _handshake(stream, conn)
            if not isinstance(answer, ws.AcceptConnection):
                await _refuse(scope, send, *answer)
                return
            await send({"type": "websocket.accept", "subprotocol": answer.subprotocol})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_client_to_sandbox, receive, stream, conn, tg.cancel_scope)
                await _sandbox_to_client(stream, conn, send)
                tg.cancel_scope.cancel()


def _target_path(scope: Scope) -> str:
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return (path + (b"?" + query if query else b"")).decode("latin-1")


def _request_headers(scope: Scope, port: int, *, length: int | None = None) -> list[tuple[bytes, bytes]]:
    """The client's end-to-end headers for the inside server, plus Host and the X-Forwarded-* trio."""
    original = dict(scope["headers"])
    out = [(b"host", f"localhost:{port}".encode())]
    out += [(k, v) for k, v in scope["headers"] if k not in _HOP and not k.startswith(b"x-forwarded-")]
    client = scope.get("client")
    forwarded_for = original.get(b"x-forwarded-for")
    if client:
        ip = client[0].encode()
        forwarded_for = forwarded_for + b", " + ip if forwarded_for else ip
    if forwarded_for:
        out.append((b"x-forwarded-for", forwarded_for))
    out.append((b"x-forwarded-host", original.get(b"host", b"")))
    out.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
    if scope["type"] == "http":
        if length is None:  # the body is still arriving: keep the client's length, or send it chunked
            if b"content-length" not in original:
                out.append((b"transfer-encoding", b"chunked"))
        else:
            out = [(k, v) for k, v in out if k != b"content-length"]
            if length or scope["method"] not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                out.append((b"content-length", str(length).encode()))
        out.append((b"connection", b"close"))  # one connection per request
    return out


async def _send_body(
    stream: ByteStream, conn: h11.Connection, receive: Receive, more: bool, scope: anyio.CancelScope
) -> None:
    """The rest of the request body; then wait for the client to leave, which ends the whole relay."""
    try:
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return
            chunk, more = message.get("body", b""), message.get("more_body", False)
            if chunk:
                await stream.send(conn.send(h11.Data(data=chunk)))
        await stream.send(conn.send(h11.EndOfMessage()))
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, h11.LocalProtocolError):
        pass  # the inside server answered (or hung up) before taking the whole body: its answer stands
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _relay_response(stream: ByteStream, conn: h11.Connection, send: Send) -> None:
    started = False
    try:
        with anyio.fail_after(RESPONSE_TIMEOUT):
            event = await _next_event(stream, conn)
            while isinstance(event, h11.InformationalResponse):
                event = await _next_event(stream, conn)
        if not isinstance(event, h11.Response):
            raise h11.RemoteProtocolError("no response")
        headers = [(k, v) for k, v in event.headers if k not in _HOP]
        await send({"type": "http.response.start", "status": event.status_code, "headers": headers})
        started = True
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
    except TimeoutError:
        await send_error(
            send, 504, "timeout", f"the server in the sandbox did not answer in {RESPONSE_TIMEOUT:g} s"
        )
    except (h11.RemoteProtocolError, anyio.BrokenResourceError, CorralError) as exc:
        if started:
            raise _Aborted from exc  # mid-body: only dropping the connection tells the client
        await send_error(send, 502, "bad_upstream", "the server in the sandbox did not answer with HTTP/1.1")


async def _next_event(stream: ByteStream, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            conn.receive_data(await stream.receive(READ_SIZE))
        except anyio.EndOfStream:
            conn.receive_data(b"")


class _Aborted(Exception):
    """A proxied response broke after it had started: the ASGI server drops the client connection."""


# -- WebSocket helpers -------------------------------------------------------------------------------------


async def _handshake(
    stream: ByteStream, conn: wsproto.WSConnection
) -> ws.AcceptConnection | tuple[int, str, str]:
    """The inside server's answer to the upgrade: accepted, or (status, code, message) to refuse with."""
    status, body = 0, b""
    try:
        with anyio.fail_after(RESPONSE_TIMEOUT):
            while True:
                try:
                    data: bytes | None = await stream.receive(READ_SIZE)
                except anyio.EndOfStream:
                    data = None
                conn.receive_data(data)
                for event in conn.events():
                    if isinstance(event, ws.AcceptConnection):
                        return event
                    if isinstance(event, ws.RejectConnection):
                        status = event.status_code
                        if not event.has_body:
                            return _refused(status, body)
                    elif isinstance(event, ws.RejectData):
                        body += event.data
                        if event.body_finished:
                            return _refused(status, body)
                if data is None:
                    return _refused(status, body) if status else (502, "bad_upstream", _NOT_WS)
    except TimeoutError:
        return 504, "timeout", "the server in the sandbox did not answer the WebSocket upgrade in time"
    except (RemoteProtocolError, anyio.BrokenResourceError, CorralError):
        return 502, "bad_upstream", _NOT_WS


_NOT_WS = "the server in the sandbox did not accept a WebSocket"


def _refused(status: int, body: bytes) -> tuple[int, str, str]:
    said = body.decode("utf-8", "replace").strip()[:300]
    return status, "upstream_refused", f"the server in the sandbox refused the WebSocket ({status}): {said}"


async def _refuse(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    """Refuse a WebSocket with an HTTP answer where the ASGI server can send one, else close it."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send_error(send, status, code, message, websocket=True)
    else:
        await send(
            {
                "type": "websocket.close",
                "code": 1008 if status in (401, 403) else 1011,
                "reason": message[:120],
            }
        )


async def _client_to_sandbox(
    receive: Receive, stream: ByteStream, conn: wsproto.WSConnection, scope: anyio.CancelScope
) -> None:
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code", 1000)
                await stream.send(conn.send(ws.CloseConnection(code=code if 1000 <= code < 5000 else 1000)))
                return
            text: str | None = message.get("text")
            if text is not None:
                await stream.send(conn.send(ws.TextMessage(data=text)))
            else:
                await stream.send(conn.send(ws.BytesMessage(data=message.get("bytes") or b"")))
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, LocalProtocolError):
        pass
    finally:
        scope.cancel()


async def _sandbox_to_client(stream: ByteStream, conn: wsproto.WSConnection, send: Send) -> None:
    texts: list[str] = []
    chunks: list[bytes] = []
    try:
        while True:
            try:
                conn.receive_data(await stream.receive(READ_SIZE))
            except anyio.EndOfStream:
                conn.receive_data(None)
            for event in conn.events():
                if isinstance(event, ws.TextMessage):  # a message may come in fragments
                    texts.append(event.data)
                    if event.message_finished:
                        await send({"type": "websocket.send", "text": "".join(texts)})
                        texts.clear()
                elif isinstance(event, ws.BytesMessage):
                    chunks.append(bytes(event.data))
                    if event.message_finished:
                        await send({"type": "websocket.send", "bytes": b"".join(chunks)})
                        chunks.clear()
                elif isinstance(event, ws.Ping):
                    await stream.send(conn.send(event.response()))
                elif isinstance(event, ws.CloseConnection):
                    if conn.state is ConnectionState.REMOTE_CLOSING:
                        await stream.send(conn.send(event.response()))
                    code = 1011 if event.code in (1005, 1006, 1015) else event.code  # not sendable codes
                    await send({"type": "websocket.close", "code": code, "reason": event.reason or ""})
                    return
    except (anyio.BrokenResourceError, RemoteProtocolError, CorralError):
        await send({"type": "websocket.close", "code": 1011, "reason": "the sandbox connection broke"})
