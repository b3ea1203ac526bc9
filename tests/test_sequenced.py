"""Sequenced rooms (protocol section 9) on the whole server, over the in-memory transport.

Every SEQUENCED JOIN outcome, every history bound seen through the wire, the
TTL of an empty room's numbering, replays larger than max_output and
replays interleaved with live traffic (no duplicate, no hole), and mixed
version-1 / version-2 rooms. A few tests at the end run a real server
process over real sockets.
"""

import time

import pytest

from muxserver import protocol as P
from muxserver.session import CLOSED
from muxserver.testing import MemoryPair, memory_server

SEQ = P.JOIN_SEQUENCED
# The bytes one emit() message (4-byte payload) counts against the history's
# bounds: its tail (str8 room, str8 event, payload), as docs/recovery.md says.
ITEM = len(P.str8("r") + P.str8("m") + bytes(4))


def make(**config):
    server, clock = memory_server(**config)
    server.clock = clock
    return server


@pytest.fixture
def srv():
    return make()


def client(server, nick, version=2, capacity=1 << 20):
    c = MemoryPair(server, capacity)
    c.send(P.Hello(version, "/", nick, ""))
    [welcome] = c.frames()
    assert isinstance(welcome, P.Welcome) and welcome.nick == nick
    c.welcome = welcome
    return c


def sjoin(c, room, epoch=0, after=0, replay_max=0, req=7, flags=SEQ):
    """Send a SEQUENCED JOIN; return (plan, the frames that followed the REPLY)."""
    c.send(P.Join(req, room, flags, epoch, after, replay_max))
    frames = c.frames()
    reply = frames[0]
    assert isinstance(reply, P.Reply) and reply.req == req and reply.status == P.OK, frames
    return P.parse_join_reply(reply.body), frames[1:]


def emit(c, room, n, start=0, req=0, size=4):
    c.send(*(P.Emit(req, P.TARGET_ROOM, room, "m", (start + i).to_bytes(size, "big"))
             for i in range(n)))  # fmt: skip


def seqs(frames):
    return [f.seq for f in frames if isinstance(f, P.EventSeq)]


def room_with(server, *nicks, room="r"):
    out = []
    for nick in nicks:
        c = client(server, nick)
        c.send(P.Join(1, room))
        c.frames()
        out.append(c)
    return out


# ============================================================== variants
def test_emit_reply_carries_seq_and_each_variant_is_encoded_for_its_members(srv):
    s, b = room_with(srv, "s", "b")
    old = client(srv, "old", version=1)
    old.send(P.Join(1, "r"))
    old.frames()
    a = client(srv, "a")
    plan, replay = sjoin(a, "r")
    assert plan[0] == P.FRESH and plan[1] != 0 and plan[2:] == (1, 0) and replay == []
    # One read, one run: three acked JSON EMITs.
    flags = P.emit_flags(False, P.PAYLOAD_JSON)
    s.send(*(P.Emit(10 + i, 0, "r", "j", b"[%d]" % i, flags) for i in range(3)))
    replies = s.frames()
    assert [P.parse_emit_reply(r.body) for r in replies] == [(3, 1), (3, 2), (3, 3)]
    got = a.frames()
    assert seqs(got) == [1, 2, 3]
    assert all(f.payload_type == P.PAYLOAD_JSON and f.kind == 0 for f in got)
    assert [f.payload for f in got] == [b"[0]", b"[1]", b"[2]"]
    assert [type(f) for f in b.frames()] == [P.Event] * 3
    assert old.frames() == [P.Event(0, "s", "r", "j", b"[%d]" % i) for i in range(3)]
    # A version-1 sender's message is numbered too; its REPLY stays version 1.
    old.send(P.Emit(5, 0, "r", "m", b"v1"))
    assert old.frames() == [P.Reply(5, P.OK, P.U32.pack(3))]
    assert a.frames() == [P.EventSeq(4, 0, "old", "r", "m", b"v1")]


def test_slow_path_emit_echo_with_ack_is_sequenced(srv):
    (s,) = room_with(srv, "s")
    a = client(srv, "a")
    sjoin(a, "r")
    a.send(P.Emit(3, 0, "r", "m", b"x", P.EMIT_ECHO))  # echo + ack: not a run
    got = a.frames()
    assert got[0] == P.EventSeq(1, 0, "a", "r", "m", b"x")
    assert P.parse_emit_reply(got[1].body) == (2, 1)
    assert s.frames() == [P.Event(0, "a", "r", "m", b"x")]
    # Direct and broadcast messages have no seq and are never replayed.
    s.send(P.Emit(4, P.TARGET_DIRECT, "a", "d", b""), P.Emit(5, P.TARGET_BROADCAST, "", "b", b""))
    assert [P.parse_emit_reply(r.body) for r in s.frames()] == [(1, 0), (1, 0)]
    assert [type(f) for f in a.frames()] == [P.Event, P.Event]
    _, replay = sjoin(a, "r", replay_max=P.REPLAY_ALL, req=9)
    assert seqs(replay) == [1] and len(replay) == 1


def test_version_1_join_bit_means_nothing_and_v1_welcome_is_unchanged(srv):
    old = client(srv, "old", version=1)
    assert old.welcome == P.Welcome(1, old.welcome.conn_id, "old", srv.config.max_frame,
                                    int(srv.config.ping_interval * 1000), "muxserver")  # fmt: skip
    old.send_raw(P.encode_frame(P.JOIN, P.REQ_U8.pack(1, SEQ) + P.str8("r")))  # no v2 tail
    assert old.frames() == [P.Reply(1, P.OK)]
    (s,) = room_with(srv, "s")
    emit(s, "r", 1)
    assert old.frames() == [P.Event(0, "s", "r", "m", bytes(4))]


# ============================================================== outcomes
def test_fresh_join_replays_the_latest_then_live(srv):
    (s,) = room_with(srv, "s")
    emit(s, "r", 5)
    a = client(srv, "a")
    plan, replay = sjoin(a, "r", replay_max=3)
    assert plan[0] == P.FRESH and plan[2:] == (3, 5)
    assert seqs(replay) == [3, 4, 5]
    emit(s, "r", 1, start=5)
    assert seqs(a.frames()) == [6]


def test_complete_gap_and_reset(srv):
    (s,) = room_with(srv, "s")
    a = client(srv, "a")
    (_, epoch, _, _), _ = sjoin(a, "r")
    emit(s, "r", 2)
    assert seqs(a.frames()) == [1, 2]
    a.send(P.Leave(2, "r"))
    a.frames()
    emit(s, "r", 3, start=2)  # 3..5 missed
    plan, replay = sjoin(a, "r", epoch, 2, P.REPLAY_ALL)
    assert plan == (P.COMPLETE, epoch, 3, 5) and seqs(replay) == [3, 4, 5]
    # The replay cap keeps the newest: 4..5 are dropped, GAP says so.
    plan, replay = sjoin(a, "r", epoch, 1, 2, req=8)
    assert plan == (P.GAP_RECOVERY, epoch, 4, 5) and seqs(replay) == [4, 5]
    # Nothing after: COMPLETE with an empty replay.
    plan, replay = sjoin(a, "r", epoch, 5, P.REPLAY_ALL, req=9)
    assert plan == (P.COMPLETE, epoch, 6, 5) and replay == []
    # Another epoch: RESET, replayed like a fresh join.
    plan, replay = sjoin(a, "r", epoch ^ 1, 5, 2, req=10)
    assert plan == (P.RESET, epoch, 4, 5) and seqs(replay) == [4, 5]
    # A re-JOIN of a room already joined sends no PRESENCE.
    w = client(srv, "w")
    w.send(P.Join(1, "r", P.JOIN_PRESENCE))
    w.frames()
    sjoin(a, "r", epoch, 5, 0, req=11)
    assert w.frames() == []


@pytest.mark.parametrize(
    "bound",
    [
        {"history_size": 4},
        {"history_bytes": 4 * ITEM + 3},
        {"history_memory": 4 * ITEM},
    ],
)
def test_eviction_by_each_bound_is_a_gap(bound):
    srv = make(**bound)
    (s,) = room_with(srv, "s")
    a = client(srv, "a")
    (_, epoch, _, _), _ = sjoin(a, "r")
    a.send(P.Leave(2, "r"))
    a.frames()
    emit(s, "r", 10)
    plan, replay = sjoin(a, "r", epoch, 0, P.REPLAY_ALL)
    assert plan[0] == P.GAP_RECOVERY and plan[3] == 10
    assert seqs(replay) == list(range(plan[2], 11)) and plan[2] > 1
    assert plan[2] == 7  # 4 messages held


def test_memory_bound_takes_the_oldest_of_all_rooms():
    srv = make(history_memory=6 * ITEM)
    s = client(srv, "s")
    for room in ("r", "t"):
        s.send(P.Join(1, room))
    s.frames()
    emit(s, "r", 4)
    emit(s, "t", 4)  # 8 held > 6: r's oldest two go
    a = client(srv, "a")
    assert sjoin(a, "r", replay_max=P.REPLAY_ALL)[0][2:] == (3, 4)
    assert sjoin(a, "t", replay_max=P.REPLAY_ALL, req=8)[0][2:] == (1, 4)


def test_ttl_ages_messages_and_an_empty_rooms_numbering():
    srv = make(history_ttl=10)
    (s,) = room_with(srv, "s")
    emit(s, "r", 3)
    a = client(srv, "a")
    (_, epoch, _, _), _ = sjoin(a, "r", replay_max=P.REPLAY_ALL)
    srv.clock.advance(11)  # messages aged out, members remain: same epoch, a GAP
    plan, replay = sjoin(a, "r", epoch, 1, P.REPLAY_ALL, req=8)
    assert plan == (P.GAP_RECOVERY, epoch, 4, 3) and replay == []
    emit(s, "r", 1)
    for c in (a, s):
        c.send(P.Leave(3, "r"))
        c.frames()
    # Refilled within the TTL: same epoch, counting on.
    srv.clock.advance(9)
    srv.protocol.history.expire(srv.clock.now)
    plan, replay = sjoin(a, "r", epoch, 3, P.REPLAY_ALL, req=9)
    assert plan == (P.COMPLETE, epoch, 4, 4) and seqs(replay) == [4]
    a.send(P.Leave(4, "r"))
    a.frames()
    # Empty for the whole TTL: a new epoch, numbering from 1.
    srv.clock.advance(10)
    srv.protocol.history.expire(srv.clock.now)
    plan, replay = sjoin(a, "r", epoch, 4, P.REPLAY_ALL, req=10)
    assert plan[0] == P.RESET and plan[1] not in (0, epoch) and plan[2:] == (1, 0)


def test_history_off_means_seq_0_and_empty_replays():
    srv = make(history_size=0)
    (s,) = room_with(srv, "s")
    a = client(srv, "a")
    assert sjoin(a, "r", replay_max=P.REPLAY_ALL)[0] == (P.FRESH, 0, 1, 0)
    s.send(P.Emit(5, 0, "r", "m", b"x"))
    assert P.parse_emit_reply(s.frames()[0].body) == (1, 0)
    assert a.frames() == [P.EventSeq(0, 0, "s", "r", "m", b"x")]
    assert sjoin(a, "r", 99, 3, P.REPLAY_ALL, req=8) == ((P.RESET, 0, 1, 0), [])


def test_plain_join_of_a_sequenced_room_switches_back(srv):
    (s,) = room_with(srv, "s")
    a = client(srv, "a")
    sjoin(a, "r")
    a.send(P.Join(8, "r"))
    assert a.frames() == [P.Reply(8, P.OK)]
    emit(s, "r", 1)
    assert a.frames() == [P.Event(0, "s", "r", "m", bytes(4))]


@pytest.mark.parametrize("size", [3, 100])
def test_replayed_frames_are_the_live_ones_whoever_sent_them(size):
    """The history keeps tails and sender prefixes apart; a replay rebuilds the same bytes."""
    import random

    rnd = random.Random(size)
    srv = make(history_size=size)
    senders = [client(srv, "s"), client(srv, "bob-the-long-nick"), client(srv, "old", 1)]
    for c in senders:
        c.send(P.Join(1, "r"))
        c.frames()
    live = client(srv, "live")
    sjoin(live, "r")
    seen = []
    for i in range(60):
        c = rnd.choice(senders)
        ptype = rnd.choice([0, P.PAYLOAD_TEXT, P.PAYLOAD_JSON]) if c.welcome.version == 2 else 0
        flags = P.emit_flags(False, ptype)
        req = rnd.choice([0, 5])  # acked EMITs end runs: runs of every length
        c.send(
            *(P.Emit(req, 0, "r", "m", b"%d.%d" % (i, k), flags) for k in range(rnd.randint(1, 4)))
        )
        c.frames()
        seen += live.frames()
    late = client(srv, "late")
    plan, replay = sjoin(late, "r", replay_max=P.REPLAY_ALL)
    assert plan[2:] == (max(1, len(seen) - size + 1), len(seen))
    assert replay == seen[-size:]
    assert [f.seq for f in seen] == list(range(1, len(seen) + 1))


# ================================================================ replays
def read_all(c, until, limit=4096, rounds=100000):
    """Read like a slow client (``limit`` bytes per turn) until ``until(frames)``."""
    got = []
    for _ in range(rounds):
        got += c.frames(limit)
        if until(got):
            return got
    raise AssertionError(f"stuck after {len(got)} frames")


def test_replay_larger_than_max_output_never_trips_slow_consumer():
    srv = make(max_output=64 << 10, history_size=5000, history_bytes=8 << 20)
    (s,) = room_with(srv, "s")
    for start in range(0, 2000, 200):
        emit(s, "r", 200, start=start, size=1000)  # 2000 x ~1 KiB: 2 MiB of history
    a = client(srv, "a", capacity=16 << 10)
    a.send(P.Join(7, "r", SEQ, 0, 0, P.REPLAY_ALL))
    got = read_all(a, lambda fs: len(seqs(fs)) >= 2000)
    assert isinstance(got[0], P.Reply) and P.parse_join_reply(got[0].body)[2:] == (1, 2000)
    assert seqs(got) == list(range(1, 2001))
    assert not any(isinstance(f, P.Error) for f in got)
    assert srv.stats["slow_consumers"] == 0
    assert a.session.transport.pending_bytes == 0


def test_replay_interleaved_with_live_traffic_has_no_duplicate_and_no_hole():
    srv = make(max_output=64 << 10, history_size=5000, history_bytes=8 << 20)
    (s,) = room_with(srv, "s")
    emit(s, "r", 500, size=500)
    a = client(srv, "a", capacity=8 << 10)
    a.send(P.Join(7, "r", SEQ, 0, 0, P.REPLAY_ALL))
    got = []
    sent = 500
    for _ in range(30):  # live messages keep arriving while the replay runs
        got += a.frames(8 << 10)
        emit(s, "r", 10, start=sent, size=500)
        sent += 10
    got = got + read_all(a, lambda fs: (seqs(got + fs) or [0])[-1] >= sent)
    assert seqs(got) == list(range(1, sent + 1))
    assert [f.payload for f in got[1:]] == [i.to_bytes(500, "big") for i in range(sent)]
    assert not srv.protocol.sequencer.replaying  # live again
    emit(s, "r", 1, start=sent)
    assert seqs(a.frames()) == [sent + 1]


def test_messages_evicted_before_a_slow_replay_reaches_them_are_one_gap():
    srv = make(max_output=1 << 20, history_size=100)
    (s,) = room_with(srv, "s")
    emit(s, "r", 100, size=2000)
    a = client(srv, "a", capacity=4 << 10)
    a.send(P.Join(7, "r", SEQ, 0, 0, P.REPLAY_ALL))
    got = a.frames(4 << 10)  # the REPLY and the first replayed messages
    emit(s, "r", 150, start=100, size=2000)  # 100 held: 1..150 evicted
    got += read_all(a, lambda fs: (seqs(got + fs) or [0])[-1] >= 250, limit=64 << 10)
    gaps = [f for f in got if isinstance(f, P.Gap)]
    assert len(gaps) == 1 and gaps[0].room == "r" and gaps[0].last_missing == 150
    numbers = seqs(got)
    missing = range(gaps[0].first_missing, gaps[0].last_missing + 1)
    assert sorted(numbers + list(missing)) == list(range(1, 251))  # each seq once
    assert srv.stats["replay_gaps"] == 1


def test_leaving_during_a_replay_stops_it(srv):
    (s,) = room_with(srv, "s")
    emit(s, "r", 50, size=2000)
    a = client(srv, "a", capacity=4 << 10)
    a.send(P.Join(7, "r", SEQ, 0, 0, P.REPLAY_ALL), P.Leave(8, "r"))
    got = read_all(a, lambda fs: any(isinstance(f, P.Reply) and f.req == 8 for f in fs))
    assert len(seqs(got)) < 50
    got = a.frames()
    assert not srv.protocol.sequencer.replaying and seqs(got) == []


def test_a_bug_while_replaying_closes_only_that_connection(monkeypatch, caplog):
    import logging

    srv = make()
    (s,) = room_with(srv, "s")
    emit(s, "r", 5)
    a, b = client(srv, "a"), client(srv, "b")
    from muxserver.sequenced import Sequencer

    real = Sequencer.frames

    def broken(self, key, first, tails):
        if self.replaying.get(a.session) is not None:
            raise RuntimeError("boom")
        return real(self, key, first, tails)

    monkeypatch.setattr(Sequencer, "frames", broken)
    with caplog.at_level(logging.ERROR, logger="muxserver"):
        a.send(P.Join(7, "r", SEQ, 0, 0, P.REPLAY_ALL))
        b.send(P.Join(7, "r", SEQ, 0, 0, P.REPLAY_ALL))
        a.frames()
    assert a.session.state == CLOSED and srv.stats["internal_errors"] == 1
    assert "boom" in caplog.text and "Traceback" in caplog.text
    assert seqs(b.frames()) == [1, 2, 3, 4, 5]  # everyone else carries on
    assert who_of(s, "r") == ["s", "b"]


def who_of(c, room):
    c.send(P.Who(99, room))
    [reply] = [f for f in c.frames() if isinstance(f, P.Reply) and f.req == 99]
    return P.parse_who(reply.body)[1]


# ============================================================ real process
def hello2(address, nick, resume=""):
    from conftest import RawClient

    c = RawClient(address)
    c.send(P.Hello(2, "/", nick, "", resume))
    c.welcome = c.recv_type(P.Welcome)
    return c


def test_real_server_replays_past_max_output_to_a_slow_reader(server_factory):
    srv = server_factory("--max-output", "65536", "--history-size", "1000")
    s = hello2(srv.address, "s")
    s.request(P.Join(1, "r"))
    for _ in range(10):
        s.send_raw(b"".join(P.encode(P.Emit(0, 0, "r", "m", bytes(1000))) for _ in range(100)))
    s.request(P.Emit(2, 0, "r", "m", bytes(1000)))  # all 1001 are in
    a = hello2(srv.address, "a")
    a.send(P.Join(3, "r", SEQ, 0, 0, P.REPLAY_ALL))
    time.sleep(0.3)  # the server fills what the kernel takes, never more than its bound
    reply = a.recv_type(P.Reply)
    assert P.parse_join_reply(reply.body)[2:] == (2, 1001)  # 1000 held, seq 1 evicted
    got = [a.recv_type(P.EventSeq).seq for _ in range(1000)]
    assert got == list(range(2, 1002))
    s.request(P.Emit(4, 0, "r", "m", b"live"))
    assert a.recv_type(P.EventSeq) == P.EventSeq(1002, 0, "s", "r", "m", b"live")


# ============================================================== randomized
@pytest.mark.parametrize("seed", range(12))
def test_random_traffic_joins_reads_and_resumes_never_duplicate_or_skip(seed):
    """A sequenced member's stream is whole whatever happens around it.

    Random steps: bursts of live messages, partial reads by a client with a
    tiny kernel buffer, fresh and positioned re-JOINs, leaves, dropped
    connections and resumes. After each REPLY, the room's EVENT_SEQs must be
    exactly ``first, first+1, ...``, a GAP only ever naming the run it skips;
    the payload says which message it is, so nothing is delivered twice.
    """
    import random

    rnd = random.Random(seed)
    srv = make(max_output=32 << 10, history_size=rnd.choice([20, 200]), resume_window=60)
    (s,) = room_with(srv, "s")
    a = client(srv, "a", capacity=2 << 10)
    token = a.welcome.resume_token
    sent = 0  # messages sent so far; message i has seq i + 1 (one epoch throughout)
    expect = None  # next seq expected for "r", None when not joined sequenced
    position = 0  # the highest seq "a" has seen (a client drops anything at or below it)
    asked = {}  # req -> (the "after" that JOIN sent, messages sent by then)
    req = 100

    def check(frames):
        nonlocal expect, position
        for f in frames:
            if isinstance(f, P.Reply) and f.req >= 100 and f.body:
                rec, _, first, last = P.parse_join_reply(f.body)
                after, sent_then = asked[f.req]
                assert first <= last + 1 and last == sent_then
                if rec == P.COMPLETE:
                    assert first == after + 1
                expect = first  # frames before this REPLY were the old stream
            elif isinstance(f, P.Reply) and f.req == 1:
                expect = None  # LEAVE done: nothing more of "r"
            elif isinstance(f, P.Gap):
                assert f.first_missing == expect and f.last_missing >= expect
                expect = f.last_missing + 1
            elif isinstance(f, P.EventSeq):
                assert expect is not None and f.seq == expect, (f.seq, expect, log[-6:])
                assert f.payload == (f.seq - 1).to_bytes(4, "big")
                expect += 1
                position = max(position, f.seq)
            elif isinstance(f, P.Error):
                raise AssertionError(f)

    epoch0 = srv.protocol.history.position(("/", "r"), srv.clock.now)[0]  # one epoch throughout
    log = []
    for _ in range(150):
        step = rnd.random()
        log.append(round(step, 2))
        if step < 0.35:
            n = rnd.randint(1, 40)
            emit(s, "r", n, start=sent)
            sent += n
        elif step < 0.7:
            check(a.frames(rnd.choice([200, 2000, None])))
        elif step < 0.8:
            req += 1
            epoch = 0 if position == 0 or rnd.random() < 0.2 else epoch0
            if epoch and rnd.random() < 0.1:
                epoch ^= 1  # not the room's: RESET
            after = position if epoch else 0
            asked[req] = (after, sent)
            a.send(P.Join(req, "r", SEQ, epoch, after, rnd.choice([0, 5, P.REPLAY_ALL])))
            check(a.frames(rnd.choice([200, None])))
        elif step < 0.87 and expect is not None:
            a.send(P.Leave(1, "r"))
            while expect is not None:
                check(a.frames())
        elif step < 0.95:
            a.close()  # the connection drops: parked, the room stays joined
            a = MemoryPair(srv, 2 << 10)
            a.send(P.Hello(2, "/", "", "", token))
            frames = a.frames()
            assert frames[0].resumed == 1
            token = frames[0].resume_token
            expect = None  # silent until re-joined
            check(frames[1:])
    # Catch up at the end: one positioned JOIN, then read everything.
    req += 1
    asked[req] = (position, sent)
    a.send(P.Join(req, "r", SEQ, epoch0, position, P.REPLAY_ALL))
    for _ in range(10000):
        check(a.frames(4096))
        if position == sent:
            break
    assert position == sent
    assert srv.stats["slow_consumers"] == 0
