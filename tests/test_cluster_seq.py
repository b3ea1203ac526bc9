"""Sequenced rooms and resume across cluster nodes (protocol sections 9, 10 and 12).

Real ``muxserver --redis`` processes on a real redis-server, as in
test_cluster.py (whose fixtures these tests use): one numbering for a room
whichever node a message entered, a session resumed on the other node that
replays what it missed exactly once, a session still attached on one node
replaced from the other (ERROR REPLACED there, WELCOME resumed=1 here), and
no unannounced gap in a sequenced
room when Redis dies mid-traffic and comes back.
"""

from __future__ import annotations

import signal
import time

import pytest
from conftest import RawClient
from test_cluster import metrics, nodes, start_node  # noqa: F401 (nodes: a fixture)
from test_redis_link import RedisServer

from muxserver import protocol as P
from muxserver.testing import wait_until

SEQ = P.JOIN_SEQUENCED


@pytest.fixture
def redis(tmp_path):
    # Append-only with fsync before every reply: whatever a node saw numbered
    # survives a SIGKILL of Redis (the outage test needs that; the others do
    # not mind).
    server = RedisServer(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    yield server
    if server.proc.poll() is None:
        server.signal(signal.SIGCONT)
    server.kill()


def v2(nodes, node, nick: str, resume: str = "") -> RawClient:  # noqa: F811
    c = nodes.client(node, None)
    c.send(P.Hello(2, "/", nick, "", resume))
    c.welcome = c.recv_type(P.Welcome)
    return c


def seq_join(c: RawClient, room: str, epoch=0, after=0, replay_max=0) -> tuple:
    reply = c.request(P.Join(c.next_req(), room, SEQ, epoch, after, replay_max))
    assert reply.status == P.OK, reply
    return P.parse_join_reply(reply.body)


def frames(c: RawClient, n: int, timeout: float = 10.0) -> list:
    """The next ``n`` frames, PINGs left out."""
    out = []
    while len(out) < n:
        f = c.recv(timeout)
        if not isinstance(f, P.ServerPing):
            out.append(f)
    return out


def quiet(c: RawClient) -> list:
    """Everything ``c`` receives before the PONG of a PING sent now."""
    c.send(P.Ping(99))
    out = []
    while True:
        f = c.recv()
        if isinstance(f, P.ServerPong) and f.nonce == 99:
            return out
        if not isinstance(f, P.ServerPing):
            out.append(f)


def emit(c: RawClient, room: str, payload: bytes, ack: bool = True, echo: bool = False):
    req = c.next_req() if ack else 0
    msg = P.Emit(req, P.TARGET_ROOM, room, "m", payload, P.EMIT_ECHO if echo else 0)
    c.send(msg)
    if not ack:
        return None
    reply = reply_to(c, req)
    assert reply.status == P.OK, reply
    return P.parse_emit_reply(reply.body) if c.welcome.version >= 2 else reply


def reply_to(c: RawClient, req: int) -> P.Reply:
    """The REPLY to ``req``; the frames read before it stay queued, in order, on ``c``."""
    before = []
    while True:
        f = c.recv()
        if isinstance(f, P.Reply) and f.req == req:
            c.frames[:0] = before
            return f
        before.append(f)


def test_one_numbering_for_a_room_across_nodes(nodes):  # noqa: F811
    a, b = nodes(2)
    alice, bob = v2(nodes, a, "alice"), v2(nodes, b, "bob")
    dave = v2(nodes, a, "dave")  # version 2, plain
    carol = nodes.client(b, "carol")  # version 1, plain
    (_, ea, _, la), (_, eb, _, lb) = seq_join(alice, "r"), seq_join(bob, "r")
    assert ea == eb != 0 and la == lb == 0
    assert dave.join("r").status == carol.join("r").status == P.OK
    # The acked EMIT's REPLY carries the cluster seq (it waits for Redis).
    assert emit(alice, "r", b"first")[1] == 1
    carols = 0
    for n in range(150):  # unacked runs from two nodes at once, echoed to the senders
        emit(alice, "r", b"a%d" % n, ack=False, echo=True)
        emit(bob, "r", b"b%d" % n, ack=False, echo=True)
        if n % 3 == 0:
            emit(carol, "r", b"c%d" % n, ack=False)
            carols += 1
    total = 1 + 300 + carols + 1
    got_a = frames(alice, total - 2)  # all but her "first" (no echo) and the "last"
    # Numbered after everything above reached Redis: the next seq.
    assert emit(bob, "r", b"last") == (3, total)  # alice, dave, carol
    seen = {}
    # Without echo, alice misses her "first" (seq 1) and bob his "last".
    for c, seqs in ((alice, range(2, total + 1)), (bob, range(1, total))):
        got = got_a + frames(alice, 1) if c is alice else frames(c, len(seqs))
        assert all(isinstance(f, P.EventSeq) for f in got), got[:3]
        assert [f.seq for f in got] == list(seqs)
        for f in got:
            assert seen.setdefault(f.seq, (f.sender, f.payload)) == (f.sender, f.payload)
        for nick, tag in (("alice", b"a"), ("bob", b"b")):
            mine = [f.payload for f in got if f.sender == nick and f.payload[:1] == tag]
            assert mine == [tag + b"%d" % n for n in range(150)]
    assert seen[1] == ("alice", b"first") and seen[total] == ("bob", b"last")
    # Plain members got plain EVENTs, every message once, per-sender order kept.
    for c, own in ((dave, None), (carol, "carol")):
        got = frames(c, total - (carols if own else 0))
        assert all(isinstance(f, P.Event) for f in got)
        assert sorted(f.payload for f in got) == sorted(
            p for s, (nick, p) in seen.items() if nick != own
        )
        for nick in ("alice", "bob"):
            order = [f.payload for f in got if f.sender == nick]
            assert order == [p for s, (k, p) in sorted(seen.items()) if k == nick]
    assert quiet(alice) == [] and quiet(dave) == []
    m = metrics(a)
    assert m["muxserver_cluster_seq_runs_total"] >= 2
    assert m["muxserver_cluster_seq_gaps_total"] == 0


def test_resume_on_the_other_node_replays_what_was_missed(nodes):  # noqa: F811
    a, b = nodes(2, "--resume-window", "30")
    sender = nodes.client(a, "sender")
    watcher = nodes.client(b, "watcher")
    assert watcher.join("r", presence=True).status == P.OK
    assert sender.join("r").status == P.OK
    mover = v2(nodes, a, "mover")
    token = mover.welcome.resume_token
    assert token and mover.welcome.resume_window_ms == 30000
    assert mover.join("plain").status == P.OK
    recovery, epoch, first, last = seq_join(mover, "r")
    assert (recovery, first, last) == (P.FRESH, 1, 0)
    for n in range(1, 6):
        emit(sender, "r", b"%d" % n)
    assert [(f.seq, f.payload) for f in frames(mover, 5)] == [(n, b"%d" % n) for n in range(1, 6)]
    seen = [f.nick for f in frames(watcher, 7) if isinstance(f, P.Presence)]
    assert seen == ["sender", "mover"]  # their PRESENCE joins (and the 5 EVENTs)
    mover.close()  # connection lost: parked on node a
    assert wait_until(lambda: metrics(a)["muxserver_parked_sessions"] == 1, 5)
    for n in range(6, 16):
        emit(sender, "r", b"%d" % n)
    # Resumed on node b: same nick, same rooms, no PRESENCE anywhere.
    back = v2(nodes, b, "ignored", resume=token)
    assert back.welcome.resumed == 1 and back.welcome.nick == "mover"
    assert back.welcome.resume_token not in ("", token)
    assert wait_until(lambda: metrics(a)["muxserver_parked_sessions"] == 0, 5)
    assert metrics(b)["muxserver_cluster_resumes_total"] == 1
    # The SEQUENCED room is silent until re-joined; the plain one is live.
    emit(sender, "r", b"16")
    assert sender.join("plain").status == P.OK
    emit(sender, "plain", b"live")
    assert [(f.source, f.payload) for f in frames(back, 1)] == [("plain", b"live")]
    recovery, epoch2, first, last = seq_join(back, "r", epoch, 5, P.REPLAY_ALL)
    assert (recovery, epoch2, first, last) == (P.COMPLETE, epoch, 6, 16)
    got = frames(back, 11)
    assert [(f.seq, f.payload) for f in got] == [(n, b"%d" % n) for n in range(6, 17)]
    emit(sender, "r", b"17")
    assert [(f.seq, f.payload) for f in frames(back, 1)] == [(17, b"17")]
    assert quiet(back) == []
    # Its nick moved with it: direct messages from node a reach node b.
    reply = sender.request(P.Emit(sender.next_req(), P.TARGET_DIRECT, "MOVER", "dm", b"hi"))
    assert reply.status == P.OK
    assert frames(back, 1)[0].payload == b"hi"
    taken = nodes.client(a, None)
    taken.send(P.Hello(1, "/", "mover", ""))
    taken.expect_error(P.NICK_TAKEN)
    # WHO keeps the join order; the watcher saw no PRESENCE leave or join.
    req = watcher.next_req()
    watcher.send(P.Who(req, "r"))
    assert P.parse_who(reply_to(watcher, req).body)[1] == ["watcher", "sender", "mover"]
    assert [f for f in quiet(watcher) if isinstance(f, P.Presence)] == []
    # A token works once.
    again = v2(nodes, a, "again", resume=token)
    assert again.welcome.resumed == 0 and again.welcome.nick == "again"
    # Leaving for good is a PRESENCE leave, once.
    back.send(P.Bye())
    assert [(f.kind, f.nick) for f in frames(watcher, 1)] == [(P.PRESENCE_LEAVE, "mover")]


def test_resume_on_the_same_node_replaces_a_live_connection(nodes):  # noqa: F811
    (a,) = nodes(1, "--resume-window", "30")
    s = v2(nodes, a, "s")
    epoch = seq_join(s, "r")[1]
    other = nodes.client(a, "other")
    other.join("r")
    emit(other, "r", b"1")
    assert frames(s, 1)[0].seq == 1
    b = v2(nodes, a, "", resume=s.welcome.resume_token)
    assert b.welcome.resumed == 1 and b.welcome.nick == "s"
    assert s.recv_type(P.Error).code == P.REPLACED
    emit(other, "r", b"2")
    assert seq_join(b, "r", epoch, 1, P.REPLAY_ALL) == (P.COMPLETE, epoch, 2, 2)
    assert [(f.seq, f.payload) for f in frames(b, 1)] == [(2, b"2")]
    emit(other, "r", b"3")
    assert [(f.seq, f.payload) for f in frames(b, 1)] == [(3, b"3")]
    assert quiet(b) == []


def test_resume_on_the_other_node_replaces_a_live_connection(nodes):  # noqa: F811
    a, b = nodes(2, "--resume-window", "30")
    watcher = nodes.client(b, "watcher")
    assert watcher.join("r", presence=True).status == P.OK
    s = v2(nodes, a, "s")
    assert s.join("r").status == P.OK
    assert s.join("plain").status == P.OK
    assert [(f.kind, f.nick) for f in frames(watcher, 1)] == [(P.PRESENCE_JOIN, "s")]
    other = nodes.client(a, "other")
    assert other.join("plain").status == P.OK
    # s's connection is still open on node a: the HELLO on node b replaces it.
    back = v2(nodes, b, "ignored", resume=s.welcome.resume_token)
    assert back.welcome.resumed == 1 and back.welcome.nick == "s"
    assert back.welcome.resume_token not in ("", s.welcome.resume_token)
    assert s.recv_type(P.Error) == P.Error(P.REPLACED, "this session was resumed elsewhere")
    s.expect_closed()  # FIN, not a reset
    assert wait_until(lambda: metrics(a)["muxserver_parked_sessions"] == 0, 5)
    assert metrics(b)["muxserver_cluster_resumes_total"] == 1
    req = watcher.next_req()
    watcher.send(P.Who(req, "r"))
    assert P.parse_who(reply_to(watcher, req).body)[1] == ["watcher", "s"]
    assert [f for f in quiet(watcher) if isinstance(f, P.Presence)] == []
    # Both rooms moved to node b, plain memberships live at once.
    emit(watcher, "r", b"hi")
    emit(other, "plain", b"live")
    got = {(f.source, f.payload) for f in frames(back, 2)}
    assert got == {("r", b"hi"), ("plain", b"live")}
    assert quiet(back) == []
    # Its nick moved with it: a direct message from node a reaches node b.
    reply = other.request(P.Emit(other.next_req(), P.TARGET_DIRECT, "s", "dm", b"dm"))
    assert reply.status == P.OK
    assert frames(back, 1)[0].payload == b"dm"


def test_a_wrong_validator_for_a_session_live_on_another_node_is_a_fresh_session(nodes):  # noqa: F811
    a, b = nodes(2, "--resume-window", "30")
    s = v2(nodes, a, "s")
    assert s.join("r").status == P.OK
    selector, _, validator = s.welcome.resume_token.partition(".")
    forged = selector + "." + ("y" if validator[-1] == "x" else "x") * len(validator)
    started = time.monotonic()
    fresh = v2(nodes, b, "fresh", resume=forged)
    assert time.monotonic() - started < 1.5  # node a answered: no wait for the timeout
    assert fresh.welcome.resumed == 0 and fresh.welcome.nick == "fresh"
    # Node a's connection is untouched: still open, still in its room.
    assert quiet(s) == []
    assert fresh.join("r").status == P.OK
    emit(fresh, "r", b"still here")
    assert [(f.source, f.payload) for f in frames(s, 1)] == [("r", b"still here")]
    assert metrics(a)["muxserver_parked_sessions"] == 0
    # A selector naming a node that does not exist: fresh at once as well.
    started = time.monotonic()
    ghost = v2(nodes, b, "ghost", resume="0123456789ab~" + selector[-16:] + "." + validator)
    assert time.monotonic() - started < 1.5  # nobody subscribed to that node's channel
    assert ghost.welcome.resumed == 0 and ghost.welcome.nick == "ghost"


def test_replace_waits_two_seconds_for_a_stalled_node_then_starts_fresh(nodes):  # noqa: F811
    a, b = nodes(2, "--resume-window", "30")
    s = v2(nodes, a, "s")
    a.signal(signal.SIGSTOP)  # a short stall: its heartbeat (TTL 4 s) stays alive
    try:
        started = time.monotonic()
        c = v2(nodes, b, "fresh", resume=s.welcome.resume_token)
        waited = time.monotonic() - started
    finally:
        a.signal(signal.SIGCONT)
    assert c.welcome.resumed == 0 and c.welcome.nick == "fresh"
    assert 1.9 <= waited < 3.5
    assert metrics(b)["muxserver_cluster_resumes_total"] == 0
    # Node a refuses the request it reads late (the asker gave up): s stays
    # attached. The direct message goes on the same node channel, after it.
    reply = c.request(P.Emit(c.next_req(), P.TARGET_DIRECT, "s", "dm", b"still"))
    assert reply.status == P.OK
    (got,) = frames(s, 1)
    assert isinstance(got, P.Event) and (got.sender, got.event, got.payload) == (
        "fresh", "dm", b"still")  # fmt: skip
    assert quiet(s) == []
    assert metrics(a)["muxserver_parked_sessions"] == 0


def acked(c: RawClient, room: str, payload: bytes) -> P.Reply:
    req = c.next_req()
    c.send(P.Emit(req, P.TARGET_ROOM, room, "m", payload))
    return reply_to(c, req)


def test_redis_killed_mid_traffic_no_unannounced_gap(nodes, redis):  # noqa: F811
    a, b = nodes(2)
    s1, s2 = v2(nodes, a, "s1"), v2(nodes, b, "s2")  # plain members
    ra, rb = v2(nodes, a, "ra"), v2(nodes, b, "rb")  # SEQUENCED members
    for c in (s1, s2):
        assert c.join("r").status == P.OK
    for c in (ra, rb):
        seq_join(c, "r")
    for n in range(100):
        s1.emit_room("r", "m", b"1-%d" % n, ack=False)
        s2.emit_room("r", "m", b"2-%d" % n, ack=False)
    got = {c: frames(c, 200) for c in (ra, rb)}  # numbered and delivered before the kill
    for n in range(100, 400):
        s1.emit_room("r", "m", b"1-%d" % n, ack=False)
        s2.emit_room("r", "m", b"2-%d" % n, ack=False)
        if n == 250:
            redis.kill()
    assert wait_until(lambda: metrics(a)["muxserver_cluster_up"] == 0, 5)
    for n in range(400, 420):  # during the outage: no seq, so no hole either
        s1.emit_room("r", "m", b"1-%d" % n, ack=False)
    time.sleep(0.2)
    redis.start()
    assert wait_until(lambda: all(metrics(n)["muxserver_cluster_up"] == 1 for n in (a, b)), 10)
    final = 0
    deadline = time.monotonic() + 10
    while not final:  # until node a knows node b's members again
        assert time.monotonic() < deadline
        reply = acked(s1, "r", b"after")
        if reply.status == P.OK and P.parse_emit_reply(reply.body)[0] == 3:
            final = P.parse_emit_reply(reply.body)[1]
        time.sleep(0.05)
    # The history survived (append-only file): the numbering goes on.
    assert final > 200
    for c in (ra, rb):
        seen = got[c]
        while not (isinstance(seen[-1], P.EventSeq) and seen[-1].seq == final):
            f = frames(c, 1)[0]
            assert isinstance(f, P.EventSeq | P.Gap), f
            seen.append(f)
        expect = 1
        payloads = []
        for f in seen:
            if isinstance(f, P.Gap):
                assert f.first_missing == expect, (f, expect)
                expect = f.last_missing + 1
                continue
            assert f.seq == expect, f"seq {f.seq} after {expect - 1}: an unannounced gap"
            payloads.append(f.payload)
            expect += 1
        # Each sender's numbered messages arrive once and in its order (those in
        # flight when Redis died may never have been numbered).
        for tag in (b"1-", b"2-"):
            ns = [int(p[2:]) for p in payloads if p.startswith(tag)]
            assert ns == sorted(set(ns)) and ns[:100] == list(range(100)), ns[:5]
            assert all(n < 400 for n in ns)  # none of the outage's (no seq)
    m = metrics(a)
    assert m["muxserver_cluster_reconnects_total"] >= 1
    print(
        f"\nseqs 1..{final}; node a: {m['muxserver_cluster_seq_fills_total']:.0f} fills, "
        f"{m['muxserver_cluster_seq_filled_messages_total']:.0f} messages filled from the stream"
    )


def test_hole_the_history_no_longer_holds_is_a_gap(tmp_path):
    # Node b stops reading (SIGSTOP) while 400 runs of 50 kB go by; Redis cuts its
    # subscriber at the pub/sub limit. Back, node b delivers what its socket
    # still held, then reads the rest from the room's history (3 messages):
    # its SEQUENCED member gets one GAP for what that no longer holds, then
    # the last 3, then live ones. Never a hole without a GAP.
    redis = RedisServer(tmp_path, "--client-output-buffer-limit", "pubsub 64kb 0 0")
    started, clients = [], []
    try:
        for _ in range(2):
            started.append(start_node(redis.url, "--history-size", "3", "--log-level", "error"))
        a, b = started
        sender, reader = RawClient(a.address), RawClient(b.address)
        clients += [sender, reader]
        sender.hello("sender", version=2)
        reader.hello("reader", version=2)
        assert sender.join("r").status == P.OK
        seq_join(reader, "r")
        emit(sender, "r", b"small")
        assert [(f.seq, f.payload) for f in frames(reader, 1)] == [(1, b"small")]
        b.proc.send_signal(signal.SIGSTOP)
        try:
            for n in range(2, 402):  # acked: one run (one stream entry) each
                assert emit(sender, "r", b"%03d" % n + bytes(50_000))[1] == n
        finally:
            b.proc.send_signal(signal.SIGCONT)
        assert wait_until(lambda: metrics(b)["muxserver_cluster_reconnects_total"] >= 1, 10)
        got = []
        while not got or not (isinstance(got[-1], P.EventSeq) and got[-1].seq == 401):
            f = frames(reader, 1)[0]
            assert isinstance(f, P.EventSeq | P.Gap), f
            got.append(f)
        gaps = [f for f in got if isinstance(f, P.Gap)]
        assert len(gaps) == 1 and gaps[0].room == "r" and gaps[0].last_missing == 398, gaps
        expect = 2
        for f in got:
            if isinstance(f, P.Gap):
                assert f.first_missing == expect
                expect = f.last_missing + 1
            else:
                assert (f.seq, f.payload[:3]) == (expect, b"%03d" % expect)
                expect += 1
        assert emit(sender, "r", b"after")[1] == 402
        assert [(f.seq, f.payload) for f in frames(reader, 1)] == [(402, b"after")]
        m = metrics(b)
        assert m["muxserver_cluster_seq_gaps_total"] == 1
        assert m["muxserver_cluster_seq_filled_messages_total"] == 3
    finally:
        for c in clients:
            c.close()
        for node in started:
            node.stop(timeout=5)
        redis.kill()
