"""Cluster mode (protocol section 12): real server processes sharing a real redis-server.

Every test starts its own redis-server on a free port and two or three
``muxserver --redis`` processes on loopback ports, then talks to them with the
raw test client. A missing redis-server fails (RedisServer), never skips.
"""

from __future__ import annotations

import signal
import socket
import time
import urllib.request

import pytest
from conftest import RawClient, ServerProcess, WsRawClient, reply_count
from test_redis_link import RedisServer

from muxserver import protocol as P
from muxserver.testing import wait_until

# Short PING settings on the link would be nicer, but these are the defaults a
# user gets; the outage test waits for the reconnect backoff (< 1 s at first).


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    if server.proc.poll() is None:
        server.signal(signal.SIGCONT)
    server.kill()


@pytest.fixture
def nodes(redis):
    started: list[ServerProcess] = []
    clients: list[RawClient] = []

    def start(n: int = 2, *args: str) -> list[ServerProcess]:
        started.extend(start_node(redis.url, *args) for _ in range(n))
        return started[-n:]

    def client(node: ServerProcess, nick: str = "", namespace: str = "/") -> RawClient:
        c = RawClient(node.address)
        clients.append(c)
        if nick is not None:
            c.hello(nick, namespace)
        return c

    start.client = client
    yield start
    for c in clients:
        c.close()
    for node in started:
        node.stop(timeout=5)


def start_node(redis_url: str, *args: str) -> ServerProcess:
    """A cluster node on ``redis_url`` with a metrics port of its own (see metrics()).

    ``args`` come last, so they override the defaults (``--log-level error``).
    """
    mport = free_port()
    node = ServerProcess("--redis", redis_url, "--metrics-port", str(mport),
                         "--log-level", "warning", "--drain-timeout", "1", *args)  # fmt: skip
    node.metrics_port = mport
    return node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(node: ServerProcess) -> dict[str, float]:
    """The node's /metrics as {series: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def events(client: RawClient, n: int, timeout: float = 10.0) -> list:
    out = []
    while len(out) < n:
        frame = client.recv(timeout)
        if isinstance(frame, P.ServerPing):
            continue
        out.append(frame)
    return out


def emit(client: RawClient, kind: int, target: str, event: str, payload: bytes, ack=True):
    req = client.next_req() if ack else 0
    msg = P.Emit(req, kind, target, event, payload)
    if ack:
        return client.request(msg)
    client.send(msg)
    return None


def who(client: RawClient, room: str) -> list[str]:
    reply = client.request(P.Who(client.next_req(), room))
    assert reply.status == P.OK, reply
    return P.parse_who(reply.body)[1]


# ================================================================ delivery
def test_room_delivery_across_nodes_keeps_per_sender_order(nodes):
    a, b = nodes(2)
    alice = nodes.client(a, "alice")
    bob = nodes.client(b, "bob")
    carol = nodes.client(b, "carol")
    for c in (alice, bob, carol):
        assert c.join("r").status == P.OK
    # Acked: recipients count the members on the other node too, as node a
    # knows them: once it has seen node b's two NS_JOINs and two PRESENCE joins.
    assert wait_until(lambda: metrics(a)["muxserver_cluster_received_total"] >= 4, 5)
    assert reply_count(alice.emit_room("r", "hi", b"0")) == 2
    for n in range(1, 300):  # unacked: one run per read, one PUBLISH per run
        alice.emit_room("r", "seq", str(n).encode(), ack=False)
    for c in (bob, carol):
        got = events(c, 300)
        assert [e.payload for e in got] == [str(n).encode() for n in range(300)]
        assert all(e.sender == "alice" and e.source == "r" for e in got)
    # And back the other way, from a node with two members.
    assert reply_count(bob.emit_room("r", "back", b"x")) == 2
    assert events(alice, 1)[0].payload == b"x"
    assert events(carol, 1)[0].payload == b"x"


def test_interest_routing_node_without_members_receives_nothing(nodes):
    a, b, c = nodes(3)
    alice = nodes.client(a, "alice")
    bob = nodes.client(b, "bob")
    idle = nodes.client(c, "idle")  # on node c, never in room r
    alice.join("r")
    bob.join("r")
    idle.join("other")
    before = metrics(c)["muxserver_cluster_received_total"]
    for n in range(50):
        alice.emit_room("r", "m", str(n).encode(), ack=False)
    assert [e.payload for e in events(bob, 50)] == [str(n).encode() for n in range(50)]
    m = metrics(c)
    assert m["muxserver_cluster_received_total"] == before
    assert metrics(b)["muxserver_cluster_received_total"] >= 1


def test_join_then_message_from_another_node_is_not_lost(nodes):
    a, b = nodes(2)
    sender = nodes.client(a, "sender")
    sender.join("r")
    for i in range(20):
        late = nodes.client(b, f"late{i}")
        # The REPLY comes only once node b holds the room's channel: a message
        # sent right after it must arrive, whichever node joined first.
        if i % 2:
            sender.join(f"r{i}")
            assert late.join(f"r{i}").status == P.OK
            sender.emit_room(f"r{i}", "m", b"now", ack=False)
        else:
            assert late.join(f"r{i}").status == P.OK
            sender.join(f"r{i}")
            assert reply_count(sender.emit_room(f"r{i}", "m", b"now")) == 1
        assert events(late, 1)[0].payload == b"now"


def test_direct_and_broadcast_across_nodes_in_order(nodes):
    a, b = nodes(2)
    alice = nodes.client(a, "alice")
    bob = nodes.client(b, "Bob")
    other = nodes.client(b, "other", namespace="/other")
    # Direct by nick, any case, to a connection on the other node.
    assert reply_count(emit(alice, P.TARGET_DIRECT, "BOB", "dm", b"1")) == 1
    for n in range(2, 101):
        emit(alice, P.TARGET_DIRECT, "bob", "dm", str(n).encode(), ack=False)
    got = events(bob, 100)
    assert [e.payload for e in got] == [str(n).encode() for n in range(1, 101)]
    assert got[0].kind == P.TARGET_DIRECT and got[0].sender == "alice"
    reply = emit(alice, P.TARGET_DIRECT, "nobody", "dm", b"")
    assert reply.status == P.NO_SUCH_TARGET
    # Broadcast reaches the namespace on every node, and no other namespace.
    emit(alice, P.TARGET_BROADCAST, "", "all", b"b1", ack=False)
    assert reply_count(emit(alice, P.TARGET_BROADCAST, "", "all", b"b2")) == 1  # bob
    assert [e.payload for e in events(bob, 2)] == [b"b1", b"b2"]
    carol = nodes.client(b, "carol")
    assert wait_until(lambda: reply_count(emit(alice, P.TARGET_BROADCAST, "", "n", b"")) == 2)
    carol.close()
    assert wait_until(lambda: reply_count(emit(alice, P.TARGET_BROADCAST, "", "n", b"")) == 1)
    other.send(P.Ping(7))
    assert other.recv_type(P.ServerPong).nonce == 7  # nothing else queued before it


def test_nick_race_on_two_nodes_exactly_one_wins(nodes):
    a, b = nodes(2)
    for round_ in range(10):
        nick = f"Racer{round_}"
        ca, cb = RawClient(a.address), RawClient(b.address)
        try:
            # Different case on each node: still one nick (protocol section 1).
            ca.send(P.Hello(1, "/", nick, ""))
            cb.send(P.Hello(1, "/", nick.upper(), ""))
            results = [c.recv() for c in (ca, cb)]
            welcomes = [r for r in results if isinstance(r, P.Welcome)]
            errors = [r for r in results if isinstance(r, P.Error)]
            assert len(welcomes) == 1 and len(errors) == 1, results
            assert errors[0].code == P.NICK_TAKEN
        finally:
            ca.close()
            cb.close()
    # NICK to a nick held on the other node is refused; a free one works and
    # the old one is free again cluster-wide.
    alice = nodes.client(a, "alice")
    nodes.client(b, "bob")
    assert alice.request(P.Nick(alice.next_req(), "BOB")).status == P.NICK_TAKEN
    assert alice.request(P.Nick(alice.next_req(), "alicia")).status == P.OK
    again = nodes.client(b, "alice")
    assert again.welcome.nick == "alice"


def test_guest_nicks_are_unique_across_nodes(nodes):
    a, b = nodes(2)
    ga = nodes.client(a, "")
    gb = nodes.client(b, "")
    assert ga.welcome.conn_id == gb.welcome.conn_id  # both nodes count from 1
    assert ga.welcome.nick != gb.welcome.nick


def test_who_rooms_presence_across_nodes(nodes):
    a, b = nodes(2)
    watcher = nodes.client(a, "watcher")
    assert watcher.join("r", presence=True).status == P.OK
    bob = nodes.client(b, "bob")
    bob.join("r")
    assert watcher.recv_type(P.Presence) == P.Presence(P.PRESENCE_JOIN, "r", "bob")
    carol = nodes.client(b, "carol")
    carol.join("r")
    carol.join("s")
    assert watcher.recv_type(P.Presence).nick == "carol"
    assert who(watcher, "r") == ["watcher", "bob", "carol"]  # join order, cluster-wide
    assert who(bob, "s") == ["carol"]
    reply = watcher.request(P.Rooms(watcher.next_req(), 1))
    assert P.parse_rooms(reply.body) == (2, [("r", 3), ("s", 1)])
    reply = carol.request(P.Rooms(carol.next_req(), 0))
    assert P.parse_rooms(reply.body) == (2, [("r", 3), ("s", 1)])
    assert bob.request(P.Nick(bob.next_req(), "robert")).status == P.OK
    assert watcher.recv_type(P.Presence) == P.Presence(P.PRESENCE_NICK, "r", "bob", "robert")
    assert bob.request(P.Leave(bob.next_req(), "r")).status == P.OK
    assert watcher.recv_type(P.Presence) == P.Presence(P.PRESENCE_LEAVE, "r", "robert")
    carol.close()
    assert watcher.recv_type(P.Presence) == P.Presence(P.PRESENCE_LEAVE, "r", "carol")
    assert who(watcher, "r") == ["watcher"]
    reply = watcher.request(P.Rooms(watcher.next_req(), 1))
    assert P.parse_rooms(reply.body) == (1, [("r", 1)])


def test_redis_killed_mid_traffic_and_restarted(nodes, redis):
    a, b = nodes(2)
    alice = nodes.client(a, "alice")
    ann = nodes.client(a, "ann")
    bob = nodes.client(b, "bob")
    for c in (alice, ann, bob):
        c.join("r")
    t0 = time.monotonic()
    timeline = []

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - t0:6.2f}s {what}")

    for n in range(100):
        alice.emit_room("r", "m", b"warm%d" % n, ack=False)
    assert [e.payload for e in events(bob, 100)][-1] == b"warm99"
    assert len(events(ann, 100)) == 100
    note("bob (node b) and ann (node a) received alice's first 100 EMITs")
    for n in range(100):
        alice.emit_room("r", "m", b"before%d" % n, ack=False)
    alice.send(P.Ping(5))  # its PONG: node a has handled the 100 (sent them to Redis)
    assert alice.recv_type(P.ServerPong).nonce == 5
    redis.kill()
    note("redis-server SIGKILLed right after 100 more unacked EMITs from alice")
    # Whatever of the 100 reached Redis before it died reached bob, in order.
    assert wait_until(lambda: metrics(a)["muxserver_cluster_up"] == 0, 5)
    note("node a reports muxserver_cluster_up 0")
    # Local delivery goes on; the acked EMIT says it stayed on this node.
    reply = alice.emit_room("r", "m", b"during-acked")
    assert reply.status == P.UNAVAILABLE
    note(f"alice: acked EMIT -> REPLY req={reply.req} UNAVAILABLE")
    assert events(ann, 101)[-1].payload == b"during-acked"
    note("ann (same node) received all 100 + the acked one")
    alice.emit_room("r", "m", b"during-1", ack=False)
    alice.emit_room("r", "m", b"during-2", ack=False)
    reply = alice.recv_type(P.Reply)
    assert (reply.req, reply.status) == (0, P.UNAVAILABLE)
    note("alice: 2 unacked EMITs -> one REPLY req=0 UNAVAILABLE")
    alice.send(P.Ping(1))
    assert alice.recv_type(P.ServerPong).nonce == 1  # and only one
    assert [e.payload for e in events(ann, 2)] == [b"during-1", b"during-2"]
    late = RawClient(a.address)
    late.send(P.Hello(1, "/", "late", ""))
    late.expect_error(P.UNAVAILABLE)
    note("new HELLO on node a -> ERROR UNAVAILABLE")
    assert ann.request(P.Nick(ann.next_req(), "anna")).status == P.UNAVAILABLE
    note("ann: NICK -> REPLY UNAVAILABLE")
    ann.request(P.Leave(ann.next_req(), "r"))  # a change made during the outage
    redis.start()
    note("redis-server restarted (empty: no persistence)")
    assert wait_until(lambda: all(metrics(n)["muxserver_cluster_up"] == 1 for n in (a, b)), 10)
    note("both nodes report muxserver_cluster_up 1")
    # Everything restored: subscriptions, memberships, nicks. Node a learns
    # bob is back (a SYNC from node b) within a moment of its own restore.
    counts = []
    while not counts or counts[-1] != 1:
        assert len(counts) < 100, counts
        counts.append(reply_count(alice.emit_room("r", "m", b"after")))
        time.sleep(0.02)
    got = []
    while len(got) < 200 and (not got or got[-1].payload != b"after"):
        got.append(bob.recv_type(P.Event))
    before = [e.payload for e in got[:-1]]
    assert before == [b"before%d" % n for n in range(len(before))]
    assert [e.payload for e in events(bob, len(counts) - 1)] == [b"after"] * (len(counts) - 1)
    note(f"bob received {len(before)} of the 100 sent before the kill, in order, then "
         f"'after' x{len(counts)} (acked recipients {counts})")  # fmt: skip
    assert who(bob, "r") == ["alice", "bob"]  # join order kept
    dup = RawClient(b.address)
    dup.send(P.Hello(1, "/", "ALICE", ""))
    dup.expect_error(P.NICK_TAKEN)
    note("WHO from node b lists alice, bob; HELLO 'ALICE' on node b -> NICK_TAKEN")
    m = metrics(a)
    assert m["muxserver_cluster_unavailable_total"] >= 4
    assert m["muxserver_cluster_reconnects_total"] >= 1
    print("\n".join(["", "outage timeline:", *timeline]))


def test_node_killed_is_cleaned_up_within_10s(nodes):
    a, b = nodes(2)
    watcher = nodes.client(a, "watcher")
    watcher.join("r", presence=True)
    bob = nodes.client(b, "bob")
    bob.join("r")
    assert watcher.recv_type(P.Presence).kind == P.PRESENCE_JOIN
    t0 = time.monotonic()
    b.proc.kill()
    left = watcher.recv_type(P.Presence, timeout=10)
    elapsed = time.monotonic() - t0
    assert left == P.Presence(P.PRESENCE_LEAVE, "r", "bob")
    assert elapsed < 10
    assert who(watcher, "r") == ["watcher"]
    again = nodes.client(a, "bob")  # the nick is free again
    assert again.welcome.nick == "bob"
    print(f"\nnode SIGKILLed: PRESENCE leave and nick freed after {elapsed:.2f} s")


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return {int(p) for p in fh.read().split()}


def test_workers_behind_one_port(redis):
    srv = ServerProcess("--workers", "2", "--redis", redis.url, "--log-level", "warning",
                        "--drain-timeout", "1")  # fmt: skip
    clients = []
    try:
        assert srv.ready_line.startswith("muxserver listening on 127.0.0.1:")
        workers = _children(srv.pid)
        assert len(workers) == 2
        # Enough connections that the kernel puts some on each worker; every
        # one of them sees every other, whichever worker it landed on.
        for i in range(8):
            c = RawClient(srv.address)
            c.hello(f"u{i}")
            assert c.join("r").status == P.OK
            clients.append(c)
        # recipients counts remote members "as known to the node" (section 12):
        # a JOIN on the other worker reaches this one a moment after its REPLY.
        probes, deadline = 0, time.monotonic() + 10
        while reply_count(clients[0].emit_room("r", "probe", b"")) != 7:
            probes += 1
            assert time.monotonic() < deadline, "the sender's node never saw all 7 others"
            time.sleep(0.05)
        assert reply_count(clients[0].emit_room("r", "m", b"all")) == 7
        for c in clients[1:]:  # probes first (an early one may have missed it), then "m"
            got = events(c, 1)
            while got[-1].event == "probe":
                got += events(c, 1)
            assert got[-1].payload == b"all" and len(got) <= probes + 2
        assert sorted(who(clients[3], "r")) == sorted(f"u{i}" for i in range(8))
        # A crashed worker is restarted on the same port.
        victim = sorted(workers)[0]
        import os

        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(_children(srv.pid) - {victim}) == 2, 10)
        late = RawClient(srv.address)
        clients.append(late)
        assert late.hello("late").nick == "late"
    finally:
        for c in clients:
            c.close()
        assert srv.stop(timeout=15) == 0


def test_cli_errors(redis):
    import subprocess
    import sys

    run = [sys.executable, "-m", "muxserver", "--port", "0"]
    done = subprocess.run([*run, "--workers", "2"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "--workers needs --redis" in done.stderr
    done = subprocess.run([*run, "--redis", "http://x"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 1 and "redis://" in done.stderr
    done = subprocess.run([sys.executable, "-m", "muxserver", "check-config", "--redis",
                           "redis://:s3cret@127.0.0.1:1/0"], capture_output=True, text=True,
                          timeout=20)  # fmt: skip
    assert "redis://:***@127.0.0.1:1/0" in done.stdout and "s3cret" not in done.stdout
    # Without hiredis: a python whose import of hiredis fails.
    code = "import sys; sys.modules['hiredis'] = None; from muxserver.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", code, "--port", "0", "--redis", redis.url],
                          capture_output=True, text=True, timeout=20)  # fmt: skip
    assert done.returncode == 1
    assert "pip install 'muxserver[cluster]'" in done.stderr


def test_node_stopped_cleanly_leaves_at_once(nodes):
    a, b = nodes(2)
    watcher = nodes.client(a, "watcher")
    watcher.join("r", presence=True)
    bob = nodes.client(b, "bob")
    bob.join("r")
    assert watcher.recv_type(P.Presence).kind == P.PRESENCE_JOIN
    t0 = time.monotonic()
    b.signal(signal.SIGTERM)
    # Bob is told SHUTTING_DOWN; the node then removes its registrations
    # itself instead of waiting for its heartbeat to expire.
    bob.expect_error(P.SHUTTING_DOWN)
    assert watcher.recv_type(P.Presence, timeout=5) == P.Presence(P.PRESENCE_LEAVE, "r", "bob")
    assert time.monotonic() - t0 < 3
    assert b.wait(10) == 0
    assert nodes.client(a, "bob").welcome.nick == "bob"


def test_version_2_payload_types_reach_version_1_members_on_other_nodes(nodes):
    a, b = nodes(2)
    sender = nodes.client(a, None)
    sender.send(P.Hello(2, "/", "sender", ""))
    assert sender.recv_type(P.Welcome).version == 2
    old = nodes.client(b, "old")  # version 1
    new = nodes.client(b, None)
    new.send(P.Hello(2, "/", "new", ""))
    new.recv_type(P.Welcome)
    for c in (sender, old, new):
        assert c.join("r").status == P.OK
    flags = P.PAYLOAD_JSON << P.EMIT_TYPE_SHIFT
    for kind, target in ((P.TARGET_ROOM, "r"), (P.TARGET_BROADCAST, ""), (P.TARGET_DIRECT, "old")):
        sender.send(P.Emit(0, kind, target, "j", b'{"a":1}', flags))
        got = old.recv_type(P.Event)
        assert (got.kind, got.payload_type, got.payload) == (kind, 0, b'{"a":1}')
        if kind != P.TARGET_DIRECT:
            got = new.recv_type(P.Event)
            assert (got.kind, got.payload_type) == (kind, P.PAYLOAD_JSON)


def test_two_senders_on_two_nodes_keep_their_order_everywhere(nodes):
    a, b, c = nodes(3)
    s1, s2 = nodes.client(a, "s1"), nodes.client(b, "s2")
    receivers = [nodes.client(c, "rc"), nodes.client(a, "ra"), nodes.client(b, "rb")]
    for cl in (s1, s2, *receivers):
        assert cl.join("r").status == P.OK
    for n in range(200):
        s1.emit_room("r", "m", b"%d" % n, ack=False)
        s2.emit_room("r", "m", b"%d" % n, ack=False)
    for r in receivers:
        got = events(r, 400)
        for nick in ("s1", "s2"):
            assert [e.payload for e in got if e.sender == nick] == [b"%d" % n for n in range(200)]


def test_pubsub_connection_cut_by_redis_output_limit_recovers(tmp_path):
    # Redis cuts a subscriber whose output buffer passes its pubsub limit; the
    # node treats it as an outage: reconnect, restore, fill the hole, carry on.
    redis = RedisServer(tmp_path, "--client-output-buffer-limit", "pubsub 64kb 0 0")
    started: list[ServerProcess] = []
    clients = []
    try:
        for _ in range(2):
            started.append(start_node(redis.url, "--log-level", "error"))
        a, b = started
        sender, reader = RawClient(a.address), RawClient(b.address)
        clients += [sender, reader]
        sender.hello("sender")
        reader.hello("reader")
        sender.join("r")
        reader.join("r")
        sender.emit_room("r", "big", bytes(200_000), ack=False)  # over 64 KiB at once

        # Both nodes hold the room's channel: Redis cuts both subscribers.
        def back(node) -> bool:
            m = metrics(node)
            return m["muxserver_cluster_reconnects_total"] >= 1 and m["muxserver_cluster_up"] == 1

        assert wait_until(lambda: back(a) and back(b), 10)
        assert reply_count(sender.emit_room("r", "small", b"after")) == 1
        # The big one was lost with the cut connection; node b read it back
        # from the room's history in Redis after reconnecting (seqrooms.py).
        assert reader.recv_type(P.Event).payload == bytes(200_000)
        assert reader.recv_type(P.Event).payload == b"after"
        assert metrics(b)["muxserver_cluster_seq_filled_messages_total"] == 1
    finally:
        for c in clients:
            c.close()
        for node in started:
            node.stop(timeout=5)
        redis.kill()


def test_websocket_clients_on_two_nodes(nodes):
    a, b = nodes(2)
    ws_a, ws_b = WsRawClient(a.address), WsRawClient(b.address)
    try:
        ws_a.hello("wa")
        ws_b.send(P.Hello(1, "/", "WA", ""))  # unique across transports and nodes
        ws_b.expect_error(P.NICK_TAKEN)
        ws_b.close()
        ws_b = WsRawClient(b.address)
        ws_b.hello("wb")
        assert ws_a.join("r").status == ws_b.join("r").status == P.OK
        assert reply_count(ws_a.emit_room("r", "m", b"over ws")) == 1
        assert events(ws_b, 1)[0].payload == b"over ws"
    finally:
        ws_a.close()
        ws_b.close()
