"""The per-connection protocol state machine, sans-I/O: frames in, queued bytes out.

A :class:`Session` is one client's protocol state (version, nick, rooms, the
EVENT prefixes carrying its nick, its rate-limit bucket, liveness times);
:class:`SessionProtocol` is the logic every session shares: HELLO, JOIN,
LEAVE, NICK, EMIT, WHO, ROOMS, PING, PONG, BYE. It imports no socket and no
loop. What it produces is bytes on ``out`` lists (through the router, the
one delivery path) and requests to its host, the server: "this session
is closing" (after BYE or a fatal ERROR) and nothing else (in cluster mode
the backplane pauses a session's reading while it waits: see ``block``).
Tests drive it over an in-memory transport (muxserver.testing).

The EMIT path is the hot one and is written out by hand in
:meth:`SessionProtocol.handle`: a run of plain room EMITs from one read to
one room is sliced, not decoded, each EMIT's tail forwarded behind the
sender's EVENT prefix (the EVENT ends with the same three fields as the
EMIT), and the whole run joined into one bytes object that the router
appends once per member. A run ends at the first frame that is anything
else, so every ordering rule holds as if each frame had been handled alone.
Byte offsets come from the codec (``protocol.py``), never from literals here.
"""

from __future__ import annotations

import hmac
import logging

from . import protocol as P
from .framing import LENGTH
from .hub import HubError

log = logging.getLogger("muxserver")

# Session states, in the order a session moves through them.
HELLO_WAIT = 0  # connected, no HELLO yet
OPEN = 1  # past HELLO: a member of a namespace
CLOSING = 2  # error or BYE queued: flushing the last output, input discarded
DRAINING = 3  # FIN sent: reading and discarding until EOF or drain_timeout
CLOSED = 4

# What the heartbeat rule decides for one session (see liveness).
ALIVE, SEND_PING, TIMED_OUT = 0, 1, 2

STATE_NAMES = {HELLO_WAIT: "hello", OPEN: "open", CLOSING: "closing", DRAINING: "draining"}

_EMIT = P.EMIT
_ECHO = P.EMIT_ECHO
_TYPE_MASK = P.EMIT_TYPE_MASK
_ROOM_TAIL = P.EMIT_TAIL_OFFSET  # the EMIT body from here on is the EVENT tail
_DELTA = P.EVENT_LENGTH_DELTA  # EVENT length = len(prefix) + len(EMIT body) - this


def liveness(now: float, last_rx: float, last_ping: float, interval: float, timeout: float) -> int:
    """Heartbeat rule of protocol section 7, as a pure function of times.

    PING a connection that has sent nothing for ``interval`` (again every
    ``interval`` while it stays silent); cut it after ``interval + timeout``
    of silence.
    """
    idle = now - last_rx
    if idle >= interval + timeout:
        return TIMED_OUT
    if idle >= interval and (last_ping <= last_rx or now - last_ping >= interval):
        return SEND_PING
    return ALIVE


class Session:
    """One client's protocol state; ``out`` is its transport's output list."""

    __slots__ = (
        "id", "peer", "state", "version", "transport", "out",
        "nick", "ns", "rooms", "prefix_room", "prefix_direct", "prefix_bcast",
        "tokens", "tokens_at", "connected_at", "last_rx", "last_ping",
        "counted", "close_timer", "frames_in", "frames_out", "deferred",
    )  # fmt: skip

    def __init__(self, conn_id: int, transport, peer, now: float) -> None:
        self.id = conn_id
        self.peer = peer
        self.state = HELLO_WAIT
        self.version = 0  # set by HELLO
        self.transport = transport
        self.out: list[bytes] = transport.out
        self.nick = ""
        self.ns = None
        self.rooms: dict = {}
        self.prefix_room = self.prefix_direct = self.prefix_bcast = b""
        self.tokens = 0.0  # rate-limit bucket, filled at HELLO
        self.tokens_at = now
        self.connected_at = self.last_rx = self.last_ping = now
        self.counted = False  # held against max_connections
        self.close_timer = None
        self.frames_in = self.frames_out = 0
        # Frames read while the session waits on the cluster backplane (a nick
        # claim, a subscription): None when not blocked. See SessionProtocol.block.
        self.deferred: list | None = None

    def __repr__(self) -> str:
        return f"<Session #{self.id} {self.nick or '-'} state={self.state}>"

    # Read by stats.py when scraped, never on the hot path.
    @property
    def bytes_in(self) -> int:
        return self.transport.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.transport.bytes_out

    @property
    def pending_bytes(self) -> int:
        return self.transport.pending_bytes

    def set_prefixes(self) -> None:
        """The EVENT prefixes carrying this nick (payload type 0); redone on NICK."""
        nick = self.nick.encode("utf-8")
        self.prefix_room = P.event_prefix(P.TARGET_ROOM, nick)
        self.prefix_direct = P.event_prefix(P.TARGET_DIRECT, nick)
        self.prefix_bcast = P.event_prefix(P.TARGET_BROADCAST, nick)


def tail_of(emit_body: bytes) -> bytes:
    """A direct EVENT's tail: an empty source, then the EMIT's event and payload."""
    return b"\x00" + emit_body[P.emit_event_offset(emit_body) :]


def typed_prefix(prefix: bytes, ptype: int) -> bytes:
    """An EVENT prefix with a version-2 payload type in its source_kind byte."""
    return prefix[:1] + bytes((prefix[1] | ptype << P.EVENT_TYPE_SHIFT,)) + prefix[2:]


class SessionProtocol:
    """The protocol rules for every session of one server.

    ``host`` is told ``closing(session)`` when a session has queued its last
    frame (after BYE or a fatal ERROR); the host owns timers and sockets.
    ``clock`` is anything with a ``now`` attribute (the loop's cached time).
    """

    def __init__(self, config, hub, router, clock, host, stats: dict) -> None:
        self.config = config
        self.hub = hub
        self.router = router
        self.clock = clock
        self.host = host
        self.stats = stats
        self._token = config.token.encode("utf-8") if config.token else b""
        self._rate = config.rate_limit
        self._burst = float(config.rate_burst or max(1.0, config.rate_limit))
        self._rooms = P.NameCache("room")
        self._events = P.NameCache("event")
        self._nicks = P.NameCache("nick")
        # The cluster backplane (muxserver.backplane.cluster), or None. While it
        # is set, the handlers below hand cluster-wide requests to it.
        self.backplane = None
        # on_block(session, blocked): the backplane stops reading a blocked session.
        self.on_block = None
        # True sends every EMIT through _on_emit (rate limit, cluster outage).
        self._slow_emit = bool(self._rate)
        self.frames_in_by_type = [0] * 256
        self._ping_nonce = 0
        self.handlers = {
            P.HELLO: self._on_second_hello,
            P.JOIN: self._on_join,
            P.LEAVE: self._on_leave,
            P.NICK: self._on_nick,
            P.EMIT: self._on_emit,
            P.PING: self._on_ping,
            P.PONG: self._on_pong,
            P.WHO: self._on_who,
            P.ROOMS: self._on_rooms,
            P.BYE: self._on_bye,
        }

    # ============================================================ dispatch
    def receive(self, sess: Session, frames: list, error=None) -> None:
        """One read's frames, then the framing error that ended the read, if any."""
        sess.frames_in += len(frames)
        held = sess.deferred
        if held is not None:
            # Waiting on the backplane: keep the session's order, handle later.
            # Reading is paused meanwhile, so this is at most one read's frames.
            held += frames
            if error is not None:
                held.append((None, error))
            return
        self._receive(sess, frames, error)

    def _receive(self, sess: Session, frames: list, error) -> None:
        try:
            self.handle(sess, frames)
        except P.ProtocolError as exc:
            self.fatal(sess, exc.code, exc.message)
            return
        if error is not None and sess.state <= OPEN:
            if sess.deferred is not None:
                sess.deferred.append((None, error))
            else:
                self.fatal(sess, error.code, error.message)

    def block(self, sess: Session) -> None:
        """Hold the session's input until ``unblock`` (one backplane round trip).

        ``on_block`` stops reading from it meanwhile: what is held is bounded
        by the read that was being handled, and the peer feels TCP backpressure.
        """
        if sess.deferred is None:
            sess.deferred = []
            if self.on_block is not None:
                self.on_block(sess, True)

    def unblock(self, sess: Session) -> None:
        """Handle what arrived while blocked, in order (it may block again)."""
        held = sess.deferred
        sess.deferred = None
        if sess.state > OPEN:
            return
        if held:
            error = held.pop()[1] if held[-1][0] is None else None
            self._receive(sess, held, error)
        if sess.deferred is None and sess.state <= OPEN and self.on_block is not None:
            self.on_block(sess, False)

    def handle(self, sess: Session, frames: list) -> None:
        """Handle one read's frames in order (see the module docstring for the run)."""
        handlers = self.handlers
        by_type = self.frames_in_by_type
        head = P.EMIT_HEAD.unpack_from
        req_of = P.REQ.unpack_from
        pack_len = LENGTH.pack
        events_ok = self._events.known
        rooms_ok = self._rooms.known
        router = self.router
        out_by_type = router.frames_out_by_type
        rooms = sess.rooms
        v2 = sess.version >= 2
        ack = P.reply_count_seq0 if v2 else P.reply_count
        emit_type, tail_at = _EMIT, _ROOM_TAIL  # locals: read per frame
        prefix = sess.prefix_room
        plen = len(prefix) - _DELTA  # EVENT length = plen + len(EMIT body)
        run_head = None  # body[4:eend] of the run's EMITs: flags, kind, room, event
        run_room = None
        run_echo = run_type = run_count = 0
        parts: list[bytes] = []  # [length, prefix, tail] per EMIT of the run
        acks = sess.out
        frames = iter(frames)  # a handler that blocks takes the rest (see block)
        for ftype, body in frames:
            if ftype == emit_type and run_head is not None and body.startswith(run_head, 4):
                # Same flags, room and event as the run so far: every check
                # those passed holds for this EMIT too.
                req = req_of(body)[0]
                if not (req and run_echo):
                    by_type[emit_type] += 1
                    parts += (pack_len(plen + len(body)), prefix, body[tail_at:])
                    if req:
                        acks.append(ack(req, run_count))
                        out_by_type[P.REPLY] += 1
                        router.pending.add(sess)
                    continue
            by_type[ftype] += 1
            if ftype == emit_type and not self._slow_emit and sess.state == OPEN:
                n = len(body)
                if n > 7:
                    req, flags, kind, tlen = head(body)
                    tend = 7 + tlen
                    ptype = (flags & _TYPE_MASK) >> 1 if v2 else 0
                    # Echo runs only without acks: the sender's REPLYs must not
                    # overtake its own EVENTs. Payload type 3 is refused below.
                    if kind == 0 and not (flags & _ECHO and req) and tend < n and ptype != 3:
                        eend = tend + 1 + body[tend]
                        if eend <= n and body[tend + 1 : eend] in events_ok:
                            if parts:
                                self._end_run(sess, run_room, parts, run_echo, run_type)
                                parts = []
                            name = rooms_ok.get(body[7:tend])
                            run_room = rooms.get(name) if name else None
                            if run_room is not None:
                                run_head = body[4:eend]
                                run_echo = flags & _ECHO
                                run_type = ptype
                                prefix = sess.prefix_room
                                if ptype:
                                    prefix = typed_prefix(prefix, ptype)
                                plen = len(prefix) - _DELTA
                                parts += (pack_len(plen + n), prefix, body[tail_at:])
                                # Recipients: no one joins or leaves during a run.
                                run_count = len(run_room.members) + run_room.remote - 1
                                if req:
                                    acks.append(ack(req, run_count))
                                    out_by_type[P.REPLY] += 1
                                    router.pending.add(sess)
                                continue
            # Everything else, in order, after the run so far is out.
            if parts:
                self._end_run(sess, run_room, parts, run_echo, run_type)
                parts = []
            run_head = run_room = None
            state = sess.state
            if state == OPEN:
                handler = handlers.get(ftype)
                if handler is None:
                    raise P.ProtocolError(P.UNKNOWN_TYPE, f"unknown frame type 0x{ftype:02x}")
                handler(sess, body)
                if sess.deferred is not None:
                    sess.deferred += frames
                    return
            elif state == HELLO_WAIT:
                self._on_hello(sess, ftype, body)
                if sess.deferred is not None:
                    sess.deferred += frames
                    return
                rooms = sess.rooms
                v2 = sess.version >= 2
                ack = P.reply_count_seq0 if v2 else P.reply_count
            else:
                return  # BYE or an error ended the session mid-read
        if parts:
            self._end_run(sess, run_room, parts, run_echo, run_type)

    def _end_run(self, sess: Session, room, parts: list, echo: int, ptype: int) -> None:
        """Hand a run of EVENTs (see handle) to the router, once for the room."""
        legacy = None
        if ptype and (room.legacy or self.backplane is not None):
            # Version-1 members get the same frames without the payload type.
            old = parts.copy()
            old[1::3] = [sess.prefix_room] * (len(parts) // 3)
            legacy = b"".join(old)
        self.router.fanout(sess, room, b"".join(parts), legacy, len(parts) // 3, echo)

    # ================================================================ HELLO
    def _on_hello(self, sess: Session, ftype: int, body: bytes) -> None:
        if ftype != P.HELLO:
            raise P.ProtocolError(P.NOT_HELLO, "the first frame must be HELLO")
        hello = P.decode(P.HELLO, body)
        if hello.version not in P.SUPPORTED_VERSIONS:
            raise P.ProtocolError(
                P.UNSUPPORTED_VERSION,
                f"protocol version {hello.version} is not supported"
                " (this server speaks versions 1 and 2)",
            )
        if self._token and not hmac.compare_digest(
            hello.token.encode("utf-8", "surrogateescape"), self._token
        ):
            raise P.ProtocolError(P.AUTH_FAILED, "authentication failed")
        sess.version = hello.version
        nick = hello.nick or self._guest_nick(hello.namespace, sess.id)
        if self.backplane is not None:
            self.backplane.hello(sess, hello.namespace, nick, bool(hello.nick))
            return
        self.admit(sess, hello.namespace, nick)

    def admit(self, sess: Session, namespace: str, nick: str) -> None:
        """HELLO accepted: join the namespace under ``nick`` and send WELCOME."""
        try:
            self.hub.attach(sess, namespace, nick)
        except HubError as exc:
            raise P.ProtocolError(exc.status, exc.message) from None
        sess.state = OPEN
        sess.tokens = self._burst
        sess.tokens_at = self.clock.now
        sess.set_prefixes()
        cfg = self.config
        welcome = P.Welcome(
            sess.version,
            sess.id,
            sess.nick,
            cfg.max_frame,
            int(cfg.ping_interval * 1000),
            cfg.name,
        )
        self.router.reply(sess, P.encode(welcome))

    def _guest_nick(self, ns_name: str, conn_id: int) -> str:
        nick = f"guest-{conn_id}"
        n = 1
        while self.hub.nick_taken(ns_name, nick):
            # Someone chose "guest-<our id>" by hand; stay unique.
            nick = f"guest-{conn_id}-{n}"
            n += 1
        return nick

    def _on_second_hello(self, sess: Session, body: bytes) -> None:
        raise P.ProtocolError(P.NOT_HELLO, "HELLO was already received")

    # ================================================================= EMIT
    def _on_emit(self, sess: Session, body: bytes) -> None:
        req, flags, kind, rtarget, revent, _ = P.parse_emit_head(body)
        ptype = P.payload_type_of(flags) if sess.version >= 2 else 0
        if ptype == 3:
            raise P.ProtocolError(P.BAD_FRAME, "EMIT: payload type 3 is reserved")
        if self._rate and not self._take_token(sess):
            self._reply_error(sess, req, P.RATE_LIMITED, f"over {self._rate:g} messages/s")
            return
        if self._events.get(revent) is None:
            self._reply_error(sess, req, P.INVALID_NAME, self._events.why(revent))
            return
        echo = flags & _ECHO
        router = self.router
        if kind == P.TARGET_DIRECT:
            nick = self._nicks.get(rtarget)
            if nick is None:
                self._reply_error(sess, req, P.INVALID_NAME, self._nicks.why(rtarget))
                return
            target = self.hub.find(sess, nick)
            if target is None and self.backplane is not None:
                data, legacy = self._event(sess.prefix_direct, ptype, tail_of(body), True)
                self.backplane.direct(sess, req, nick, data, legacy)
                return
            if target is None:
                self._reply_error(sess, req, P.NO_SUCH_TARGET, f"no one is called {nick!r} here")
                return
            # Source is empty for a direct message: str8 "" then event + payload.
            tail = tail_of(body)
            data, legacy = self._event(sess.prefix_direct, ptype, tail, target.version < 2)
            count = router.to_one(sess, target, data, legacy, echo)
        else:
            if kind == P.TARGET_ROOM:
                name = self._rooms.get(rtarget)
                if name is None:
                    self._reply_error(sess, req, P.INVALID_NAME, self._rooms.why(rtarget))
                    return
                group = sess.rooms.get(name)
                if group is None:
                    self._reply_error(sess, req, P.NOT_MEMBER, f"not a member of room {name!r}")
                    return
                prefix = sess.prefix_room
            else:
                group = sess.ns
                prefix = sess.prefix_bcast
            # The EMIT tail (str8 target, str8 event, payload) *is* the EVENT
            # tail for a room, and for a broadcast (its target is empty).
            want_legacy = bool(group.legacy) or self.backplane is not None
            data, legacy = self._event(prefix, ptype, body[_ROOM_TAIL:], want_legacy)
            count = router.fanout(sess, group, data, legacy, 1, echo)
            if self.backplane is not None and not self.backplane.emitted(sess, req):
                return  # the cluster link is down: UNAVAILABLE was the answer
        if req:
            router.reply(sess, P.reply_count_seq0(req, count) if sess.version >= 2
                         else P.reply_count(req, count))  # fmt: skip

    def _event(self, prefix: bytes, ptype: int, tail: bytes, want_legacy: bool):
        """(frame, version-1 frame or None) for an EVENT with this prefix and tail."""
        if not ptype:
            return P.event_frame(prefix, tail), None
        typed = P.event_frame(typed_prefix(prefix, ptype), tail)
        return typed, (P.event_frame(prefix, tail) if want_legacy else None)

    def _take_token(self, sess: Session) -> bool:
        """Token bucket: ``rate_limit`` per second, up to ``rate_burst`` saved."""
        now = self.clock.now
        tokens = sess.tokens + (now - sess.tokens_at) * self._rate
        sess.tokens_at = now
        if tokens > self._burst:
            tokens = self._burst
        if tokens < 1.0:
            sess.tokens = tokens
            return False
        sess.tokens = tokens - 1.0
        return True

    # ============================================================ requests
    def _reply_error(self, sess: Session, req: int, status: int, message: str) -> None:
        self.router.reply(sess, P.reply_error(req, status, message))
        errors = self.stats["reply_errors"]
        errors[status] = errors.get(status, 0) + 1

    def _membership(self, sess: Session, req: int, change) -> None:
        """JOIN, LEAVE, NICK: run the hub change, tell the watchers, answer."""
        try:
            changes = change()
        except HubError as exc:
            self._reply_error(sess, req, exc.status, exc.message)
            return
        self.router.presence(changes)
        self.router.reply(sess, P.reply_ok(req))

    def _on_join(self, sess: Session, body: bytes) -> None:
        msg = P.decode_join(body, sess.version)
        if self.backplane is not None:
            self.backplane.join(sess, msg)
            return
        presence = bool(msg.flags & P.JOIN_PRESENCE)
        self._membership(sess, msg.req, lambda: self.hub.join(sess, msg.room, presence))

    def _on_leave(self, sess: Session, body: bytes) -> None:
        msg = P.decode(P.LEAVE, body)
        if self.backplane is not None:
            self.backplane.leave(sess, msg)
            return
        self._membership(sess, msg.req, lambda: self.hub.leave(sess, msg.room))

    def _on_nick(self, sess: Session, body: bytes) -> None:
        msg = P.decode(P.NICK, body)
        if self.backplane is not None:
            self.backplane.nick(sess, msg)
            return

        def rename():
            changes = self.hub.rename(sess, msg.nick)
            sess.set_prefixes()  # EVENTs carry the new nick from now on
            return changes

        self._membership(sess, msg.req, rename)

    def _on_who(self, sess: Session, body: bytes) -> None:
        msg = P.decode(P.WHO, body)
        if self.backplane is not None and self.backplane.who(sess, msg):
            return
        try:
            nicks = self.hub.who(sess, msg.room)
        except HubError as exc:
            self._reply_error(sess, msg.req, exc.status, exc.message)
            return
        entries = [P.str8(n) for n in nicks]
        self.router.reply(sess, P.listing_reply(msg.req, entries, self.config.max_frame))

    def _on_rooms(self, sess: Session, body: bytes) -> None:
        msg = P.decode(P.ROOMS, body)
        if self.backplane is not None and self.backplane.rooms(sess, msg):
            return
        rooms = self.hub.rooms(sess, all_rooms=msg.scope == 1)
        entries = [P.str8(name) + P.U32.pack(count) for name, count in rooms]
        self.router.reply(sess, P.listing_reply(msg.req, entries, self.config.max_frame))

    def _on_ping(self, sess: Session, body: bytes) -> None:
        nonce = P.decode(P.PING, body).nonce  # exactly 8 bytes, or BAD_FRAME
        self.router.reply(sess, P.ping_frame(P.SERVER_PONG, nonce))

    def _on_pong(self, sess: Session, body: bytes) -> None:
        P.decode(P.PONG, body)  # any frame counts as alive: last_rx is already set

    def _on_bye(self, sess: Session, body: bytes) -> None:
        P.decode(P.BYE, body)  # must be empty
        log.debug(
            "bye #%d %s from %s", sess.id, sess.nick, sess.peer,
            extra={"conn": sess.id, "peer": sess.peer, "nick": sess.nick, "reason": "BYE"},
        )  # fmt: skip
        self.detach(sess)
        self.begin_close(sess)

    # ============================================================ liveness
    def sweep(self, sessions, now: float) -> None:
        """Heartbeats and timeouts of protocol section 7 (and the HELLO timeout)."""
        cfg = self.config
        interval, timeout = cfg.ping_interval, cfg.ping_timeout
        for sess in sessions:
            state = sess.state
            if state == OPEN:
                verdict = liveness(now, sess.last_rx, sess.last_ping, interval, timeout)
                if verdict == SEND_PING:
                    self._ping_nonce += 1
                    sess.last_ping = now
                    self.router.reply(sess, P.ping_frame(P.SERVER_PING, self._ping_nonce))
                elif verdict == TIMED_OUT:
                    self.fatal(
                        sess, P.IDLE_TIMEOUT, f"nothing received for {interval + timeout:g} s"
                    )
            elif state == HELLO_WAIT and now - sess.connected_at >= cfg.hello_timeout:
                self.fatal(sess, P.IDLE_TIMEOUT, f"no HELLO within {cfg.hello_timeout:g} s")

    # ============================================================ closing
    def fatal(self, sess: Session, code: int, message: str) -> None:
        """Queue ERROR ``code`` behind what is already queued, then close.

        The session leaves its rooms and namespace at once (protocol section
        6), so nothing is ever queued behind its ERROR.
        """
        if sess.state >= CLOSING:
            return
        errors = self.stats["errors"]
        errors[code] = errors.get(code, 0) + 1
        # SHUTTING_DOWN, LIMIT and SLOW_CONSUMER are logged by whoever decided them.
        if code not in (P.SHUTTING_DOWN, P.LIMIT, P.SLOW_CONSUMER):
            reason = P.STATUS_NAMES.get(code, code)
            log.info(
                "closing #%d %s from %s: %s (%s)",
                sess.id, sess.nick or "-", sess.peer, reason, message,
                extra={
                    "conn": sess.id, "peer": sess.peer, "nick": sess.nick,
                    "reason": reason, "detail": message,
                },
            )  # fmt: skip
        self.detach(sess)
        sess.out.append(P.error_frame(code, message))
        self.begin_close(sess)

    def slow_consumer(self, sess: Session, dropped: int) -> None:
        """Its unsent output passed max_output; ``dropped`` bytes were thrown away."""
        self.stats["slow_consumers"] += 1
        # The one info line for this disconnect (fatal does not log it again).
        log.info(
            "slow consumer #%d %s from %s: %d unsent bytes dropped, disconnecting",
            sess.id, sess.nick, sess.peer, dropped,
            extra={
                "conn": sess.id, "peer": sess.peer, "nick": sess.nick,
                "reason": "SLOW_CONSUMER", "dropped_bytes": dropped,
            },
        )  # fmt: skip
        self.fatal(sess, P.SLOW_CONSUMER, f"unsent output passed {self.config.max_output} bytes")

    def detach(self, sess: Session) -> None:
        """Drop the session from the hub now, telling the watchers."""
        if sess.ns is not None:
            if self.backplane is not None:
                self.backplane.detach(sess)
                return
            self.router.presence(self.hub.detach(sess))

    def begin_close(self, sess: Session) -> None:
        sess.state = CLOSING
        self.router.pending.add(sess)
        self.host.closing(sess)
