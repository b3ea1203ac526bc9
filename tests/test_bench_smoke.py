"""Smoke test of the benchmark's load generator: can its counting be trusted?

``make bench`` compares muxserver with other servers using figures that the
load generator (bench/loadgen.py) derives from byte counts, not from parsed
frames. This test drives a real server process for about a second with acks
on and checks those counts against what the server itself acknowledged: the
sum of the recipient counts in the EMIT REPLYs must equal the deliveries the
receivers counted, and every receiver must hold exactly whole deliveries.
Standard library and project only: no pytest-benchmark, no uvloop.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ is a tool at the top of the repository, not an installed package.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from bench.loadgen import TS, LoadGen, MuxAdapter, Phase, Workload, _Sampler  # noqa: E402
from bench.wsload import WsCounter, WsMuxAdapter  # noqa: E402

RECEIVERS = 10


@pytest.mark.parametrize("adapter_class", [MuxAdapter, WsMuxAdapter])  # raw TCP, WebSocket
def test_counted_deliveries_equal_what_the_server_acknowledged(server, adapter_class):
    wl = Workload("smoke", f"1 -> {RECEIVERS}", 1, RECEIVERS, window=512, batch=32)
    adapter = adapter_class(wl, ack=True)
    gen = LoadGen(adapter, server.address, wl, timeout=10)
    try:
        gen.setup()
        phase = gen.run(0.8)
        sampled = gen.run(0.2, rate=2000, sample=True)
        assert gen.drain(10), "receivers did not get every published message"
        assert gen.pump(lambda: adapter.acks >= gen.published, 10), "missing EMIT replies"
    finally:
        gen.close()
    assert phase.published > 0 and phase.deliveries > 0
    assert adapter.acks == gen.published
    # The server's own account of how many EVENTs it queued...
    assert adapter.acked == gen.published * RECEIVERS
    # ...is what the receivers counted from bytes alone.
    assert gen.delivered == adapter.acked
    assert all(n == gen.published * adapter.frame_size for n in gen.rx)
    # Latency samples are read at the right offsets: plausible, positive times.
    assert sampled.latencies_ns, "no latency samples"
    assert all(0 < ns < 5e9 for ns in sampled.latencies_ns)


def test_sampler_reads_timestamps_across_split_reads():
    frame_size, offset = 20, 8
    frames = b"".join(b"h" * offset + TS.pack(t) + b"tail" for t in (100, 200, 300))
    stream = b"zz" + frames  # sampling starts 2 bytes before a frame boundary
    sampler = _Sampler(frame_size, offset, stream_pos=frame_size - 2)
    out: list[int] = []
    for cut in (1, 7, 30, len(stream)):  # uneven reads, frames split across them
        chunk, stream = stream[:cut], stream[cut:]
        sampler.feed(bytearray(chunk.ljust(64, b"\0")), len(chunk), 150, out, 1000)
    # "now" (1000) minus each send time; the frame sent at 100 predates the
    # phase (since_ns=150) and is not counted.
    assert out == [800, 700]


def test_percentiles_are_nearest_rank():
    phase = Phase(1.0, 0, 0, 0.0, latencies_ns=[i * 1000 for i in range(1, 101)])
    assert phase.percentile(50) == 50.0
    assert phase.percentile(99) == 99.0
    assert Phase(1.0, 0, 0, 0.0).percentile(99) is None


def test_ws_counter_counts_payload_across_split_headers():
    payloads = [b"a" * 5, b"b" * 300, b"c" * 70_000]
    heads = [bytes((0x82, 5)), bytes((0x82, 126)) + (300).to_bytes(2, "big")]
    heads.append(bytes((0x82, 127)) + (70_000).to_bytes(8, "big"))
    stream = b"".join(h + p for h, p in zip(heads, payloads, strict=True))
    for cut in (1, 2, 3, 9, 4096):
        counter, total, out = WsCounter(), 0, b""
        for start in range(0, len(stream), cut):
            chunk = stream[start : start + cut]
            buf = bytearray(chunk) + bytearray(16)
            n = counter.feed(buf, len(chunk), compact=True)
            total += n
            out += bytes(buf[:n])
        assert total == sum(map(len, payloads)) and out == b"".join(payloads), cut
