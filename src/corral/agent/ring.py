"""A process's kept output: stdout and stderr interleaved as read, at most ``RING_BYTES``, oldest dropped first.

Bytes are addressed by absolute offset (0 = the first byte the process wrote); a subscriber is just an offset.
They live in a circular buffer in an anonymous ``mmap`` marked ``MADV_DONTFORK``, for two reasons:

- Forking cost. Running a command as ``user`` makes ``subprocess`` fork instead of vfork (it must change
  credentials in the child), and file workers are forked too. fork copies page tables, so its cost grows with
  the agent's resident memory, which is mostly kept output (up to 8 MiB per process). Memory excluded from
  fork costs nothing there, and the children never touch it (they exec, or run worker code).
- Bounded, unfragmented memory. One mapping per process, released as a whole when the output is dropped,
  instead of many ``bytes`` objects in the Python heap.

The mapping starts small and doubles up to ``RING_BYTES``, so quiet processes cost a page or two. Which stream
each byte came from is kept as a list of *segments* (offset where a run of one stream starts); a process that
alternates streams byte by byte could make that list huge, so it is capped at ``RING_SEGMENTS`` and the
oldest segments are dropped with their bytes.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap

__all__ = ["RING_BYTES", "RING_SEGMENTS", "Ring"]

RING_BYTES = 8 * 1024 * 1024  # per process, from the spec
RING_SEGMENTS = 64 * 1024  # stream switches kept; ~64 bytes each, so at most ~4 MiB of bookkeeping
INITIAL_BYTES = 64 * 1024  # first mapping: one pipe's worth


def _mapping(size: int) -> mmap.mmap:
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # not Linux (or refused): still correct, forks slower
        buf.madvise(mmap.MADV_DONTFORK)
    return buf


class Ring:
    __slots__ = (
        "_buf",
        "_cap",
        "_head",
        "_limit",
        "_max_segments",
        "_seg_starts",
        "_seg_streams",
        "dropped",
        "end",
        "start",
    )

    def __init__(self, limit: int = RING_BYTES, max_segments: int = RING_SEGMENTS) -> None:
        self._limit = limit
        self._max_segments = max(1, max_segments)
        self._buf: mmap.mmap | None = None
        self._cap = 0
        self._seg_starts: list[int] = []  # absolute offset where each run of one stream starts
        self._seg_streams: list[str] = []
        self._head = 0  # index of the oldest segment still (partly) kept
        self.start = 0  # absolute offset of the oldest kept byte
        self.end = 0  # absolute offset just past the newest byte
        self.dropped = 0  # bytes no longer kept (== start, unless cleared)

    @property
    def size(self) -> int:
        return self.end - self.start

    def append(self, stream: str, data: bytes) -> None:
        n = len(data)
        if not n:
            return
        if self.size + n > self._cap and self._cap < self._limit:
            self._grow(self.size + n)
        if self._head >= len(self._seg_starts) or self._seg_streams[-1] != stream:
            self._seg_starts.append(self.end)
            self._seg_streams.append(stream)
        new_end = self.end + n
        if new_end - self.start > self._cap:
            self._drop_to(new_end - self._cap)
        view = memoryview(data)[-self._cap :]
        buf = self._buf
        assert buf is not None
        pos = new_end - len(view)
        i = 0
        while i < len(view):
            off = pos % self._cap
            k = min(len(view) - i, self._cap - off)
            buf[off : off + k] = view[i : i + k]
            i += k
            pos += k
        self.end = new_end
        while len(self._seg_starts) - self._head > self._max_segments:
            self._drop_to(self._seg_starts[self._head + 1])

    def _grow(self, need: int) -> None:
        cap = max(self._cap, INITIAL_BYTES)
        while cap < need and cap < self._limit:
            cap *= 2
        cap = min(cap, self._limit)
        new = _mapping(cap)
        old, old_cap = self._buf, self._cap
        pos = self.start
        while old is not None and pos < self.end:
            src, dst = pos % old_cap, pos % cap
            k = min(self.end - pos, old_cap - src, cap - dst)
            new[dst : dst + k] = old[src : src + k]
            pos += k
        self._buf, self._cap = new, cap
        if old is not None:
            old.close()

    def _drop_to(self, start: int) -> None:
        if start <= self.start:
            return
        self.dropped += start - self.start
        self.start = start
        starts = self._seg_starts
        while self._head + 1 < len(starts) and starts[self._head + 1] <= start:
            self._head += 1
        if self._head >= 1024 and self._head * 2 >= len(starts):
            del starts[: self._head], self._seg_streams[: self._head]
            self._head = 0

    def clear(self) -> None:
        """Drop everything kept (counted in ``dropped``) and release the memory."""
        self._drop_to(self.end)
        self._seg_starts.clear()
        self._seg_streams.clear()
        self._head = 0
        if self._buf is not None:
            self._buf.close()
        self._buf, self._cap = None, 0

    def read(self, pos: int, limit: int, stop: int) -> tuple[str, bytes]:
        """Up to ``limit`` bytes of one stream from ``pos``, where ``start <= pos < min(stop, end)``."""
        assert self.start <= pos < min(stop, self.end) and self._buf is not None
        i = bisect.bisect_right(self._seg_starts, pos, self._head) - 1
        seg_end = self._seg_starts[i + 1] if i + 1 < len(self._seg_starts) else self.end
        off = pos % self._cap
        n = min(limit, seg_end - pos, stop - pos, self._cap - off)
        return self._seg_streams[i], self._buf[off : off + n]
