"""The per-connection protocol state machine, sans-I/O: frames in, queued bytes out.

A :class:`Session` is one client's protocol state (version, nick, rooms, the
EVENT prefixes carrying its nick, its rate-limit bucket, liveness times);
:class:`SessionProtocol` is the logic every session shares: HELLO, JOIN,
LEAVE, NICK, EMIT, WHO, ROOMS, PING, PONG, BYE. It imports no socket and no
loop. What it produces is bytes on ``out`` lists (through the router, the
one delivery path) and two requests to its host, the server: "this session
is closing" (after BYE or a fatal ERROR) and nothing else. Tests drive it
over an in-memory transport (muxserver.testing).

The EMIT path is the hot one and is written out by hand in
:meth:`SessionProtocol.handle`: a run of plain room EMITs from one read to
one room is sliced, not decoded, each EMIT's tail forwarded behind the
sender's EVENT prefix (the EVENT ends with the same three fields as the
EMIT), and the whole run joined into one bytes object that the router
appends once per member. A run ends at the first frame that is anything
else, so every ordering rule holds as if each frame had been handled alone.
Byte offsets come from the codec (``protocol.py``), never from literals here.

Every room EMIT is numbered and kept (section 9): one EVENT_SEQ ``pack`` per
message, the run's tails to the history in one call (in a cluster, Redis
numbers and keeps them: backplane/seqrooms.py). SEQUENCED JOINs and replays
are muxserver.sequenced's, resume (section 10) muxserver.resume's.
"""

from __future__ import annotations

import functools
import hmac
import logging

from . import protocol as P
from .framing import LENGTH
from .history import History
from .hub import HubError
from .logs import pack_peer, unpack_peer
from .requests import RequestHandlers
from .resume import PARK_CODES, Resumer
from .sequenced import Sequencer, gauges

log = logging.getLogger("muxserver")

# Session states, in the order a session moves through them.
HELLO_WAIT = 0  # connected, no HELLO yet
OPEN = 1  # past HELLO: a member of a namespace
CLOSING = 2  # error or BYE queued: flushing the last output, input discarded
DRAINING = 3  # FIN sent: reading and discarding until EOF or drain_timeout
CLOSED = 4
# PARKED = 5 (muxserver.resume): in the hub, no connection; the flush skips it.

# What the heartbeat rule decides for one session (see liveness).
ALIVE, SEND_PING, TIMED_OUT = 0, 1, 2

STATE_NAMES = {HELLO_WAIT: "hello", OPEN: "open", CLOSING: "closing", DRAINING: "draining"}

_EMIT = P.EMIT
_ECHO = P.EMIT_ECHO
_TYPE_MASK = P.EMIT_TYPE_MASK
_ROOM_TAIL = P.EMIT_TAIL_OFFSET  # the EMIT body from here on is the EVENT tail
_DELTA = P.EVENT_LENGTH_DELTA  # EVENT length = len(prefix) + len(EMIT body) - this
_NO_REQ = P.REQ.pack(0)  # an EMIT's req field when no ack is asked
_EVENT_SEQ = P.EVENT_SEQ
_SEQ_EXTRA = P.EVENT_SEQ_EXTRA  # EVENT_SEQ length = EVENT length + this


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
        "id", "_peer", "state", "version", "transport", "out",
        "nick", "ns", "rooms", "_prefix_room", "_prefix_direct", "_prefix_bcast",
        "bucket", "connected_at", "last_rx", "last_ping",
        "counted", "frames_in", "frames_out", "successor", "resume_key",
        "deferred",
    )  # fmt: skip

    def __init__(self, conn_id: int, transport, peer, now: float) -> None:
        self.id = conn_id
        self._peer = pack_peer(peer)
        self.state = HELLO_WAIT
        self.version = 0  # set by HELLO
        self.transport = transport
        self.out: list[bytes] = transport.out
        self.nick = ""
        self.ns = None
        self.rooms: dict = {}
        self._prefix_room = self._prefix_direct = self._prefix_bcast = b""
        self.bucket = None  # [tokens, when]: the rate-limit bucket, from HELLO, if limited
        self.connected_at = self.last_rx = self.last_ping = now
        self.counted = False  # held against max_connections
        self.frames_in = self.frames_out = 0
        self.successor = None  # the session this connection was handed to (resume)
        self.resume_key = ""  # selector of its resume token (muxserver.resume)
        # Frames read while the session waits on the cluster backplane (a nick
        # claim, a subscription): None when not blocked. See SessionProtocol.block.
        self.deferred: list | None = None

    def __repr__(self) -> str:
        return f"<Session #{self.id} {self.nick or '-'} state={self.state}>"

    @property  # (this and the next two: read by stats.py when scraped)
    def bytes_in(self) -> int:
        return self.transport.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.transport.bytes_out

    @property
    def pending_bytes(self) -> int:
        return self.transport.pending_bytes

    @property
    def peer(self):
        """The peer address as the socket layer gave it (stored packed, see logs.pack_peer)."""
        return unpack_peer(self._peer)

    def set_prefixes(self) -> None:
        """Forget the EVENT prefixes carrying the nick (after HELLO and NICK).

        They are made on first use: an idle connection never needs one, and
        the three cost 138 bytes.
        """
        self._prefix_room = self._prefix_direct = self._prefix_bcast = b""

    @property
    def prefix_room(self) -> bytes:
        if not self._prefix_room:
            self._prefix_room = P.event_prefix(P.TARGET_ROOM, self.nick.encode("utf-8"))
        return self._prefix_room

    @property
    def prefix_direct(self) -> bytes:
        if not self._prefix_direct:
            self._prefix_direct = P.event_prefix(P.TARGET_DIRECT, self.nick.encode("utf-8"))
        return self._prefix_direct

    @property
    def prefix_bcast(self) -> bytes:
        if not self._prefix_bcast:
            self._prefix_bcast = P.event_prefix(P.TARGET_BROADCAST, self.nick.encode("utf-8"))
        return self._prefix_bcast


class SessionProtocol(RequestHandlers):
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
        self._acks_wait = False  # acked room EMITs skip fast runs (backplane/seqrooms.py)
        self.frames_in_by_type = [0] * 256
        self._ping_nonce = 0
        self.history = History(
            config.history_size, config.history_bytes, config.history_ttl, config.history_memory
        )
        hub.on_members = self._members_changed
        self.sequencer = Sequencer(
            self.history, router, clock, stats, config.max_output,
            lambda sess: host._internal_error(sess, "replaying its history"),
        )  # fmt: skip
        self.resumer = Resumer(config, hub, router, self.sequencer, clock, host, stats, self.fatal)
        # Replay pages go out while kernels take them: pump, flush, again (sequenced.py).
        clock.add_before_sleep(functools.partial(self.sequencer.pump_rounds, host.flush, clock))
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

    def gauges(self) -> dict:
        """History and resume figures for /metrics (Server.snapshot)."""
        return gauges(self)

    def _members_changed(self, key, count: int) -> None:
        self.history.set_members(key, count, self.clock.now)

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
            self.fatal(sess.successor or sess, exc.code, exc.message)
            return
        sess = sess.successor or sess  # a resuming HELLO hands the connection over
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
        pack_seq = None  # the run's EVENT_SEQ head: length, type, seq, sprefix
        events_ok = self._events.known
        rooms_ok = self._rooms.known
        router = self.router
        out_by_type = router.frames_out_by_type
        history = self.history
        keep = history.enabled  # every room EMIT gets a seq and is kept (section 9)
        step = 1 if keep else 0
        now = self.clock.now
        rooms = sess.rooms
        v2 = sess.version >= 2
        ack = P.reply_count_seq if v2 else P.reply_count_v1
        emit_type, tail_at, seq_type = _EMIT, _ROOM_TAIL, _EVENT_SEQ
        prefix = b""  # set with the run's first EMIT (prefix_room is made on first use)
        plen = 0  # EVENT length = plen + len(EMIT body)
        sprefix = b""  # prefix of the run's EVENT_SEQ frames (after their u64 seq)
        splen = seq = 0  # EVENT_SEQ length = splen + len(EMIT body); seq of the last message
        run_head = None  # body[4:eend] of the run's EMITs: flags, kind, room, event
        run_room = None
        run_echo = run_type = run_count = 0
        parts: list[bytes] = []  # [length, prefix, tail] per EMIT of the run
        sparts: list[bytes] | None = None  # one EVENT_SEQ frame per EMIT, when needed
        acks = sess.out
        acks_wait = self._acks_wait
        # req 0 + run_head: one comparison takes an unacked EMIT of the run;
        # None matches nothing (no run yet). A slice and == cost less than
        # startswith(), whose argument parsing was 7 % of a pipelined
        # message (bench.callgrind --server 1 20000: 7,238 -> 7,024).
        run_key: bytes | None = None
        klen = 0
        last_n, last_len = -1, b""
        frames = iter(frames)  # a handler that blocks takes the rest (see block)
        for ftype, body in frames:
            if ftype == emit_type and body[:klen] == run_key:
                # Counted in frames_in_by_type by _end_run, once per run.
                if len(body) != last_n:  # runs are mostly of one size: reuse its length prefix
                    last_n = len(body)
                    last_len = pack_len(plen + last_n)
                tail = body[tail_at:]
                parts += (last_len, prefix, tail)
                seq += step  # its own seq (the history takes the run's tails in _end_run)
                if sparts is not None:
                    sparts.append(pack_seq(splen + last_n, seq_type, seq, sprefix) + tail)
                continue
            if ftype == emit_type and run_head is not None and body.startswith(run_head, 4):
                # Same flags, room and event as the run so far: every check
                # those passed holds for this EMIT too.
                req = req_of(body)[0]
                if not (req and (run_echo or acks_wait)):
                    tail = body[tail_at:]
                    parts += (pack_len(plen + len(body)), prefix, tail)
                    seq += step  # its own seq (the history takes the run's tails in _end_run)
                    if sparts is not None:
                        # SEQUENCED members: its EVENT_SEQ frame, one pack.
                        sparts.append(pack_seq(splen + len(body), seq_type, seq, sprefix) + tail)
                    if req:
                        acks.append(ack(req, run_count, seq))
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
                    fast = not (req and (flags & _ECHO or acks_wait))
                    if kind == 0 and fast and tend < n and ptype != 3:
                        eend = tend + 1 + body[tend]
                        if eend <= n and body[tend + 1 : eend] in events_ok:
                            if parts:
                                self._end_run(sess, run_room, parts, run_echo, run_type, sparts,
                                              seq, sprefix)  # fmt: skip
                                parts = []
                            name = rooms_ok.get(body[7:tend])
                            run_room = rooms.get(name) if name else None
                            if run_room is not None:
                                run_head = body[4:eend]
                                run_key = _NO_REQ + run_head
                                klen = len(run_key)
                                last_n = -1
                                run_echo = flags & _ECHO
                                run_type = ptype
                                prefix = sess.prefix_room
                                if ptype:
                                    prefix = P.typed_prefix(prefix, ptype)
                                plen = len(prefix) - _DELTA
                                tail = body[tail_at:]
                                parts += (pack_len(plen + n), prefix, tail)
                                seq = history.next_seq(run_room.key, now) if keep else 0
                                sprefix = prefix[1:]  # the EVENT_SEQ / history form of it
                                if run_room.seq or run_room.held:
                                    splen = plen + _SEQ_EXTRA
                                    pack_seq = P.event_seq_head(len(sprefix)).pack
                                    sparts = [pack_seq(splen + n, seq_type, seq, sprefix) + tail]
                                else:
                                    sparts = None
                                # Recipients: no one joins or leaves during a run.
                                run_count = (
                                    len(run_room.members) - run_room.parked + run_room.remote - 1
                                )
                                if req:
                                    acks.append(ack(req, run_count, seq))
                                    out_by_type[P.REPLY] += 1
                                    router.pending.add(sess)
                                continue
            # Everything else, in order, after the run so far is out.
            if parts:
                self._end_run(sess, run_room, parts, run_echo, run_type, sparts, seq, sprefix)
                parts = []
            run_head = run_room = None
            run_key = None
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
                if sess.successor is not None:
                    sess = sess.successor  # resumed: the rest of the read is the old session's
                    acks = sess.out
                rooms = sess.rooms
                v2 = sess.version >= 2
                ack = P.reply_count_seq if v2 else P.reply_count_v1
            else:
                return  # BYE or an error ended the session mid-read
        if parts:
            self._end_run(sess, run_room, parts, run_echo, run_type, sparts, seq, sprefix)

    def _end_run(
        self, sess: Session, room, parts: list, echo: int, ptype: int, sparts, seq: int, sprefix
    ) -> None:
        """Hand a run of EVENTs (see handle) to the history and the router, once for the room.

        The history keeps each message's tail (``parts[2::3]``: the EMIT's
        target, event and payload, bytes that already exist) and the run's
        sender prefix once; a replay builds the EVENT_SEQ frames from them.
        """
        n = len(parts) // 3
        # The run's EMITs after its first (which went through the general
        # path) are counted here: one addition per run, not one per message.
        self.frames_in_by_type[_EMIT] += n - 1
        cluster = self.backplane is not None
        seq_variant = sparts is not None and (room.seq or room.held)
        # SEQUENCED members get the EVENT_SEQ variant; skip the plain join
        # when nobody else is there to take it.
        plain = not seq_variant or cluster or len(room.seq) + len(room.held) < len(room.members)
        data = b"".join(parts) if plain else b""
        if self.history.enabled and not cluster:  # a cluster keeps it in Redis
            # The tails' bytes: the frames less a length prefix and the run's
            # one sender prefix (parts[1]) each.
            size = len(data) - n * (LENGTH.size + len(parts[1])) if plain else -1
            self.sequencer.keep(room.key, parts[2::3], seq - n + 1, sprefix, size)
        legacy = None
        if ptype and (room.legacy or self.backplane is not None):
            # Version-1 members (here or, in a cluster, on other nodes) get the
            # same frames without the payload type.
            old = parts.copy()
            old[1::3] = [sess.prefix_room] * n
            legacy = b"".join(old)
        if seq_variant:
            self.router.fanout_seq(sess, room, data, legacy, b"".join(sparts), len(sparts), echo)
            return
        self.router.fanout(sess, room, data, legacy, n, echo)

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
        if hello.resume and self.resumer.window:
            # An unknown, used or expired token is no error: a fresh session.
            if self.backplane is not None:  # parked on any node (backplane/resume.py)
                self.backplane.resume(sess, hello, lambda: self._fresh(sess, hello))
                return
            resumed = self.resumer.resume(sess, hello)
            if resumed is not None:
                self._welcome(resumed, resumed=True)
                return
        self._fresh(sess, hello)

    def _fresh(self, sess: Session, hello: P.Hello) -> None:  # no resume: a new session
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
        if self._rate:
            sess.bucket = [self._burst, self.clock.now]
        sess.set_prefixes()
        self._welcome(sess, resumed=False)

    def _welcome(self, sess: Session, resumed: bool) -> None:
        cfg = self.config
        v2 = sess.version >= 2
        welcome = P.Welcome(
            sess.version,
            sess.id,
            sess.nick,
            cfg.max_frame,
            int(cfg.ping_interval * 1000),
            cfg.name,
            self.resumer.issue(sess) if v2 else "",
            int(self.resumer.window * 1000) if v2 else 0,
            1 if resumed else 0,
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
                data, legacy = self._event(sess.prefix_direct, ptype, P.direct_tail(body), True)
                self.backplane.direct(sess, req, nick, data, legacy)
                return
            if target is None:
                self._reply_error(sess, req, P.NO_SUCH_TARGET, f"no one is called {nick!r} here")
                return
            # Source is empty for a direct message: str8 "" then event + payload.
            tail = P.direct_tail(body)
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
            tail = body[_ROOM_TAIL:]
            want_legacy = bool(group.legacy) or self.backplane is not None
            data, legacy = self._event(prefix, ptype, tail, want_legacy)
            history = self.history
            if kind == P.TARGET_ROOM and (history.enabled or group.seq or group.held):
                seq = history.next_seq(group.key, self.clock.now)
                tprefix = P.typed_prefix(prefix, ptype) if ptype else prefix
                if history.enabled and self.backplane is None:  # a cluster keeps it in Redis
                    self.sequencer.keep(group.key, [tail], seq, tprefix[1:])
                if group.seq or group.held:
                    frame = P.event_seq_frame(seq, tprefix, tail)
                    count = router.fanout_seq(sess, group, data, legacy, frame, 1, echo)
                else:
                    count = router.fanout(sess, group, data, legacy, 1, echo)
                if self.backplane is not None and not self.backplane.emitted(sess, req, count):
                    return  # UNAVAILABLE was the answer, or the REPLY waits for the cluster seq
                if req:
                    router.reply(sess, P.reply_count_seq(req, count, seq) if sess.version >= 2
                                 else P.reply_count(req, count))  # fmt: skip
                return
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
        typed = P.event_frame(P.typed_prefix(prefix, ptype), tail)
        return typed, (P.event_frame(prefix, tail) if want_legacy else None)

    # ============================================================ liveness
    def sweep(self, sessions, now: float) -> None:
        """Heartbeats and timeouts of protocol section 7 (and the HELLO timeout); history ages."""
        self.sequencer.expire(now)
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
        if code in PARK_CODES and self.resumer.can_park(sess):
            # Section 10: the session stays (parked); its connection, now a
            # shell outside the hub, carries the ERROR and closes.
            sess = self.resumer.park(sess)
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

    def release(self, sess: Session) -> Session:
        """Its connection is gone: park it if it may resume, else detach; who holds it now."""
        if self.resumer.can_park(sess):
            return self.resumer.park(sess)
        self.detach(sess)
        return sess

    def detach(self, sess: Session) -> None:
        """Drop the session from the hub now, telling the watchers."""
        if sess.resume_key:
            self.resumer.forget(sess)
        if sess.ns is not None:
            if self.backplane is not None:
                self.backplane.detach(sess)
                return
            self.router.presence(self.hub.detach(sess))

    def begin_close(self, sess: Session) -> None:
        sess.state = CLOSING
        self.router.pending.add(sess)
        self.host.closing(sess)
