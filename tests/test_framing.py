"""framing: whole input, one byte at a time, trailing bytes, the size cap, fuzz."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxserver.framing import FrameDecoder, FrameError, encode_frame

FRAMES = [(0x05, b"hello"), (0x01, b""), (0x83, bytes(range(256)) * 3), (0x0A, b"")]
STREAM = b"".join(encode_frame(t, b) for t, b in FRAMES)


def test_encode_layout():
    assert encode_frame(0x06, b"\x01\x02") == b"\x00\x00\x00\x03\x06\x01\x02"


def test_whole_stream():
    assert FrameDecoder().feed(STREAM) == FRAMES


def test_one_byte_at_a_time():
    dec = FrameDecoder()
    out = []
    for i in range(len(STREAM)):
        out += dec.feed(STREAM[i : i + 1])
    assert out == FRAMES
    assert dec.buffered == 0


def test_trailing_bytes_of_next_frame_are_kept():
    dec = FrameDecoder()
    nxt = encode_frame(0x07, b"12345678")
    assert dec.feed(STREAM + nxt[:3]) == FRAMES
    assert dec.buffered == 3
    assert dec.feed(nxt[3:]) == [(0x07, b"12345678")]


def test_memoryview_input_is_copied_out():
    buf = bytearray(STREAM)
    frames = FrameDecoder().feed(memoryview(buf))
    buf[:] = bytes(len(buf))  # the caller reuses its buffer
    assert frames == FRAMES


def test_too_large_rejected_from_length_bytes_alone():
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(FrameError) as err:
        dec.feed(b"\x00\x00\x00\x65")  # 101: only the prefix, no body sent
    assert err.value.code == 6


def test_too_large_after_good_frames_keeps_them():
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(FrameError) as err:
        dec.feed(encode_frame(5, b"ok") + b"\xff\xff\xff\xff")
    assert err.value.code == 6
    assert err.value.frames == [(5, b"ok")]


def test_exactly_max_frame_is_fine():
    dec = FrameDecoder(max_frame=100)
    assert dec.feed(encode_frame(5, b"x" * 99)) == [(5, b"x" * 99)]


def test_zero_length_is_bad_frame():
    with pytest.raises(FrameError) as err:
        FrameDecoder().feed(b"\x00\x00\x00\x00")
    assert err.value.code == 1


def test_partial_header_waits():
    dec = FrameDecoder()
    assert dec.feed(b"\x00\x00") == []
    assert dec.buffered == 2


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_any_bytes_decode_or_raise_frame_error(data, step):
    dec = FrameDecoder(max_frame=64)
    try:
        for i in range(0, len(data), step):
            for ftype, body in dec.feed(data[i : i + step]):
                assert isinstance(ftype, int) and isinstance(body, bytes)
    except FrameError as exc:
        assert exc.code in (1, 6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=200)), max_size=10), st.data())
def test_round_trip_any_split(frames, data):
    stream = b"".join(encode_frame(t, b) for t, b in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    dec = FrameDecoder()
    out, prev = [], 0
    for cut in [*cuts, len(stream)]:
        out += dec.feed(stream[prev:cut])
        prev = cut
    assert out == frames


def test_large_frame_in_many_reads_then_the_next_frame():
    body = bytes(range(256)) * 4096  # 1 MiB
    stream = encode_frame(0x05, body) + encode_frame(0x06, b"next")
    dec = FrameDecoder(max_frame=2 << 20)
    view = memoryview(bytearray(stream))
    out = []
    for i in range(0, len(stream), 65536):
        out += dec.feed(view[i : i + 65536])
        if not out:
            assert dec.buffered == min(i + 65536, len(stream))
    assert out == [(0x05, body), (0x06, b"next")]
    assert dec.buffered == 0


def test_prefix_split_over_reads_then_too_large():
    dec = FrameDecoder(max_frame=100)
    assert dec.feed(b"\x00") == []
    with pytest.raises(FrameError) as err:
        dec.feed(b"\x00\x00\x65rest")
    assert err.value.code == 6


def test_clear_forgets_the_partial_frame():
    dec = FrameDecoder()
    assert dec.feed(encode_frame(5, b"abcdef")[:6]) == []
    assert dec.buffered == 6
    dec.clear()
    assert dec.buffered == 0
    assert dec.feed(encode_frame(5, b"x")) == [(5, b"x")]
