"""Micro benchmarks of the codec and the hub: frames/s without sockets.

These files are named ``bench_*.py`` so that ``make test`` (which collects
``test_*.py``) never runs them and never needs pytest-benchmark; ``make
bench`` collects them with ``-o python_files=bench_*.py``. Each benchmark
stores its throughput in ``extra_info`` so the JSON (``--benchmark-json``)
carries frames/s, and ``--benchmark-compare`` compares timings between
commits.
"""

from __future__ import annotations

import pytest

from muxserver import protocol as P
from muxserver.framing import FrameDecoder, encode_frame
from muxserver.hub import Hub, Member

PAYLOAD = b"x" * 64


def _frames_of_size(total: int, count: int) -> bytes:
    """``count`` EMIT frames of exactly ``total`` bytes each, back to back."""
    head = P.encode(P.Emit(0, P.TARGET_ROOM, "room", "ev", b""))
    frame = P.encode(P.Emit(0, P.TARGET_ROOM, "room", "ev", b"p" * (total - len(head))))
    assert len(frame) == total
    return frame * count


def _rate(benchmark, items: int, unit: str = "frames_per_s") -> None:
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info[unit] = round(items / benchmark.stats.stats.mean)


@pytest.mark.parametrize(
    ("size", "count"), [(64, 4096), (4096, 64)], ids=["64B", "4KiB"]
)  # fmt: skip
def test_decode_whole_reads(benchmark, size, count):
    """One read holds many whole frames: the common case on a busy connection."""
    data = _frames_of_size(size, count)
    frames = benchmark(lambda: FrameDecoder().feed(data))
    assert len(frames) == count
    _rate(benchmark, count)


@pytest.mark.parametrize(("size", "count"), [(64, 4096), (4096, 64)], ids=["64B", "4KiB"])
def test_decode_split_reads(benchmark, size, count):
    """The same bytes in 1,448-byte reads (a TCP segment): partial frames carried over."""
    data = _frames_of_size(size, count)
    chunks = [data[i : i + 1448] for i in range(0, len(data), 1448)]

    def run():
        decoder = FrameDecoder()
        n = 0
        for chunk in chunks:
            n += len(decoder.feed(chunk))
        return n

    assert benchmark(run) == count
    _rate(benchmark, count)


def test_encode_emit_tuple(benchmark):
    """What a client does per message: an Emit tuple to frame bytes."""
    msg = P.Emit(7, P.TARGET_ROOM, "room", "ev", PAYLOAD)
    benchmark(P.encode, msg)
    _rate(benchmark, 1)


def test_encode_event_forwarded(benchmark):
    """What the server does per room message: EMIT tail behind the sender's prefix."""
    body = P.encode(P.Emit(0, P.TARGET_ROOM, "room", "ev", PAYLOAD))[5:]
    prefix = P.event_prefix(P.TARGET_ROOM, b"alice")
    tail = body[6:]
    frame = benchmark(P.event_frame, prefix, tail)
    assert P.decode(frame[4], frame[5:]) == P.Event(0, "alice", "room", "ev", PAYLOAD)
    _rate(benchmark, 1)


def test_encode_frame_raw(benchmark):
    benchmark(encode_frame, P.EVENT, PAYLOAD)
    _rate(benchmark, 1)


@pytest.fixture(scope="module")
def room_of_1000():
    hub = Hub()
    members = [Member() for _ in range(1000)]
    for i, m in enumerate(members):
        hub.attach(m, "/", f"m{i}")
        hub.join(m, "big")
    return hub, members


def test_hub_recipients_1000(benchmark, room_of_1000):
    """Who gets a room message: every member but the sender, for 1,000 members."""
    hub, members = room_of_1000
    sender = members[0]

    def recipients():
        return [m for m in hub.room_of(sender, "big").members if m is not sender]

    assert len(benchmark(recipients)) == 999
    _rate(benchmark, 999, "recipients_per_s")


def test_hub_fanout_append_1000(benchmark, room_of_1000):
    """The server's per-recipient work for 1,000 members: one list append each."""
    hub, members = room_of_1000
    outs = {m: [] for m in members}
    frame = b"f" * 88
    room = hub.room_of(members[0], "big")

    def fanout():
        for m in room.members:
            outs[m].append(frame)

    def clear():  # outside the timing: queues start empty every round
        for o in outs.values():
            o.clear()

    benchmark.pedantic(fanout, setup=clear, rounds=2000, warmup_rounds=50)
    _rate(benchmark, 1000, "deliveries_per_s")
