"""Session resume (protocol section 10) on the whole server, over the in-memory transport.

Parking on a lost connection, IDLE_TIMEOUT and SLOW_CONSUMER (and not after
BYE or a protocol error), resume within and after the window, single-use
tokens, REPLACED, silent SEQUENCED memberships until re-joined, and
version-1 sessions, which never park. The last tests use a real server
process and real sockets.
"""

import pytest

from muxserver import protocol as P
from muxserver.resume import PARKED
from muxserver.session import CLOSED
from muxserver.stats import render_metrics
from muxserver.testing import MemoryPair, memory_server

SEQ = P.JOIN_SEQUENCED


def make(**config):
    config.setdefault("ping_interval", 10)
    config.setdefault("ping_timeout", 5)
    config.setdefault("resume_window", 30)
    server, clock = memory_server(**config)
    server.clock = clock
    return server


@pytest.fixture
def srv():
    return make()


def hello(server, nick, version=2, resume="", capacity=1 << 20, ns="/"):
    c = MemoryPair(server, capacity)
    c.send(P.Hello(version, ns, nick, "", resume))
    frames = c.frames()
    assert isinstance(frames[0], P.Welcome), frames
    c.welcome = frames[0]
    return c


def joined(c, *rooms, flags=0):
    for i, room in enumerate(rooms):
        c.send(P.Join(i + 1, room, flags))
    assert all(f.status == P.OK for f in c.frames())


def watcher(server, *rooms):
    w = hello(server, "w", version=1)
    joined(w, *rooms, flags=P.JOIN_PRESENCE)
    return w


def who(c, room):
    c.send(P.Who(99, room))
    [reply] = [f for f in c.frames() if isinstance(f, P.Reply) and f.req == 99]
    return P.parse_who(reply.body)[1]


def presences(c):
    return [f for f in c.frames() if isinstance(f, P.Presence)]


def park(server, c):
    """Drop ``c``'s connection (EOF); the session parks."""
    sess = c.session
    c.close()
    assert sess.state == PARKED
    return sess


# ================================================================ parking
def test_welcome_v2_carries_a_token_and_the_window(srv):
    a = hello(srv, "a")
    w = a.welcome
    assert 16 < len(w.resume_token.encode()) <= 64 and w.resume_window_ms == 30000
    assert w.resumed == 0
    b = hello(srv, "b")
    assert b.welcome.resume_token != w.resume_token


def test_resume_within_the_window(srv):
    w = watcher(srv, "plain", "seq")
    a = hello(srv, "a")
    joined(a, "plain")
    a.send(P.Join(5, "seq", SEQ, 0, 0, 0))
    (_, epoch, _, _) = P.parse_join_reply(a.frames()[0].body)
    s = hello(srv, "s")
    joined(s, "plain", "seq")
    w.frames()
    s.send(P.Emit(0, 0, "seq", "m", b"1"))
    assert [f.seq for f in a.frames()] == [1]
    token = a.welcome.resume_token
    sess = park(srv, a)
    # Parked: a member still, nick reserved, no PRESENCE leave, nothing queued.
    assert presences(w) == []
    assert who(w, "plain") == ["w", "a", "s"] and who(w, "seq") == ["w", "a", "s"]
    c = MemoryPair(srv)
    c.send(P.Hello(2, "/", "a", ""))
    assert c.frames()[0].code == P.NICK_TAKEN
    s.send(P.Emit(0, 0, "plain", "m", b"lost"), P.Emit(7, 0, "seq", "m", b"2"))
    assert P.parse_emit_reply(s.frames()[0].body) == (1, 2)  # a parked member is no recipient
    s.send(P.Emit(8, P.TARGET_DIRECT, "a", "m", b""), P.Emit(9, P.TARGET_BROADCAST, "", "m", b""))
    assert [P.parse_emit_reply(f.body) for f in s.frames()] == [(0, 0), (1, 0)]
    assert len(sess.out) == 0
    # Resume: same session, nick and rooms, a new token, no PRESENCE join.
    b = hello(srv, "ignored", resume=token)
    assert b.welcome.resumed == 1 and b.welcome.nick == "a"
    assert b.welcome.conn_id not in (a.welcome.conn_id, 0) and b.session is sess
    assert b.welcome.conn_id == sess.id  # conn_id names the connection
    assert b.welcome.resume_token not in ("", token)
    assert presences(w) == []
    # Plain rooms are live at once; the message sent while parked is gone.
    s.send(P.Emit(0, 0, "plain", "m", b"now"), P.Emit(0, 0, "seq", "m", b"3"))
    assert b.frames() == [P.Event(0, "s", "plain", "m", b"now")]  # seq room: silent
    # Re-joined with its position, the SEQUENCED room replays what was missed.
    b.send(P.Join(9, "seq", SEQ, epoch, 1, P.REPLAY_ALL))
    got = b.frames()
    assert P.parse_join_reply(got[0].body) == (P.COMPLETE, epoch, 2, 3)
    assert [(f.seq, f.payload) for f in got[1:]] == [(2, b"2"), (3, b"3")]
    assert presences(w) == []  # the re-JOIN is no PRESENCE either
    assert srv.stats["resumes"] == 1


def test_window_ends_with_presence_leave_and_a_free_nick(srv):
    w = watcher(srv, "r")
    a = hello(srv, "a")
    joined(a, "r")
    w.frames()
    token = a.welcome.resume_token
    park(srv, a)
    srv.clock.advance(29)
    srv.loop.run_timers()
    assert w.frames() == []
    srv.clock.advance(1)
    srv.loop.run_timers()
    assert w.frames() == [P.Presence(P.PRESENCE_LEAVE, "r", "a")]
    assert who(w, "r") == ["w"]
    # An expired token is no error: a fresh session with the nick it names.
    b = hello(srv, "a", resume=token)
    assert b.welcome.resumed == 0 and b.welcome.nick == "a"
    assert b.session.rooms == {}
    assert srv.stats["parked_expired"] == 1


def test_a_token_works_once(srv):
    a = hello(srv, "a")
    token = a.welcome.resume_token
    park(srv, a)
    b = hello(srv, "", resume=token)
    assert b.welcome.resumed == 1
    park(srv, b)
    c = hello(srv, "c", resume=token)  # the first token again
    assert c.welcome.resumed == 0 and c.welcome.nick == "c"
    d = hello(srv, "", resume=b.welcome.resume_token)  # the second one works
    assert d.welcome.resumed == 1 and d.welcome.nick == "a"


def test_a_forged_or_foreign_token_is_a_fresh_session(srv):
    a = hello(srv, "a")
    token = a.welcome.resume_token
    park(srv, a)
    selector, _, validator = token.partition(".")
    forged = validator[:-1] + ("x" if validator[-1] != "x" else "y")  # (1 in 64 ends in x)
    for bad in (selector + "." + forged, selector, "junk", "\udcff.x"):
        c = hello(srv, "", resume=bad)
        assert c.welcome.resumed == 0
    other_ns = hello(srv, "", resume=token, ns="/other")
    assert other_ns.welcome.resumed == 0
    assert hello(srv, "", resume=token).welcome.resumed == 1


def test_replaced_when_the_old_connection_is_still_open(srv):
    w = watcher(srv, "r")
    a = hello(srv, "a")
    joined(a, "r")
    w.frames()
    b = hello(srv, "", resume=a.welcome.resume_token)
    assert b.welcome.resumed == 1 and b.welcome.nick == "a"
    old = a.frames()
    assert old[-1] == P.Error(P.REPLACED, "this session was resumed elsewhere")
    assert a.socket.fin and a.session.state != PARKED
    assert w.frames() == [] and who(w, "r") == ["w", "a"]
    w.send(P.Emit(0, 0, "r", "m", b"x"))
    assert b.frames() == [P.Event(0, "w", "r", "m", b"x")]
    assert a.frames() == []
    assert srv.stats["resumes_replaced"] == 1


def test_resume_after_idle_timeout(srv):
    w = watcher(srv, "r")
    a = hello(srv, "a")
    joined(a, "r")
    w.frames()
    sess = a.session
    srv.clock.advance(15)
    w.send(P.Ping(1))  # the watcher stays alive
    srv.protocol.sweep(list(srv.sessions.values()), srv.clock.now)
    assert a.frames()[-1].code == P.IDLE_TIMEOUT
    assert sess.state == PARKED and w.frames() == [P.ServerPong(1)]
    b = hello(srv, "", resume=a.welcome.resume_token)
    assert b.welcome.resumed == 1 and b.session is sess


def test_resume_after_slow_consumer_replays_what_was_dropped():
    srv = make(max_output=16 << 10, history_size=1000, history_bytes=4 << 20)
    s = hello(srv, "s")
    joined(s, "r")
    a = hello(srv, "a", capacity=4 << 10)
    a.send(P.Join(1, "r", SEQ, 0, 0, 0))
    (_, epoch, _, _) = P.parse_join_reply(a.frames()[0].body)
    sess = a.session
    s.send(*(P.Emit(0, 0, "r", "m", i.to_bytes(1000, "big")) for i in range(100)))
    got = []
    while not got or not isinstance(got[-1], P.Error):
        got += a.frames()
    assert got[-1].code == P.SLOW_CONSUMER and sess.state == PARKED
    last = max(f.seq for f in got if isinstance(f, P.EventSeq))
    assert last < 100
    b = hello(srv, "", resume=a.welcome.resume_token)
    assert b.welcome.resumed == 1
    b.send(P.Join(2, "r", SEQ, epoch, last, P.REPLAY_ALL))
    frames = []
    for _ in range(1000):
        frames += b.frames(4 << 10)
        if frames and isinstance(frames[-1], P.EventSeq) and frames[-1].seq == 100:
            break
    assert P.parse_join_reply(frames[0].body) == (P.COMPLETE, epoch, last + 1, 100)
    assert [f.seq for f in frames[1:]] == list(range(last + 1, 101))
    assert srv.stats["slow_consumers"] == 1


def test_bye_and_protocol_errors_do_not_park(srv):
    w = watcher(srv, "r")
    for i, ending in enumerate((P.encode(P.Bye()), P.encode_frame(0x7F))):
        a = hello(srv, "a")
        joined(a, "r")
        w.frames()
        token = a.welcome.resume_token
        a.send_raw(ending)
        a.frames()
        assert a.session.state != PARKED
        assert w.frames() == [P.Presence(P.PRESENCE_LEAVE, "r", "a")]
        a.close()
        assert hello(srv, f"x{i}", resume=token).welcome.resumed == 0
    assert srv.protocol.resumer.parked_count == 0


def test_version_1_sessions_never_park(srv):
    w = watcher(srv, "r")
    a = hello(srv, "a", version=1)
    assert a.welcome == P.Welcome(1, a.welcome.conn_id, "a", srv.config.max_frame, 10000,
                                  "muxserver")  # fmt: skip
    joined(a, "r")
    w.frames()
    a.close()
    assert a.session.state == CLOSED
    assert w.frames() == [P.Presence(P.PRESENCE_LEAVE, "r", "a")]


def test_resume_window_0_turns_it_off():
    srv = make(resume_window=0)
    w = watcher(srv, "r")
    a = hello(srv, "a")
    assert (a.welcome.resume_token, a.welcome.resume_window_ms) == ("", 0)
    joined(a, "r")
    w.frames()
    a.close()
    assert w.frames() == [P.Presence(P.PRESENCE_LEAVE, "r", "a")]


def test_metrics_count_history_replays_and_resumes(srv):
    s = hello(srv, "s")
    joined(s, "r")
    s.send(*(P.Emit(0, 0, "r", "m", b"x") for _ in range(3)))
    a = hello(srv, "a")
    a.send(P.Join(1, "r", SEQ, 0, 0, 2))
    a.frames()
    park(srv, a)
    text = render_metrics(srv.snapshot())
    for line in (
        "muxserver_history_messages 3",
        'muxserver_replays_total{outcome="fresh"} 1',
        "muxserver_replayed_messages_total 2",
        "muxserver_parked_sessions 1",
        'muxserver_resumes_total{how="parked"} 0',
    ):
        assert line in text.splitlines(), line
    hello(srv, "", resume=a.welcome.resume_token)
    text = render_metrics(srv.snapshot())
    assert 'muxserver_resumes_total{how="parked"} 1' in text.splitlines()
    assert "muxserver_parked_sessions 0" in text.splitlines()


# ============================================================ real process
def raw_hello(address, nick, resume=""):
    from conftest import RawClient

    c = RawClient(address)
    c.send(P.Hello(2, "/", nick, "", resume))
    c.welcome = c.recv_type(P.Welcome)
    return c


def test_real_server_resume_after_a_dropped_socket(server_factory):
    srv = server_factory("--resume-window", "30")
    w = raw_hello(srv.address, "w")
    w.request(P.Join(1, "r", P.JOIN_PRESENCE))
    a = raw_hello(srv.address, "a")
    reply = a.request(P.Join(1, "r", SEQ, 0, 0, 0))
    epoch = P.parse_join_reply(reply.body)[1]
    assert w.recv_type(P.Presence) == P.Presence(P.PRESENCE_JOIN, "r", "a")
    a.close()  # no BYE
    for i in range(3):
        w.request(P.Emit(10 + i, 0, "r", "m", b"%d" % i))
    assert P.parse_who(w.request(P.Who(20, "r")).body)[1] == ["w", "a"]
    b = raw_hello(srv.address, "", resume=a.welcome.resume_token)
    assert (b.welcome.resumed, b.welcome.nick) == (1, "a")
    reply = b.request(P.Join(2, "r", SEQ, epoch, 0, P.REPLAY_ALL))
    assert P.parse_join_reply(reply.body) == (P.COMPLETE, epoch, 1, 3)
    assert [b.recv_type(P.EventSeq).payload for _ in range(3)] == [b"0", b"1", b"2"]
    # REPLACED: a third connection takes the session over from b.
    c = raw_hello(srv.address, "", resume=b.welcome.resume_token)
    assert c.welcome.resumed == 1
    b.expect_error(P.REPLACED)
    reply = c.request(P.Join(3, "r", SEQ, epoch, 3, P.REPLAY_ALL))
    assert P.parse_join_reply(reply.body) == (P.COMPLETE, epoch, 4, 3)
    w.request(P.Emit(30, 0, "r", "m", b"live"))
    assert c.recv_type(P.EventSeq).seq == 4
    with pytest.raises(TimeoutError):
        w.recv(timeout=0.3)  # no PRESENCE at any point


def test_real_server_options_from_the_environment(server_factory):
    srv = server_factory(env={"MUXSERVER_HISTORY_SIZE": "0", "MUXSERVER_RESUME_WINDOW": "0"})
    a = raw_hello(srv.address, "a")
    assert (a.welcome.resume_token, a.welcome.resume_window_ms) == ("", 0)
    reply = a.request(P.Join(1, "r", SEQ, 0, 0, P.REPLAY_ALL))
    assert P.parse_join_reply(reply.body) == (P.FRESH, 0, 1, 0)
    b = raw_hello(srv.address, "b")
    b.request(P.Join(1, "r"))
    assert P.parse_emit_reply(b.request(P.Emit(2, 0, "r", "m", b"x")).body) == (1, 0)
    assert a.recv_type(P.EventSeq) == P.EventSeq(0, 0, "b", "r", "m", b"x")


def test_bad_history_options_exit_2():
    import subprocess
    import sys

    for args in (["--history-size", "-1"], ["--resume-window", "x"], ["--history-ttl", "-5"]):
        proc = subprocess.run([sys.executable, "-m", "muxserver", *args],
                              capture_output=True, text=True, timeout=20)  # fmt: skip
        assert proc.returncode == 2 and args[0] in proc.stderr, (args, proc.stderr)


def test_real_server_resume_after_idle_timeout_over_websocket(server_factory):
    # A parked WebSocket session: the loop may still call the connection's
    # first (sniffing) transport, which must reach the shell that now holds
    # it, not the parked session (once a crash of the whole server).
    from conftest import WsRawClient

    from muxserver.client import Client, Event, Presence

    srv = server_factory("--ping-interval", "0.5", "--ping-timeout", "0.5")
    w = Client.connect(*srv.address, nick="w", heartbeat=True)  # stays alive meanwhile
    w.join("r", presence=True)
    a = WsRawClient(srv.address)
    a.send(P.Hello(2, "/", "a", "", ""))
    token = a.recv_type(P.Welcome).resume_token
    epoch = P.parse_join_reply(a.request(P.Join(1, "r", SEQ, 0, 0, 0)).body)[1]
    assert w.recv(timeout=5) == Presence("join", "r", "a", None)
    a.expect_error(P.IDLE_TIMEOUT, timeout=5)  # silent: never answers the PING
    assert a.close_code == 4000 + P.IDLE_TIMEOUT
    for i in range(2):
        w.emit("m", b"%d" % i, room="r", ack=True)
    b = WsRawClient(srv.address)
    b.send(P.Hello(2, "/", "", "", token))
    assert (b.recv_type(P.Welcome).resumed, srv.proc.poll()) == (1, None)
    reply = b.request(P.Join(2, "r", SEQ, epoch, 0, P.REPLAY_ALL))
    assert P.parse_join_reply(reply.body) == (P.COMPLETE, epoch, 1, 2)
    assert [b.recv_type(P.EventSeq).payload for _ in range(2)] == [b"0", b"1"]
    w.emit("m", b"live", room="r", ack=True)
    assert b.recv_type(P.EventSeq).seq == 3
    item = w.recv(timeout=0.3)
    assert item is None or isinstance(item, Event), item  # the session never left: no PRESENCE
    w.close()


def test_real_server_websocket_close_without_bye_parks_like_eof(server_factory):
    # Section 11: "A Close from the client ends the session like EOF", and EOF
    # parks a v2 session (section 10): no PRESENCE leave, WHO still counts it,
    # and its token resumes it. A BYE first would have ended it for good.
    from conftest import WsRawClient
    from wsproto.events import CloseConnection

    from muxserver.client import Client, Event

    srv = server_factory()
    w = Client.connect(*srv.address, nick="w")
    w.join("r", presence=True, sequenced=False)
    a = WsRawClient(srv.address)
    a.send(P.Hello(2, "/", "a", "", ""))
    token = a.recv_type(P.Welcome).resume_token
    a.request(P.Join(1, "r"))
    assert w.recv(timeout=5).kind == "join"
    a.sock.sendall(a.ws.send(CloseConnection(code=1001, reason="tab in background")))
    a.expect_closed()
    assert a.close_code == 1001  # our Close answered with the same code
    assert [name for name in w.who("r")] == ["w", "a"]  # parked, still a member
    item = w.recv(timeout=0.3)
    assert item is None or isinstance(item, Event), item  # no PRESENCE leave
    b = WsRawClient(srv.address)
    b.send(P.Hello(2, "/", "", "", token))
    welcome = b.recv_type(P.Welcome)
    assert (welcome.resumed, welcome.nick) == (1, "a")
    w.emit("m", b"back", room="r")
    assert b.recv_type(P.Event).payload == b"back"
    w.close()


def test_a_read_scheduled_before_a_park_goes_to_whoever_holds_the_connection(srv, monkeypatch):
    """TLS keeps decrypted bytes with no readiness event, so the server schedules one more read
    (``_read_again``). If the peer's EOF parks the session first, the read must not go to the
    parked session, which has no connection any more (the soak's TLS resumers crashed the
    whole server that way)."""
    from muxserver.loop import EVENT_READ
    from muxserver.testing import MemoryTransport

    a = hello(srv, "a")
    sess = a.session
    # As an SSL object with a record left over: the read schedules one more.
    monkeypatch.setattr(MemoryTransport, "more_buffered", lambda self: True)
    a.socket.inbox += P.encode(P.Ping(1))
    srv._on_event(sess, EVENT_READ)
    monkeypatch.setattr(MemoryTransport, "more_buffered", lambda self: False)
    a.socket.peer_eof = True
    srv._on_event(sess, EVENT_READ)  # end of stream first: the session parks
    assert sess.state == PARKED
    srv.loop.run_timers()  # then the scheduled read: the shell has closed, nobody reads
    assert sess.state == PARKED and srv.stats["internal_errors"] == 0
    b = hello(srv, "", resume=a.welcome.resume_token)
    assert b.welcome.resumed == 1 and b.welcome.nick == "a"


def test_websocket_session_parked_by_idle_timeout_then_resumed(server_factory):
    """The loop keeps calling the sniffed stream transport until the WebSocket one changes its
    interest; after a park that must still reach whoever holds the connection (the shell that
    sends the ERROR and drains), not the parked session (the server used to crash on the
    client's Close reply)."""
    from conftest import WsRawClient

    srv = server_factory(
        "--ping-interval", "0.3", "--ping-timeout", "0.3", "--log-level", "warning"
    )
    a = WsRawClient(srv.address)
    token = a.hello("a", version=2).resume_token
    a.expect_error(P.IDLE_TIMEOUT)  # ...and answers the server's Close: input for the shell
    a.close()
    b = WsRawClient(srv.address)
    b.send(P.Hello(2, "/", "", "", token))
    welcome = b.recv_type(P.Welcome)
    assert (welcome.resumed, welcome.nick) == (1, "a")
    b.send(P.Ping(3))
    assert b.recv_type(P.ServerPong).nonce == 3
    b.close()
    assert srv.proc.poll() is None
