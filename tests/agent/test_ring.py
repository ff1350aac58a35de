"""The output ring against a trivially correct model: same bytes, same streams, same drop accounting."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.agent.ring import Ring


class Model:
    def __init__(self, limit: int, max_segments: int) -> None:
        self.limit = limit
        self.max_segments = max_segments
        self.data = bytearray()  # every byte ever written
        self.streams: list[str] = []  # stream of every byte
        self.start = 0

    def append(self, stream: str, data: bytes) -> None:
        self.data += data
        self.streams += [stream] * len(data)
        self.start = max(self.start, len(self.data) - self.limit)
        while self._segments() > self.max_segments:
            first = self.streams[self.start]
            while self.streams[self.start] == first:
                self.start += 1

    def _segments(self) -> int:
        kept = self.streams[self.start :]
        return sum(1 for i, s in enumerate(kept) if i == 0 or kept[i - 1] != s)


def _read_all(ring: Ring, pos: int, limit: int) -> list[tuple[str, bytes]]:
    out = []
    while pos < ring.end:
        stream, data = ring.read(pos, limit, ring.end)
        assert data
        out.append((stream, data))
        pos += len(data)
    return out


ops = st.lists(
    st.tuples(st.sampled_from(["stdout", "stderr"]), st.binary(min_size=1, max_size=300)), max_size=40
)


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    limit=st.integers(min_value=1, max_value=700),
    max_segments=st.integers(min_value=1, max_value=6),
    read_limit=st.integers(min_value=1, max_value=200),
)
def test_ring_matches_model(
    ops: list[tuple[str, bytes]], limit: int, max_segments: int, read_limit: int
) -> None:
    ring = Ring(limit=limit, max_segments=max_segments)
    model = Model(limit, max_segments)
    for stream, data in ops:
        ring.append(stream, data)
        model.append(stream, data)
        assert (ring.start, ring.end, ring.dropped) == (model.start, len(model.data), model.start)
        assert ring.size <= limit
        pieces = _read_all(ring, ring.start, read_limit)
        assert b"".join(d for _, d in pieces) == bytes(model.data[model.start :])
        assert [s for s, d in pieces for _ in d] == model.streams[model.start :]
        assert all(len(d) <= read_limit for _, d in pieces)


def test_grows_to_the_limit_and_wraps() -> None:
    ring = Ring()
    payload = os.urandom(20 * 1024 * 1024)
    for i in range(0, len(payload), 65536):
        ring.append("stdout", payload[i : i + 65536])
    assert ring.size == 8 * 1024 * 1024 and ring.dropped == 12 * 1024 * 1024
    got = b"".join(d for _, d in _read_all(ring, ring.start, 128 * 1024))
    assert got == payload[-8 * 1024 * 1024 :]


def test_clear_releases_and_keeps_counting() -> None:
    ring = Ring(limit=100)
    ring.append("stdout", b"x" * 60)
    ring.clear()
    assert (ring.size, ring.dropped, ring.start, ring.end) == (0, 60, 60, 60)
    ring.append("stderr", b"yz")
    assert _read_all(ring, ring.start, 10) == [("stderr", b"yz")]


def test_stop_bounds_a_read() -> None:
    ring = Ring()
    ring.append("stdout", b"abcdef")
    assert ring.read(1, 100, 3) == ("stdout", b"bc")
