"""The asyncio client (muxserver.aio) against real server processes.

The core cases of test_client.py: every request and its errors (RATE_LIMITED
included), events and presence through ``recv``/``async for``/handlers,
heartbeats answered by the reader task, ERROR frames, TLS, and reconnect after
a server restart. Each test runs its own event loop under a hard timeout (no
pytest-asyncio needed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import socket
import ssl
import time

import pytest
from conftest import restart_on_same_port
from tlsutil import make_tls_files

from muxserver import protocol as P
from muxserver.aio import AsyncClient
from muxserver.client import (
    Ack,
    Backoff,
    ConnectionClosed,
    Event,
    IdleTimeout,
    InvalidName,
    NickTaken,
    NoSuchTarget,
    NotConnected,
    NotMember,
    Presence,
    RateLimited,
    Recovery,
    RoomInfo,
    ShuttingDown,
    TooLarge,
)

FAST = Backoff(initial=0.05, maximum=0.2)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(server_factory, tls):
    return server_factory(*tls.server_args)


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def connect(srv, nick=None, **kw) -> AsyncClient:
    # These tests are about one connection: reconnecting (the default) only
    # where a test asks for it.
    kw.setdefault("reconnect", False)
    return await AsyncClient.connect(srv.host, srv.port, nick=nick, **kw)


async def recv_type(client: AsyncClient, cls, timeout: float = 10.0):
    item = await client.recv(timeout)
    assert isinstance(item, cls), f"expected {cls.__name__}, got {item!r}"
    return item


def test_connect_and_errors(server):
    async def main():
        a = await connect(server, "alice")
        assert (a.nick, a.max_frame, a.connected) == ("alice", 1048576, True)
        guest = await connect(server)
        assert guest.nick.startswith("guest-")
        with pytest.raises(NickTaken) as info:
            await connect(server, "alice")
        assert isinstance(info.value, ConnectionClosed)
        with pytest.raises(InvalidName):
            await connect(server, "two words")
        await guest.close()
        await a.close()

    run(main())


def test_requests(server):
    async def main():
        async with await connect(server, "alice") as a, await connect(server, "bob") as b:
            await a.join("games", presence=True)
            await b.join("games")
            assert await recv_type(a, Presence) == Presence("join", "games", "bob")
            assert await b.emit("chat", "hi", room="games", ack=True) == 1
            assert await recv_type(a, Event) == Event(
                "chat", b"hi", "bob", "room", "games", P.PAYLOAD_TEXT, seq=1
            )
            assert await a.who("games") == ["alice", "bob"]
            assert await b.rooms() == [RoomInfo("games", 2)]
            assert (await b.rooms(all=True)).total == 1
            await b.set_nick("robert")
            assert b.nick == "robert"
            assert await recv_type(a, Presence) == Presence("nick", "games", "bob", "robert")
            assert await a.emit("psst", b"\x00", nick="robert", ack=True) == 1
            ev = await recv_type(b, Event)
            assert (ev.kind, ev.payload) == ("direct", b"\x00")
            assert await a.emit("all", "x", broadcast=True, ack=True) == 1
            assert (await recv_type(b, Event)).kind == "broadcast"
            await b.leave("games")
            assert await recv_type(a, Presence) == Presence("leave", "games", "robert")
            assert await a.ping() >= 0
            assert await a.recv(0.1) is None

    run(main())


def test_request_errors(server):
    async def main():
        async with await connect(server, "alice") as a, await connect(server, "bob"):
            with pytest.raises(NotMember):
                await a.emit("chat", "x", room="games", ack=True)
            with pytest.raises(NoSuchTarget):
                await a.emit("chat", "x", nick="nobody", ack=True)
            with pytest.raises(NickTaken):
                await a.set_nick("bob")
            with pytest.raises(InvalidName):
                await a.join("bad\x00")
            with pytest.raises(InvalidName):
                await a.leave("x" * 300)
            with pytest.raises(TooLarge):
                await a.emit("chat", b"x" * (a.max_frame + 1), broadcast=True)
            with pytest.raises(ValueError):
                await a.emit("chat", "nowhere")
            # Without ack the error arrives through recv, never silently.
            await a.emit("chat", "x", room="nowhere")
            with pytest.raises(NotMember) as info:
                await a.recv(10)
            assert info.value.req == 0

    run(main())


def test_emit_ack_without_wait(server):
    async def main():
        async with await connect(server, "alice") as a, await connect(server, "bob") as b:
            await a.join("r")
            await b.join("r")
            req = await a.emit("chat", "one", room="r", ack=True, wait=False)
            assert isinstance(req, int) and a.pending_acks == {req}
            ack = await recv_type(a, Ack)
            assert ack == Ack(req, 1) and ack.rtt > 0 and a.pending_acks == frozenset()
            assert (await recv_type(b, Event)).text == "one"
            bad = await a.emit("chat", "x", room="elsewhere", ack=True, wait=False)
            with pytest.raises(NotMember) as info:
                await a.recv(10)
            assert info.value.req == bad
            # Through handlers, as many as are sent at once.
            acks, errors = [], []
            a.on_ack(acks.append)
            a.on_error(errors.append)
            reqs = await asyncio.gather(
                *(a.emit("chat", str(n), room="r", ack=True, wait=False) for n in range(20))
            )
            bad = await a.emit("chat", "x", nick="nobody", ack=True, wait=False)
            while len(acks) < 20 or not errors:
                await a.poll(10)
            assert sorted(ack.req for ack in acks) == sorted(reqs)
            assert isinstance(errors[0], NoSuchTarget) and errors[0].req == bad

    run(main())


def test_concurrent_requests(server):
    async def main():
        async with await connect(server, "alice") as a:
            rooms = [f"room{n}" for n in range(50)]
            await asyncio.gather(*(a.join(r) for r in rooms))
            counts = await asyncio.gather(*(a.emit("e", "x", room=r, ack=True) for r in rooms))
            assert counts == [0] * 50
            assert sorted(r.name for r in await a.rooms()) == sorted(rooms)

    run(main())


def test_async_for_and_handlers(server):
    async def main():
        a, b = await connect(server, "alice"), await connect(server, "bob")
        await a.join("games", presence=True)
        await b.join("games")
        for n in range(3):
            await b.emit("chat", str(n), room="games")
        await b.emit("stop", room="games", ack=True)
        seen = []
        async for item in a:
            seen.append(item)
            if isinstance(item, Event) and item.event == "stop":
                break
        assert [getattr(i, "text", i.kind) for i in seen] == ["join", "0", "1", "2", ""]

        got = []

        @a.on("chat")
        async def on_chat(ev):  # handlers may be coroutines...
            got.append(ev.text)

        a.on("stop", lambda ev: asyncio.ensure_future(a.close()))  # ...or plain functions
        a.on_presence(got.append)
        await b.emit("chat", "x", room="games")
        assert await a.poll(10) >= 1
        await b.leave("games")
        await b.join("games")
        await b.emit("stop", room="games", ack=True)
        await a.run_forever()
        assert got == ["x", Presence("leave", "games", "bob"), Presence("join", "games", "bob")]
        async for _ in a:  # a closed client's iterator ends
            raise AssertionError("closed client yielded")
        with pytest.raises(NotConnected):
            await a.join("r")
        await b.close()

    run(main())


def test_heartbeat_and_idle_timeout(server_factory):
    srv = server_factory("--ping-interval", "0.3", "--ping-timeout", "1")

    async def busy():
        a = await connect(srv, "busy")
        # The reader task answers PINGs while this task does something else.
        await asyncio.sleep(2.5)
        assert await a.ping() >= 0
        await a.close()

    async def blocked():
        a = await connect(srv, "blocked")
        time.sleep(2.5)  # blocks the whole loop, reader task included: no PONG
        with pytest.raises(IdleTimeout) as info:
            while True:
                await a.recv(10)
        assert info.value.code == P.IDLE_TIMEOUT
        await a.close()

    # Two loops in two threads, so the 2.5 s waits overlap.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for job in [pool.submit(run, busy()), pool.submit(run, blocked())]:
            job.result()


def test_server_shutdown_ends_iteration_with_error(server):
    async def main():
        a = await connect(server, "a")
        server.signal(signal.SIGTERM)
        with pytest.raises(ShuttingDown) as info:
            async for _ in a:
                pass
        assert isinstance(info.value, ConnectionClosed)
        with pytest.raises(NotConnected):
            await a.recv()
        with pytest.raises(NotConnected):
            await a.join("r")
        await a.close()

    run(main())
    assert server.wait(15) == 0


def test_reconnect_after_server_restart(server_factory):
    srv = server_factory("--drain-timeout", "1")

    async def main():
        lost, back = asyncio.Event(), asyncio.Event()
        alice = await connect(srv, "alice", reconnect=True, backoff=FAST)
        reasons = []
        alice.on_disconnect(lambda exc: (reasons.append(exc), lost.set()))

        async def on_reconnect():
            back.set()

        alice.on_reconnect(on_reconnect)
        await alice.join("games", presence=True)
        srv.signal(signal.SIGTERM)
        await asyncio.wait_for(lost.wait(), 10)
        assert isinstance(reasons[0], ShuttingDown)
        with pytest.raises(NotConnected):
            await alice.emit("chat", "x", room="games")
        srv2 = await asyncio.to_thread(restart_on_same_port, server_factory, srv)
        await asyncio.wait_for(back.wait(), 15)
        assert alice.connected and alice.nick == "alice"
        # A new server, a new history: the sequenced room's position is void.
        assert (await recv_type(alice, Recovery)).outcome == "reset"
        bob = await connect(srv2, "bob")
        await bob.join("games")
        assert await recv_type(alice, Presence) == Presence("join", "games", "bob")
        await bob.emit("chat", "welcome back", room="games", ack=True)
        assert (await recv_type(alice, Event)).text == "welcome back"
        await bob.close()
        await alice.close()

    run(main())


def test_reconnect_after_cut_connection(server):
    async def main():
        back = asyncio.Event()
        alice = await connect(server, "alice", reconnect=True, backoff=FAST)
        alice.on_reconnect(back.set)
        bob = await connect(server, "bob")
        await alice.join("games")
        await bob.join("games")
        await alice.set_nick("alicia")
        old_id = alice.conn_id
        alice._writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)  # the network cuts us
        await asyncio.wait_for(back.wait(), 15)
        assert alice.conn_id != old_id and alice.nick == "alicia"
        assert (await recv_type(alice, Recovery)).outcome == "complete"  # nothing was missed
        await bob.emit("chat", "still there?", room="games", ack=True)
        assert (await recv_type(alice, Event)).text == "still there?"
        await bob.close()
        await alice.close()

    run(main())


# ============================================================= rate limit
RATE = ("--rate-limit", "0.01", "--rate-burst", "3")  # 3 EMITs, then one per 100 s


def test_rate_limited(server_factory):
    srv = server_factory(*RATE)

    async def main():
        async with await connect(srv, "chatty") as a, await connect(srv, "b") as b:
            await a.join("r")
            await b.join("r")
            for n in range(3):
                assert await a.emit("chat", str(n), room="r", ack=True) == 1
            with pytest.raises(RateLimited) as info:  # with ack: raised by emit
                await a.emit("chat", "one too many", room="r", ack=True)
            assert info.value.req > 0 and not isinstance(info.value, ConnectionClosed)
            await a.emit("chat", "no ack", room="r")  # returns at once...
            with pytest.raises(RateLimited) as info:  # ...and recv raises the refusal
                await a.recv(10)
            assert info.value.req == 0 and a.connected
            errors = []
            a.on_error(errors.append)
            await a.emit("chat", "again", room="r")
            assert await a.poll(10) == 1  # or on_error gets it
            assert isinstance(errors[0], RateLimited) and errors[0].req == 0
            # None of the refused ones reached b: its echoed marker comes next.
            await b.emit("chat", "marker", room="r", echo=True, ack=True)
            texts = [(await recv_type(b, Event)).text for _ in range(4)]
            assert texts == ["0", "1", "2", "marker"]

    run(main())


# ==================================================================== TLS
def test_tls(tls_server, tls):
    srv = tls_server

    async def main():
        a = await connect(srv, "a", ca=tls.ca)  # ca= implies TLS
        b = await connect(srv, "b", tls=ssl.create_default_context(cafile=tls.ca))
        assert a.tls and a._writer.get_extra_info("ssl_object") is not None
        await a.join("r", presence=True)
        await b.join("r")
        assert await recv_type(a, Presence) == Presence("join", "r", "b")
        big = b"z" * 300_000  # many TLS records
        assert await b.emit("big", big, room="r", ack=True) == 1
        assert (await recv_type(a, Event)).payload == big
        assert await a.who("r") == ["a", "b"] and await a.ping() >= 0
        await b.close()  # BYE over TLS
        assert await recv_type(a, Presence) == Presence("leave", "r", "b")
        await a.close()

    run(main())


def test_tls_failures_are_quick_and_clear(server, tls_server, tls):
    async def main():
        # timeout=5: a hang would fail as TimeoutError, not pass.
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            await connect(tls_server, tls=True, timeout=5)  # the system store lacks our CA
        with pytest.raises(ssl.SSLError):
            await connect(server, ca=tls.ca, timeout=5)  # a plain server
        async with await connect(tls_server, "fine", ca=tls.ca, timeout=5) as c:
            assert await c.ping() >= 0

    run(main())


def test_tls_reconnect_wraps_the_new_connection(tls_server, tls):
    async def main():
        back = asyncio.Event()
        alice = await connect(tls_server, "alice", ca=tls.ca, reconnect=True, backoff=FAST)
        alice.on_reconnect(back.set)
        await alice.join("games")
        old_id = alice.conn_id
        alice._writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)  # the network cuts us
        await asyncio.wait_for(back.wait(), 15)
        assert alice.conn_id != old_id
        assert alice._writer.get_extra_info("ssl_object") is not None
        assert await alice.who("games") == ["alice"]
        await alice.close()

    run(main())
