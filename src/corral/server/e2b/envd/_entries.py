"""Corral's file entries and watch events in envd's message shapes (shared by the RPCs and the watchers)."""

from __future__ import annotations

import os
import re
import stat as st
from collections.abc import AsyncIterator

from corral.errors import CorralError
from corral.models import EntryInfo, EntryType, FilesystemEvent, FilesystemEventType
from corral.server.e2b.envd._access import SandboxCall
from corral.server.e2b.envd._pb import filesystem_pb2 as pb

__all__ = ["entry_info", "fs_event", "plain_events", "with_entries"]

_TYPES = {
    EntryType.FILE: pb.FILE_TYPE_FILE,
    EntryType.DIR: pb.FILE_TYPE_DIRECTORY,
    EntryType.SYMLINK: pb.FILE_TYPE_SYMLINK,
}
_EVENTS = {
    FilesystemEventType.CREATE: pb.EVENT_TYPE_CREATE,
    FilesystemEventType.WRITE: pb.EVENT_TYPE_WRITE,
    FilesystemEventType.REMOVE: pb.EVENT_TYPE_REMOVE,
    FilesystemEventType.RENAME: pb.EVENT_TYPE_RENAME,
    FilesystemEventType.CHMOD: pb.EVENT_TYPE_CHMOD,
}
_NAMES = {0: "root", 1000: "user"}  # the sandbox's two identities (corral.agent.users)
_MODE_CHAR = {EntryType.FILE: "-", EntryType.DIR: "d", EntryType.SYMLINK: "L"}


def entry_info(e: EntryInfo) -> pb.EntryInfo:
    out = pb.EntryInfo(
        name=e.name,
        type=_TYPES.get(e.type, pb.FILE_TYPE_UNSPECIFIED),
        path=e.path,
        size=e.size,
        mode=e.mode,
        # Go's FileMode.String(), which envd reports: type letter, then rwx triples
        permissions=_MODE_CHAR.get(e.type, "?") + st.filemode(e.mode)[1:],
        owner=_NAMES.get(e.uid, str(e.uid)),
        group=_NAMES.get(e.gid, str(e.gid)),
    )
    out.modified_time.FromNanoseconds(int(e.mtime * 1e9))
    if e.target is not None:
        out.symlink_target = e.target
    out.is_symlink = e.type is EntryType.SYMLINK
    return out


def fs_event(event: FilesystemEvent) -> pb.FilesystemEvent | None:
    kind = _EVENTS.get(event.type)
    return None if kind is None else pb.FilesystemEvent(name=event.name, type=kind)


async def with_entries(
    call: SandboxCall, root: str, events: AsyncIterator[FilesystemEvent], user: str | None
) -> AsyncIterator[pb.FilesystemEvent | None]:
    """Watch events as envd's, with the entry's stat when asked (``include_entry``); None for ``started``."""
    try:
        async for event in _as_envd(events):
            if event.type is FilesystemEventType.STARTED:
                yield None
                continue
            out = fs_event(event)
            if out is None:
                continue
            if event.type in (
                FilesystemEventType.CREATE,
                FilesystemEventType.WRITE,
                FilesystemEventType.CHMOD,
            ):
                try:
                    entry = await call.service.stat(
                        call.sandbox_id, os.path.join(root, event.name), user=user, tenant=call.tenant
                    )
                    out.entry.CopyFrom(entry_info(entry))
                except CorralError:
                    pass  # gone again already: the event stands without its entry
            yield out
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def plain_events(events: AsyncIterator[FilesystemEvent]) -> AsyncIterator[pb.FilesystemEvent | None]:
    """Watch events as envd's; None for ``started``."""
    try:
        async for event in _as_envd(events):
            if event.type is FilesystemEventType.STARTED:
                yield None
            elif (out := fs_event(event)) is not None:
                yield out
    finally:
        await events.aclose()  # type: ignore[attr-defined]


_UPLOAD = re.compile(r"(.*/)?\.(.+)\.[0-9a-f]{8}\.corral-upload")


async def _as_envd(events: AsyncIterator[FilesystemEvent]) -> AsyncIterator[FilesystemEvent]:
    """Corral's agent writes a file atomically (a hidden temporary file renamed into place), envd writes in
    place: hide the temporary file and report the upload as envd would, the file's ``create`` then ``write``."""
    landing: set[str] = set()
    async for event in events:
        match = _UPLOAD.fullmatch(event.name)
        if match is not None:
            if event.type is FilesystemEventType.RENAME:
                if len(landing) > 1024:  # renames that never land (code in the sandbox can fake them)
                    landing.clear()
                landing.add((match[1] or "") + match[2])
            continue
        yield event
        if event.type is FilesystemEventType.CREATE and event.name in landing:
            landing.discard(event.name)
            yield FilesystemEvent(name=event.name, type=FilesystemEventType.WRITE)
