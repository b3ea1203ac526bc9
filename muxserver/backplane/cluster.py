"""Cluster mode (protocol section 12): many server processes sharing one Redis.

The :class:`Backplane` plugs into two seams and nowhere else: the router
hands it every room and namespace run after local delivery (``publish``), and
the session protocol hands it the requests whose answer is cluster-wide
(HELLO, JOIN, LEAVE, NICK, WHO, ROOMS, a direct EMIT to a nick not on this
node, a disconnect). Key layout and message formats are in keys.py.

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
"""

from __future__ import annotations

import logging
import secrets
import time

from muxserver import protocol as P
from muxserver.backplane import keys as K
from muxserver.backplane.redis import RedisError, RedisLink
from muxserver.backplane.scripts import room_base
from muxserver.hub import Change, HubError, Room, nick_key
from muxserver.session import HELLO_WAIT as P_HELLO_WAIT
from muxserver.session import OPEN as P_OPEN

log = logging.getLogger("muxserver.backplane")


class Channel:
    """A channel this node holds: a room's or a namespace's."""

    __slots__ = ("name", "ns", "room", "ready", "waiters")

    def __init__(self, name: bytes, ns: str, room: str | None) -> None:
        self.name = name
        self.ns = ns
        self.room = room  # None for a namespace channel
        self.ready = False  # Redis confirmed the SUBSCRIBE
        self.waiters: list = []


def _gate(count: int, then):
    """A callable that runs ``then()`` on its ``count``-th call."""
    left = [count]

    def step(*_args) -> None:
        left[0] -= 1
        if left[0] == 0:
            then()

    return step


class Backplane:
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
        self._hellos: dict[str, int] = {}  # namespace -> HELLOs waiting on its channel
        self._timer = None
        self.down_since: float | None = None
        # Counters, read by /metrics.
        self.published = self.published_bytes = 0
        self.received = self.received_bytes = 0
        self.unavailable = 0
        self.reaped = 0
        self.nick_conflicts = 0
        self.ups = 0
        server.backplane = self
        self.protocol.backplane = self
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

    def _on_down(self, reason: str) -> None:
        self.down_since = self.loop.time()
        self.protocol._slow_emit = True
        for ch in self.channels.values():
            ch.ready = False
            self._run_waiters(ch)  # blocked JOINs and HELLOs finish now, locally

    def _restore(self) -> None:
        """Register every local nick and membership again (Redis may have lost them)."""
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
    def publish(self, sender, group, data: bytes, legacy: bytes | None, messages: int) -> int:
        """Router seam: a run just delivered locally; send it to the other nodes."""
        if not self.link.up:
            return 0
        if group.__class__ is Room:
            channel = self._room_ch.get(group)
            if channel is None:
                return 0
            msg = K.events_message(K.EVENTS, self.origin8, messages, data, legacy)
            remote = group.remote
        else:
            channel = K.ns_channel(group.name)
            msg = K.events_message(K.BROADCAST, self.origin8, messages, data, legacy)
            remote = group.remote
        self.link.call(b"PUBLISH", channel, msg)
        self.published += 1
        self.published_bytes += len(msg)
        return remote

    def emitted(self, sess, req: int) -> bool:
        """After local delivery of a room/broadcast EMIT: False if UNAVAILABLE was sent."""
        if self.link.up:
            return True
        self._unavailable(sess, req, "delivered on this node only: the cluster link is down")
        return False

    def _on_message(self, channel: bytes, data: bytes) -> None:
        ch = self.channels.get(channel)
        if ch is None or len(data) < 2:
            return
        kind, origin, at = K.split_origin(data)
        if origin == self.node:
            return
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
        if kind == K.EVENTS:
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

    # ============================================================ HELLO, NICK
    def _ns_message(self, what: int) -> bytes:
        return bytes((K.NS_COUNT,)) + self.origin8 + bytes((what,))

    def _claim(self, sess, ns_name: str, nicks: list[str], callback, joining=False) -> bool:
        """NICK_CLAIM; ``callback(index or RedisError, size of the nicks hash or None)``."""
        hkey = K.nicks_key(ns_name)
        notice = self._ns_message(K.NS_JOIN) if joining else b""
        args = [self._owner(sess), hkey + b"\n", K.ns_channel(ns_name), notice]
        for nick in nicks:
            args += [nick_key(nick).encode(), nick.encode()]

        def on_reply(reply) -> None:
            if isinstance(reply, list) and len(reply) == 2:
                callback(reply[0], reply[1])
            else:
                callback(reply if isinstance(reply, RedisError) else RedisError(repr(reply)), None)

        return self._eval(K.NICK_CLAIM, [hkey, K.node_nicks(self.node)], args, on_reply)

    def _release(self, sess, ns_name: str, nick: str, leaving: bool = False) -> None:
        hkey = K.nicks_key(ns_name)
        key = nick_key(nick).encode()
        notice = self._ns_message(K.NS_LEAVE) if leaving else b""
        args = [self._owner(sess), hkey + b"\n" + key, key, K.ns_channel(ns_name), notice]
        self._eval(K.NICK_RELEASE, [hkey, K.node_nicks(self.node)], args, retry=True)

    def hello(self, sess, ns_name: str, nick: str, chosen: bool) -> None:
        why = P.check_name(ns_name, "namespace") or P.check_name(nick, "nick")
        if why:
            raise P.ProtocolError(P.INVALID_NAME, why)
        if not self.link.up:
            self.unavailable += 1
            raise P.ProtocolError(P.UNAVAILABLE, "the cluster link is down: try again shortly")
        if chosen and self.hub.nick_taken(ns_name, nick):
            raise P.ProtocolError(P.NICK_TAKEN, f"nick {nick!r} is taken in {ns_name}")
        candidates = [nick]
        if not chosen:  # guest-<conn id> is per node: another node's may hold it
            candidates.append(f"{nick}-{self.node.decode()}")
        result: list = []
        protocol = self.protocol

        def on_claim(reply, size) -> None:
            result.append(reply)
            result.append(size)

        def finish() -> None:
            try:
                reply = result[0] if result else RedisError("no reply")
                claimed = isinstance(reply, int) and reply > 0
                got = candidates[reply - 1] if claimed else ""
                if sess.state != P_HELLO_WAIT:
                    if claimed:
                        self._release(sess, ns_name, got, leaving=True)
                elif isinstance(reply, RedisError):
                    self.unavailable += 1
                    protocol.fatal(sess, P.UNAVAILABLE, f"the cluster link is down: {reply}")
                elif not claimed:
                    protocol.fatal(sess, P.NICK_TAKEN, f"nick {nick!r} is taken in {ns_name}")
                else:
                    try:
                        protocol.admit(sess, ns_name, got)
                    except P.ProtocolError as exc:
                        self._release(sess, ns_name, got, leaving=True)
                        protocol.fatal(sess, exc.code, exc.message)
                    else:
                        sess.ns.remote = max(0, result[1] - len(sess.ns.members))
                left = self._hellos.pop(ns_name, 1) - 1
                if left:
                    self._hellos[ns_name] = left
                self._drop_ns_if_empty(ns_name)
            finally:
                protocol.unblock(sess)

        protocol.block(sess)
        self._hellos[ns_name] = self._hellos.get(ns_name, 0) + 1
        gate = _gate(2, self._guarded(sess, finish))
        self._claim(sess, ns_name, candidates, lambda r, n: (on_claim(r, n), gate()), True)
        self._when_ready(self._hold(K.ns_channel(ns_name), ns_name, None), gate)

    def nick(self, sess, msg) -> None:
        new = msg.nick
        why = P.check_name(new, "nick")
        if why:
            self._error(sess, msg.req, P.INVALID_NAME, why)
            return
        if new == sess.nick:
            self._reply(sess, P.reply_ok(msg.req))
            return
        if not self.link.up:
            self.unavailable += 1
            self._error(
                sess, msg.req, P.UNAVAILABLE, "the cluster link is down: nicks cannot change"
            )
            return
        ns_name = sess.ns.name
        if nick_key(new) == nick_key(sess.nick):  # a change of case: same owner, same key
            self._renamed(sess, new)
            self._eval(K.NICK_RENAME, [K.nicks_key(ns_name)],
                       [self._owner(sess), nick_key(new).encode(), new.encode()])  # fmt: skip
            self._reply(sess, P.reply_ok(msg.req))
            return
        holder = self.hub.find(sess, new)
        if holder is not None and holder is not sess:
            self._error(sess, msg.req, P.NICK_TAKEN, f"nick {new!r} is taken in {ns_name}")
            return

        def done(reply, _size) -> None:
            try:
                claimed = isinstance(reply, int) and reply > 0
                if sess.state != P_OPEN or sess.ns is None:
                    if claimed:
                        self._release(sess, ns_name, new)
                elif isinstance(reply, RedisError):
                    self.unavailable += 1
                    self._error(sess, msg.req, P.UNAVAILABLE, f"cluster link: {reply}")
                elif not claimed:
                    self._error(sess, msg.req, P.NICK_TAKEN, f"nick {new!r} is taken in {ns_name}")
                else:
                    old = sess.nick
                    if self._renamed(sess, new, msg.req):
                        self._release(sess, ns_name, old)
                        self._reply(sess, P.reply_ok(msg.req))
                    else:
                        self._release(sess, ns_name, new)
            finally:
                self.protocol.unblock(sess)

        self.protocol.block(sess)
        self._claim(sess, ns_name, [new], self._guarded(sess, done))

    def _renamed(self, sess, new: str, req: int = 0) -> bool:
        """The local rename, its PRESENCE here and on every room channel."""
        old = sess.nick
        try:
            changes = self.hub.rename(sess, new)
        except HubError as exc:
            self._error(sess, req, exc.status, exc.message)
            return False
        sess.set_prefixes()
        self.router.presence(changes)
        member = self._member_id(sess)
        notice = K.presence_message(self.origin8, P.PRESENCE_NICK, old, new, member)
        for room in sess.rooms.values():
            base = room_base(sess.ns.name, room.name)
            self._eval(K.MEMBER_RENAME, [base + b":m"],
                       [member, new.encode(), base + b":ev", notice])  # fmt: skip
        return True

    # ============================================================ rooms
    def _member_add(self, sess, ns_name: str, room: Room, base: bytes, quiet: bool, then=None):
        member = self._member_id(sess)
        rkey = K.rooms_key(ns_name)
        entry = b"\n".join((rkey, room.name.encode(), base, member))
        value = b"%016d|%s" % (self._next_order(), sess.nick.encode())
        notice = b"" if quiet else K.presence_message(
            self.origin8, P.PRESENCE_JOIN, sess.nick, "", member)  # fmt: skip

        def done(reply) -> None:
            if isinstance(reply, int) and self._room_ch.get(room) is not None:
                room.remote = max(0, reply - len(room.members))
            if then is not None:
                then()

        keys = [base + b":m", rkey, K.node_rooms(self.node)]
        args = [member, value, room.name.encode(), entry, base + b":ev", notice]
        return self._eval(K.MEMBER_ADD, keys, args, done)

    def _member_gone(self, sess_id: int, ns_name: str, room_name: str, nick: str) -> None:
        base = room_base(ns_name, room_name)
        member = self.node + b"|" + str(sess_id).encode()
        rkey = K.rooms_key(ns_name)
        entry = b"\n".join((rkey, room_name.encode(), base, member))
        notice = K.presence_message(self.origin8, P.PRESENCE_LEAVE, nick, "", member)
        keys = [base + b":m", rkey, K.node_rooms(self.node)]
        args = [member, room_name.encode(), entry, base + b":ev", notice]
        self._eval(K.MEMBER_REMOVE, keys, args, retry=True)
        ns = self.hub.namespaces.get(ns_name)
        if ns is None or room_name not in ns.rooms:
            channel = base + b":ev"
            self._drop(channel)
            for room, ch in list(self._room_ch.items()):
                if ch == channel:
                    del self._room_ch[room]

    def join(self, sess, msg) -> None:
        name = msg.room
        before = sess.rooms.get(name)
        try:
            changes = self.hub.join(sess, name, bool(msg.flags & P.JOIN_PRESENCE))
        except HubError as exc:
            self._error(sess, msg.req, exc.status, exc.message)
            return
        self.router.presence(changes)
        if before is not None:
            self._reply(sess, P.reply_ok(msg.req))
            return
        ns_name = sess.ns.name
        room = sess.rooms[name]
        base = room_base(ns_name, name)
        channel = base + b":ev"
        self._room_ch[room] = channel
        ch = self._hold(channel, ns_name, name)

        def finish() -> None:
            try:
                if sess.state == P_OPEN:
                    self._reply(sess, P.reply_ok(msg.req))
            finally:
                self.protocol.unblock(sess)

        gate = _gate(2, self._guarded(sess, finish))
        if not self._member_add(sess, ns_name, room, base, quiet=False, then=gate):
            self._reply(sess, P.reply_ok(msg.req))  # down: restored on reconnect
            return
        self.protocol.block(sess)
        self._when_ready(ch, gate)

    def leave(self, sess, msg) -> None:
        was = sess.rooms.get(msg.room)
        try:
            changes = self.hub.leave(sess, msg.room)
        except HubError as exc:
            self._error(sess, msg.req, exc.status, exc.message)
            return
        self.router.presence(changes)
        if was is not None:
            self._member_gone(sess.id, sess.ns.name, msg.room, sess.nick)
        self._reply(sess, P.reply_ok(msg.req))

    def detach(self, sess) -> None:
        ns_name = sess.ns.name
        names = list(sess.rooms)
        nick = sess.nick
        self.router.presence(self.hub.detach(sess))
        for name in names:
            self._member_gone(sess.id, ns_name, name, nick)
        self._release(sess, ns_name, nick, leaving=True)
        self._drop_ns_if_empty(ns_name)

    # ============================================================ queries
    def who(self, sess, msg) -> bool:
        if not self.link.up or P.check_name(msg.room, "room"):
            return False  # this node's view (or the name error), from the hub

        def done(reply) -> None:
            try:
                if isinstance(reply, RedisError) or not isinstance(reply, list):
                    nicks = self.hub.who(sess, msg.room)
                else:
                    values = sorted(reply[1::2])
                    nicks = [v[17:].decode("utf-8", "replace") for v in values]
                entries = [P.str8(n) for n in nicks]
                max_frame = self.protocol.config.max_frame
                if sess.state == P_OPEN:
                    self._reply(sess, P.listing_reply(msg.req, entries, max_frame))
            finally:
                self.protocol.unblock(sess)

        self.protocol.block(sess)
        base = room_base(sess.ns.name, msg.room)
        self.link.call(b"HGETALL", base + b":m", callback=self._guarded(sess, done))
        return True

    def rooms(self, sess, msg) -> bool:
        if not self.link.up:
            return False
        names = list(sess.rooms)
        if msg.scope != 1 and not names:
            return False

        def done(reply) -> None:
            try:
                if isinstance(reply, RedisError) or not isinstance(reply, list):
                    rooms = self.hub.rooms(sess, all_rooms=msg.scope == 1)
                elif msg.scope == 1:
                    pairs = zip(reply[::2], reply[1::2], strict=True)
                    rooms = sorted((k.decode("utf-8", "replace"), int(v)) for k, v in pairs)
                else:
                    rooms = list(zip(names, (int(n) for n in reply), strict=True))
                entries = [P.str8(name) + P.U32.pack(count) for name, count in rooms]
                if sess.state == P_OPEN:
                    max_frame = self.protocol.config.max_frame
                    self._reply(sess, P.listing_reply(msg.req, entries, max_frame))
            finally:
                self.protocol.unblock(sess)

        self.protocol.block(sess)
        callback = self._guarded(sess, done)
        ns_name = sess.ns.name
        if msg.scope == 1:
            self.link.call(b"HGETALL", K.rooms_key(ns_name), callback=callback)
        else:
            keys = [room_base(ns_name, name) + b":m" for name in names]
            self._eval(K.ROOM_COUNTS, keys, [], callback)
        return True

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
            "muxserver_cluster_nodes_reaped_total",
            "counter",
            "Dead nodes this node cleaned up.",
            self.reaped,
        )
        out.family("muxserver_cluster_redis_bytes_total", "counter",
                   "Bytes on the Redis connections.",
                   [({"direction": "in"}, link["bytes_in"]),
                    ({"direction": "out"}, link["bytes_out"])])  # fmt: skip
        return out.text()
