"""The client API as socket.io users expect it (issue: "For people").

emit targets (room=/nick=/broadcast=, to= refused with a pointer), payload
types (bytes/str/JSON) and their decoding, print(event), on/off/once and the
connect/disconnect lifecycle names, reconnect on by default, the blocking
client's background heartbeat, ``async with AsyncClient(...)``, and port
checks in both constructors. Real servers on 127.0.0.1 (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from conftest import restart_on_same_port

from muxserver import protocol as P
from muxserver.aio import AsyncClient
from muxserver.client import Client, ConnectionClosed, Event
from muxserver.clientcore import decode_payload, encode_payload


# ================================================================ no server
@pytest.mark.parametrize("port", [-1, 65536, 99999, "7878", 7878.0, True])
def test_ports_outside_the_tcp_range_are_refused(port):
    for cls in (Client, AsyncClient):
        with pytest.raises(ValueError, match="0..65535"):
            cls("127.0.0.1", port)
    with pytest.raises(ValueError, match="0..65535"):
        Client.connect("127.0.0.1", port)


def test_unknown_protocol_version_is_refused():
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        Client("127.0.0.1", 7878, version=3)


@pytest.mark.parametrize(
    "value, wire, ptype",
    [
        (b"\x00\xff", b"\x00\xff", P.PAYLOAD_BINARY),
        (bytearray(b"ab"), b"ab", P.PAYLOAD_BINARY),
        ("héllo", "héllo".encode(), P.PAYLOAD_TEXT),
        ({"a": [1, 2], "b": "é"}, '{"a":[1,2],"b":"é"}'.encode(), P.PAYLOAD_JSON),
        ([1, "x", None], b'[1,"x",null]', P.PAYLOAD_JSON),
        (42, b"42", P.PAYLOAD_JSON),
        (None, b"null", P.PAYLOAD_JSON),
        (True, b"true", P.PAYLOAD_JSON),
    ],
)
def test_payload_encoding(value, wire, ptype):
    assert encode_payload(value) == (wire, ptype)
    decoded = decode_payload(wire, ptype)
    assert decoded == (bytes(value) if isinstance(value, bytearray) else value)


def test_payloads_that_cannot_be_sent_say_why():
    with pytest.raises(TypeError, match="JSON value"):
        encode_payload(object())
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        encode_payload({"x": object()})
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        encode_payload(float("nan"))


def test_malformed_typed_payloads_decode_without_failing():
    assert decode_payload(b"\xff", P.PAYLOAD_TEXT) == "\ufffd"
    assert decode_payload(b"{not json", P.PAYLOAD_JSON) == b"{not json"


def test_event_shows_the_decoded_value():
    ev = Event("chat", b'{"move":"e4"}', "bob", "room", "games", P.PAYLOAD_JSON)
    assert ev.data == {"move": "e4"}
    assert ev.payload == b'{"move":"e4"}'
    shown = "Event(event='chat', data={'move': 'e4'}, sender='bob', kind='room', room='games')"
    assert repr(ev) == str(ev) == shown
    plain = Event("chat", b"hi", "bob", "direct")
    assert plain.data == b"hi" and "room=" not in repr(plain)


# ============================================================== with server
def test_emit_targets_room_nick_broadcast(server):
    with (
        Client.connect(server.host, server.port, nick="alice") as a,
        Client.connect(server.host, server.port, nick="bob") as b,
    ):
        a.join("games")
        b.join("games")
        assert a.emit("move", "e4", room="games", ack=True) == 1
        assert b.recv(5).room == "games"
        assert a.emit("psst", "hi", nick="bob", ack=True) == 1
        assert b.recv(5).kind == "direct"
        assert a.emit("news", "all", broadcast=True, ack=True) == 1
        assert b.recv(5).kind == "broadcast"
        with pytest.raises(TypeError, match=r"room='games' .* nick='games'"):
            a.emit("move", "e4", to="games")


def test_version_1_session_delivers_raw_bytes(server):
    """On version 1 there are no payload types: data is the bytes as sent."""
    with (
        Client.connect(server.host, server.port, nick="alice", version=1) as a,
        Client.connect(server.host, server.port, nick="bob", version=1) as b,
    ):
        assert a.session_version == 1
        a.emit("state", {"n": 1}, nick="bob")
        a.emit("line", "é", nick="bob")
        first, second = b.recv(5), b.recv(5)
        assert (first.data, first.payload_type) == (b'{"n":1}', P.PAYLOAD_BINARY)
        assert second.data == "é".encode()


def test_on_off_once_and_connect(server):
    seen: list = []
    client = Client(server.host, server.port, nick="alice")
    client.on("connect", lambda: seen.append(("connect", client.nick)))
    with client, Client.connect(server.host, server.port, nick="bob") as bob:
        assert seen == [("connect", "alice")]  # opened by the with block
        client.join("r")

        def always(ev):
            seen.append(("always", ev.data))

        client.on("x", always)
        client.once("x", lambda ev: seen.append(("once", ev.data)))
        bob.join("r")
        for text in ("1", "2"):
            bob.emit("x", text, room="r")
        deadline = time.monotonic() + 5
        while len(seen) < 4 and time.monotonic() < deadline:
            client.poll(0.1)
        assert seen[1:] == [("always", "1"), ("once", "1"), ("always", "2")]
        client.off("x", always)
        bob.emit("x", "3", room="r", ack=True)
        client.poll(0.5)
        assert len(seen) == 4  # nobody listens to "x" any more
        client.off("x", always)  # removing twice is fine


def test_once_can_be_removed_before_it_runs(server):
    with Client.connect(server.host, server.port, nick="alice") as a:
        calls = []

        def fn(ev):
            calls.append(ev)

        a.once("x", fn)
        a.off("x", fn)
        assert a._handlers["x"] == []


def test_reconnect_is_the_default_and_fires_connect(server_factory):
    srv = server_factory()
    client = Client(srv.host, srv.port, nick="alice")
    assert client.reconnect is True
    ups, downs = [], []
    client.on("connect", lambda: ups.append(client.conn_id))
    client.on("disconnect", downs.append)
    client.open()
    client.join("lobby")
    client.backoff.initial = 0.05
    srv = restart_on_same_port(server_factory, srv)
    deadline = time.monotonic() + 15
    while len(ups) < 2:
        assert time.monotonic() < deadline, "did not reconnect"
        try:
            client.poll(0.1)
        except ConnectionClosed:
            pass
    assert isinstance(downs[0], ConnectionClosed)
    assert client.joined == {"lobby": False}
    client.close()


def test_heartbeat_keeps_a_sleeping_client_alive(server_factory):
    # Silence is cut after 1.3 s; the heartbeat writes every 0.15 s.
    srv = server_factory("--ping-interval", "0.3", "--ping-timeout", "1")
    with (
        Client.connect(srv.host, srv.port, nick="sleeper", heartbeat=True) as sleeper,
        Client.connect(srv.host, srv.port, nick="napper", reconnect=False) as napper,
    ):
        time.sleep(2.5)  # no client call: only the heartbeat thread writes
        assert sleeper.emit("still", "here", broadcast=True, ack=True) == 0  # napper was cut
        assert sleeper.ping() >= 0
        with pytest.raises(ConnectionClosed) as info:
            napper.recv(5)
        assert info.value.name == "IDLE_TIMEOUT"


def test_heartbeat_argument_is_checked():
    with pytest.raises(ValueError, match="heartbeat"):
        Client("127.0.0.1", 7878, heartbeat=-1)


def test_async_with_constructor(server):
    async def main():
        seen = []
        client = AsyncClient(server.host, server.port, nick="alice")
        client.on("connect", lambda: seen.append("connect"))
        async with client as a, AsyncClient(server.host, server.port, nick="bob") as b:
            assert seen == ["connect"] and a.connected
            await a.join("r")
            await b.join("r")
            assert await b.emit("hi", [1, 2], room="r", ack=True) == 1
            ev = await a.recv(5)
            assert ev.room == "r"
        assert not a.connected and not b.connected

    asyncio.run(asyncio.wait_for(main(), 30))


def test_async_emit_refuses_to(server):
    async def main():
        async with AsyncClient(server.host, server.port, nick="a") as a:
            with pytest.raises(TypeError, match="room="):
                await a.emit("x", "y", to="games")

    asyncio.run(asyncio.wait_for(main(), 30))


# ===================================================== version 2, no server
def _emit_on(version: int, data) -> P.Emit:
    c = Client("127.0.0.1", 7878, version=version)
    c.session_version = version  # as WELCOME would set it
    frame = c._emit_call("x", data, "r", None, False, True, False).frame
    return P.decode(frame[4], frame[5:])


def test_v2_emit_flags_carry_the_payload_type():
    for data, ptype in (({"a": 1}, P.PAYLOAD_JSON), ("t", P.PAYLOAD_TEXT), (b"b", 0)):
        msg = _emit_on(2, data)
        assert P.payload_type_of(msg.flags) == ptype
        assert msg.flags & P.EMIT_ECHO
    assert _emit_on(1, {"a": 1}).flags == P.EMIT_ECHO  # version 1: no type bits


def test_v2_event_kind_is_masked_and_payload_decoded():
    c = Client("127.0.0.1", 7878, version=2)
    c.session_version = 2
    for kind, source in ((P.TARGET_ROOM, "r"), (P.TARGET_DIRECT, ""), (P.TARGET_BROADCAST, "")):
        skind = P.event_kind_byte(kind, P.PAYLOAD_JSON)
        c._incoming(P.Event(skind, "bob", source, "x", b'{"a":1}'))
    got = [(ev.kind, ev.room, ev.data) for ev in c._inbox]
    expected_kinds = [("room", "r"), ("direct", None), ("broadcast", None)]
    assert got == [(k, r, {"a": 1}) for k, r in expected_kinds]


def test_heartbeat_under_gevent(server_factory):
    """Monkey-patched, the heartbeat is a greenlet: it runs while the program sleeps."""
    srv = server_factory("--ping-interval", "0.3", "--ping-timeout", "1")
    script = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import gevent, sys\n"
        "from muxserver.client import Client\n"
        f"c = Client.connect('127.0.0.1', {srv.port}, nick='g', heartbeat=True)\n"
        "c.join('r')\n"
        "gevent.sleep(2.5)\n"
        "print('recipients', c.emit('x', 'y', room='r', echo=True, ack=True))\n"
        "c.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "recipients 1\n"
