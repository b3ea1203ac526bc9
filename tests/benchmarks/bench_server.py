"""Micro benchmark of the server's hot path, EMIT -> queued frames, without a network.

A real ``Server`` with real ``Connection`` objects over ``socket.socketpair()``:
members say HELLO and JOIN through the normal read path, then each round
hands the sender's EMITs to the server and stops the clock before the
flush, so what is timed is parsing, the room lookup and the per-recipient
appends. A separate benchmark times ``flush`` (one send per connection) on
its own. Queues are emptied between rounds, outside the timing.

Named ``bench_*.py``: run by ``make bench``, never by ``make test``.
"""

from __future__ import annotations

import socket

import pytest

from muxserver import protocol as P
from muxserver.loop import EventLoop
from muxserver.server import Config, Server

BATCH = 64  # EMITs per round, about one read's worth from a busy publisher


# A room of 2 is the 1 -> 1 workload (the sender is a member), 101 is 1 -> 100.
@pytest.fixture(scope="module", params=[2, 101], ids=["1to1", "1to100"])
def room(request):
    """A server with that many connections in one room; yields (server, conns, peers)."""
    server = Server(Config(), EventLoop())
    conns, peers = [], []
    for i in range(request.param):
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        conn = server.adopt(ours)
        theirs.sendall(P.encode(P.Hello(1, "/", f"m{i:04d}", "")) + P.encode(P.Join(1, "r")))
        server._on_readable(conn)
        assert conn.state == 1 and "r" in conn.rooms, conn  # OPEN and in the room
        conns.append(conn)
        peers.append(theirs)
    _reset(server, conns, peers)
    yield server, conns, peers
    server.close()
    server.loop.close()
    for p in peers:
        p.close()


def _reset(server, conns, peers) -> None:
    for c in conns:
        c.out.clear()
    server.router.pending.clear()
    for p in peers:
        try:
            while p.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def _emit(req: int = 0) -> bytes:
    return P.encode(P.Emit(req, P.TARGET_ROOM, "r", "ev", b"x" * 64))


def _rate(benchmark, unit: str, items: int) -> None:
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info[unit] = round(items / benchmark.stats.stats.mean)


def _queued(server, conns) -> int:
    """Bytes queued to a receiver; must be BATCH EVENTs however they are chunked."""
    event = P.event_frame(conns[0].prefix_room, _emit()[11:])
    got = sum(map(len, conns[1].out))
    assert got == BATCH * len(event), (got, BATCH * len(event))
    return got


def test_emit_handler_to_queues(benchmark, room):
    """BATCH EMITs straight into the EMIT handler: what one read costs, minus I/O."""
    server, conns, peers = room
    handler, sender, body = server.protocol.handlers[P.EMIT], conns[0], _emit()[5:]

    def emit_batch():
        for _ in range(BATCH):
            handler(sender, body)

    benchmark.pedantic(
        emit_batch, setup=lambda: _reset(server, conns, peers), rounds=300, warmup_rounds=20
    )
    _queued(server, conns)
    assert not sender.out
    _rate(benchmark, "emits_per_s", BATCH)
    _rate(benchmark, "deliveries_per_s", BATCH * (len(conns) - 1))


def test_emit_read_path_to_queues(benchmark, room):
    """The same through ``_on_readable``: recv_into + decode + dispatch + handler."""
    server, conns, peers = room
    sender, data = conns[0], _emit() * BATCH

    def setup():
        _reset(server, conns, peers)
        peers[0].sendall(data)

    benchmark.pedantic(
        server._on_readable, args=(sender,), setup=setup, rounds=300, warmup_rounds=20
    )
    _queued(server, conns)
    _rate(benchmark, "emits_per_s", BATCH)


def test_flush_queued_frames(benchmark, room):
    """``Server.flush``: one join + send per connection holding BATCH frames."""
    server, conns, peers = room
    frame = P.event_frame(conns[0].prefix_room, _emit()[11:])

    def setup():
        _reset(server, conns, peers)
        for c in conns:
            c.out.extend([frame] * BATCH)
        server.router.pending.update(conns)

    benchmark.pedantic(server.flush, setup=setup, rounds=300, warmup_rounds=20)
    assert not server.router.pending and not conns[1].out
    _rate(benchmark, "deliveries_per_s", BATCH * len(conns))
