"""Integration: real sockets against a real server process on a free port."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from conftest import RawClient, ServerProcess, reply_count

from muxserver import protocol as P

# ------------------------------------------------------------ handshake


def test_welcome_fields(server, connect):
    c = connect(hello=False)
    w = c.hello("alice")
    assert (w.version, w.nick, w.max_frame, w.ping_interval_ms) == (1, "alice", 1 << 20, 25000)
    assert w.server_name == "muxserver" and w.conn_id >= 1


def test_empty_nick_gets_guest_name(connect):
    w = connect(hello=False).hello("")
    assert w.nick == f"guest-{w.conn_id}"


def test_first_frame_not_hello(connect):
    c = connect(hello=False)
    c.send(P.Join(1, "r"))
    c.expect_error(P.NOT_HELLO)


def test_unknown_first_frame_is_not_hello(connect):
    c = connect(hello=False)
    c.send_raw(b"\x00\x00\x00\x01\x42")
    c.expect_error(P.NOT_HELLO)


def test_second_hello(connect):
    c = connect("a")
    c.send(P.Hello(1, "/", "b", ""))
    c.expect_error(P.NOT_HELLO)


def test_unsupported_version(connect):
    c = connect(hello=False)
    c.send_raw(P.encode_frame(P.HELLO, b"\x03\x01/\x01a\x00"))
    err = c.expect_error(P.UNSUPPORTED_VERSION)
    assert "1 and 2" in err.message


def test_hello_nick_taken(connect):
    connect("alice")
    c = connect(hello=False)
    c.send(P.Hello(1, "/", "alice", ""))
    c.expect_error(P.NICK_TAKEN)


@pytest.mark.parametrize(
    "ns,nick", [("nope", "a"), ("/", "two words"), ("/", "x" * 33), ("/bell\x07", "a")]
)
def test_hello_invalid_name(connect, ns, nick):
    c = connect(hello=False)
    c.send(P.Hello(1, ns, nick, ""))
    c.expect_error(P.INVALID_NAME)


def test_hello_invalid_utf8_nick(connect):
    c = connect(hello=False)
    c.send_raw(P.encode_frame(P.HELLO, b"\x01\x01/\x02\xff\xfe\x00"))
    c.expect_error(P.INVALID_NAME)


def test_malformed_hello_is_bad_frame(connect):
    c = connect(hello=False)
    c.send_raw(P.encode_frame(P.HELLO, b"\x01\x09/"))
    c.expect_error(P.BAD_FRAME)


def test_token_auth(server_factory, connect):
    srv = server_factory("--token", "sesame")
    bad = connect(hello=False, srv=srv)
    bad.send(P.Hello(1, "/", "a", "wrong"))
    bad.expect_error(P.AUTH_FAILED)
    good = connect(hello=False, srv=srv)
    assert good.hello("a", token="sesame").nick == "a"


def test_token_ignored_when_server_has_none(connect):
    assert connect(hello=False).hello("a", token="whatever").nick == "a"


# ------------------------------------------------------------ framing errors


def test_too_large_decided_from_length_alone(server_factory, connect):
    srv = server_factory("--max-frame", "1000")
    c = connect("a", srv=srv)
    c.send_raw(struct.pack(">I", 1001))  # no body follows: must not wait for it
    c.expect_error(P.TOO_LARGE)


def test_zero_length_frame(connect):
    c = connect("a")
    c.send_raw(b"\x00\x00\x00\x00")
    c.expect_error(P.BAD_FRAME)


def test_unknown_type_after_hello(connect):
    c = connect("a")
    c.send_raw(b"\x00\x00\x00\x01\x81")  # a server-to-client type
    c.expect_error(P.UNKNOWN_TYPE)


@pytest.mark.parametrize(
    "raw",
    [
        P.encode_frame(P.JOIN, b"\x00\x00"),
        P.encode_frame(P.EMIT, b"\x00\x00\x00\x01\x00\x07\x01r\x01e"),
        P.encode_frame(P.EMIT, b"\x00\x00\x00\x01\x00\x02\x01r\x01e"),
        P.encode_frame(P.PING, b"\x00" * 4),
        P.encode_frame(P.PONG, b"\x00" * 9),
        P.encode_frame(P.ROOMS, b"\x00\x00\x00\x01\x05"),
        P.encode_frame(P.BYE, b"x"),
        P.encode_frame(P.WHO, b"\x00\x00\x00\x01\x01rr"),
    ],
)
def test_bad_bodies(connect, raw):
    c = connect("a")
    c.send_raw(raw)
    c.expect_error(P.BAD_FRAME)


def test_frames_before_a_bad_one_are_still_handled(connect):
    a, b = connect("a"), connect("b")
    a.join("r")
    b.join("r")
    a.send_raw(P.encode(P.Emit(0, 0, "r", "e", b"first")) + b"\x00\x00\x00\x00")
    assert b.recv_type(P.Event).payload == b"first"
    a.expect_error(P.BAD_FRAME)


# ------------------------------------------------------------ requests


def test_join_leave_who_rooms(connect):
    a, b = connect("a"), connect("b")
    assert a.join("r1").status == P.OK
    assert a.join("r1").status == P.OK  # idempotent
    b.join("r1")
    b.join("r2")
    who = a.request(P.Who(a.next_req(), "r1"))
    assert who.body == struct.pack(">IH", 2, 2) + b"\x01a\x01b"
    mine = b.request(P.Rooms(b.next_req(), 0))
    assert mine.body == struct.pack(">IH", 2, 2) + b"\x02r1" + struct.pack(
        ">I", 2
    ) + b"\x02r2" + struct.pack(">I", 1)
    assert a.request(P.Leave(a.next_req(), "r1")).status == P.OK
    assert a.request(P.Leave(a.next_req(), "r1")).status == P.OK  # idempotent
    every = a.request(P.Rooms(a.next_req(), 1))
    assert struct.unpack(">IH", every.body[:6]) == (2, 2)
    empty = a.request(P.Who(a.next_req(), "nobody-here"))
    assert empty.body == struct.pack(">IH", 0, 0)


def test_who_lists_fewer_to_stay_under_max_frame(server_factory, connect):
    srv = server_factory("--max-frame", "200")
    clients = [connect(hello=False, srv=srv) for _ in range(30)]
    for i, c in enumerate(clients):
        c.hello(f"member-number-{i:03d}")
        c.join("r")
    reply = clients[0].request(P.Who(99, "r"))
    total, listed = struct.unpack(">IH", reply.body[:6])
    assert total == 30 and 0 < listed < 30
    assert len(P.encode(reply)) - 4 <= 200


def test_request_errors(server_factory, connect):
    srv = server_factory("--max-rooms", "2")
    a = connect("a", srv=srv)
    connect("b", srv=srv)  # holds the nick "b" for NICK_TAKEN below
    assert a.join("").status == P.INVALID_NAME
    assert a.join("x\x01").status == P.INVALID_NAME
    a.join("r1")
    a.join("r2")
    limit = a.join("r3")
    assert limit.status == P.LIMIT and limit.message
    assert a.request(P.Nick(a.next_req(), "b")).status == P.NICK_TAKEN
    assert a.request(P.Nick(a.next_req(), "bad nick")).status == P.INVALID_NAME
    assert a.request(P.Emit(a.next_req(), 0, "elsewhere", "e", b"")).status == P.NOT_MEMBER
    assert a.request(P.Emit(a.next_req(), 1, "nobody", "e", b"")).status == P.NO_SUCH_TARGET
    assert a.request(P.Emit(a.next_req(), 0, "r1", "bad\x00event", b"")).status == P.INVALID_NAME
    # req = 0: success is silent, failure is not.
    a.send(P.Emit(0, 0, "elsewhere", "e", b""))
    failed = a.recv_type(P.Reply)
    assert (failed.req, failed.status) == (0, P.NOT_MEMBER)


def test_ping_pong_both_ways(connect):
    a = connect("a")
    a.send(P.Ping(0xDEADBEEF))
    assert a.recv_type(P.ServerPong) == P.ServerPong(0xDEADBEEF)


def test_bye_flushes_then_closes(connect):
    a = connect("a")
    a.send(P.Ping(1))
    a.send(P.Bye())
    assert a.recv() == P.ServerPong(1)
    a.expect_closed()


# ------------------------------------------------------------ delivery


def test_room_delivery_echo_and_ack_counts(connect):
    a, b, c = connect("a"), connect("b"), connect("c")
    for x in (a, b, c):
        x.join("r")
    assert reply_count(a.emit_room("r", "msg", b"one")) == 2
    for x in (b, c):
        assert x.recv_type(P.Event) == P.Event(0, "a", "r", "msg", b"one")
    a.send(P.Emit(7, 0, "r", "msg", b"two", P.EMIT_ECHO))
    assert a.recv() == P.Event(0, "a", "r", "msg", b"two")  # the echo comes first
    assert reply_count(a.recv()) == 3
    for x in (b, c):
        assert x.recv_type(P.Event).payload == b"two"


def test_echo_arrives_before_reply(connect):
    a = connect("a")
    a.join("r")
    a.send(P.Emit(5, 0, "r", "msg", b"self", P.EMIT_ECHO))
    assert a.recv() == P.Event(0, "a", "r", "msg", b"self")
    assert reply_count(a.recv()) == 1


def test_direct_and_broadcast(connect):
    a, b, c = connect("a"), connect("b"), connect("c")
    assert reply_count(a.request(P.Emit(a.next_req(), 1, "b", "dm", b"psst"))) == 1
    assert b.recv_type(P.Event) == P.Event(1, "a", "", "dm", b"psst")
    assert reply_count(a.request(P.Emit(a.next_req(), 2, "", "all", b"hey"))) == 2
    for x in (b, c):
        assert x.recv_type(P.Event) == P.Event(2, "a", "", "all", b"hey")
    assert reply_count(a.request(P.Emit(a.next_req(), 1, "a", "dm", b"me", 0))) == 0
    a.send(P.Emit(50, 1, "a", "dm", b"me", P.EMIT_ECHO))
    assert a.recv() == P.Event(1, "a", "", "dm", b"me")
    assert reply_count(a.recv()) == 1


def test_presence_flow(connect):
    a, b = connect("a"), connect("b")
    a.join("r", presence=True)
    b.join("r")
    assert a.recv_type(P.Presence) == P.Presence(1, "r", "b", "")
    b.request(P.Nick(b.next_req(), "bee"))
    assert a.recv_type(P.Presence) == P.Presence(3, "r", "b", "bee")
    reply = b.emit_room("r", "m", b"x")
    assert reply_count(reply) == 1
    assert a.recv_type(P.Event).sender == "bee"  # the new nick is used at once
    b.close()
    assert a.recv_type(P.Presence) == P.Presence(2, "r", "bee", "")


def test_namespaces_isolated(connect):
    a, b = connect("a", "/one"), connect("a", "/two")  # same nick, other namespace
    a.join("r")
    b.join("r")
    assert reply_count(a.emit_room("r", "m", b"x")) == 0
    assert reply_count(a.request(P.Emit(a.next_req(), 2, "", "m", b"x"))) == 0
    assert a.request(P.Emit(a.next_req(), 1, "a", "m", b"x", 0)).status == P.OK
    assert b.request(P.Rooms(b.next_req(), 1)).body[:6] == struct.pack(">IH", 1, 1)
    b.send(P.Ping(3))
    assert b.recv() == P.ServerPong(3)  # nothing else reached b


def _recv_all_events(clients, expected, timeout=60.0):
    """Collect EVENT payloads per client until each has ``expected`` of them."""
    sel = selectors.DefaultSelector()
    got = {id(c): [] for c in clients}
    for c in clients:
        c.sock.setblocking(False)
        got[id(c)].extend(f.payload for f in c.frames if isinstance(f, P.Event))
        c.frames.clear()
        sel.register(c.sock, selectors.EVENT_READ, c)
    deadline = time.monotonic() + timeout
    left = sum(1 for c in clients if len(got[id(c)]) < expected)
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            c = key.data
            data = c.sock.recv(1 << 20)
            assert data, "server closed a receiver"
            for ftype, body in c.feed(data):
                msg = P.decode(ftype, body)
                if ftype != P.EVENT or len(got[id(c)]) >= expected:
                    c.frames.append(msg)  # keep it for the next reader
                    continue
                got[id(c)].append(msg.payload)
                if len(got[id(c)]) == expected:
                    left -= 1
    sel.close()
    for c in clients:
        c.sock.setblocking(True)
    return got


def test_per_sender_order_5_senders_2000_each(connect):
    senders = [connect(f"s{i}") for i in range(5)]
    receivers = [connect(f"r{i}") for i in range(3)]
    for c in senders + receivers:
        c.join("order")
    for i in range(2000):
        for n, s in enumerate(senders):
            s.send_raw(P.encode(P.Emit(0, 0, "order", "seq", f"{n}:{i}".encode())))
    got = _recv_all_events(receivers, 5 * 2000, timeout=90)
    for c in receivers:
        seqs = {n: [] for n in range(5)}
        for payload in got[id(c)]:
            n, i = payload.decode().split(":")
            seqs[int(n)].append(int(i))
        assert all(seqs[n] == list(range(2000)) for n in range(5)), "loss or reorder"


def test_broadcast_to_1000_members_of_one_room(connect):
    members = [connect(f"m{i}") for i in range(1000)]
    for m in members:
        m.send(P.Join(1, "big", 0))
    for m in members:
        assert m.recv_type(P.Reply).status == P.OK
    pub = connect("pub")
    pub.join("big")
    assert reply_count(pub.emit_room("big", "news", b"to everyone")) == 1000
    got = _recv_all_events(members, 1, timeout=60)
    assert all(v == [b"to everyone"] for v in got.values())


# ------------------------------------------------------------ limits


def test_slow_consumer_is_cut_others_get_everything(server_factory, connect):
    # A long drain timeout: the slow member only starts reading at the end,
    # and must then still find the ERROR behind what reached its socket.
    srv = server_factory("--max-output", "200000", "--drain-timeout", "120")
    slow, fast, pub = (connect(n, srv=srv) for n in ("slow", "fast", "pub"))
    for c in (slow, fast, pub):
        c.join("r")
    # More than the kernel's socket buffers can hide (several MiB on loopback),
    # in batches the fast member keeps up with, so only the slow one lags.
    n, batch = 16000, 100
    payload = b"x" * 1000
    got = []
    for start in range(0, n, batch):
        pub.send_raw(
            b"".join(
                P.encode(P.Emit(0, 0, "r", "e", i.to_bytes(4, "big") + payload))
                for i in range(start, start + batch)
            )
        )
        got += _recv_all_events([fast], batch, timeout=60)[id(fast)]
    assert [int.from_bytes(p[:4], "big") for p in got] == list(range(n))
    # The slow one now reads: a whole prefix of the stream, then the error, then EOF.
    slow.sock.settimeout(10)
    seen = []
    error = None
    while True:
        data = slow.sock.recv(65536)
        if not data:
            break
        for ftype, body in slow.feed(data):
            msg = P.decode(ftype, body)
            if isinstance(msg, P.Event):
                assert error is None, "event after the error"
                seen.append(int.from_bytes(msg.payload[:4], "big"))
            elif isinstance(msg, P.Error):
                error = msg
    assert error is not None and error.code == P.SLOW_CONSUMER
    assert seen == list(range(len(seen))) and len(seen) < n
    assert slow.decoder.buffered == 0  # the stream ended on a frame boundary
    # The publisher is still fine.
    pub.send(P.Ping(9))
    assert pub.recv_type(P.ServerPong).nonce == 9


def test_idle_timeout_short_settings(server_factory, connect):
    srv = server_factory("--ping-interval", "0.3", "--ping-timeout", "0.3")
    c = connect("idle", srv=srv)
    assert isinstance(c.recv(), P.ServerPing)
    c.expect_error(P.IDLE_TIMEOUT)


def test_client_that_answers_stays(server_factory, connect):
    srv = server_factory("--ping-interval", "0.2", "--ping-timeout", "0.3")
    c = connect("awake", srv=srv)
    for _ in range(4):
        ping = c.recv(timeout=5)
        assert isinstance(ping, P.ServerPing)
        c.send(P.Pong(ping.nonce))
    c.send(P.Ping(1))
    while True:
        frame = c.recv(timeout=5)
        if isinstance(frame, P.ServerPong):
            break
        assert isinstance(frame, P.ServerPing)
        c.send(P.Pong(frame.nonce))


def test_max_connections(server_factory, connect, transport):
    srv = server_factory("--max-connections", "3")
    ok = [connect(f"c{i}", srv=srv) for i in range(3)]
    # Section 11: refused in its own transport once its first bytes show
    # which (a WebSocket gets its upgrade, then ERROR LIMIT and Close 4011).
    extra = connect(hello=False, srv=srv)
    if transport == "tcp":
        extra.send(P.Hello(1, "/", "extra", ""))
    extra.expect_error(P.LIMIT)
    ok[0].send(P.Ping(4))
    assert ok[0].recv() == P.ServerPong(4)
    ok[0].send(P.Bye())
    ok[0].expect_closed()
    ok[0].close()  # the server counts a connection until its socket is closed
    time.sleep(0.3)
    again = connect(hello=False, srv=srv)
    assert again.hello("again").nick == "again"


def test_client_killed_mid_frame_does_not_disturb_others(connect):
    a, b = connect("a"), connect("b")
    a.join("r")
    b.join("r")
    victim = connect("victim")
    victim.join("r")
    half = P.encode(P.Emit(0, 0, "r", "e", b"y" * 5000))[:2000]
    victim.send_raw(half)
    victim.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    victim.close()  # RST in the middle of a frame
    assert reply_count(a.emit_room("r", "e", b"after")) >= 1
    assert b.recv_type(P.Event).payload == b"after"


# ------------------------------------------------------------ process level


def test_sigterm_flushes_queue_then_shutting_down_then_exit_0(server_factory, connect):
    srv = server_factory()
    a, b = connect("a", srv=srv), connect("b", srv=srv)
    a.join("r")
    b.join("r")
    for i in range(200):
        a.send(P.Emit(0, 0, "r", "e", str(i).encode()))
    a.send(P.Ping(77))
    assert a.recv_type(P.ServerPong).nonce == 77  # all 200 were handled
    srv.signal(signal.SIGTERM)
    got = [b.recv_type(P.Event).payload for _ in range(200)]
    assert got == [str(i).encode() for i in range(200)]
    b.expect_error(P.SHUTTING_DOWN)
    a.expect_error(P.SHUTTING_DOWN)
    a.close()
    b.close()
    assert srv.wait() == 0


def test_sigint_with_no_clients_exits_0(server):
    server.signal(signal.SIGINT)
    assert server.wait() == 0


def test_second_sigint_exits_at_once(server_factory):
    srv = server_factory("--drain-timeout", "30")
    c = RawClient(srv.address)
    c.hello("stubborn")  # never reads, never closes: would hold the drain
    srv.signal(signal.SIGINT)
    time.sleep(0.3)
    srv.signal(signal.SIGINT)
    assert srv.wait(timeout=5) == 130
    c.close()


def test_port_in_use_exits_1_with_one_line(server):
    proc = subprocess.run(
        [sys.executable, "-m", "muxserver", "--port", str(server.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"muxserver: port {server.port} is already in use (pick another")
    assert proc.stderr.count("\n") == 1
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "args", [["--port", "99999"], ["--max-frame", "abc"], ["--bogus"], ["--ping-interval", "-1"]]
)
def test_bad_arguments_exit_2(args):
    proc = subprocess.run(
        [sys.executable, "-m", "muxserver", *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "error" in proc.stderr


def test_bad_environment_value_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "muxserver"],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, MUXSERVER_PORT="seven"),
    )
    assert proc.returncode == 2 and "MUXSERVER_PORT" in proc.stderr


def test_environment_and_command_line_precedence():
    srv = ServerProcess(env={"MUXSERVER_NAME": "from-env", "MUXSERVER_MAX_FRAME": "5000"})
    try:
        w = RawClient(srv.address).hello("a")
        assert (w.server_name, w.max_frame) == ("from-env", 5000)
    finally:
        srv.stop()
    srv = ServerProcess("--name", "from-cli", env={"MUXSERVER_NAME": "from-env"})
    try:
        assert RawClient(srv.address).hello("a").server_name == "from-cli"
    finally:
        srv.stop()


def test_ready_line_exact(server):
    assert server.ready_line == f"muxserver listening on 127.0.0.1:{server.port}\n"


def test_ipv6_loopback(server_factory, connect):
    if not socket.has_ipv6:
        pytest.fail("IPv6 not available")
    srv = server_factory("--host", "::1")
    assert srv.ready_line.startswith("muxserver listening on [::1]:")
    assert srv.address == ("::1", srv.port)
    c = connect(hello=False, srv=srv)
    assert c.hello("six").nick == "six"


def test_one_read_mixing_emits_and_requests(connect):
    """Runs of EMITs in one read are batched; every ordering rule must still hold."""
    a, b, c = connect("a"), connect("b"), connect("c")
    for x in (a, b, c):
        x.join("r1")
    a.join("r2")
    b.join("r2")
    frames = [
        P.Emit(0, 0, "r1", "e", b"1"),
        P.Emit(1, 0, "r1", "e", b"2"),  # acked, same run
        P.Emit(0, 0, "r1", "e", b"3", P.EMIT_ECHO),  # echo starts a new run
        P.Emit(0, 0, "r2", "e", b"4"),
        P.Leave(2, "r1"),
        P.Emit(3, 0, "r1", "e", b"lost"),  # no longer a member
        P.Nick(4, "aa"),
        P.Emit(0, 0, "r2", "e", b"5"),  # carries the new nick
        P.Emit(5, 0, "r2", "e", b"6", P.EMIT_ECHO),  # echo + ack: echo before reply
    ]
    a.send_raw(b"".join(P.encode(f) for f in frames))
    got_a = [a.recv() for _ in range(7)]
    assert got_a[3].status == P.NOT_MEMBER
    assert got_a == [
        P.Reply(1, 0, b"\x00\x00\x00\x02"),
        P.Event(0, "a", "r1", "e", b"3"),
        P.Reply(2, 0, b""),
        P.Reply(3, P.NOT_MEMBER, got_a[3].body),
        P.Reply(4, 0, b""),
        P.Event(0, "aa", "r2", "e", b"6"),
        P.Reply(5, 0, b"\x00\x00\x00\x02"),
    ]
    got_b = [b.recv_type(P.Event) for _ in range(6)]
    assert [(e.sender, e.source, e.payload) for e in got_b] == [
        ("a", "r1", b"1"), ("a", "r1", b"2"), ("a", "r1", b"3"), ("a", "r2", b"4"),
        ("aa", "r2", b"5"), ("aa", "r2", b"6"),
    ]  # fmt: skip
    got_c = [c.recv_type(P.Event) for _ in range(3)]
    assert [e.payload for e in got_c] == [b"1", b"2", b"3"]
    c.send(P.Ping(1))
    assert c.recv() == P.ServerPong(1)  # nothing after a left r1
