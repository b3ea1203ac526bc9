"""Cluster mode (protocol section 12): many server processes sharing one Redis.

The :class:`Backplane` plugs into two seams and nowhere else: the router
hands it every room and namespace run after local delivery (``publish``), and
the session protocol hands it the requests whose answer is cluster-wide
(HELLO, JOIN, LEAVE, NICK, WHO, ROOMS, a direct EMIT to a nick not on this
node, a disconnect; those handlers are in requests.py). Key layout and
message formats are in keys.py.

Decisions worth knowing:

* **Interest routing.** A node SUBSCRIBEs to a room's channel only while it
  has local members of that room, and answers the room's first local JOIN
  only once Redis confirmed the subscription and recorded the member, so a
  message published by another node after that REPLY reaches it. Every node
  PUBLISHes every room run (Redis drops it when nobody listens): the
  publisher never decides from stale knowledge who may be listening.
* **Encode once per cluster.** A run of EMITs becomes one PUBLISH carrying the
  ready EVENT bytes (both variants when a payload type makes them differ);
  receivers append those bytes to their members' queues unchanged. A node
  receives its own publications back from Redis and drops them by origin id.
* **Blocking, per session.** A request that needs Redis first (a nick claim,
  a subscription, WHO, ROOMS, a remote direct message) blocks that session's
  input (``SessionProtocol.block``); frames read meanwhile wait and are
  handled in order after the answer. Other sessions are not held up.
* **WHO and ROOMS read Redis** (per-room member hashes, per-namespace room
  counts) rather than asking the other nodes: one round trip, no fan-in,
  and a dead node's entries are removed by the script that reaps it. While
  Redis is down they answer from this node's view.
* **Outage.** Local delivery goes on. While the link is down every EMIT takes
  the slow path, so an EMIT that should also reach other nodes is answered
  UNAVAILABLE (acked) or once per connection per outage (req 0). Removals
  that fail while down are kept and replayed on reconnect; then every nick
  and membership of this node is registered again (idempotent scripts) and
  the link itself restores the subscriptions.
* **Node death.** Each node refreshes a heartbeat key with a TTL and runs the
  reap script each beat: any node whose heartbeat expired has its members
  removed (a PRESENCE leave is published for each, which every node delivers
  to its watchers) and its nicks freed, atomically, by whichever node gets
  there first.
* Recipient counts: local members plus the members on other nodes as last
  known (``Room.remote``: the member hash size when this node joined, then
  every PRESENCE seen; ``Namespace.remote`` likewise from the nick hash and
  NS_COUNT messages), so no EMIT waits for a count.

Sequenced rooms (protocol section 9, cluster-wide) and resume on any node
(section 10) are the two mixins seqrooms.py and resume.py.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time

from muxserver import protocol as P
from muxserver.backplane import keys as K
from muxserver.backplane.redis import RedisError, RedisLink
from muxserver.backplane.requests import Requests
from muxserver.backplane.resume import Resumes
from muxserver.backplane.scripts import room_base
from muxserver.backplane.seqrooms import SeqRooms
from muxserver.hub import Change, Room, nick_key
from muxserver.loop import EVENT_READ

log = logging.getLogger("muxserver.backplane")


def set_reading(server, sess, blocked: bool) -> None:
    """``SessionProtocol.on_block``: no reads from a session waiting on Redis."""
    transport = sess.transport
    if blocked:
        transport.set_interest(server.loop, transport.interest & ~EVENT_READ)
        return
    transport.set_interest(server.loop, transport.interest | EVENT_READ)
    if transport.more_buffered():  # TLS bytes already decrypted raise no event
        server.loop.call_later(0, server._read_again, sess)


class Channel:
    """A channel this node holds: a room's or a namespace's."""

    __slots__ = ("name", "ns", "room", "ready", "waiters")

    def __init__(self, name: bytes, ns: str, room: str | None) -> None:
        self.name = name
        self.ns = ns
        self.room = room  # None for a namespace channel
        self.ready = False  # Redis confirmed the SUBSCRIBE
        self.waiters: list = []


class Backplane(Requests, SeqRooms, Resumes):
    """The cluster node: the link, the channels held, delivery both ways, upkeep."""

    def __init__(
        self,
        server,
        url: str,
        *,
        node: bytes | None = None,
        heartbeat: float = 1.0,
        ttl: float = 4.0,
        **link_options,
    ) -> None:
        self.server = server
        self.loop = server.loop
        self.hub = server.hub
        self.router = server.router
        self.protocol = server.protocol
        self.node = node or secrets.token_hex(6).encode()
        self.origin8 = K.str8(self.node)
        self.heartbeat = heartbeat
        self.ttl_ms = int(ttl * 1000)
        self.link = RedisLink(
            self.loop, url, on_up=self._on_up, on_down=self._on_down, **link_options
        )
        self.channels: dict[bytes, Channel] = {}
        self._room_ch: dict[Room, bytes] = {}  # local room -> its channel (publish)
        self._notified: set[int] = set()  # sessions told UNAVAILABLE this outage
        self._retry: list[tuple] = []  # (script, keys, args) that failed while down
        self._order = 0
        self._orders: dict[tuple, int] = {}  # (conn id, namespace, room) -> join order
        self._hellos: dict[str, int] = {}  # namespace -> HELLOs waiting on its channel
        self._timer = None
        self.down_since: float | None = None
        # Counters, read by /metrics.
        self.published = self.published_bytes = 0
        self.received = self.received_bytes = 0
        self.unavailable = 0
        self.rejected = 0  # publications the link refused (backlog full)
        self._rejected_now = False
        self.reaped = 0
        self.nick_conflicts = 0
        self.ups = 0
        self._seq_init()
        self._resume_init()
        server.backplane = self
        self.protocol.backplane = self
        self.protocol.on_block = functools.partial(set_reading, server)
        self.router.backplane = self

    # ============================================================ lifecycle
    def start(self) -> None:
        self.link.subscribe(K.node_channel(self.node), self._on_direct)
        self.link.start()
        self._timer = self.loop.call_later(self.heartbeat, self._beat)

    @property
    def up(self) -> bool:
        return self.link.up

    def shutdown(self, then=None) -> None:
        """Clean shutdown: remove this node's registrations now (presence leaves go out)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.link.up:
            if then is not None:
                self.loop.call_later(0, then)
            return
        self.link.eval_script(K.REAP, [], [self.node], callback=lambda _r: then and then())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.link.close()

    def _beat(self) -> None:
        self._timer = self.loop.call_later(self.heartbeat, self._beat)
        if not self.link.up:
            return
        self.link.eval_script(K.BEAT, [], [self.node, self.ttl_ms], callback=self._on_beat)
        self.link.eval_script(K.REAP, [], [b""], callback=self._on_reaped)

    def _on_beat(self, reply) -> None:
        if reply == 0 and self.link.up:
            # Our heartbeat had expired (the process stalled, the link stayed
            # up) and another node reaped us: register everything again.
            log.warning("cluster: this node was reaped while alive; registering again")
            self._restore()

    def _on_reaped(self, reply) -> None:
        if isinstance(reply, RedisError) or not reply:
            return
        for node in reply:
            self.reaped += 1
            log.warning("cluster: node %s stopped beating; its nicks and members are freed",
                        node.decode(errors="replace"))  # fmt: skip

    def _on_up(self) -> None:
        self.ups += 1
        if self.down_since is not None:
            log.info("cluster: Redis is back after %.1f s; restoring registrations",
                     self.loop.time() - self.down_since)  # fmt: skip
        self.down_since = None
        self.protocol._slow_emit = bool(self.protocol._rate)
        self._notified.clear()
        link = self.link
        link.eval_script(K.BEAT, [], [self.node, self.ttl_ms])
        retry, self._retry = self._retry, []
        for script, keys, args in retry:
            self._eval(script, keys, args)
        self._restore()
        for ch in self.channels.values():
            ch.ready = True
            self._run_waiters(ch)
        self._catch_up()  # what the room channels missed while down

    def _on_down(self, reason: str) -> None:
        self.down_since = self.loop.time()
        self.protocol._slow_emit = True
        for ch in self.channels.values():
            ch.ready = False
            self._run_waiters(ch)  # blocked JOINs and HELLOs finish now, locally

    def _restore(self) -> None:
        """Register every local nick and membership again (Redis may have lost them)."""
        for sess in list(self.protocol.resumer.parked):
            self._parked(sess)  # and the resume records (a full window again: ours ends first)
        sync = bytes((K.SYNC,)) + self.origin8
        for ns in self.hub.namespaces.values():
            for sess in ns.members:
                self._claim(sess, ns.name, [sess.nick], self._restored_nick(sess))
            # Then one message: the other nodes re-read the sizes (no PRESENCE).
            self.link.call(b"PUBLISH", K.ns_channel(ns.name), self._ns_message(K.NS_SYNC))
            self.link.call(b"HLEN", K.nicks_key(ns.name), callback=self._ns_recount(ns))
            for room in ns.rooms.values():
                base = room_base(ns.name, room.name)
                for sess in room.members:
                    self._member_add(sess, ns.name, room, base, quiet=True)
                self.link.call(b"PUBLISH", base + b":ev", sync)

    def _restored_nick(self, sess):
        def done(reply, _size) -> None:
            if reply == 0:
                self.nick_conflicts += 1
                log.warning("cluster: nick %r of #%d was taken elsewhere during the outage",
                            sess.nick, sess.id)  # fmt: skip

        return done

    # ============================================================ helpers
    def _eval(self, script, keys, args, callback=None, retry: bool = False) -> bool:
        ok = self.link.eval_script(script, keys, args, callback=callback)
        if not ok and retry:
            self._retry.append((script, keys, args))
        return ok

    def _member_id(self, sess) -> bytes:
        return self.node + b"|" + str(sess.id).encode()

    def _owner(self, sess) -> bytes:
        return self._member_id(sess) + b"|"

    def _next_order(self) -> int:
        self._order = max(time.time_ns() // 1000, self._order + 1)
        return self._order

    def _reply(self, sess, frame: bytes) -> None:
        self.router.reply(sess, frame)

    def _error(self, sess, req: int, status: int, message: str) -> None:
        self.protocol._reply_error(sess, req, status, message)

    def _unavailable(self, sess, req: int, message: str) -> None:
        """REPLY UNAVAILABLE; for req 0 only once per connection per outage."""
        if not req:
            if sess.id in self._notified:
                return
            self._notified.add(sess.id)
        self.unavailable += 1
        self._error(sess, req, P.UNAVAILABLE, message)

    def _guarded(self, sess, fn):
        """A Redis callback for ``sess``: our bug closes that session, nothing else."""

        def call(*args) -> None:
            try:
                fn(*args)
            except Exception:
                self.server._internal_error(sess, "handling a cluster reply")

        return call

    def _run_waiters(self, ch: Channel) -> None:
        waiters, ch.waiters = ch.waiters, []
        for waiter in waiters:
            waiter()

    def _when_ready(self, ch: Channel, fn) -> None:
        if ch.ready or not self.link.up:
            fn()
        else:
            ch.waiters.append(fn)

    def _hold(self, name: bytes, ns: str, room: str | None) -> Channel:
        ch = self.channels.get(name)
        if ch is None:
            ch = self.channels[name] = Channel(name, ns, room)
            self.link.subscribe(name, self._on_message, lambda: self._confirmed(ch))
        return ch

    def _confirmed(self, ch: Channel) -> None:
        if self.channels.get(ch.name) is ch:
            ch.ready = True
            if ch.room is not None and self.seq_on:
                ns = self.hub.namespaces.get(ch.ns)
                room = ns.rooms.get(ch.room) if ns is not None else None
                if room is not None:
                    self._seq_baseline(room, ch.name[:-3])
            self._run_waiters(ch)

    def _drop(self, name: bytes) -> None:
        ch = self.channels.pop(name, None)
        if ch is not None:
            self.link.unsubscribe(name)
            self._run_waiters(ch)

    def _drop_ns_if_empty(self, ns_name: str) -> None:
        if ns_name not in self.hub.namespaces and not self._hellos.get(ns_name):
            self._drop(K.ns_channel(ns_name))

    # ============================================================ delivery
    def publish(self, sender, group, data: bytes, legacy, messages: int, echo=0) -> int:
        """Router seam: a run just delivered locally; send it to the other nodes."""
        self._last_run = None
        if not self.link.up:
            return 0
        if group.__class__ is Room:
            channel = self._room_ch.get(group)
            if channel is None:
                return 0
            if self.seq_on:
                run = self._publish_run(sender, group, channel, data, legacy, messages, echo)
                if run is None:
                    self._refused()
                    return 0
                self._last_run = run
                return group.remote
            msg = K.events_message(K.EVENTS, self.origin8, messages, data, legacy)
            remote = group.remote
        else:
            channel = K.ns_channel(group.name)
            msg = K.events_message(K.BROADCAST, self.origin8, messages, data, legacy)
            remote = group.remote
        if not self.link.call(b"PUBLISH", channel, msg):
            self._refused()
            return 0
        self.published += 1
        self.published_bytes += len(msg)
        return remote

    def _refused(self) -> None:
        # The link's backlog is full (Redis is not keeping up): counted,
        # logged, and the slow path's EMIT gets UNAVAILABLE (see emitted).
        self.rejected += 1
        self._rejected_now = True
        if self.rejected == 1 or not self.rejected % 1000:
            log.warning("cluster: %d publications refused: Redis link backlog full",
                        self.rejected)  # fmt: skip

    def emitted(self, sess, req: int, count: int = 0) -> bool:
        """After local delivery of a room/broadcast EMIT: False if the caller must not reply.

        That is when UNAVAILABLE was sent, or when the EMIT went into a
        sequenced run: its REPLY (with the cluster seq) comes with the
        script's answer.
        """
        run, self._last_run = self._last_run, None
        if self.link.up and not self._rejected_now:
            if run is not None and req:
                run.acks.append((sess, req, count, 0))
                return False
            return True
        self._rejected_now = False
        self._unavailable(sess, req, "delivered on this node only: the cluster link is down")
        return False

    def _on_message(self, channel: bytes, data: bytes) -> None:
        ch = self.channels.get(channel)
        if ch is None or len(data) < 2:
            return
        kind, origin, at = K.split_origin(data)
        if origin == self.node:
            if kind != K.SEQ_EVENTS:
                return  # (our sequenced runs come back to be delivered in seq order)
        else:
            self.received += 1
            self.received_bytes += len(data)
        ns = self.hub.namespaces.get(ch.ns)
        if ns is None:
            return
        if kind == K.BROADCAST:
            messages, body, legacy = K.read_events(data, at)
            self.router.remote(ns, body, legacy, messages)
            return
        if kind == K.NS_COUNT:
            what = data[at]
            if what == K.NS_JOIN:
                ns.remote += 1
            elif what == K.NS_LEAVE and ns.remote > 0:
                ns.remote -= 1
            elif what == K.NS_SYNC:
                self.link.call(b"HLEN", K.nicks_key(ns.name), callback=self._ns_recount(ns))
            return
        room = ns.rooms.get(ch.room) if ch.room is not None else None
        if room is None:
            return
        if kind == K.SEQ_EVENTS:
            self._on_seq_run(room, data, at, origin)
        elif kind == K.EVENTS:
            messages, body, legacy = K.read_events(data, at)
            self.router.remote(room, body, legacy, messages)
        elif kind == K.SYNC:
            self.link.call(b"HLEN", channel[:-3] + b":m", callback=lambda n: self._recount(room, n))
        elif kind == K.PRESENCE:
            pkind = data[at]
            nick, at = K.read_str8(data, at + 1)
            new, at = K.read_str8(data, at)
            if pkind == P.PRESENCE_JOIN:
                room.remote += 1
            elif pkind == P.PRESENCE_LEAVE and room.remote > 0:
                room.remote -= 1
            if room.watchers:
                notice = P.Presence(pkind, room.name, nick.decode(), new.decode())
                self.router.presence([Change(list(room.watchers), notice)])

    def _ns_recount(self, ns):
        def done(size) -> None:
            if isinstance(size, int) and self.hub.namespaces.get(ns.name) is ns:
                ns.remote = max(0, size - len(ns.members))

        return done

    def _recount(self, room: Room, size) -> None:
        if isinstance(size, int) and self._room_ch.get(room) is not None:
            room.remote = max(0, size - len(room.members))

    def _on_direct(self, channel: bytes, data: bytes) -> None:
        if len(data) >= 2 and data[0] in self._resume_kinds:
            self._resume_kinds[data[0]](data)
            return
        if len(data) < 2 or data[0] != K.DIRECT:
            return
        _, origin, at = K.split_origin(data)
        self.received += 1
        self.received_bytes += len(data)
        conn, at = K.read_str8(data, at)
        target = self.server.sessions.get(int(conn))
        if target is None or target.ns is None:
            return  # gone since the registry was read: like a message to a closed socket
        (size,) = K.U32.unpack_from(data, at)
        body = data[at + 4 : at + 4 + size]
        legacy = data[at + 4 + size :] or None
        self.router.to_one(None, target, body, legacy, 1)

    def direct(self, sess, req: int, nick: str, data: bytes, legacy: bytes | None) -> None:
        """A direct EMIT to a nick that is not on this node."""
        if not self.link.up:
            self._unavailable(
                sess, req, f"{nick!r} is not on this node and the cluster link is down"
            )
            return
        self.protocol.block(sess)
        tail = K.U32.pack(len(data)) + data + (legacy or b"")
        head = bytes((K.DIRECT,)) + self.origin8

        def done(reply) -> None:
            try:
                if isinstance(reply, RedisError):
                    self._unavailable(sess, req, f"cluster link: {reply}")
                elif not reply:
                    self._error(sess, req, P.NO_SUCH_TARGET, f"no one is called {nick!r} here")
                else:
                    self.published += 1
                    self.published_bytes += len(head) + len(tail)
                    if req:
                        self._reply(sess, P.reply_count_seq0(req, 1) if sess.version >= 2
                                    else P.reply_count(req, 1))  # fmt: skip
            finally:
                self.protocol.unblock(sess)

        keys = [K.nicks_key(sess.ns.name)]
        self._eval(K.DIRECT_SEND, keys, [nick_key(nick), head, tail], self._guarded(sess, done))

    # ============================================================ metrics
    def metrics_text(self) -> str:
        """The backplane's families for /metrics (appended to the server's page)."""
        from muxserver.stats import _Exposition

        out = _Exposition()
        link = self.link.stats()
        out.family(
            "muxserver_cluster_up",
            "gauge",
            "1 while the Redis link is up (cluster mode).",
            1 if self.link.up else 0,
        )
        out.family(
            "muxserver_cluster_published_total",
            "counter",
            "Messages this node published to Redis.",
            self.published,
        )
        out.family(
            "muxserver_cluster_published_bytes_total",
            "counter",
            "Bytes of the messages this node published.",
            self.published_bytes,
        )
        out.family(
            "muxserver_cluster_received_total",
            "counter",
            "Messages from other nodes received.",
            self.received,
        )
        out.family(
            "muxserver_cluster_received_bytes_total",
            "counter",
            "Bytes of the messages from other nodes received.",
            self.received_bytes,
        )
        out.family(
            "muxserver_cluster_subscriptions",
            "gauge",
            "Redis channels this node holds.",
            link["subscriptions"],
        )
        out.family(
            "muxserver_cluster_reconnects_total",
            "counter",
            "Redis reconnect attempts.",
            link["reconnects"],
        )
        out.family(
            "muxserver_cluster_unavailable_total",
            "counter",
            "UNAVAILABLE answers (REPLY or ERROR) while Redis was down.",
            self.unavailable,
        )
        out.family(
            "muxserver_cluster_publish_refused_total",
            "counter",
            "Publications refused because the Redis backlog was full.",
            self.rejected,
        )
        out.family(
            "muxserver_cluster_nodes_reaped_total",
            "counter",
            "Dead nodes this node cleaned up.",
            self.reaped,
        )
        out.family("muxserver_cluster_seq_runs_total", "counter",
                   "Runs of sequenced room messages numbered by this node's script calls.",
                   self.seq_runs)  # fmt: skip
        out.family("muxserver_cluster_seq_fills_total", "counter",
                   "History reads that filled a seq jump on a room channel (or caught up "
                   "after a reconnect).", self.seq_fills)  # fmt: skip
        out.family("muxserver_cluster_seq_filled_messages_total", "counter",
                   "Messages those reads delivered.", self.seq_filled)  # fmt: skip
        out.family("muxserver_cluster_seq_gaps_total", "counter",
                   "GAP frames sent for messages the Redis history no longer held.",
                   self.seq_gaps)  # fmt: skip
        out.family("muxserver_cluster_resumes_total", "counter",
                   "Sessions resumed here that were parked on another node or this one.",
                   self.resumed_remote)  # fmt: skip
        out.family("muxserver_cluster_redis_bytes_total", "counter",
                   "Bytes on the Redis connections.",
                   [({"direction": "in"}, link["bytes_in"]),
                    ({"direction": "out"}, link["bytes_out"])])  # fmt: skip
        return out.text()
