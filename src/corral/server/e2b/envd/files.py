"""envd's HTTP side: ``GET``/``POST /files``, ``/health``, ``/envs``, ``/init``, over Corral's file operations.

- ``GET /files?path=&username=`` streams the file (``read_file``), gzip-compressed on the fly when the client
  asks for gzip.
- ``POST /files`` takes ``multipart/form-data`` (any number of ``file`` parts, each part's filename being its
  destination unless ``path`` is given for a single part) or a raw ``application/octet-stream`` body with
  ``path``, optionally ``Content-Encoding: gzip``. Each file streams into the sandbox with ``write_file``
  (atomic per file). The answer is envd's ``[{"path", "name", "type": "file"}]``.
- Signed URLs (``signature``, ``signature_expiration``) are checked before a request gets here
  (:meth:`._access.SandboxAccess.signed_call`).
- Errors are envd's JSON, ``{"code": <HTTP status>, "message"}``, which the SDK maps by status.
"""

from __future__ import annotations

import posixpath
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from corral.errors import (
    CorralError,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unsupported,
)
from corral.models import SandboxState
from corral.protocol import CHUNK_SIZE
from corral.server.e2b.envd._access import SandboxCall
from corral.server.e2b.envd._connect import USERS

__all__ = ["envd_error", "handle"]

MAX_PARTS = 1000  # files in one multipart upload
MULTIPART_OVERHEAD = 1024 * 1024  # part headers and boundaries, beyond the upload limit itself
_HOMES = {"user": "/home/user", "root": "/root"}


def envd_error(exc: CorralError) -> JSONResponse:
    status = 401 if isinstance(exc, Unauthenticated) else exc.status
    return JSONResponse({"code": status, "message": exc.message}, status_code=status)


def _user(request: Request) -> str | None:
    name = request.query_params.get("username") or None
    if name is not None and name not in USERS:
        raise Unauthenticated(f"invalid user {name[:64]!r}: this sandbox has 'user' and 'root'")
    return name


def _absolute(path: str, user: str | None) -> str:
    return path if path.startswith("/") else posixpath.join(_HOMES[user or "user"], path)


async def _download(call: SandboxCall, request: Request) -> Response:
    path = request.query_params.get("path")
    if not path:
        raise InvalidRequest("the path query parameter is required")
    user = _user(request)
    chunks = await call.service.read_file(call.sandbox_id, path, user=user, tenant=call.tenant)
    first = await anext(chunks, b"")  # the first chunk (or the error: missing, a directory) before the 200
    # gzip when that is what the client asks for (the SDK's ``read(gzip=True)`` sends exactly that), not for an
    # HTTP library's default list (httpx accepts gzip on every request): compressing 1 MiB costs ~100 ms of CPU
    # here, more than it saves on the networks a Corral server is reached over.
    gzip = request.headers.get("accept-encoding", "").strip().lower() == "gzip"
    headers = {"content-encoding": "gzip"} if gzip else {}
    return StreamingResponse(
        _gzip(first, chunks) if gzip else _chain(first, chunks),
        media_type="application/octet-stream",
        headers=headers,
    )


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        if first:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _gzip(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # Level 1: most of gzip's gain on text at a fraction of its time (httpx, hence the SDK, accepts gzip on every
    # download); in a worker thread, so compressing never stalls the server's other requests.
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    async for chunk in _chain(first, rest):
        out = await anyio.to_thread.run_sync(packer.compress, chunk)
        if out:
            yield out
    yield packer.flush()


async def _body(request: Request, *, gzip: bool, limit: int) -> AsyncIterator[bytes]:
    """The request body, gunzipped when it says so; at most ``limit`` bytes after unpacking."""
    unpacker = zlib.decompressobj(31) if gzip else None
    total = 0
    async for chunk in request.stream():
        if unpacker is None:
            total += len(chunk)
            if total > limit:
                raise InvalidRequest(f"the upload is larger than the {limit} byte limit")
            yield chunk
            continue
        try:
            data = unpacker.decompress(chunk, CHUNK_SIZE)
            while data:
                total += len(data)
                if total > limit:
                    raise InvalidRequest(f"the upload is larger than the {limit} byte limit")
                yield data
                data = unpacker.decompress(unpacker.unconsumed_tail, CHUNK_SIZE)
        except zlib.error as exc:
            raise InvalidRequest("the upload says Content-Encoding: gzip but is not gzip data") from exc
    if unpacker is not None and not unpacker.eof:
        raise InvalidRequest("the gzip upload ended early")


async def _parts(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK_SIZE):
        yield chunk


async def _upload(call: SandboxCall, request: Request) -> Response:
    user = _user(request)
    if any(k.lower().startswith("x-metadata-") for k in request.headers):
        raise Unsupported("file metadata (X-Metadata-* headers, stored as xattrs by E2B) is not supported")
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", "gzip"):
        raise InvalidRequest(f"unsupported Content-Encoding {encoding!r}: send gzip or nothing")
    path = request.query_params.get("path")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = call.service.settings.max_file_bytes
    written: list[str] = []
    if content_type == "multipart/form-data":
        if encoding == "gzip":
            raise InvalidRequest("gzip uploads are octet-stream uploads; send multipart bodies uncompressed")
        try:
            form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS)
        except HTTPException as exc:  # Starlette's answer to a malformed body
            raise InvalidRequest(f"the multipart body is malformed: {exc.detail}") from exc
        try:
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not uploads:
                raise InvalidRequest("the multipart body has no file parts")
            if path is not None and len(uploads) > 1:
                raise InvalidRequest("path names one file; several parts each carry their own filename")
            for upload in uploads:
                dest = path if path is not None else upload.filename
                if not dest:
                    raise InvalidRequest("a file part has no filename and no path was given")
                await call.service.write_file(
                    call.sandbox_id, dest, _parts(upload), user=user, tenant=call.tenant
                )
                written.append(dest)
        finally:
            await form.close()  # the parts spooled to temporary files
    else:
        if not path:
            raise InvalidRequest("an octet-stream upload needs the path query parameter")
        body = _body(request, gzip=encoding == "gzip", limit=limit)
        await call.service.write_file(call.sandbox_id, path, body, user=user, tenant=call.tenant)
        written.append(path)
    return JSONResponse(
        [{"path": (p := _absolute(d, user)), "name": posixpath.basename(p), "type": "file"} for d in written]
    )


async def _health(call: SandboxCall) -> Response:
    info = await call.service.get(call.sandbox_id, tenant=call.tenant)
    if info.state is not SandboxState.RUNNING:
        raise NotFound(f"sandbox {call.sandbox_id} was not found")
    return Response(status_code=204)


def _bounded(receive: Receive, limit: int) -> Receive:
    """``receive``, failing once the body passes ``limit`` bytes: a multipart body is parsed (and spooled to
    disk) before any of it reaches the sandbox, where the upload limit would otherwise apply."""
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ResourceExhausted(f"the upload is larger than the {limit} byte limit")
        return message

    return bounded


async def handle(call: SandboxCall, scope: Scope, receive: Receive, send: Send) -> None:
    """One of envd's HTTP routes (not the Connect ones), answered with envd's JSON errors."""
    if scope["method"] == "POST":
        receive = _bounded(receive, call.service.settings.max_file_bytes + MULTIPART_OVERHEAD)
    request = Request(scope, receive)
    route = (request.method, scope["path"])
    response: Response
    try:
        if route in (("GET", "/files"), ("HEAD", "/files")):
            response = await _download(call, request)
        elif route == ("POST", "/files"):
            response = await _upload(call, request)
        elif route == ("GET", "/health"):
            response = await _health(call)
        elif route == ("GET", "/envs"):
            response = JSONResponse(await call.service.sandbox_env(call.sandbox_id, tenant=call.tenant))
        elif route == ("POST", "/init"):
            response = await _init(call, request)
        else:
            response = JSONResponse(
                {"code": 404, "message": f"no route {scope['path'][:200]}"}, status_code=404
            )
    except CorralError as exc:
        response = envd_error(exc)
    await response(scope, receive, send)


async def _init(call: SandboxCall, request: Request) -> Response:
    """envd's ``/init``: the sandbox's global env vars and default user and working directory."""
    try:
        body: Any = await request.json()
    except ValueError as exc:
        raise InvalidRequest("the body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    env = body.get("envVars") or {}
    user = body.get("defaultUser") or None
    cwd = body.get("defaultWorkdir") or None
    if user is not None and user not in USERS:
        raise InvalidRequest("defaultUser must be 'user' or 'root'")
    await call.service.configure(call.sandbox_id, env=env, user=user, cwd=cwd, tenant=call.tenant)
    return Response(status_code=204)
