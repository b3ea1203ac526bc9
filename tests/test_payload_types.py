"""Payload types end to end on protocol version 2 (protocol.md section 8).

A dict sent by one client arrives as a dict in another, a str as a str, bytes
as bytes, for the blocking and the asyncio client alike, and a version-1
member of the same room receives the same bytes untyped (its EVENTs carry no
payload-type bits). And a reconnect resumes the parked session (section 10),
so the nick it held is not refused as taken. These run against a real
version-2 server.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from muxserver import protocol as P
from muxserver.aio import AsyncClient
from muxserver.client import Backoff, Client, ConnectionClosed

VALUES = [
    {"move": "e4", "n": [1, 2.5, None, True]},
    [1, "two", {"three": 3}],
    "héllo, world",
    b"\x00\x01\xfe\xff",
    42,
    None,
]


def test_blocking_v2_round_trip(server):
    with (
        Client.connect(server.host, server.port, nick="alice", version=2) as a,
        Client.connect(server.host, server.port, nick="bob", version=2) as b,
        Client.connect(server.host, server.port, nick="old", version=1) as old,
    ):
        assert (a.session_version, b.session_version, old.session_version) == (2, 2, 1)
        for c in (a, b, old):
            c.join("games")
        for value in VALUES:
            assert a.emit("state", value, room="games", ack=True) == 2
            got = b.recv(5)
            assert got.data == value and type(got.data) is type(value)
            legacy = old.recv(5)
            assert legacy.payload == got.payload  # the same bytes, untyped
            assert legacy.payload_type == P.PAYLOAD_BINARY
            assert legacy.data == got.payload
        # Direct and broadcast carry the type too, and the kind stays readable.
        a.emit("dm", {"x": 1}, nick="bob")
        ev = b.recv(5)
        assert (ev.kind, ev.data, ev.payload_type) == ("direct", {"x": 1}, P.PAYLOAD_JSON)
        a.emit("all", "hi", broadcast=True)
        ev = b.recv(5)
        assert (ev.kind, ev.room, ev.data) == ("broadcast", None, "hi")
        assert "data='hi'" in repr(ev)


def test_asyncio_v2_round_trip(server):
    async def main():
        async with (
            AsyncClient(server.host, server.port, nick="alice", version=2) as a,
            AsyncClient(server.host, server.port, nick="bob", version=2) as b,
        ):
            await a.join("r")
            await b.join("r")
            for value in VALUES:
                await a.emit("state", value, room="r")
                got = await b.recv(5)
                assert got.data == value and type(got.data) is type(value)

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("version", [1, 2])
def test_v1_sender_to_v2_receiver_is_binary(server, version):
    with (
        Client.connect(server.host, server.port, nick="old", version=1) as old,
        Client.connect(server.host, server.port, nick="new", version=version) as new,
    ):
        old.emit("x", {"a": 1}, nick="new")
        ev = new.recv(5)
        assert (ev.data, ev.payload_type) == (b'{"a":1}', P.PAYLOAD_BINARY)


def test_v2_reconnect_resumes_the_parked_session(server):
    fast = Backoff(initial=0.05, jitter=0)
    with (
        Client.connect(server.host, server.port, nick="alice", version=2, backoff=fast) as a,
        Client.connect(server.host, server.port, nick="bob", version=2) as b,
    ):
        assert a.resumed is False
        window = a.resume_window  # 0: this server does not resume
        a.join("r")
        b.join("r", presence=True)
        old = a.conn_id
        ups = []
        a.on("connect", lambda: ups.append(a.resumed))
        a.sock.shutdown(socket.SHUT_RDWR)  # the network cuts alice off: the server parks her
        deadline = time.monotonic() + 15
        while not ups:
            assert time.monotonic() < deadline, "alice did not come back"
            try:
                a.poll(0.05)
            except ConnectionClosed:
                pass
        assert a.nick == "alice" and a.conn_id != old
        assert b.emit("x", {"back": True}, room="r", ack=True) == 1
        assert a.recv(5).data == {"back": True}
        if window:
            assert ups == [True]
            assert b.recv(0.5) is None  # a resume sends no PRESENCE leave or join
        else:
            # A server with resume off (window 0) frees the nick at once: a fresh
            # session with the same nick and rooms, and PRESENCE says so.
            assert ups == [False]
            assert [(p.kind, p.nick) for p in (b.recv(5), b.recv(5))] == [
                ("leave", "alice"), ("join", "alice"),
            ]  # fmt: skip
