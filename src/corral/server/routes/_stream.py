"""Streaming helpers: NDJSON bodies that start only once the first item is known.

A stream's first item is fetched before the response starts, so errors that happen up front (no such sandbox,
no such file, a paused sandbox) still get their proper status and error body; an error after the first byte
ends the stream with one ``{"error": …}`` line instead, because the status line has already been sent. If the
client goes away, Starlette cancels the body, and closing the source iterator stops the work behind it (a
foreground command is killed, a download stops reading).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse

from corral.errors import CorralError

__all__ = ["NDJSON", "ndjson_response", "prefetched"]

T = TypeVar("T")
NDJSON = "application/x-ndjson"


async def prefetched(source: AsyncIterator[T]) -> AsyncIterator[T]:
    """``source`` with its first item already fetched (raising now if it fails)."""
    try:
        first = await anext(source)
    except StopAsyncIteration:
        await _close(source)
        return _empty()
    except BaseException:
        await _close(source)
        raise
    return _chain(first, source)


async def _empty() -> AsyncIterator[Any]:
    return
    yield


async def _chain(first: T, source: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        yield first
        async for item in source:
            yield item
    finally:
        await _close(source)


async def _close(source: AsyncIterator[Any]) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


def ndjson_response(items: AsyncIterator[T], encode: Callable[[T], dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield json.dumps(encode(item), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        except CorralError as exc:
            yield json.dumps(exc.to_wire()).encode() + b"\n"
        finally:
            await _close(items)

    return StreamingResponse(body(), media_type=NDJSON, headers={"cache-control": "no-store"})
