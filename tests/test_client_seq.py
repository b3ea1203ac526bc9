"""Sequenced rooms in the clients (protocol sections 9 and 10): positions, replay, Recovery.

First the pure bookkeeping (muxserver.clientseq) and the client's frame
routing fed decoded frames, without sockets (GAP frames, which a real server
sends only when eviction overtakes a slow replay, are tested here). Then
the blocking client against real server processes: positions that move only
once the handlers returned, a cut connection that comes back with every
missed message exactly once, GAP with a small --history-size, RESET after a
restart, history=N, plain rooms and version 1. The asyncio client's
versions of the same are in tests/test_aio_seq.py.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest
from conftest import restart_on_same_port

from muxserver import protocol as P
from muxserver.client import Backoff, Client, ConnectionClosed, Event, Recovery
from muxserver.clientseq import Quiet, Tracker, check_history

FAST = Backoff(initial=0.05, maximum=0.2, jitter=0)
EPOCH = 0xE90C


def poll_until(client: Client, cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        client.poll(0.05)


def seq_event(seq: int, room: str = "r", text: str = "m") -> P.EventSeq:
    return P.EventSeq(seq, P.TARGET_ROOM | P.PAYLOAD_TEXT << P.EVENT_TYPE_SHIFT, "bob", room,
                      "chat", text.encode())  # fmt: skip


# ====================================================== pure bookkeeping
def answered(tracker: Tracker, room: str, reply: tuple, history: int = 0, quiet=False):
    """Send a JOIN for ``room`` through ``tracker`` and read ``reply`` (recovery, epoch, first, last)."""
    pending, join = tracker.join(7, room, history, quiet)
    tracker.sent(7, pending)
    frame = P.reply_join_seq(7, *reply)
    return join, tracker.on_reply(P.decode(frame[4], frame[5:]))


def hand_out(tracker: Tracker, item):
    item = tracker.take(item)
    if item is not None:
        tracker.done(item)
    return item


def as_event(tracker: Tracker, msg: P.EventSeq) -> Event | None:
    replayed = tracker.on_event(msg, msg.source)
    if replayed is None:
        return None
    return Event(msg.event, msg.payload, msg.sender, "room", msg.source, 1, seq=msg.seq,
                 replayed=replayed)  # fmt: skip


def test_tracker_fresh_join_then_resume_from_the_position():
    t = Tracker()
    join, rec = answered(t, "r", (P.FRESH, EPOCH, 4, 5), history=2)
    assert (join.epoch, join.after, join.replay_max) == (0, 0, 2)
    assert rec == Recovery("r", "fresh", EPOCH, 4, 5, None, 2)
    assert t.positions == {"r": (EPOCH, 3)}  # known at once, before anything is handed out
    events = [as_event(t, seq_event(s)) for s in (4, 5, 6)]
    assert [(e.seq, e.replayed) for e in events] == [(4, True), (5, True), (6, False)]
    assert hand_out(t, rec) is rec
    assert hand_out(t, events[0]) is events[0]
    assert t.positions == {"r": (EPOCH, 4)}
    # The next JOIN resumes from there, with no cap but the history's.
    join, rec = answered(t, "r", (P.COMPLETE, EPOCH, 5, 7))
    assert (join.epoch, join.after, join.replay_max) == (EPOCH, 4, P.REPLAY_ALL)
    assert (rec.outcome, rec.replayed) == ("complete", 3)


def test_tracker_drops_what_was_handed_out_and_never_goes_back():
    t = Tracker()
    _, fresh = answered(t, "r", (P.FRESH, EPOCH, 1, 0))
    hand_out(t, fresh)
    queued = [as_event(t, seq_event(s)) for s in (1, 2, 3)]  # read, not handed out yet
    _, again = answered(t, "r", (P.COMPLETE, EPOCH, 1, 3))  # re-joined from position 0
    replayed = [as_event(t, seq_event(s)) for s in (1, 2, 3)]
    assert all(e.replayed for e in replayed)
    got = [hand_out(t, item) for item in [*queued, again, *replayed]]
    assert [e.seq for e in got if isinstance(e, Event)] == [1, 2, 3]
    assert t.positions == {"r": (EPOCH, 3)}
    # Read after the position moved on: dropped as soon as it is read.
    assert t.on_event(seq_event(2), "r") is None


def test_tracker_gap_and_reset_move_the_position():
    t = Tracker()
    _, fresh = answered(t, "r", (P.FRESH, EPOCH, 1, 0))
    hand_out(t, fresh)
    hand_out(t, as_event(t, seq_event(1)))
    _, gap = answered(t, "r", (P.GAP_RECOVERY, EPOCH, 40, 45))
    assert (gap.outcome, gap.missing, gap.replayed) == ("gap", (2, 39), 6)
    hand_out(t, gap)
    assert t.positions == {"r": (EPOCH, 39)}  # the lost ones will not come
    # A GAP frame in the replay: 40..42 evicted before the replay reached them.
    frame = t.on_gap(P.Gap("r", 40, 42))
    assert frame == Recovery("r", "gap", EPOCH, 43, 45, (40, 42), 3)
    hand_out(t, frame)
    assert t.positions == {"r": (EPOCH, 42)}
    # RESET: messages of the old epoch still queued count under it; then the new one.
    old = as_event(t, seq_event(43))
    _, reset = answered(t, "r", (P.RESET, EPOCH + 1, 1, 2))
    assert (reset.outcome, reset.epoch, reset.missing, reset.replayed) == ("reset", EPOCH + 1,
                                                                           None, 2)  # fmt: skip
    new = [as_event(t, seq_event(s)) for s in (1, 2)]
    assert [e.replayed for e in new] == [True, True]
    assert hand_out(t, old) is old and t.positions == {"r": (EPOCH, 43)}
    hand_out(t, reset)
    assert [hand_out(t, e).seq for e in new] == [1, 2]
    assert t.positions == {"r": (EPOCH + 1, 2)}


def test_tracker_without_history_tracks_nothing():
    # --history-size 0: epoch 0 and seq 0 everywhere; nothing is a duplicate.
    t = Tracker()
    _, rec = answered(t, "r", (P.FRESH, 0, 1, 0))
    hand_out(t, rec)
    events = [as_event(t, seq_event(0)) for _ in range(2)]
    assert [hand_out(t, e) for e in events] == events
    assert t.positions == {"r": (0, 0)}


def test_tracker_refused_join_and_forget():
    t = Tracker()
    pending, _ = t.join(3, "r", 0, True)
    t.sent(3, pending)
    assert t.on_reply(P.Reply(3, P.LIMIT, b"too many rooms")) is None
    assert t.positions == {} and not t.expects(3)
    _, rec = answered(t, "r", (P.FRESH, EPOCH, 1, 0), quiet=True)
    assert type(rec) is Quiet and rec.recovery.outcome == "fresh"
    t.forget("r")
    assert t.positions == {} and "r" not in t


@pytest.mark.parametrize("bad", [-1, 0xFFFF, 1.5, True, "3"])
def test_history_must_be_a_count(bad):
    with pytest.raises(ValueError, match="history must be an integer 0..65534"):
        check_history(bad)


def feed(client: Client, *frames: bytes) -> None:
    msgs, bad = client._parse(b"".join(frames))
    assert bad is None
    for msg in msgs:
        client._incoming(msg)


def test_client_routes_join_replies_events_and_gap_frames_without_a_server():
    c = Client(sequenced=True)  # never opened: frames are fed to it
    seen = []
    c.on("recovery", seen.append)
    c.on("chat", lambda e: seen.append((e.seq, e.replayed)))
    call = c._join_call("r", False)
    assert call.frame == P.encode(P.Join(call.req, "r", P.JOIN_SEQUENCED, 0, 0, 0))
    feed(
        c,
        P.reply_join_seq(call.req, P.FRESH, EPOCH, 1, 9),
        P.encode(seq_event(1)),
        P.gap_frame(b"r", 2, 5),
        P.encode(seq_event(6)),
        P.encode(seq_event(10)),
    )
    assert c.poll(0) == 5
    fresh, gap = seen[0], seen[2]
    assert (fresh.outcome, fresh.first, fresh.last, fresh.replayed) == ("fresh", 1, 9, 9)
    assert seen[1] == (1, True)
    assert gap == Recovery("r", "gap", EPOCH, 6, 9, (2, 5), 4)
    assert seen[3:] == [(6, True), (10, False)]
    assert c.positions == {"r": (EPOCH, 10)}


def test_recv_hands_out_reconnect_recoveries_but_not_the_one_join_returned():
    c = Client()
    quiet = c._join_call("r", False)
    feed(c, P.reply_join_seq(quiet.req, P.FRESH, EPOCH, 1, 0), P.encode(seq_event(1)))
    loud = c._rejoin_call("r", False)
    assert P.decode(loud.frame[4], loud.frame[5:]) == P.Join(
        loud.req, "r", P.JOIN_SEQUENCED, EPOCH, 0, P.REPLAY_ALL
    )
    feed(c, P.reply_join_seq(loud.req, P.COMPLETE, EPOCH, 1, 1), P.encode(seq_event(1)))
    first = c.recv(0)
    assert (type(first), first.seq) == (Event, 1)
    assert c.positions == {"r": (EPOCH, 1)}  # recv returned it: handled
    rec = c.recv(0)
    assert (rec.outcome, rec.replayed) == ("complete", 1)
    # The replayed 1 is a duplicate: recv would skip it (and then wait for a socket).
    assert c._for_recv(c._inbox.popleft()) is None and not c._inbox


def test_a_version_1_session_never_joins_sequenced():
    c = Client(version=1)
    c.session_version = 1
    call = c._join_call("r", False)
    assert call.frame == P.encode(P.Join(call.req, "r", 0))
    with pytest.raises(ValueError, match="version-2 session"):
        c._join_call("r", False, sequenced=True)
    with pytest.raises(ValueError, match="history= needs a sequenced join"):
        c._join_call("r", False, history=5)


# ====================================================== against a server
@pytest.fixture
def clients(server_factory):
    made: list[Client] = []

    def make(srv, nick, **kw) -> Client:
        kw.setdefault("reconnect", False)
        c = Client.connect(srv.host, srv.port, nick=nick, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def emit_all(sender: Client, room: str, texts) -> None:
    for text in texts:
        sender.emit("chat", text, room=room, ack=True)


def test_positions_move_after_the_handler_returned_and_not_when_it_raises(server, clients):
    alice, bob = clients(server, "alice"), clients(server, "bob")
    rec = alice.join("games")
    bob.join("games")
    epoch = rec.epoch
    assert alice.positions == {"games": (epoch, 0)}
    during = []

    def handler(event: Event) -> None:
        during.append((event.seq, alice.positions["games"]))
        if event.text == "boom":
            raise RuntimeError("handler failed")

    alice.on("chat", handler)
    emit_all(bob, "games", ["one"])
    poll_until(alice, lambda: during)
    assert during[0] == (1, (epoch, 0))  # not yet advanced inside the handler
    assert alice.positions == {"games": (epoch, 1)}
    emit_all(bob, "games", ["boom"])
    with pytest.raises(RuntimeError):
        poll_until(alice, lambda: len(during) >= 2)
    assert during[1] == (2, (epoch, 1))
    assert alice.positions == {"games": (epoch, 1)}  # the raising handler left it
    emit_all(bob, "games", ["three"])
    poll_until(alice, lambda: len(during) >= 3)
    assert alice.positions == {"games": (epoch, 3)}


def cut(client: Client) -> None:
    """The network drops the connection under the client (the server parks the session)."""
    client.sock.shutdown(socket.SHUT_RDWR)


def test_reconnect_replays_what_was_missed_exactly_once_in_order(server, clients):
    alice = clients(server, "alice", reconnect=True, backoff=FAST)
    bob = clients(server, "bob")
    recoveries, got, back = [], [], []
    alice.on("recovery", recoveries.append)
    alice.on("chat", lambda e: got.append((e.text, e.seq, e.replayed)))
    alice.on_reconnect(lambda: back.append(alice.resumed))
    alice.join("games")
    alice.join("lobby", sequenced=False)
    bob.join("games")
    emit_all(bob, "games", ["before"])
    poll_until(alice, lambda: got)
    cut(alice)
    emit_all(bob, "games", [f"missed {i}" for i in range(12)])
    poll_until(alice, lambda: len(got) >= 13)
    assert back == [True]  # the parked session came back
    assert got == [("before", 1, False)] + [(f"missed {i}", 2 + i, True) for i in range(12)]
    epoch = recoveries[0].epoch
    assert [r.outcome for r in recoveries] == ["fresh", "complete"]
    assert recoveries[1] == Recovery("games", "complete", epoch, 2, 13, None, 12)
    emit_all(bob, "games", ["live"])
    poll_until(alice, lambda: len(got) >= 14)
    assert got[-1] == ("live", 14, False)
    assert alice.poll(0.2) == 0  # nothing twice
    assert alice.positions == {"games": (epoch, 14)}  # the plain room has none


def test_queued_messages_replayed_again_are_dropped(server, clients):
    alice = clients(server, "alice", reconnect=True, backoff=FAST)
    bob = clients(server, "bob")
    alice.join("games")
    bob.join("games")
    emit_all(bob, "games", ["a", "b", "c"])
    assert alice.who("games").total == 2  # reads the three into the inbox, hands none out
    cut(alice)
    with pytest.raises(ConnectionClosed):
        alice.ping()  # notices the cut
    time.sleep(0.3)
    alice.ping()  # reconnects and re-joins from position 0: a, b, c come again
    assert alice.positions["games"][1] == 0
    got, recoveries = [], []
    alice.on("chat", lambda e: got.append(e.text))
    alice.on("recovery", recoveries.append)
    poll_until(alice, lambda: len(recoveries) >= 2 and len(got) >= 3)
    assert alice.poll(0.2) == 0
    assert got == ["a", "b", "c"]
    assert [(r.outcome, r.replayed) for r in recoveries] == [("fresh", 0), ("complete", 3)]


def test_gap_when_the_history_is_smaller_than_what_was_missed(server_factory, clients):
    srv = server_factory("--history-size", "3")
    alice = clients(srv, "alice", reconnect=True, backoff=FAST)
    bob = clients(srv, "bob")
    recoveries, got = [], []
    alice.on("recovery", recoveries.append)
    alice.on("chat", lambda e: got.append(e.seq))
    alice.join("games")
    bob.join("games")
    emit_all(bob, "games", ["1"])
    poll_until(alice, lambda: got)
    cut(alice)
    emit_all(bob, "games", [str(i) for i in range(2, 12)])
    poll_until(alice, lambda: len(got) >= 4)
    rec = recoveries[-1]
    assert (rec.outcome, rec.missing, rec.first, rec.last, rec.replayed) == (
        "gap",
        (2, 8),
        9,
        11,
        3,
    )
    assert got == [1, 9, 10, 11]
    assert alice.positions["games"][1] == 11


def test_reset_after_a_server_restart(server_factory, clients):
    srv = server_factory("--drain-timeout", "1")
    alice = clients(srv, "alice", reconnect=True, backoff=FAST)
    recoveries, got = [], []
    alice.on("recovery", recoveries.append)
    alice.on("chat", lambda e: got.append((e.text, e.seq, e.replayed)))
    old = alice.join("games").epoch
    srv.signal(signal.SIGTERM)  # alice reads the SHUTTING_DOWN only when she polls
    srv2 = restart_on_same_port(server_factory, srv, "--drain-timeout", "1")
    bob = clients(srv2, "bob")
    bob.join("games")
    emit_all(bob, "games", ["new 1", "new 2"])
    poll_until(alice, lambda: len(got) >= 2)
    rec = recoveries[-1]
    assert rec.outcome == "reset" and rec.epoch != old and rec.missing is None
    assert (rec.first, rec.last, rec.replayed) == (1, 2, 2)
    assert got == [("new 1", 1, True), ("new 2", 2, True)]
    assert alice.positions == {"games": (rec.epoch, 2)}


def test_join_with_history_replays_the_latest_n(server, clients):
    alice, bob = clients(server, "alice"), clients(server, "bob")
    bob.join("games")
    emit_all(bob, "games", [f"m{i}" for i in range(1, 6)])
    rec = alice.join("games", history=3)
    assert (rec.outcome, rec.first, rec.last, rec.replayed) == ("fresh", 3, 5, 3)
    emit_all(bob, "games", ["m6"])
    got = [alice.recv(5) for _ in range(4)]
    assert [(e.text, e.seq, e.replayed) for e in got] == [
        ("m3", 3, True),
        ("m4", 4, True),
        ("m5", 5, True),
        ("m6", 6, False),
    ]
    assert alice.recv(0.2) is None
    assert alice.positions == {"games": (rec.epoch, 6)}


def test_plain_rooms_and_the_constructor_default(server, clients):
    alice, bob = clients(server, "alice"), clients(server, "bob", sequenced=False)
    assert alice.join("a", sequenced=False) is None
    assert bob.join("a") is None  # Client(sequenced=False)
    assert isinstance(bob.join("b", sequenced=True), Recovery)
    with pytest.raises(ValueError, match="history= needs a sequenced join"):
        bob.join("a", history=3)
    bob.emit("chat", "plain", room="a", ack=True)
    ev = alice.recv(5)
    assert (ev.text, ev.seq, ev.replayed) == ("plain", None, False)
    assert alice.positions == {} and bob.positions == {"b": bob.positions["b"]}


def test_version_1_is_unchanged(server, clients):
    alice, bob = clients(server, "alice", version=1), clients(server, "bob")
    assert alice.join("games") is None
    bob.join("games")
    with pytest.raises(ValueError, match="version-2 session"):
        alice.join("other", sequenced=True)
    bob.emit("chat", b"x", room="games", ack=True)
    ev = alice.recv(5)
    assert (ev.payload, ev.seq, ev.replayed) == (b"x", None, False)
    assert alice.positions == {}
