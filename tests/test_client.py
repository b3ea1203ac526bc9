"""The blocking client (muxserver.client) against real server processes.

Every request, every error it can raise (RATE_LIMITED included), heartbeats,
handlers, TLS, and auto-reconnect after a server restart and after a cut
connection. A few cases the real server cannot produce (a server that never
answers, a frame type nobody defined) use a tiny scripted server on a thread.
Acked EMITs that do not wait (``wait=False``) are sent while another thread,
or greenlet, reads: the Locust users' pattern, PINGs and all.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import restart_on_same_port
from tlsutil import make_tls_files

from muxserver import protocol as P
from muxserver.client import (
    Ack,
    AuthFailed,
    Backoff,
    Client,
    ConnectionClosed,
    Event,
    IdleTimeout,
    InvalidName,
    Limit,
    MuxError,
    NickTaken,
    NoSuchTarget,
    NotConnected,
    NotMember,
    Presence,
    RateLimited,
    RoomInfo,
    ShuttingDown,
    SlowConsumer,
    TooLarge,
    UnknownType,
    error_for,
)
from muxserver.clientcore import RECV_SIZE
from muxserver.framing import FrameDecoder, encode_frame

FAST = Backoff(initial=0.05, maximum=0.2)


@pytest.fixture
def connect(server):
    """connect(nick, srv=None, **kw) -> a Client, closed after the test."""
    clients: list[Client] = []

    def make(nick: str | None = None, srv=None, **kw) -> Client:
        srv = srv or server
        # These tests are about one connection: reconnecting (the default) only
        # where a test asks for it.
        kw.setdefault("reconnect", False)
        client = Client.connect(srv.host, srv.port, nick=nick, **kw)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def recv_type(client: Client, cls, timeout: float = 10.0):
    item = client.recv(timeout)
    assert isinstance(item, cls), f"expected {cls.__name__}, got {item!r}"
    return item


def poll_until(client: Client, cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        client.poll(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(server_factory, tls):
    return server_factory(*tls.server_args)


# ================================================================ connect
def test_connect_exposes_welcome(server, connect):
    c = connect("alice")
    assert c.nick == "alice"
    assert c.conn_id >= 1
    assert c.max_frame == 1048576
    assert c.server_name == "muxserver"
    assert c.ping_interval == 25.0
    assert c.connected
    assert "alice" in repr(c)


def test_connect_without_nick_gets_guest(connect):
    c = connect()
    assert c.nick == f"guest-{c.conn_id}"


def test_connect_nick_taken_is_nicktaken_and_connectionclosed(connect):
    connect("alice")
    with pytest.raises(NickTaken) as info:
        connect("alice")
    assert isinstance(info.value, ConnectionClosed)
    assert info.value.code == P.NICK_TAKEN
    assert "alice" in info.value.message
    assert str(info.value).startswith("NICK_TAKEN: ")


@pytest.mark.parametrize(
    "kw", [{"nick": "two words"}, {"nick": "x" * 33}, {"namespace": "no-slash"}]
)
def test_connect_invalid_names(connect, kw):
    with pytest.raises(InvalidName) as info:
        connect(**kw)
    assert isinstance(info.value, ConnectionClosed)


def test_connect_auth(server_factory):
    srv = server_factory("--token", "s3cret")
    for token in (None, "wrong"):
        with pytest.raises(AuthFailed):
            Client.connect(srv.host, srv.port, nick="a", token=token)
    with Client.connect(srv.host, srv.port, nick="a", token="s3cret") as c:
        assert c.nick == "a"


def test_connect_refused_is_oserror():
    with pytest.raises(ConnectionRefusedError):
        Client.connect("127.0.0.1", free_port(), timeout=2)


# ================================================================== rooms
def test_join_leave_who_rooms(connect):
    a, b = connect("alice"), connect("bob")
    rec = a.join("games")  # version 2: sequenced, and the answer says so
    assert (rec.room, rec.outcome, rec.first, rec.last, rec.replayed) == ("games", "fresh", 1, 0, 0)
    assert b.join("games", sequenced=False) is None
    b.join("games")
    b.join("lobby")
    a.join("games")  # idempotent
    who = a.who("games")
    assert who == ["alice", "bob"] and who.total == 2
    assert a.who("empty") == [] and a.who("empty").total == 0
    assert b.rooms() == [RoomInfo("games", 2), RoomInfo("lobby", 1)]
    assert a.rooms() == [("games", 2)]
    assert sorted(a.rooms(all=True)) == [("games", 2), ("lobby", 1)]
    assert a.rooms(all=True).total == 2
    assert b.joined == {"games": False, "lobby": False}
    b.leave("games")
    assert a.who("games") == ["alice"]
    assert b.joined == {"lobby": False}
    assert b.leave("never-joined") is None  # idempotent


def test_join_errors(server_factory):
    srv = server_factory("--max-rooms", "2")
    with Client.connect(srv.host, srv.port, nick="a") as c:
        with pytest.raises(InvalidName) as info:
            c.join("bad\x01room")
        assert info.value.code == P.INVALID_NAME and info.value.req > 0
        assert not isinstance(info.value, ConnectionClosed)
        with pytest.raises(InvalidName):
            c.join("x" * 256)  # does not fit a str8: refused before sending
        c.join("one")
        c.join("two")
        with pytest.raises(Limit):
            c.join("three")
        assert c.joined == {"one": False, "two": False}
        c.ping()  # the connection is fine after per-request errors


def test_leave_and_who_invalid_name(connect):
    c = connect("a")
    with pytest.raises(InvalidName):
        c.leave("bad\x7froom")
    with pytest.raises(InvalidName):
        c.who("")


def test_presence(connect):
    a, b = connect("alice"), connect("bob")
    a.join("games", presence=True)
    b.join("games")
    assert recv_type(a, Presence) == Presence("join", "games", "bob")
    b.set_nick("robert")
    assert recv_type(a, Presence) == Presence("nick", "games", "bob", "robert")
    b.leave("games")
    assert recv_type(a, Presence) == Presence("leave", "games", "robert")
    assert a.recv(0.2) is None  # nothing about alice herself, nothing else


# =================================================================== nick
def test_set_nick(connect):
    a, b = connect("alice"), connect("bob")
    a.set_nick("alicia")
    assert a.nick == "alicia"
    assert b.who("nobody-room") == []
    with pytest.raises(NickTaken):
        b.set_nick("alicia")
    assert b.nick == "bob"
    with pytest.raises(InvalidName):
        b.set_nick("has space")
    b.set_nick("alice")  # freed by the rename
    assert b.nick == "alice"


# =================================================================== emit
def test_emit_room(connect):
    a, b = connect("alice"), connect("bob")
    a.join("games")
    b.join("games")
    assert a.emit("chat", "hi bob", room="games", ack=True) == 1
    ev = recv_type(b, Event)
    # A str goes as text (protocol version 2, the default): it comes back a str.
    assert ev == Event("chat", b"hi bob", "alice", "room", "games", P.PAYLOAD_TEXT, seq=1)
    assert ev.text == ev.data == "hi bob"
    assert a.emit("bin", b"\x00\xff" * 10, room="games") is None
    assert recv_type(b, Event).payload == b"\x00\xff" * 10
    a.emit("empty", room="games", ack=True)
    assert recv_type(b, Event).payload == b""
    assert a.recv(0.1) is None  # no echo by default


def test_emit_echo(connect):
    a = connect("alice")
    a.join("solo")
    assert a.emit("chat", "me too", room="solo", echo=True, ack=True) == 1
    assert recv_type(a, Event).sender == "alice"


def test_emit_direct_and_broadcast(connect):
    a, b, c = connect("alice"), connect("bob"), connect("carol")
    assert a.emit("psst", "just you", nick="bob", ack=True) == 1
    ev = recv_type(b, Event)
    assert (ev.kind, ev.room, ev.sender, ev.text) == ("direct", None, "alice", "just you")
    assert a.emit("hey", "everyone", broadcast=True, ack=True) == 2
    for client in (b, c):
        ev = recv_type(client, Event)
        assert (ev.kind, ev.room, ev.event) == ("broadcast", None, "hey")
    assert c.recv(0.1) is None


def test_emit_errors_with_ack(connect):
    a = connect("alice")
    with pytest.raises(NotMember) as info:
        a.emit("chat", "x", room="games", ack=True)
    assert "games" in info.value.message
    with pytest.raises(NoSuchTarget):
        a.emit("chat", "x", nick="nobody", ack=True)
    with pytest.raises(InvalidName):
        a.emit("", "x", broadcast=True, ack=True)
    with pytest.raises(InvalidName):
        a.emit("chat", "x", nick="two words", ack=True)


def test_emit_error_without_ack_raised_by_recv(connect):
    a, b = connect("alice"), connect("bob")
    a.join("games")
    b.join("games")
    a.emit("chat", "lost?", room="nowhere")  # returns at once...
    a.emit("chat", "fine", room="games")
    with pytest.raises(NotMember) as info:  # ...and the error is not lost
        a.recv(10)
    assert info.value.req == 0
    assert recv_type(b, Event).text == "fine"


def test_emit_error_without_ack_goes_to_on_error(connect):
    a = connect("alice")
    errors = []
    a.on_error(errors.append)
    a.emit("chat", "x", nick="nobody")
    poll_until(a, lambda: errors)
    assert isinstance(errors[0], NoSuchTarget)


def test_emit_argument_errors(server_factory):
    srv = server_factory("--max-frame", "1024")
    with Client.connect(srv.host, srv.port, nick="a") as c:
        c.join("r")
        with pytest.raises(ValueError):
            c.emit("chat", "no target")
        with pytest.raises(ValueError):
            c.emit("chat", "two targets", room="r", nick="b")
        with pytest.raises(TypeError, match="JSON value"):
            c.emit("chat", object(), room="r")
        with pytest.raises(TypeError, match=r"room='games'.*nick='games'"):
            c.emit("chat", "x", to="games")
        with pytest.raises(ValueError, match="reserved"):
            c.emit("connect", "x", room="r")
        with pytest.raises(TooLarge):  # refused before sending: no fatal TOO_LARGE
            c.emit("chat", b"x" * 2000, room="r")
        assert c.max_frame == 1024
        assert c.emit("chat", b"x" * 900, room="r", ack=True) == 0


def test_large_event_near_max_frame(server_factory):
    srv = server_factory("--max-frame", "4096")
    with (
        Client.connect(srv.host, srv.port, nick="a" * 32) as a,
        Client.connect(srv.host, srv.port, nick="b") as b,
    ):
        a.join("r")
        b.join("r")
        payload = b"y" * (4096 - 20)  # EVENT adds the 32-byte nick: over max_frame
        a.emit("e", payload, room="r", ack=True)
        assert recv_type(b, Event).payload == payload


# ============================================================= rate limit
RATE = ("--rate-limit", "0.01", "--rate-burst", "3")  # 3 EMITs, then one per 100 s


def test_rate_limited_emit_with_ack_raises(server_factory):
    srv = server_factory(*RATE)
    with (
        Client.connect(srv.host, srv.port, nick="chatty") as a,
        Client.connect(srv.host, srv.port, nick="b") as b,
    ):
        a.join("r")
        b.join("r")
        for n in range(3):
            assert a.emit("chat", str(n), room="r", ack=True) == 1
        with pytest.raises(RateLimited) as info:
            a.emit("chat", "one too many", room="r", ack=True)
        assert info.value.code == P.RATE_LIMITED and info.value.req > 0
        assert not isinstance(info.value, ConnectionClosed) and a.connected
        assert a.who("r") == ["chatty", "b"]  # other requests are not limited
        # b's own bucket is full; its echo comes after anything a got delivered.
        b.emit("chat", "marker", room="r", echo=True, ack=True)
        assert [recv_type(b, Event).text for _ in range(4)] == ["0", "1", "2", "marker"]


def test_rate_limited_emit_without_ack_surfaces_later(server_factory):
    srv = server_factory(*RATE)
    with (
        Client.connect(srv.host, srv.port, nick="chatty") as a,
        Client.connect(srv.host, srv.port, nick="b") as b,
    ):
        a.join("r")
        b.join("r")
        for n in range(4):
            assert a.emit("chat", str(n), room="r") is None  # all four return at once
        with pytest.raises(RateLimited) as info:  # the fourth's refusal, through recv
            a.recv(10)
        assert info.value.req == 0 and a.connected
        errors = []
        a.on_error(errors.append)
        a.emit("chat", "again", room="r")
        poll_until(a, lambda: errors)  # ...or through on_error
        assert isinstance(errors[0], RateLimited) and errors[0].req == 0
        b.emit("chat", "marker", room="r", echo=True, ack=True)
        assert [recv_type(b, Event).text for _ in range(4)] == ["0", "1", "2", "marker"]


# ==================================================== acks without waiting
def test_emit_ack_without_wait_answers_through_recv(connect):
    a, b = connect("alice"), connect("bob")
    a.join("r")
    b.join("r")
    req = a.emit("chat", "one", room="r", ack=True, wait=False)
    assert isinstance(req, int) and req > 0
    assert a.pending_acks == {req}
    ack = recv_type(a, Ack)
    assert ack == Ack(req, 1) and ack.rtt > 0 and a.pending_acks == frozenset()
    assert recv_type(b, Event).text == "one"
    # Answers come in order, between whatever else arrives; a request that
    # waits meanwhile gets its own REPLY and leaves the Acks for recv.
    reqs = [a.emit("chat", str(n), room="r", ack=True, wait=False) for n in range(3)]
    b.emit("chat", "from bob", room="r")
    assert a.who("r") == ["alice", "bob"]
    items = [a.recv(10) for _ in range(4)]
    assert [i for i in items if isinstance(i, Ack)] == [Ack(r, 1) for r in reqs]
    assert [i.text for i in items if isinstance(i, Event)] == ["from bob"]
    # A refused EMIT is raised by recv, with its id.
    bad = a.emit("chat", "x", room="elsewhere", ack=True, wait=False)
    with pytest.raises(NotMember) as info:
        a.recv(10)
    assert info.value.req == bad and a.pending_acks == frozenset()
    # wait=False changes nothing without ack: nothing to wait for, no id.
    assert a.emit("chat", "plain", room="r", wait=False) is None
    assert a.recv(0.2) is None  # no Ack for it


def test_emit_ack_without_wait_answers_through_handlers(connect):
    a, b = connect("alice"), connect("bob")
    a.join("r")
    b.join("r")
    acks, errors = [], []
    a.on_ack(acks.append)
    a.on_error(errors.append)
    good = [a.emit("chat", str(n), room="r", ack=True, wait=False) for n in range(5)]
    bad = a.emit("chat", "x", nick="nobody", ack=True, wait=False)
    poll_until(a, lambda: len(acks) == 5 and errors)
    assert [ack.req for ack in acks] == good and {ack.recipients for ack in acks} == {1}
    assert isinstance(errors[0], NoSuchTarget) and errors[0].req == bad
    assert a.pending_acks == frozenset()


def test_acks_while_another_thread_reads(connect):
    # The reading thread answers; this one only writes, then closes.
    a, b = connect("alice"), connect("bob")
    a.join("r")
    b.join("r")
    acks, failures = [], []
    a.on_ack(acks.append)

    def read() -> None:
        try:
            a.run_forever()  # returns after close() from the main thread
        except BaseException as exc:
            failures.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reqs = [a.emit("chat", str(n), room="r", ack=True, wait=False) for n in range(200)]
    assert [b.recv(10).text for _ in range(200)] == [str(n) for n in range(200)]
    deadline = time.monotonic() + 30
    while len(acks) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    a.close()
    reader.join(15)
    assert not reader.is_alive() and failures == []
    assert sorted(ack.req for ack in acks) == reqs and not a.connected


def test_reads_leave_the_socket_timeout_alone(connect):
    # A writer in another greenlet shares the socket: a read must not set
    # a timeout of 0 (a deadline that passed) under its sendall.
    a = connect("alice", timeout=7.0)
    a.join("r")
    assert a.sock.gettimeout() == 7.0
    assert a.recv(0) is None and a.recv(0.05) is None and a.poll(0) == 0
    a.emit("e", "x", room="r", echo=True, ack=True)
    assert recv_type(a, Event).text == "x" and a.ping() >= 0
    assert a.sock.gettimeout() == 7.0


def test_send_waits_out_a_full_nonblocking_socket(connect):
    # A send that would block waits for room instead of calling the
    # connection lost, even on a socket some program made non-blocking.
    a, b = connect("alice"), connect("bob")
    a.join("r")
    b.join("r")
    a.sock.setblocking(False)
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # many would-blocks
    blob = bytes(range(256)) * 3000  # 768 KB: ~12 reads of RECV_SIZE for bob
    assert RECV_SIZE <= 64 * 1024  # larger recv() sizes cost 5x per call (clientcore)
    for _ in range(3):
        assert a.emit("blob", blob, room="r", ack=True) == 1
    assert [recv_type(b, Event).payload for _ in range(3)] == [blob] * 3


# =========================================================== ping, close
def test_ping(connect):
    rtt = connect("a").ping()
    assert isinstance(rtt, float) and 0 <= rtt < 10


def test_close_sends_bye(connect):
    a, b = connect("alice"), connect("bob")
    a.join("games", presence=True)
    b.join("games")
    recv_type(a, Presence)
    b.close()
    assert recv_type(a, Presence) == Presence("leave", "games", "bob")
    assert not b.connected
    b.close()  # idempotent
    with pytest.raises(NotConnected):
        b.join("games")
    with pytest.raises(NotConnected):
        b.emit("chat", "x", room="games")
    with pytest.raises(NotConnected):
        b.recv(0.1)


def test_context_manager(server):
    with Client.connect(server.host, server.port, nick="ctx") as c:
        c.join("r")
    assert not c.connected
    with Client.connect(server.host, server.port, nick="ctx") as c2:  # nick is free again
        assert c2.nick == "ctx"


# =============================================================== handlers
def test_handlers_poll_and_run_forever(connect):
    a, b = connect("alice"), connect("bob")
    a.join("games", presence=True)
    got, every, presence = [], [], []

    @a.on("chat")
    def on_chat(ev):
        got.append(ev.text)
        if ev.text == "stop":
            a.close()

    a.on("*", every.append)
    a.on_presence(presence.append)
    b.join("games")
    b.emit("chat", "one", room="games")
    b.emit("other", "two", room="games", ack=True)
    poll_until(a, lambda: len(every) == 2)
    assert got == ["one"] and [e.event for e in every] == ["chat", "other"]
    assert presence == [Presence("join", "games", "bob")]
    assert a.poll(0.1) == 0
    b.emit("chat", "stop", room="games", ack=True)
    a.run_forever()  # returns once the handler closes the client
    assert got == ["one", "stop"] and not a.connected


# ============================================== heartbeats and ERROR frames
def test_heartbeat_answered_and_idle_timeout(server_factory):
    srv = server_factory("--ping-interval", "0.3", "--ping-timeout", "1")
    with (
        Client.connect(srv.host, srv.port, nick="awake", reconnect=False) as awake,
        Client.connect(srv.host, srv.port, nick="asleep", reconnect=False) as asleep,
    ):
        # awake reads for 2.5 s: the server PINGs it every 0.3 s and it PONGs.
        assert awake.recv(2.5) is None
        assert awake.ping() >= 0
        # asleep read nothing meanwhile: the server cut it after 1.3 s.
        with pytest.raises(IdleTimeout) as info:
            asleep.recv(10)
        assert isinstance(info.value, ConnectionClosed) and info.value.code == P.IDLE_TIMEOUT
        with pytest.raises(NotConnected):
            asleep.recv(0.1)


def test_server_shutdown_raises_connection_closed(server, connect):
    c = connect("a")
    server.signal(signal.SIGTERM)
    with pytest.raises(ShuttingDown) as info:
        c.recv(10)
    assert isinstance(info.value, ConnectionClosed) and info.value.code == P.SHUTTING_DOWN
    with pytest.raises(NotConnected):
        c.join("r")
    assert server.wait(15) == 0


def test_server_full_is_limit(server_factory):
    srv = server_factory("--max-connections", "1")
    with Client.connect(srv.host, srv.port, nick="first"):
        with pytest.raises(Limit) as info:
            Client.connect(srv.host, srv.port, nick="second")
        assert isinstance(info.value, ConnectionClosed)


def test_slow_consumer_gets_events_then_error(server_factory):
    srv = server_factory("--max-output", "65536")
    with (
        Client.connect(srv.host, srv.port, nick="slow", reconnect=False) as slow,
        Client.connect(srv.host, srv.port, nick="fast") as fast,
    ):
        slow.join("r")
        fast.join("r")
        blob = b"x" * 60000
        for _ in range(600):  # 36 MB: more than the kernel buffers hold
            fast.emit("e", blob, room="r")
        fast.ping()  # the server has handled every EMIT
        received = 0
        with pytest.raises(SlowConsumer) as info:
            while True:
                assert slow.recv(10).payload == blob  # whole events, then the error
                received += 1
        assert isinstance(info.value, ConnectionClosed) and received < 600


def test_error_for():
    exc = error_for(P.NOT_MEMBER, "no")
    assert type(exc) is NotMember and exc.code == P.NOT_MEMBER and str(exc) == "NOT_MEMBER: no"
    fatal = error_for(P.SLOW_CONSUMER, "too slow", fatal=True)
    assert isinstance(fatal, ConnectionClosed) and fatal.name == "SLOW_CONSUMER"
    odd = error_for(999, "new code")
    assert type(odd) is MuxError and odd.code == 999


# ====================================================== scripted servers
class ScriptedServer:
    """Accepts one client, answers HELLO with WELCOME, then runs ``script(conn)``."""

    def __init__(self, script) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script) -> None:
        conn, _ = self.lsock.accept()
        with conn:
            decoder, frames = FrameDecoder(), []
            while not frames:
                frames = decoder.feed(conn.recv(4096))
            assert frames[0][0] == P.HELLO
            conn.sendall(P.encode(P.Welcome(1, 1, "alice", 1 << 20, 25000, "scripted")))
            script(conn)
            self.done.wait(10)

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)
        self.lsock.close()


def test_request_without_reply_times_out():
    srv = ScriptedServer(lambda conn: None)
    try:
        c = Client.connect("127.0.0.1", srv.port, nick="alice", timeout=0.5)
        assert c.server_name == "scripted"
        with pytest.raises(TimeoutError):
            c.join("r")
        with pytest.raises(TimeoutError):
            c.ping()
    finally:
        srv.close()


def test_undecodable_server_frame_closes():
    def script(conn):
        conn.recv(4096)  # the client's PING
        conn.sendall(encode_frame(0x99, b""))

    srv = ScriptedServer(script)
    try:
        c = Client.connect("127.0.0.1", srv.port, nick="alice", reconnect=False)
        with pytest.raises(UnknownType) as info:
            c.ping()
        assert isinstance(info.value, ConnectionClosed)
    finally:
        srv.close()


def test_server_eof_without_error():
    srv = ScriptedServer(lambda conn: conn.shutdown(socket.SHUT_WR))
    try:
        c = Client.connect("127.0.0.1", srv.port, nick="alice", reconnect=False)
        with pytest.raises(ConnectionClosed) as info:
            c.recv(10)
        assert info.value.code is None and "closed" in info.value.message
    finally:
        srv.close()


def test_lost_connection_keeps_the_unanswered_acks():
    def script(conn):  # read an EMIT, answer nothing, end the connection
        conn.recv(4096)
        conn.shutdown(socket.SHUT_WR)

    srv = ScriptedServer(script)
    try:
        a = Client.connect("127.0.0.1", srv.port, nick="alice", reconnect=False)
        lost = []
        a.on_disconnect(lambda exc: lost.append(a.pending_acks))
        reqs = {a.emit("e", str(n), broadcast=True, ack=True, wait=False) for n in range(2)}
        with pytest.raises(ConnectionClosed):
            a.recv(10)
        # What went unanswered stays listed until a next connection starts.
        assert lost == [reqs] and a.pending_acks == reqs
        with pytest.raises(NotConnected):
            a.emit("e", "x", broadcast=True, ack=True, wait=False)
        assert a.pending_acks == reqs
    finally:
        srv.close()


# ============================================================== reconnect
def test_backoff_delays():
    b = Backoff()
    assert [b.delay(n, rng=lambda: 0.5) for n in range(8)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0,
    ]  # fmt: skip
    assert b.delay(1, rng=lambda: 0.0) == pytest.approx(0.8)
    assert b.delay(1, rng=lambda: 1.0) == pytest.approx(1.2)
    assert b.delay(10_000, rng=lambda: 1.0) == 30.0
    assert Backoff(initial=0.05, maximum=0.2, jitter=0).delay(3) == 0.2


def test_reconnect_after_server_restart(server_factory):
    srv = server_factory("--drain-timeout", "1")
    events: list = []
    alice = Client.connect(srv.host, srv.port, nick="alice", reconnect=True, backoff=FAST)
    alice.on_disconnect(lambda exc: events.append(exc))
    alice.on_reconnect(lambda: events.append("reconnected"))
    alice.join("games", presence=True)
    alice.join("lobby")
    srv.signal(signal.SIGTERM)
    poll_until(alice, lambda: events)
    assert isinstance(events[0], ShuttingDown)
    srv2 = restart_on_same_port(server_factory, srv)
    poll_until(alice, lambda: "reconnected" in events)
    assert alice.connected and alice.nick == "alice"
    assert sorted(alice.rooms()) == [("games", 1), ("lobby", 1)]
    with Client.connect(srv2.host, srv2.port, nick="bob") as bob:
        bob.join("games")
        # The presence flag came back with the room...
        assert recv_type(alice, Presence) == Presence("join", "games", "bob")
        # ...and the next message arrives.
        bob.emit("chat", "welcome back", room="games", ack=True)
        assert recv_type(alice, Event).text == "welcome back"
    alice.close()


def test_reconnect_after_cut_connection(server, connect):
    alice = connect("alice", reconnect=True, backoff=FAST)
    bob = connect("bob")
    reconnects = []
    alice.on_reconnect(lambda: reconnects.append(alice.conn_id))
    alice.join("games")
    bob.join("games")
    alice.set_nick("alicia")
    old_id = alice.conn_id
    alice.sock.shutdown(socket.SHUT_RDWR)  # the network cuts us off
    poll_until(alice, lambda: reconnects)
    assert alice.conn_id != old_id and alice.nick == "alicia"  # the latest nick
    bob.emit("chat", "still there?", room="games", ack=True)
    assert recv_type(alice, Event).text == "still there?"


def test_request_while_disconnected_raises_not_connected(server, connect):
    alice = connect("alice", reconnect=True, backoff=Backoff(initial=60))
    lost = []
    alice.on_disconnect(lost.append)
    alice.join("games")
    alice.sock.shutdown(socket.SHUT_RDWR)
    poll_until(alice, lambda: lost)
    assert not alice.connected
    with pytest.raises(NotConnected) as info:
        alice.emit("chat", "hello?", room="games")
    assert "next attempt" in str(info.value)
    assert alice.poll(0) == 0  # waiting out the backoff, not failing


def test_emit_without_wait_leaves_reconnecting_to_the_reader(server, connect):
    alice = connect("alice", reconnect=True, backoff=Backoff(initial=0.05, jitter=0))
    lost, back = [], []
    alice.on_disconnect(lost.append)
    alice.on_reconnect(lambda: back.append(alice.conn_id))
    alice.join("games")
    alice.sock.shutdown(socket.SHUT_RDWR)
    while not lost:
        alice.poll(0)  # notices the loss; the attempt is not due yet
    time.sleep(0.1)  # now it is: a send that waits for nothing still does not read
    with pytest.raises(NotConnected):
        alice.emit("chat", "x", room="games", ack=True, wait=False)
    poll_until(alice, lambda: back)  # the reading call reconnects
    req = alice.emit("chat", "x", room="games", ack=True, wait=False)
    assert recv_type(alice, Ack) == Ack(req, 0)


def test_reconnect_gives_up_after_max_attempts(server_factory):
    srv = server_factory("--drain-timeout", "1")
    c = Client.connect(
        srv.host, srv.port, nick="a", reconnect=True,
        backoff=Backoff(initial=0.05, maximum=0.1, max_attempts=2),
    )  # fmt: skip
    srv.signal(signal.SIGTERM)
    with pytest.raises(ConnectionClosed) as info:
        c.run_forever()
    assert "refused" in str(info.value)


def test_reconnect_stops_on_permanent_refusal(server_factory):
    srv = server_factory("--drain-timeout", "1")
    c = Client.connect(srv.host, srv.port, nick="a", reconnect=True, backoff=FAST)
    srv.signal(signal.SIGTERM)
    with pytest.raises(ShuttingDown):
        # The signal may reach the server after our first JOIN: keep asking
        # until a request meets the end of the connection, which must raise.
        for _ in range(10_000):
            c.join("r")
    restart_on_same_port(server_factory, srv, "--token", "now-required")
    with pytest.raises(AuthFailed):
        c.run_forever()
    with pytest.raises(NotConnected):
        c.poll(0)


# ==================================================================== TLS
def test_tls_end_to_end(tls_server, tls):
    srv = tls_server
    a = Client.connect(srv.host, srv.port, nick="a", ca=tls.ca)  # ca= implies TLS
    b = Client.connect(srv.host, srv.port, nick="b", tls=ssl.create_default_context(cafile=tls.ca))
    assert a.tls and b.tls and isinstance(a.sock, ssl.SSLSocket) and " tls " in repr(a)
    a.join("r", presence=True)
    # A zero-timeout read of an SSLSocket raises SSLWantReadError: "nothing yet".
    assert a.recv(0) is None and a.poll(0) == 0 and a.connected
    b.join("r")
    assert recv_type(a, Presence) == Presence("join", "r", "b")
    for n in range(200):
        b.emit("e", b"%d" % n, room="r")
    big = b"z" * 300_000  # many TLS records, more than one socket buffer
    assert b.emit("big", big, room="r", ack=True) == 1
    assert [recv_type(a, Event).payload for _ in range(200)] == [b"%d" % n for n in range(200)]
    # Nothing decrypted is left inside the SSL object, where a selector on
    # a.sock could not see it.
    assert a.sock.pending() == 0
    assert recv_type(a, Event).payload == big
    assert a.who("r") == ["a", "b"] and a.ping() >= 0
    b.close()  # BYE over TLS
    assert recv_type(a, Presence) == Presence("leave", "r", "b")
    a.close()


def test_tls_failures_are_quick_and_clear(server, tls_server, tls):
    # timeout=5 everywhere: a hang would fail as TimeoutError, not pass.
    addr = (tls_server.host, tls_server.port)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        Client.connect(*addr, tls=True, timeout=5)  # the system store does not know our CA
    with pytest.raises(ssl.SSLError):
        Client.connect(server.host, server.port, ca=tls.ca, timeout=5)  # a plain server
    with pytest.raises(ConnectionClosed):
        Client.connect(*addr, timeout=5)  # plain TCP to a TLS server: closed on us
    with pytest.raises(FileNotFoundError, match="no-such-ca.pem"):
        Client.connect(*addr, ca="no-such-ca.pem")
    with pytest.raises(ValueError):
        Client.connect(*addr, tls=ssl.create_default_context(), ca=tls.ca)
    with Client.connect(*addr, nick="still-fine", ca=tls.ca, timeout=5) as c:
        assert c.ping() >= 0


def test_tls_reconnect_wraps_the_new_socket(server_factory, tls):
    srv = server_factory(*tls.server_args, "--drain-timeout", "1")
    alice = Client.connect(
        srv.host, srv.port, nick="alice", ca=tls.ca, reconnect=True, backoff=FAST
    )
    lost, back = [], []
    alice.on_disconnect(lost.append)
    alice.on_reconnect(lambda: back.append(alice.sock))
    alice.join("games")
    srv.signal(signal.SIGTERM)
    poll_until(alice, lambda: lost)
    restart_on_same_port(server_factory, srv, *tls.server_args)
    poll_until(alice, lambda: back)
    assert isinstance(back[0], ssl.SSLSocket)
    assert alice.who("games") == ["alice"]
    alice.close()


# ================================================================= gevent
GEVENT_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import sys, gevent
from muxserver.client import Client
port, ca = int(sys.argv[1]), sys.argv[2] or None
clients = [Client.connect("127.0.0.1", port, nick=f"user{n}", ca=ca) for n in range(5)]
# gevent's cooperative socket / SSLSocket, not the blocking ones.
assert all(type(c.sock).__module__.startswith("gevent") for c in clients), type(clients[0].sock)
assert all(c.tls == (ca is not None) for c in clients)
for c in clients:
    c.join("room")
def talk(c):
    # Each greenlet blocks in recv(); gevent switches to the others meanwhile.
    c.emit("hi", f"from {c.nick}", room="room", echo=True, ack=True)
    texts = set()
    while len(texts) < 5:
        texts.add(c.recv(10).text)
    c.close()
    return texts
jobs = [gevent.spawn(talk, c) for c in clients]
gevent.joinall(jobs, timeout=20, raise_error=True)
assert all(len(j.value) == 5 for j in jobs), [j.value for j in jobs]
print("ok")
"""


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
def test_works_under_gevent(server_factory, tls, use_tls):
    # In the test extra: if gevent is missing this fails, it never skips.
    import gevent  # noqa: F401

    srv = server_factory(*(tls.server_args if use_tls else ()))
    ca = tls.ca if use_tls else ""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(GEVENT_SCRIPT), str(srv.port), ca],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip() == "ok", out.stderr


# One greenlet reads the sender's connection (recv with short timeouts, or
# run_forever) while another writes big EMITs with ack=True, wait=False, and
# the server PINGs both clients whenever they have been silent for 50 ms. The
# reader is parked (in its on_ack handler) through each silence, so that the
# PING is waiting for it when the writer starts a burst: it writes the PONG as
# soon as the writer blocks half-way through a frame (a small send buffer
# makes sure it does). Without the client's write lock the PONG lands inside
# that frame (or gevent refuses the second writer); with the old per-read
# timeouts the writer's send failed with BlockingIOError.
GEVENT_ACKS_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import random, select, socket, sys
import gevent, gevent.event
from muxserver.client import Ack, Client

port, mode = int(sys.argv[1]), sys.argv[2]
ROUNDS, BURST = 8, 3
seen = {"pongs": 0, "mid_frame": 0}
writing = [False]

class Counting(Client):
    def _write(self, frame):  # the I/O hook the reading side writes PONGs with
        seen["pongs"] += 1
        seen["mid_frame"] += writing[0]
        super()._write(frame)

listener = Client.connect("127.0.0.1", port, nick="listener")
sender = Counting.connect("127.0.0.1", port, nick="sender")
listener.join("r")
sender.join("r")
sender.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
rng = random.Random(7)
payloads = [
    n.to_bytes(4, "big") + rng.randbytes(rng.randrange(50_000, 200_000))
    for n in range(ROUNDS * BURST)
]
acks, errors, reqs, got = {}, [], [], []
go = gevent.event.Event()

def on_ack(ack):
    acks[ack.req] = ack
    if len(acks) % BURST == 0 and len(acks) < len(payloads):
        go.wait()  # read nothing until the writer starts its next burst
        go.clear()

sender.on_ack(on_ack)
sender.on_error(errors.append)

def read_sender():
    if mode == "run_forever":
        sender.run_forever()  # until the writer's close()
        return
    while len(acks) < len(payloads):
        item = sender.recv(0.002)
        if item is not None:
            assert isinstance(item, Ack), item
            on_ack(item)

def read_listener():
    while len(got) < len(payloads):
        got.append(listener.recv(30).payload)

def write():
    for r in range(ROUNDS):
        if r:
            while len(acks) < r * BURST:
                gevent.sleep(0.002)
            poller = select.poll()  # the reader is parked: wait, silent, for a PING
            poller.register(sender.sock, select.POLLIN)
            poller.poll(5000)
            go.set()
        for payload in payloads[r * BURST : (r + 1) * BURST]:
            writing[0] = True
            reqs.append(sender.emit("blob", payload, room="r", ack=True, wait=False))
            writing[0] = False
    while len(acks) < len(payloads):
        gevent.sleep(0.005)
    if mode == "run_forever":
        sender.close()  # from this greenlet, while the other one reads

jobs = [gevent.spawn(f) for f in (read_sender, read_listener, write)]
gevent.joinall(jobs, timeout=60, raise_error=True)
assert all(j.successful() for j in jobs), "a greenlet hung"
assert errors == [], errors
assert got == payloads, "a payload arrived damaged, out of order or not at all"
assert sorted(acks) == sorted(reqs) and len(set(reqs)) == len(payloads)
assert all(a.recipients == 1 and a.rtt > 0 for a in acks.values())
assert sender.pending_acks == frozenset()
assert seen["mid_frame"] > 0, f"no PONG was written during an EMIT: {seen}"
print("ok", seen)
"""


@pytest.mark.parametrize("mode", ["recv", "run_forever"])
def test_gevent_reader_and_nowait_writer_share_a_connection(server_factory, mode):
    import gevent  # noqa: F401  (in the test extra: missing, this fails)

    srv = server_factory("--ping-interval", "0.05", "--ping-timeout", "5")
    out = subprocess.run(
        [sys.executable, "-c", GEVENT_ACKS_SCRIPT, str(srv.port), mode],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert out.stdout.startswith("ok"), out.stderr


# =================================================================== docs
def test_docs_echo_bot(server, connect):
    """The 10-line echo bot of docs/client.md, run as written (bar the port)."""
    doc = (Path(__file__).parents[1] / "docs" / "client.md").read_text()
    code = re.search(r"<!-- echo-bot.*?-->\n```python\n(.*?)```", doc, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    bot = subprocess.Popen([sys.executable, "-c", code.replace("7878", str(server.port))])
    try:
        ann = connect("ann")
        ann.join("lobby")
        deadline = time.monotonic() + 15
        while "echo-bot" not in ann.who("lobby"):
            assert time.monotonic() < deadline and bot.poll() is None, "the bot did not join"
            time.sleep(0.05)
        ann.emit("msg", "hello bot", room="lobby")
        ev = recv_type(ann, Event)
        assert (ev.sender, ev.text) == ("echo-bot", "ann said: hello bot")
    finally:
        bot.terminate()
        bot.wait(10)
