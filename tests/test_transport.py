"""transport/stream.py: one send per turn, backlog on a full kernel, discard keeps the stream whole."""

import pytest

from muxserver import protocol as P
from muxserver.framing import FrameDecoder
from muxserver.loop import EVENT_WRITE
from muxserver.testing import MemoryTransport

FRAMES = [P.encode(P.Event(0, "n", "room", "e", b"x" * k)) for k in (0, 1, 7, 30, 2)]
CHUNK = b"".join(FRAMES)


def test_flush_sends_everything_when_the_kernel_has_room():
    t = MemoryTransport(capacity=1 << 16)
    t.out.extend(FRAMES)
    assert t.flush(None) == 0
    assert bytes(t.sock.sent) == CHUNK
    assert t.interest == 0 and not t.out


@pytest.mark.parametrize("cut", range(len(CHUNK) + 1))
def test_discard_unsent_at_every_offset_keeps_the_stream_whole(cut):
    """Whatever the kernel took, the peer sees whole frames and nothing after the cut frame."""
    t = MemoryTransport(capacity=cut)
    t.out.extend(FRAMES)
    left = t.flush(None)
    assert left == len(CHUNK) - cut
    assert (t.interest & EVENT_WRITE) == (EVENT_WRITE if left else 0)
    t.out.append(P.encode(P.Event(0, "n", "room", "late", b"")))  # queued behind the backlog
    t.flush(None)
    dropped = t.discard_unsent()
    # Drain the kernel, let the transport finish the partly-sent frame.
    t.sock.capacity = 1 << 20
    t.on_writable(None)
    received = bytes(t.sock.sent)
    decoder = FrameDecoder()
    frames = decoder.feed(received)
    # The peer got every frame the cut touched, whole, and nothing after it.
    boundary, whole = 0, []
    for f in FRAMES:
        if boundary >= cut:
            break
        boundary += len(f)
        whole.append(f)
    assert received == CHUNK[:boundary]
    assert decoder.buffered == 0  # no partial frame was left in the stream
    assert [P.encode_frame(ft, b) for ft, b in frames] == whole
    assert dropped == len(CHUNK) - boundary + len(P.encode(P.Event(0, "n", "room", "late", b"")))
    assert t.wbytes == 0 and t.chunks is None


def test_backlog_is_sent_in_order_as_the_kernel_drains():
    t = MemoryTransport(capacity=10)
    t.out.extend(FRAMES)
    t.flush(None)
    t.out.append(b"\x00\x00\x00\x01\x87")
    t.flush(None)  # behind the backlog, not sent yet
    got = bytearray(t.sock.sent)
    while t.chunks:
        t.sock.sent.clear()
        t.on_writable(None)
        got += t.sock.sent
    assert bytes(got) == CHUNK + b"\x00\x00\x00\x01\x87"
    assert t.interest & EVENT_WRITE == 0


def test_pending_bytes_counts_backlog_and_queue():
    t = MemoryTransport(capacity=5)
    t.out.extend(FRAMES)
    t.flush(None)
    t.out.append(b"abc")
    assert t.pending_bytes == len(CHUNK) - 5 + 3


def test_idle_transports_share_one_decoder_and_take_their_own_mid_frame():
    a, b = MemoryTransport(), MemoryTransport()
    assert a.decoder is b.decoder  # nothing held: shared
    frame = P.encode(P.Event(0, "n", "room", "e", b"x" * 100))
    assert a.receive(frame[:10]) == [] and a.decoder.buffered == 10
    assert a.held == a.decoder.allocated > 10  # the memory held: the buffer's capacity
    assert a.decoder is not b.decoder and b.decoder.buffered == 0
    assert b.receive(frame) == [(P.EVENT, frame[5:])]  # b is not disturbed by a's partial
    assert a.receive(frame[10:] + frame) == [(P.EVENT, frame[5:])] * 2
    assert a.decoder is b.decoder and a.held == 0
    a.receive(frame[:10])
    a.discard_input()
    assert a.decoder is b.decoder and a.held == 0
