"""Sessions over the in-memory transport: the whole server, no sockets, fake time.

These run the real Server (sessions, router, hub, StreamTransport's output
bookkeeping) over muxserver.testing.MemoryPair, so every close path and
timer rule is checked in milliseconds.
"""

import logging

import pytest

from muxserver import protocol as P
from muxserver.session import CLOSED, CLOSING, DRAINING
from muxserver.testing import MemoryPair, memory_server


@pytest.fixture
def srv():
    server, clock = memory_server(ping_interval=10, ping_timeout=5, drain_timeout=2)
    server.clock = clock
    return server


def client(server, nick, version=1, capacity=1 << 20):
    c = MemoryPair(server, capacity)
    c.send(P.Hello(version, "/", nick, ""))
    [welcome] = c.frames()
    assert isinstance(welcome, P.Welcome) and welcome.nick == nick
    return c


def test_hello_join_emit_event(srv):
    a, b = client(srv, "a"), client(srv, "b")
    a.send(P.Join(1, "r"))
    b.send(P.Join(2, "r"))
    assert a.frames() == [P.Reply(1, P.OK)]
    assert b.frames() == [P.Reply(2, P.OK)]
    a.send(P.Emit(3, P.TARGET_ROOM, "r", "msg", b"hi"))
    assert b.frames() == [P.Event(0, "a", "r", "msg", b"hi")]
    assert a.frames() == [P.Reply(3, P.OK, P.U32.pack(1))]


def test_echo_and_runs_keep_order(srv):
    a, b = client(srv, "a"), client(srv, "b")
    a.send(P.Join(1, "r"))
    b.send(P.Join(1, "r"))
    a.frames(), b.frames()
    # One read: a run of three echoed EMITs without acks, then an acked one.
    a.send(*(P.Emit(0, 0, "r", "m", bytes([i]), P.EMIT_ECHO) for i in range(3)),
           P.Emit(9, 0, "r", "m", b"z", P.EMIT_ECHO))  # fmt: skip
    want = [P.Event(0, "a", "r", "m", bytes([i])) for i in range(3)]
    want.append(P.Event(0, "a", "r", "m", b"z"))
    assert b.frames() == want
    assert a.frames() == [*want, P.Reply(9, P.OK, P.U32.pack(2))]


def test_version_2_payload_types_and_version_1_members(srv):
    """One message, two encodings: the v1 member gets no payload-type bits."""
    a, b, old = client(srv, "a", 2), client(srv, "b", 2), client(srv, "old", 1)
    for c in (a, b, old):
        c.send(P.Join(1, "r"))
        c.frames()
    a.send(P.Emit(5, 0, "r", "j", b'{"x":1}', P.emit_flags(False, P.PAYLOAD_JSON)))
    [ev] = b.frames()
    assert (ev.kind, ev.payload_type, ev.payload) == (P.TARGET_ROOM, P.PAYLOAD_JSON, b'{"x":1}')
    assert old.frames() == [P.Event(0, "a", "r", "j", b'{"x":1}')]
    [reply] = a.frames()
    assert P.parse_emit_reply(reply.body) == (2, 1)  # v2 REPLY: recipients and the seq
    # Payload type 3 is reserved in version 2 ...
    a.send(P.Emit(6, 0, "r", "j", b"", 0b110))
    assert a.frames()[-1].code == P.BAD_FRAME
    # ... and the same bits mean nothing from a version-1 sender.
    old.send(P.Emit(7, 0, "r", "j", b"", 0b110))
    assert P.parse_count(old.frames()[0].body) == 1
    assert b.frames() == [P.Event(0, "old", "r", "j", b"")]


def test_nicks_ignore_case_and_width(srv):
    client(srv, "Bob")
    for taken in ("bob", "BOB", "ｂｏｂ"):
        c = MemoryPair(srv)
        c.send(P.Hello(1, "/", taken, ""))
        [err] = c.frames()
        assert err.code == P.NICK_TAKEN and "Bob" in err.message
    alice = client(srv, "alice")
    alice.send(P.Nick(1, "ALICE"))  # only the case changes: the same person
    assert alice.frames() == [P.Reply(1, P.OK)]
    alice.send(P.Emit(2, P.TARGET_DIRECT, "BOB", "dm", b"hi"))
    assert P.parse_count(alice.frames()[0].body) == 1


def test_bye_flushes_then_fin_then_close_on_eof(srv):
    a = client(srv, "a")
    a.send(P.Ping(7), P.Bye())
    assert a.frames() == [P.ServerPong(7)]
    assert a.session.state == DRAINING and a.socket.fin
    a.close()
    assert a.session.state == CLOSED and a.socket.closed


def test_fatal_error_then_drain_timeout(srv):
    a = client(srv, "a")
    a.send_raw(b"\x00\x00\x00\x00")  # length 0
    [err] = a.frames()
    assert err.code == P.BAD_FRAME
    assert a.session.state == DRAINING
    srv.clock.advance(2.1)
    srv.loop.run_timers()
    assert a.session.state == CLOSED


def test_idle_timeout_on_fake_time(srv):
    a = client(srv, "a")
    srv.clock.advance(10)
    srv.protocol.sweep([a.session], srv.loop.time())
    assert a.frames() == [P.ServerPing(1)]
    srv.clock.advance(5)
    srv.protocol.sweep([a.session], srv.loop.time())
    assert a.frames()[0].code == P.IDLE_TIMEOUT


def test_slow_consumer_gets_what_reached_it_then_the_error():
    server, _ = memory_server(max_output=4096)
    a = client(server, "a")
    slow = client(server, "slow", capacity=1000)
    a.send(P.Join(1, "r"))
    slow.send(P.Join(1, "r"))
    a.frames(), slow.frames()
    a.send(*(P.Emit(0, 0, "r", "m", b"x" * 100) for _ in range(60)))
    server.flush()
    assert slow.session.state == CLOSING
    frames = slow.frames()  # reading frees the kernel buffer: the rest follows
    frames += slow.frames()
    assert isinstance(frames[-1], P.Error) and frames[-1].code == P.SLOW_CONSUMER
    assert all(isinstance(f, P.Event) for f in frames[:-1])
    assert a.session.state != CLOSED  # the sender is not slowed down


def test_rate_limit_on_fake_time():
    server, clock = memory_server(rate_limit=2, rate_burst=2)
    a = client(server, "a")
    a.send(P.Join(1, "r"))
    a.frames()
    a.send(*(P.Emit(10 + i, 0, "r", "m", b"") for i in range(3)))
    statuses = [f.status for f in a.frames()]
    assert statuses == [P.OK, P.OK, P.RATE_LIMITED]
    clock.advance(0.5)  # one token back
    a.send(P.Emit(20, 0, "r", "m", b""), P.Emit(21, 0, "r", "m", b""))
    assert [f.status for f in a.frames()] == [P.OK, P.RATE_LIMITED]


def test_a_bug_in_a_handler_closes_only_that_connection(srv, caplog, monkeypatch):
    a, b = client(srv, "a"), client(srv, "b")
    a.send(P.Join(1, "r"))
    b.send(P.Join(1, "r", P.JOIN_PRESENCE))
    a.frames(), b.frames()
    who = srv.protocol.handlers[P.WHO]

    def broken(sess, body):
        if sess is a.session:
            raise RuntimeError("boom")
        who(sess, body)

    monkeypatch.setitem(srv.protocol.handlers, P.WHO, broken)
    with caplog.at_level(logging.ERROR, logger="muxserver"):
        a.send(P.Who(3, "r"))
    assert a.session.state == CLOSED
    assert srv.stats["internal_errors"] == 1
    assert "boom" in caplog.text and "Traceback" in caplog.text
    # Everyone else carries on, and was told the broken one left.
    assert b.frames() == [P.Presence(P.PRESENCE_LEAVE, "r", "a")]
    b.send(P.Who(4, "r"))
    assert P.parse_who(b.frames()[0].body) == (1, ["b"])


def test_the_example_in_docs_architecture_runs():
    """docs/architecture.md shows socket-free testing; it must stay true."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/architecture.md", "exec"), {})


def test_a_bug_while_containing_a_bug_still_leaves_the_loop_running(srv, caplog, monkeypatch):
    """The containment's own close failing (say, a transport already gone) stays contained."""
    a, b = client(srv, "a"), client(srv, "b")
    a.send(P.Join(1, "r"))
    b.send(P.Join(1, "r"))
    a.frames(), b.frames()

    def broken(sess, body):
        raise RuntimeError("boom")

    transport = a.session.transport
    close = type(transport).close

    def close_fails(self, loop):
        if self is transport:
            raise AttributeError("'NoneType' object has no attribute 'close'")
        close(self, loop)

    monkeypatch.setitem(srv.protocol.handlers, P.WHO, broken)
    monkeypatch.setattr(type(transport), "close", close_fails)
    with caplog.at_level(logging.ERROR, logger="muxserver"):
        a.send(P.Who(3, "r"))  # raised out of receive() before the fix
    assert "internal error while closing" in caplog.text
    assert a.session.id not in srv.sessions
    b.send(P.Emit(4, P.TARGET_ROOM, "r", "m", b"still here"))
    assert [f.status for f in b.frames()] == [P.OK]


@pytest.mark.parametrize("member", ["plain", "v1", "sequenced-only"])
def test_history_counts_the_bytes_of_every_run(member):
    """A run's history bytes come from its joined frames (session._end_run),
    not from summing the tails: they must still equal what the room holds,
    whatever mix of sizes, acks, payload types and members the runs had."""
    srv, _clock = memory_server(history_size=1000)
    a = client(srv, "a", 2)
    b = client(srv, "b", 1 if member == "v1" else 2)
    a.send(P.Join(1, "r", P.JOIN_SEQUENCED if member == "sequenced-only" else 0))
    b.send(P.Join(1, "r", P.JOIN_SEQUENCED if member == "sequenced-only" else 0))
    a.frames(), b.frames()
    typed = 1 << 1  # payload type 1 (text) in the EMIT flags, version 2
    runs = [
        [P.Emit(0, 0, "r", "m", b"x" * 10) for _ in range(5)],
        [P.Emit(0, 0, "r", "m", b"y" * n) for n in (1, 50, 7, 7, 300)],
        [P.Emit(0, 0, "r", "m", b"z", typed), P.Emit(0, 0, "r", "m", b"zz", typed)],
        [
            P.Emit(0, 0, "r", "m", b"a"),
            P.Emit(2, 0, "r", "m", b"acked"),
            P.Emit(0, 0, "r", "m", b""),
        ],
    ]
    for run in runs:
        a.send(*run)
    a.frames(), b.frames()
    history = srv.protocol.history
    [held] = history._rooms.values()
    assert sum(map(len, held.items[held.head :])) == held.bytes == history.bytes_held
    assert held.held == sum(map(len, runs))
