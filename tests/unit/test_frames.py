"""The frame codec: round trips, limits, every split of a stream, and fuzzing (only ProtocolError escapes)."""

from __future__ import annotations

import contextlib
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.protocol.frames import MAX_HEADER, MAX_PAYLOAD, Decoder, Frame, ProtocolError, encode


def test_encode_layout() -> None:
    assert encode({"id": "a1", "ev": "stdout"}, b"hello") == b'{"id":"a1","ev":"stdout","size":5}\nhello'
    assert encode({"id": "a1", "ev": "ok"}) == b'{"id":"a1","ev":"ok"}\n'


def test_encode_overrides_a_wrong_size() -> None:
    assert encode({"size": 99}, b"ab") == b'{"size":2}\nab'
    assert encode({"size": 99}) == b"{}\n"


def test_encode_keeps_unicode_readable() -> None:
    assert encode({"path": "/tmp/é"}) == '{"path":"/tmp/é"}\n'.encode()


def test_decode_one_frame_and_size_default() -> None:
    assert Decoder().feed(b'{"ev":"ok"}\n') == [Frame({"ev": "ok"})]
    assert Decoder().feed(b'{"ev":"x","size":3}\nabc') == [Frame({"ev": "x", "size": 3}, b"abc")]


def test_decoder_buffered_tracks_partial_frames() -> None:
    d = Decoder()
    assert d.buffered == 0
    assert d.feed(b'{"size":4}\nab') == []
    assert d.buffered > 0
    assert d.feed(b"cd") == [Frame({"size": 4}, b"abcd")]
    assert d.buffered == 0


def test_frame_is_immutable_and_compared_by_value() -> None:
    frame = Frame({"a": 1}, b"x")
    assert frame == Frame({"a": 1}, b"x") and frame != Frame({"a": 1}, b"y")
    assert frame.get("a") == 1 and frame.get("b", 2) == 2
    with pytest.raises(AttributeError):
        frame.payload = b"z"  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(frame)


def test_encode_limits() -> None:
    with pytest.raises(ProtocolError):
        encode({"x": "a" * MAX_HEADER})
    with pytest.raises(ProtocolError):
        encode({}, b"x" * (MAX_PAYLOAD + 1))
    assert len(encode({}, b"x" * MAX_PAYLOAD)) > MAX_PAYLOAD


@pytest.mark.parametrize(
    "data",
    [
        b"not json\n",
        b"[1,2]\n",
        b'"string"\n',
        b"\xff\xfe\n",
        b'{"size":-1}\n',
        b'{"size":"3"}\n',
        b'{"size":true}\n',
        b'{"size":1.5}\n',
        b'{"size":%d}\n' % (MAX_PAYLOAD + 1),
        b"[" * 60000 + b"\n",  # nesting deep enough to exhaust the JSON parser's recursion
        b"{" + b" " * (MAX_HEADER + 1),  # no newline within the limit
        b'{"a":"' + b"x" * (MAX_HEADER + 10) + b'"}\n',  # newline present but past the limit
    ],
)
def test_invalid_streams_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        Decoder().feed(data)


def test_header_of_exactly_the_limit_is_accepted() -> None:
    header = {"pad": ""}
    header["pad"] = "x" * (MAX_HEADER - len(json.dumps(header, separators=(",", ":"))))
    line = encode(header)
    assert len(line) == MAX_HEADER + 1
    assert Decoder().feed(line) == [Frame(header)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
headers = st.dictionaries(st.text(max_size=10).filter(lambda k: k != "size"), json_values, max_size=5)
frames = st.lists(st.tuples(headers, st.binary(max_size=300)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(frames=frames, cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_any_split_of_a_stream_decodes_to_the_same_frames(
    frames: list[tuple[dict[str, object], bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode(h, p) for h, p in frames)
    expected = [Frame({**h, "size": len(p)} if p else h, p) for h, p in frames]
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = Decoder()
    got: list[Frame] = []
    for start, end in itertools.pairwise(points):
        got += decoder.feed(stream[start:end])
    assert got == expected
    assert decoder.buffered == 0


@settings(max_examples=100, deadline=None)
@given(frames=frames)
def test_byte_at_a_time(frames: list[tuple[dict[str, object], bytes]]) -> None:
    stream = b"".join(encode(h, p) for h, p in frames)
    decoder = Decoder()
    got: list[Frame] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert [f.payload for f in got] == [p for _, p in frames]


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=200), max_size=10))
def test_random_bytes_raise_only_protocol_error(chunks: list[bytes]) -> None:
    decoder = Decoder()
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert isinstance(frame.header, dict)
                assert len(frame.payload) == frame.header.get("size", 0)
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    prefix=frames,
    garbage=st.binary(min_size=1, max_size=100).map(lambda b: b"\n" + b),
    junk_first=st.booleans(),
)
def test_garbage_after_valid_frames(
    prefix: list[tuple[dict[str, object], bytes]], garbage: bytes, junk_first: bool
) -> None:
    stream = b"".join(encode(h, p) for h, p in prefix)
    decoder = Decoder()
    assert len(decoder.feed(stream)) == len(prefix)
    with contextlib.suppress(ProtocolError):
        decoder.feed(garbage if not junk_first else b"{" + garbage)


@settings(max_examples=200, deadline=None)
@given(frames=frames.filter(bool), data=st.data())
def test_mutated_streams_raise_only_protocol_error(
    frames: list[tuple[dict[str, object], bytes]], data: st.DataObject
) -> None:
    """Valid streams with bytes flipped, inserted or removed: near-misses reach deeper into the decoder."""
    stream = bytearray(b"".join(encode(h, p) for h, p in frames))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        at = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            stream[at] = data.draw(st.integers(min_value=0, max_value=255))
        elif action == "insert":
            stream[at:at] = data.draw(
                st.sampled_from([b"\n", b"{", b'"size":', b"9999999999", b"-", b"\xff"])
            )
        elif len(stream) > 1:
            del stream[at]
    decoder = Decoder()
    with contextlib.suppress(ProtocolError):
        for frame in decoder.feed(bytes(stream)):
            assert isinstance(frame.header, dict)
            size = frame.header.get("size", 0)
            assert isinstance(size, int) and len(frame.payload) == size
