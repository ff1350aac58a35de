"""Connect-RPC plumbing for envd's services, on the ``connectrpc`` library (the one the E2B SDK itself uses).

- Messages are google ``protobuf`` classes generated from our ``proto/*.proto`` (``_pb``); connectrpc speaks
  both codecs with them: binary (``application/proto``, ``application/connect+proto``) and JSON
  (``application/json``, ``application/connect+json``, which the SDK sends), unary and streaming, with
  Connect's envelopes, end-of-stream messages and error bodies. The JSON codec here is connectrpc's google
  one without indentation (the library's pretty-prints every message).
- Each service is a table of :class:`Rpc` rows (name, kind, messages, handler). An app is built per request
  around the request's :class:`SandboxCall`, so handlers get their sandbox and tenant as plain arguments.
- Corral's errors become Connect errors with the matching code (``NotFound`` → ``not_found`` and so on); the
  SDK branches on those codes (``kill`` → False, ``exists`` → False, ``make_dir`` → False).
- :func:`with_keepalive` interleaves keep-alive messages into a quiet stream, every
  ``Keepalive-Ping-Interval`` seconds as the SDK asks, so proxies and the client keep an idle stream open and a
  client that left is noticed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_binary_codec
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import Headers, RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.types import Receive, Scope, Send

from corral.errors import (
    AgentUnavailable,
    Conflict,
    CorralError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RuntimeFailure,
    Timeout,
    Unauthenticated,
    Unsupported,
)

__all__ = [
    "Kind",
    "Row",
    "Rpc",
    "connect_error",
    "keepalive_interval",
    "serve",
    "table",
    "timeout_of",
    "user_of",
    "with_keepalive",
]

M = TypeVar("M", bound=Message)
T = TypeVar("T")
K = TypeVar("K")

READ_MAX_BYTES = 16 * 1024 * 1024  # one request message (SendInput carries stdin chunks)
MAX_KEEPALIVE = 3600.0  # seconds; a client asking for longer gets this
USERS = ("user", "root")


class _JSONCodec:
    """protojson with google.protobuf, compact; unknown fields ignored, as envd does."""

    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        return json_format.MessageToJson(message, indent=None).encode()

    def decode(self, data: bytes | bytearray, message_class: type[M]) -> M:
        message = message_class()
        try:
            json_format.Parse(bytes(data), message, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, f"the request is not valid JSON for it: {exc}") from exc
        return message


CODECS: list[Codec[Any, Any]] = [google_protobuf_binary_codec(), _JSONCodec()]


Row = tuple[str, type[Message], type[Message], Callable[..., Any]]  # name, input, output, handler


class Kind(Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"


@dataclass(frozen=True, kw_only=True)
class Rpc:
    name: str
    kind: Kind
    input: type[Message]
    output: type[Message]
    handler: Callable[
        ..., Any
    ]  # (request | AsyncIterator[request], ctx) -> response | AsyncIterator[response]


def table(kind: Kind, rows: Iterable[Row]) -> list[Rpc]:
    """Rows ``(name, input, output, handler)`` of one kind as :class:`Rpc` values."""
    return [Rpc(name=n, kind=kind, input=i, output=o, handler=h) for n, i, o, h in rows]


_CODES: list[tuple[type[CorralError], Code]] = [
    (InvalidRequest, Code.INVALID_ARGUMENT),
    (Unauthenticated, Code.UNAUTHENTICATED),
    (PermissionDenied, Code.PERMISSION_DENIED),
    (NotFound, Code.NOT_FOUND),
    (Conflict, Code.FAILED_PRECONDITION),
    (ResourceExhausted, Code.RESOURCE_EXHAUSTED),
    (Unsupported, Code.UNIMPLEMENTED),
    (Timeout, Code.DEADLINE_EXCEEDED),
    (AgentUnavailable, Code.UNAVAILABLE),
    (RuntimeFailure, Code.UNAVAILABLE),
]


def connect_error(exc: CorralError) -> ConnectError:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return ConnectError(code, exc.message)
    return ConnectError(Code.INTERNAL, exc.message)


Explain = Callable[[CorralError], Awaitable[CorralError]]


def _unary(
    fn: Callable[[Any, Any], Awaitable[Any]], explain: Explain
) -> Callable[[Any, Any], Awaitable[Any]]:
    @functools.wraps(fn)
    async def run(request: Any, ctx: Any) -> Any:
        try:
            return await fn(request, ctx)
        except CorralError as exc:
            raise connect_error(await explain(exc)) from exc

    return run


def _stream(
    fn: Callable[[Any, Any], AsyncIterator[Any]], explain: Explain
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    @functools.wraps(fn)
    async def run(request: Any, ctx: Any) -> AsyncIterator[Any]:
        events = fn(request, ctx)
        try:
            async for message in events:
                yield message
        except CorralError as exc:
            raise connect_error(await explain(exc)) from exc
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return run


class _App(ConnectASGIApplication[object]):
    def __init__(self, path: str, endpoints: Mapping[str, Any]) -> None:
        self._path = path
        super().__init__(
            service=object(), endpoints=lambda _: endpoints, codecs=CODECS, read_max_bytes=READ_MAX_BYTES
        )

    @property
    def path(self) -> str:
        return self._path


async def serve(
    service: str, rpcs: Iterable[Rpc], scope: Scope, receive: Receive, send: Send, *, explain: Explain
) -> None:
    """Answer one Connect request for ``service`` (``"process.Process"``) from its table of rpcs.

    ``explain`` may reword a Corral error before it becomes the Connect error (a sandbox going away).
    """
    endpoints: dict[str, Any] = {}
    for rpc in rpcs:
        method = MethodInfo(
            name=rpc.name,
            service_name=service,
            input=rpc.input,
            output=rpc.output,
            idempotency_level=IdempotencyLevel.UNKNOWN,
        )
        path = f"/{service}/{rpc.name}"
        if rpc.kind is Kind.UNARY:
            endpoints[path] = Endpoint.unary(method, _unary(rpc.handler, explain))
        elif rpc.kind is Kind.SERVER_STREAM:
            endpoints[path] = Endpoint.server_stream(method, _stream(rpc.handler, explain))
        else:
            endpoints[path] = Endpoint.client_stream(method, _unary(rpc.handler, explain))
    await _App(f"/{service}", endpoints)(scope, receive, send)


def user_of(headers: Headers) -> str | None:
    """The user a request acts as: HTTP Basic ``user:`` (no password), as envd reads it; None for the default."""
    value = headers.get("authorization", "")
    if value[:6].lower() != "basic ":
        return None
    try:
        name = base64.b64decode(value[6:].strip(), validate=True).decode().split(":", 1)[0]
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ConnectError(Code.UNAUTHENTICATED, "the Authorization header is not valid Basic auth") from exc
    return check_user(name)


def check_user(name: str | None) -> str | None:
    if not name:
        return None
    if name not in USERS:
        raise ConnectError(
            Code.UNAUTHENTICATED, f"invalid user {name[:64]!r}: this sandbox has 'user' and 'root'"
        )
    return name


def timeout_of(ctx: RequestContext[Any, Any]) -> float | None:
    """The request's ``Connect-Timeout-Ms`` in seconds (envd: a process's lifetime), or None."""
    remaining = ctx.timeout_ms
    return None if remaining is None else max(remaining, 1.0) / 1000.0


def keepalive_interval(ctx: RequestContext[Any, Any]) -> float | None:
    raw = ctx.request_headers.get("keepalive-ping-interval", "")
    try:
        seconds = float(raw)
    except ValueError:
        return None
    return min(seconds, MAX_KEEPALIVE) if seconds > 0 else None


async def with_keepalive(
    source: AsyncIterator[T], interval: float | None, keepalive: Callable[[], K]
) -> AsyncIterator[T | K]:
    """``source``'s items, and ``keepalive()`` whenever ``interval`` seconds pass without one.

    The source is iterated (and closed) in a task of its own, so a keep-alive tick never interrupts it
    mid-item; the queue holds one item, so a slow client still slows the source down.
    """
    if interval is None:
        async for item in source:
            yield item
        return
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue(maxsize=1)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put((True, item))
            await queue.put((False, None))
        except Exception as exc:  # handed to the consumer, which raises it in its own task
            await queue.put((False, exc))
        finally:
            await source.aclose()  # type: ignore[attr-defined]

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                more, value = await asyncio.wait_for(queue.get(), interval)
            except TimeoutError:
                yield keepalive()
                continue
            if not more:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
