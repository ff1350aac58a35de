"""envd's ``filesystem.Filesystem`` service over Corral's file operations and watches.

``Stat``/``ListDir``/``MakeDir``/``Move``/``Remove`` are one ``SandboxService`` call each (``MakeDir`` and
``Move`` answer the entry with a ``stat``). ``WatchDir`` is ``watch_dir`` as a stream; the polling trio
``CreateWatcher``/``GetWatcherEvents``/``RemoveWatcher`` keeps the same watch open server-side
(:mod:`.watchers`). Entries carry envd's fields: ``permissions`` as ``ls`` shows them, owner and group names
for the sandbox's two users, the modification time as a Timestamp.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from corral.server.e2b.envd._access import SandboxCall
from corral.server.e2b.envd._connect import Kind, Row, Rpc, keepalive_interval, table, user_of, with_keepalive
from corral.server.e2b.envd._entries import entry_info, plain_events, with_entries
from corral.server.e2b.envd._pb import filesystem_pb2 as pb
from corral.server.e2b.envd.watchers import Watchers

__all__ = ["SERVICE", "rpcs"]

SERVICE = "filesystem.Filesystem"


class _Filesystem:
    def __init__(self, call: SandboxCall, watchers: Watchers) -> None:
        self.call = call
        self.service = call.service
        self.watchers = watchers
        self.sid = call.sandbox_id

    def _kw(self, ctx: RequestContext[Any, Any]) -> dict[str, Any]:
        return {"user": user_of(ctx.request_headers), "tenant": self.call.tenant}

    async def stat(self, req: pb.StatRequest, ctx: RequestContext[Any, Any]) -> pb.StatResponse:
        return pb.StatResponse(entry=entry_info(await self.service.stat(self.sid, req.path, **self._kw(ctx))))

    async def list_dir(self, req: pb.ListDirRequest, ctx: RequestContext[Any, Any]) -> pb.ListDirResponse:
        entries = await self.service.list_dir(self.sid, req.path, depth=req.depth or 1, **self._kw(ctx))
        return pb.ListDirResponse(entries=[entry_info(e) for e in entries])

    async def make_dir(self, req: pb.MakeDirRequest, ctx: RequestContext[Any, Any]) -> pb.MakeDirResponse:
        kw = self._kw(ctx)
        if not await self.service.make_dir(self.sid, req.path, **kw):
            raise ConnectError(Code.ALREADY_EXISTS, f"directory {req.path} already exists")
        return pb.MakeDirResponse(entry=entry_info(await self.service.stat(self.sid, req.path, **kw)))

    async def move(self, req: pb.MoveRequest, ctx: RequestContext[Any, Any]) -> pb.MoveResponse:
        kw = self._kw(ctx)
        await self.service.rename(self.sid, req.source, req.destination, overwrite=True, **kw)
        return pb.MoveResponse(entry=entry_info(await self.service.stat(self.sid, req.destination, **kw)))

    async def remove(self, req: pb.RemoveRequest, ctx: RequestContext[Any, Any]) -> pb.RemoveResponse:
        await self.service.remove(self.sid, req.path, recursive=True, **self._kw(ctx))
        return pb.RemoveResponse()

    async def watch_dir(
        self, req: pb.WatchDirRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.WatchDirResponse]:
        kw = self._kw(ctx)
        events = await self.service.watch_dir(self.sid, req.path, recursive=req.recursive, **kw)
        if not req.include_entry:
            source: AsyncIterator[pb.FilesystemEvent | None] = plain_events(events)
        else:
            source = with_entries(self.call, req.path, events, kw["user"])
        stream = with_keepalive(_responses(source), keepalive_interval(ctx), _keepalive)
        async for message in stream:
            yield message

    async def create_watcher(
        self, req: pb.CreateWatcherRequest, ctx: RequestContext[Any, Any]
    ) -> pb.CreateWatcherResponse:
        kw = self._kw(ctx)
        watcher_id = await self.watchers.create(
            self.call, req.path, recursive=req.recursive, include_entry=req.include_entry, user=kw["user"]
        )
        return pb.CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(
        self, req: pb.GetWatcherEventsRequest, ctx: RequestContext[Any, Any]
    ) -> pb.GetWatcherEventsResponse:
        events = self.watchers.take(self.call, req.watcher_id)
        return pb.GetWatcherEventsResponse(events=events)

    async def remove_watcher(
        self, req: pb.RemoveWatcherRequest, ctx: RequestContext[Any, Any]
    ) -> pb.RemoveWatcherResponse:
        self.watchers.remove(self.call, req.watcher_id)
        return pb.RemoveWatcherResponse()


async def _responses(source: AsyncIterator[pb.FilesystemEvent | None]) -> AsyncIterator[pb.WatchDirResponse]:
    started = False
    try:
        async for event in source:
            if event is None:
                if not started:
                    started = True
                    yield pb.WatchDirResponse(start=pb.WatchDirResponse.StartEvent())
            else:
                yield pb.WatchDirResponse(filesystem=event)
    finally:
        await source.aclose()  # type: ignore[attr-defined]


def _keepalive() -> pb.WatchDirResponse:
    return pb.WatchDirResponse(keepalive=pb.WatchDirResponse.KeepAlive())


def rpcs(call: SandboxCall, watchers: Watchers) -> list[Rpc]:
    f = _Filesystem(call, watchers)
    unary: list[Row] = [
        ("Stat", pb.StatRequest, pb.StatResponse, f.stat),
        ("ListDir", pb.ListDirRequest, pb.ListDirResponse, f.list_dir),
        ("MakeDir", pb.MakeDirRequest, pb.MakeDirResponse, f.make_dir),
        ("Move", pb.MoveRequest, pb.MoveResponse, f.move),
        ("Remove", pb.RemoveRequest, pb.RemoveResponse, f.remove),
        ("CreateWatcher", pb.CreateWatcherRequest, pb.CreateWatcherResponse, f.create_watcher),
        ("GetWatcherEvents", pb.GetWatcherEventsRequest, pb.GetWatcherEventsResponse, f.get_watcher_events),
        ("RemoveWatcher", pb.RemoveWatcherRequest, pb.RemoveWatcherResponse, f.remove_watcher),
    ]
    streams: list[Row] = [("WatchDir", pb.WatchDirRequest, pb.WatchDirResponse, f.watch_dir)]
    return [*table(Kind.UNARY, unary), *table(Kind.SERVER_STREAM, streams)]
