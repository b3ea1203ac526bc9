"""Sequenced rooms in the asyncio client (muxserver.aio) against real server processes.

The blocking client's cases (tests/test_client_seq.py) where the asyncio
client differs in how it gets there: its reader task reconnects and re-joins
in the background, possibly while a handler is still busy with a message,
which must then come again after the re-join and still be handled once.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from muxserver.aio import AsyncClient
from muxserver.client import Backoff, Event, Recovery

FAST = Backoff(initial=0.05, maximum=0.2, jitter=0)


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def connect(srv, nick, **kw) -> AsyncClient:
    kw.setdefault("reconnect", False)
    return await AsyncClient.connect(srv.host, srv.port, nick=nick, **kw)


async def poll_until(client: AsyncClient, cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await client.poll(0.05)


def cut(client: AsyncClient) -> None:
    """The network drops the connection under the client."""
    client._writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)


async def emit_all(sender: AsyncClient, room: str, texts) -> None:
    for text in texts:
        await sender.emit("chat", text, room=room, ack=True)


def test_positions_move_after_async_handlers_and_not_when_they_raise(server):
    async def main():
        alice, bob = await connect(server, "alice"), await connect(server, "bob")
        epoch = (await alice.join("games")).epoch
        await bob.join("games")
        during = []

        async def handler(event: Event) -> None:
            await asyncio.sleep(0)
            during.append((event.seq, alice.positions["games"]))
            if event.text == "boom":
                raise RuntimeError("handler failed")

        alice.on("chat", handler)
        await emit_all(bob, "games", ["one"])
        await poll_until(alice, lambda: during)
        assert during == [(1, (epoch, 0))] and alice.positions == {"games": (epoch, 1)}
        await emit_all(bob, "games", ["boom"])
        with pytest.raises(RuntimeError):
            await poll_until(alice, lambda: len(during) >= 2)
        assert alice.positions == {"games": (epoch, 1)}
        await bob.close()
        await alice.close()

    run(main())


def test_reconnect_replays_what_was_missed_exactly_once(server):
    async def main():
        alice = await connect(server, "alice", reconnect=True, backoff=FAST)
        bob = await connect(server, "bob")
        await alice.join("games")
        await bob.join("games")
        await emit_all(bob, "games", ["before"])
        first = await alice.recv(5)
        assert (first.seq, first.replayed) == (1, False)
        cut(alice)
        await emit_all(bob, "games", [f"missed {i}" for i in range(5)])
        rec = await alice.recv(10)  # recv hands out a reconnect's Recovery
        assert rec == Recovery("games", "complete", rec.epoch, 2, 6, None, 5)
        got = [await alice.recv(5) for _ in range(5)]
        assert [(e.text, e.seq, e.replayed) for e in got] == [
            (f"missed {i}", 2 + i, True) for i in range(5)
        ]
        assert await alice.recv(0.3) is None
        assert alice.positions == {"games": (rec.epoch, 6)}
        await bob.close()
        await alice.close()

    run(main())


def test_a_message_still_in_its_handler_at_the_reconnect_is_handled_once(server):
    async def main():
        alice = await connect(server, "alice", reconnect=True, backoff=FAST)
        bob = await connect(server, "bob")
        await alice.join("games")
        await bob.join("games")
        release, busy, back = asyncio.Event(), asyncio.Event(), asyncio.Event()
        handled, recoveries = [], []

        async def slow(event: Event) -> None:
            if event.seq == 1:
                busy.set()
                await release.wait()
            handled.append(event.seq)

        alice.on("chat", slow)
        alice.on("recovery", recoveries.append)
        alice.on_reconnect(back.set)
        runner = asyncio.create_task(alice.run_forever())
        await emit_all(bob, "games", ["one"])
        await asyncio.wait_for(busy.wait(), 5)
        cut(alice)  # the re-join asks from position 0: message 1 comes again
        await asyncio.wait_for(back.wait(), 10)
        await emit_all(bob, "games", ["two"])
        release.set()
        deadline = time.monotonic() + 10
        while len(handled) < 2 or len(recoveries) < 2:
            assert time.monotonic() < deadline, (handled, recoveries)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert handled == [1, 2]
        assert [(r.outcome, r.first, r.replayed) for r in recoveries] == [
            ("fresh", 1, 0),
            ("complete", 1, 1),
        ]
        await alice.close()
        await runner
        await bob.close()

    run(main())


def test_gap_history_and_plain_rooms(server_factory):
    srv = server_factory("--history-size", "3")

    async def main():
        alice = await connect(srv, "alice", reconnect=True, backoff=FAST)
        bob = await connect(srv, "bob", sequenced=False)
        await bob.join("games")
        await emit_all(bob, "games", ["1", "2", "3", "4"])
        rec = await alice.join("games", history=2)
        assert (rec.outcome, rec.first, rec.last, rec.replayed) == ("fresh", 3, 4, 2)
        got = [await alice.recv(5) for _ in range(2)]
        assert [(e.seq, e.replayed) for e in got] == [(3, True), (4, True)]
        cut(alice)
        await emit_all(bob, "games", [str(i) for i in range(5, 12)])
        gap = await alice.recv(10)
        assert (gap.outcome, gap.missing, gap.first, gap.last) == ("gap", (5, 8), 9, 11)
        assert [(await alice.recv(5)).seq for _ in range(3)] == [9, 10, 11]
        # bob joined plain (AsyncClient(sequenced=False)): no seq, no positions.
        assert await bob.join("plain") is None
        await alice.join("plain", sequenced=False)
        await alice.emit("chat", "hi", room="plain", ack=True)
        ev = await bob.recv(5)
        assert (ev.text, ev.seq, ev.replayed) == ("hi", None, False)
        assert bob.positions == {} and list(alice.positions) == ["games"]
        await bob.close()
        await alice.close()

    run(main())


def test_version_1_never_joins_sequenced(server):
    async def main():
        alice, bob = await connect(server, "alice", version=1), await connect(server, "bob")
        assert await alice.join("games") is None
        with pytest.raises(ValueError, match="version-2 session"):
            await alice.join("games", sequenced=True)
        await bob.join("games")
        await bob.emit("chat", b"x", room="games", ack=True)
        ev = await alice.recv(5)
        assert (ev.payload, ev.seq) == (b"x", None) and alice.positions == {}
        await bob.close()
        await alice.close()

    run(main())
