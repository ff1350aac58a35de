"""Files in a sandbox, over one :class:`AgentClient`: streamed both ways, never whole files in memory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator

from corral.core.agent_client import AgentClient, Request
from corral.errors import CorralError, InvalidRequest, PermissionDenied, ResourceExhausted
from corral.models import EntryInfo
from corral.protocol import CHUNK_SIZE, Event, Op

__all__ = [
    "check_files",
    "check_path",
    "list_dir",
    "make_dir",
    "read",
    "remove",
    "rename",
    "stat",
    "write",
    "write_all",
]

RESERVED = "/.corral"
MAX_LIST_ENTRIES = 100_000  # one answer's worth; beyond it a caller should page by directory  # the agent bundle lives here, read-only


def check_path(path: object, *, writing: bool = False) -> str:
    """Reject paths no sandbox file can have, and writes into Corral's own mount."""
    if not isinstance(path, str) or not path:
        raise InvalidRequest("a path must be a non-empty string")
    if "\x00" in path or len(path) > 4096:
        raise InvalidRequest("a path may not contain NUL bytes or exceed 4096 characters")
    if writing and (path == RESERVED or path.startswith(RESERVED + "/")):
        raise PermissionDenied(f"{RESERVED} is reserved for Corral's agent and is read-only")
    return path


async def read(client: AgentClient, path: str, *, user: str | None = None) -> AsyncIterator[bytes]:
    fields = {"path": check_path(path), **({"user": user} if user else {})}
    async with client.request(Op.READ, fields) as req:
        async for frame in req:
            if frame.get("ev") == Event.CHUNK and frame.payload:
                yield frame.payload


async def write(
    client: AgentClient,
    path: str,
    chunks: AsyncIterable[bytes],
    *,
    max_bytes: int,
    user: str | None = None,
    mode: int | None = None,
) -> int:
    """Upload ``chunks`` to ``path`` (atomically replaced on success). Returns the bytes written."""
    fields: dict[str, object] = {"path": check_path(path, writing=True), "parents": True}
    if user:
        fields["user"] = user
    if mode is not None:
        fields["mode"] = mode
    total = 0
    async with client.request(Op.WRITE, fields) as req:
        async for chunk in chunks:
            for start in range(0, len(chunk), CHUNK_SIZE):
                piece = chunk[start : start + CHUNK_SIZE]
                total += len(piece)
                if total > max_bytes:
                    await _abort(req)
                    raise ResourceExhausted(
                        f"file is larger than the {max_bytes} byte upload limit", details={"limit": max_bytes}
                    )
                await req.send({"op": Op.DATA, "eof": False}, piece)
        await req.send({"op": Op.DATA, "eof": True})
        async for frame in req:
            if frame.get("ev") == Event.OK:
                return int(frame.get("bytes", total))
    return total


async def _abort(req: Request) -> None:
    """Cancel an upload and wait until the agent confirms (it removes its temporary file first)."""
    await req.send({"op": Op.DATA, "eof": True, "abort": True})
    with contextlib.suppress(CorralError):
        async for _ in req:
            pass


async def list_dir(
    client: AgentClient, path: str, *, depth: int = 1, user: str | None = None
) -> list[EntryInfo]:
    if not 1 <= depth <= 32:
        raise InvalidRequest("depth must be between 1 and 32")
    entries: list[EntryInfo] = []
    # stream: the agent sends the listing in ``chunk`` frames (one header could not hold a large directory)
    fields = {"path": check_path(path), "depth": depth, "stream": True, **_user(user)}
    async with client.request(Op.LIST, fields) as req:
        async for frame in req:
            if len(entries) > MAX_LIST_ENTRIES:
                raise ResourceExhausted(
                    f"{path} has more than {MAX_LIST_ENTRIES} entries at depth {depth}; list less at a time"
                )
            entries.extend(EntryInfo.from_wire(e) for e in frame.get("entries", []))
    return entries


async def stat(client: AgentClient, path: str, *, user: str | None = None) -> EntryInfo:
    answer = await client.call(Op.STAT, {"path": check_path(path), **_user(user)})
    return EntryInfo.from_wire(answer["entry"])


async def make_dir(client: AgentClient, path: str, *, user: str | None = None) -> bool:
    answer = await client.call(Op.MKDIR, {"path": check_path(path, writing=True), **_user(user)})
    return bool(answer.get("created", True))


async def remove(client: AgentClient, path: str, *, recursive: bool = False, user: str | None = None) -> None:
    await client.call(
        Op.REMOVE, {"path": check_path(path, writing=True), "recursive": recursive, **_user(user)}
    )


async def rename(
    client: AgentClient, src: str, dst: str, *, overwrite: bool = False, user: str | None = None
) -> None:
    await client.call(
        Op.RENAME,
        {
            "src": check_path(src, writing=True),
            "dst": check_path(dst, writing=True),
            "overwrite": overwrite,
            **_user(user),
        },
    )


def _user(user: str | None) -> dict[str, str]:
    return {"user": user} if user else {}


MAX_CREATE_FILES = 256
MAX_CREATE_FILES_BYTES = 64 * 1024 * 1024  # they travel in one request body (base64 over HTTP)


def check_files(value: object) -> dict[str, bytes]:
    """Validate the ``files`` of a create request (path -> content), before anything is created."""
    if not isinstance(value, dict) or not all(isinstance(v, bytes | bytearray) for v in value.values()):
        raise InvalidRequest("files must map sandbox paths to bytes")
    if len(value) > MAX_CREATE_FILES or sum(len(v) for v in value.values()) > MAX_CREATE_FILES_BYTES:
        raise InvalidRequest(
            f"a create may carry at most {MAX_CREATE_FILES} files and {MAX_CREATE_FILES_BYTES} bytes in all; "
            "upload larger ones with files.write"
        )
    return {check_path(path, writing=True): bytes(data) for path, data in value.items()}


async def write_all(client: AgentClient, files: dict[str, bytes], *, max_bytes: int) -> None:
    """Write each file (as the default user, like ``files.write``), in order."""
    for path, data in files.items():
        await write(client, path, _one(data), max_bytes=max_bytes)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
