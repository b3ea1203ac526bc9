"""The server: accept, HELLO handshake, frame dispatch, limits, heartbeats, shutdown.

This is the glue between the event loop (loop.py), the per-client transport
(connection.py), the membership rules (hub.py) and the codec (framing.py,
protocol.py). The shape of one loop turn:

1. ``select`` says which sockets are readable; each gets *one* ``recv_into``
   of the shared read buffer (that caps what one flooding client can take
   per turn), and every complete frame in it is decoded and handled in one
   pass.
2. Handlers never send. They append finished frame bytes to the recipients'
   ``out`` lists and put the recipients in ``pending``.
3. Right before the next ``select`` (a before-sleep hook), every pending
   connection is flushed with one send; the output bound is checked there.

The EMIT path is the hot one and is written out by hand: it slices the EMIT
body instead of decoding it to a tuple, looks names up in caches, and
forwards the EMIT's tail (target, event, payload) behind a per-sender EVENT
prefix that is computed once per nick change. Everything else goes through
``protocol.decode`` because clarity is worth more there than microseconds.
"""

from __future__ import annotations

import errno
import functools
import hmac
import logging
import socket
import ssl
from dataclasses import dataclass

from . import protocol as P
from .connection import (
    CLOSED,
    CLOSING,
    DRAINING,
    EVENT_READ,
    EVENT_WRITE,
    HELLO_WAIT,
    OPEN,
    WOULD_BLOCK,
    Connection,
)
from .framing import LENGTH, FrameError
from .hub import Hub, HubError
from .loop import EventLoop, listening_socket

log = logging.getLogger("muxserver")

READ_CHUNK = 256 * 1024  # most bytes taken from one connection per turn
ACCEPTS_PER_WAKEUP = 64
EMFILE_BACKOFF = 0.5  # seconds without accepting after running out of fds


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 7878
    max_frame: int = 1024 * 1024
    max_connections: int = 10000
    max_output: int = 8 * 1024 * 1024
    max_rooms: int = 1000
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    drain_timeout: float = 5.0
    hello_timeout: float = 10.0
    name: str = "muxserver"
    token: str = ""
    rate_limit: float = 0.0  # EMITs per second per connection; 0 = off
    rate_burst: int = 0  # bucket size; 0 = max(1, rate_limit)
    tls_cert: str = ""
    tls_key: str = ""


# What the sweep timer decides for one connection.
ALIVE, SEND_PING, TIMED_OUT = 0, 1, 2


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


class Server:
    def __init__(self, config: Config, loop: EventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or EventLoop()
        self.hub = Hub(max_rooms=config.max_rooms)
        self.conns: dict[int, Connection] = {}  # conn id -> connection
        self.pending: set[Connection] = set()
        self._turn = 0  # flushes so far: rooms remember when they were last queued to
        self.listeners: list[socket.socket] = []
        self.address: tuple[str, int] | None = None
        self.shutting_down = False
        self.accepting = False
        self._next_id = 0
        self._live = 0  # connections counted against max_connections
        self._rbuf = bytearray(READ_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._token = config.token.encode("utf-8") if config.token else b""
        self._rate = config.rate_limit
        self._burst = float(config.rate_burst or max(1.0, config.rate_limit))
        self._tls = self._tls_context(config) if config.tls_cert else None
        self._rooms = P.NameCache("room")
        self._events = P.NameCache("event")
        self._nicks = P.NameCache("nick")
        self._emfile_logged = False
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
        # Counters for monitoring; plain ints, read when scraped.
        self.stats = {
            "accepted": 0,
            "refused_limit": 0,
            "refused_tls_handshake": 0,  # stats.py exports every refused_<reason>
            "deliveries": 0,
            "slow_consumers": 0,
            "errors": {},
            "reply_errors": {},  # REPLY status -> count
        }
        # Frames by type byte: received (counted in the dispatch loop) and
        # queued (where non-hot frames are built; EVENTs are the deliveries,
        # ERRORs the errors above). Closed connections' counters are kept
        # here (frames in, frames out, bytes in, bytes out) so totals never go down.
        self.frames_in_by_type = [0] * 256
        self.frames_out_by_type = [0] * 256
        self.closed_totals = [0, 0, 0, 0]
        self.loop.add_before_sleep(self.flush)

    @staticmethod
    def _tls_context(cfg: Config) -> ssl.SSLContext:
        """Server-side TLS; raises OSError/SSLError if the files are unusable."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
        return ctx

    # =============================================================== start
    def start(self) -> tuple[str, int]:
        """Bind and listen; returns the (host, port) actually bound."""
        cfg = self.config
        lsock = listening_socket(cfg.host, cfg.port, backlog=4096)
        self.listeners.append(lsock)
        self.address = lsock.getsockname()[:2]
        self._start_accepting()
        self._sweep_interval = max(
            0.01, min(1.0, cfg.ping_interval / 4, cfg.ping_timeout / 4, cfg.hello_timeout / 4)
        )
        self.loop.call_later(self._sweep_interval, self._sweep)
        return self.address

    def _start_accepting(self) -> None:
        if self.shutting_down or self.accepting:
            return
        for lsock in self.listeners:
            self.loop.register(lsock, EVENT_READ, functools.partial(self._on_accept, lsock))
        self.accepting = True

    def _stop_accepting(self) -> None:
        if self.accepting:
            for lsock in self.listeners:
                self.loop.unregister(lsock)
            self.accepting = False

    def run(self) -> None:
        self.loop.run()

    # ============================================================== accept
    def _on_accept(self, lsock: socket.socket, _mask: int) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of file descriptors: the pending connection stays in
                    # the backlog and the listener stays readable. Stop
                    # watching it for a moment instead of spinning at 100 %.
                    if not self._emfile_logged:
                        log.warning("accept: %s; pausing accepts", exc.strerror)
                        self._emfile_logged = True
                    self._stop_accepting()
                    self.loop.call_later(EMFILE_BACKOFF, self._start_accepting)
                    return
                continue  # ECONNABORTED and friends: that peer is gone already
            self._emfile_logged = False
            self.adopt(sock, peer)

    def adopt(self, sock: socket.socket, peer=None) -> Connection:
        """Take over a connected socket (accepted, or a socketpair in tests)."""
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            # The handshake runs on the loop like any other I/O (see
            # _handshake); the accept path never blocks on a slow client.
            sock = self._tls.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        self._next_id += 1
        conn = Connection(sock, self._next_id, peer, self.config.max_frame, self.loop.now)
        conn.callback = functools.partial(self._on_event, conn)
        conn.set_interest(self.loop, EVENT_READ)
        self.conns[conn.id] = conn
        self.stats["accepted"] += 1
        if self._live >= self.config.max_connections or self.shutting_down:
            self.stats["refused_limit"] += 1
            self._fatal(conn, P.LIMIT, "server is full (max_connections)")
            return conn
        # Counted until its socket is closed: a closing connection still
        # holds a file descriptor.
        conn.counted = True
        self._live += 1
        log.debug("connect #%d from %s", conn.id, peer, extra={"conn": conn.id, "peer": peer})
        return conn

    # ============================================================== events
    def _on_event(self, conn: Connection, mask: int) -> None:
        if conn.handshaking:
            self._handshake(conn)
            return
        if mask & EVENT_WRITE and conn.state != CLOSED:
            before = conn.wbytes
            try:
                left = conn.on_writable(self.loop)
            except OSError:
                self._close(conn)
                return
            if conn.state == CLOSING:
                if not left and not conn.out:
                    self._finish_output(conn)
                elif left < before and not self.shutting_down:
                    # A slow reader is still reading: the grace period counts
                    # from its last progress, so its ERROR (behind what the
                    # kernel already holds) is not cut off while it reads.
                    conn.close_timer.cancel()
                    conn.close_timer = self.loop.call_later(
                        self.config.drain_timeout, self._close, conn
                    )
        if mask & EVENT_READ and conn.state != CLOSED:
            self._on_readable(conn)

    def _handshake(self, conn: Connection) -> None:
        """Advance a non-blocking TLS handshake by whatever the socket allows."""
        if conn.state != HELLO_WAIT:
            # Refused (LIMIT) or timed out before the handshake finished:
            # there is no TLS session to send the ERROR through.
            self._close(conn)
            return
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            conn.set_interest(self.loop, EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            conn.set_interest(self.loop, EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            # A plain-TCP client, a wrong certificate, a scanner: close this
            # one quietly and carry on with everyone else.
            self.stats["refused_tls_handshake"] += 1
            log.info(
                "TLS handshake failed for #%d from %s: %s", conn.id, conn.peer, exc,
                extra={"conn": conn.id, "peer": conn.peer, "reason": "TLS_HANDSHAKE"},
            )  # fmt: skip
            self._close(conn)
            return
        conn.handshaking = False
        conn.set_interest(self.loop, EVENT_READ)
        if conn.sock.pending():
            self.loop.call_later(0, self._read_again, conn)

    def _read_again(self, conn: Connection) -> None:
        """TLS: bytes already decrypted in the SSL object raise no readiness event."""
        if conn.state != CLOSED:
            self._on_readable(conn)

    def _on_readable(self, conn: Connection) -> None:
        try:
            n = conn.sock.recv_into(self._rbuf)
        except WOULD_BLOCK:
            return
        except OSError:
            self._lost(conn)
            return
        if n == 0:
            self._lost(conn)
            return
        conn.bytes_in += n
        conn.last_rx = self.loop.now
        if conn.state != OPEN and conn.state != HELLO_WAIT:
            return  # CLOSING / DRAINING: input is read and thrown away
        try:
            frames = conn.decoder.feed(self._rview[:n])
            error = None
        except FrameError as exc:
            frames, error = exc.frames, exc
        conn.frames_in += len(frames)
        try:
            self._dispatch(conn, frames)
        except P.ProtocolError as exc:
            self._fatal(conn, exc.code, exc.message)
            return
        if error is not None and conn.state in (OPEN, HELLO_WAIT):
            self._fatal(conn, error.code, error.message)
        elif conn.tls and conn.sock.pending():
            self.loop.call_later(0, self._read_again, conn)

    def _dispatch(self, conn: Connection, frames: list) -> None:
        """Handle one read's frames in order.

        The common case, a run of plain room EMITs (no echo) from this sender
        to one room, is handled inline: each EMIT's tail becomes an EVENT
        behind the sender's prefix, and the whole run is joined into *one*
        bytes object appended once per member when the run ends. Per message
        that leaves a header check and three list appends; per member, one
        append per read instead of one per message. A run ends at the first
        frame that is anything else (which may change membership or talk to
        the sender), so every ordering rule holds as if each frame had been
        handled alone. Anything unusual falls through to its handler.
        """
        handlers = self.handlers
        by_type = self.frames_in_by_type
        head = P.EMIT_HEAD.unpack_from
        pack_len = LENGTH.pack
        events_ok = self._events.known
        rooms = conn.rooms
        prefix = conn.prefix_room
        plen = len(prefix) - 6  # EVENT length = prefix + EMIT body - 6 bytes
        run_head = None  # body[4:eend] of the run's EMITs: flags, kind, room, event
        run_room = None
        run_echo = 0
        parts: list[bytes] = []
        acks = conn.out
        req_of = P.REQ.unpack_from
        for ftype, body in frames:
            if ftype == 5 and run_head is not None and body.startswith(run_head, 4):
                # Same flags, room and event as the run so far: every check
                # those passed holds for this EMIT too.
                req = req_of(body)[0]
                if not (req and run_echo):
                    by_type[5] += 1
                    parts += (pack_len(plen + len(body)), prefix, body[6:])
                    if req:
                        acks.append(
                            P.REPLY_COUNT.pack(11, P.REPLY, req, P.OK, len(run_room.members) - 1)
                        )
                        self.frames_out_by_type[P.REPLY] += 1
                        self.pending.add(conn)
                    continue
            by_type[ftype] += 1
            if ftype == 5 and not self._rate and conn.state == OPEN:  # 5: EMIT
                n = len(body)
                if n > 7:
                    req, flags, kind, tlen = head(body)
                    tend = 7 + tlen
                    # Echo runs only without acks: the sender's REPLYs must not
                    # overtake its own EVENTs.
                    if kind == 0 and not (flags & 1 and req) and tend < n:
                        eend = tend + 1 + body[tend]
                        if eend <= n and body[tend + 1 : eend] in events_ok:
                            if parts:
                                self._end_run(conn, run_room, parts, run_echo)
                                parts = []
                            name = self._rooms.known.get(body[7:tend])
                            run_room = rooms.get(name) if name else None
                            run_head = body[4:eend] if run_room is not None else None
                            run_echo = flags & 1
                            if run_room is not None:
                                parts += (pack_len(plen + n), prefix, body[6:])
                                if req:
                                    acks.append(
                                        P.REPLY_COUNT.pack(
                                            11, P.REPLY, req, P.OK, len(run_room.members) - 1
                                        )
                                    )
                                    self.frames_out_by_type[P.REPLY] += 1
                                    self.pending.add(conn)
                                continue
            # Everything else, in order, after the run so far is out.
            if parts:
                self._end_run(conn, run_room, parts, run_echo)
                parts = []
            run_head = run_room = None
            state = conn.state
            if state == OPEN:
                handler = handlers.get(ftype)
                if handler is None:
                    raise P.ProtocolError(P.UNKNOWN_TYPE, f"unknown frame type 0x{ftype:02x}")
                handler(conn, body)
                prefix = conn.prefix_room  # a NICK changes it
                plen = len(prefix) - 6
            elif state == HELLO_WAIT:
                self._on_hello(conn, ftype, body)
                prefix = conn.prefix_room
                plen = len(prefix) - 6
                rooms = conn.rooms
            else:
                return  # BYE or an error ended the session mid-read
        if parts:
            self._end_run(conn, run_room, parts, run_echo)

    def _end_run(self, conn: Connection, room, parts: list[bytes], echo: int) -> None:
        """Queue a run of EVENTs (see _dispatch) to every member (but the sender)."""
        data = b"".join(parts)
        members = room.members
        for member in members:
            member.out.append(data)
        if not echo:
            conn.out.pop()  # the sender is a member and got it last: take it back
        if room.queued != self._turn:
            # Once per room per turn: whoever joins later in the turn is
            # pending anyway (its JOIN REPLY).
            room.queued = self._turn
            self.pending.update(members)
        self.stats["deliveries"] += (len(members) - (0 if echo else 1)) * (len(parts) // 3)

    def _lost(self, conn: Connection) -> None:
        """The peer closed (or reset) its side."""
        if conn.state in (OPEN, HELLO_WAIT):
            log.debug(
                "disconnect #%d %s from %s", conn.id, conn.nick, conn.peer,
                extra={"conn": conn.id, "peer": conn.peer, "nick": conn.nick, "reason": "peer closed"},
            )  # fmt: skip
            self._leave_everything(conn)
        if conn.state == CLOSING and (conn.out or conn.chunks):
            # Peer half-closed but may still read: finish sending, then close.
            conn.eof = True
            conn.set_interest(self.loop, conn.interest & ~EVENT_READ)
            return
        self._close(conn)

    # ================================================================ HELLO
    def _on_hello(self, conn: Connection, ftype: int, body: bytes) -> None:
        if ftype != P.HELLO:
            raise P.ProtocolError(P.NOT_HELLO, "the first frame must be HELLO")
        hello = P.decode(P.HELLO, body)
        if hello.version != P.PROTOCOL_VERSION:
            raise P.ProtocolError(
                P.UNSUPPORTED_VERSION,
                f"protocol version {hello.version} is not supported (this server speaks 1)",
            )
        if self._token and not hmac.compare_digest(
            hello.token.encode("utf-8", "surrogateescape"), self._token
        ):
            raise P.ProtocolError(P.AUTH_FAILED, "authentication failed")
        nick = hello.nick or self._guest_nick(hello.namespace, conn.id)
        try:
            self.hub.attach(conn, hello.namespace, nick)
        except HubError as exc:
            raise P.ProtocolError(exc.status, exc.message) from None
        conn.state = OPEN
        conn.tokens = self._burst
        conn.tokens_at = self.loop.now
        self._set_prefixes(conn)
        cfg = self.config
        conn.out.append(
            P.encode(
                P.Welcome(
                    P.PROTOCOL_VERSION,
                    conn.id,
                    conn.nick,
                    cfg.max_frame,
                    int(cfg.ping_interval * 1000),
                    cfg.name,
                )
            )
        )
        self.frames_out_by_type[P.WELCOME] += 1
        self.pending.add(conn)

    def _guest_nick(self, ns_name: str, conn_id: int) -> str:
        nick = f"guest-{conn_id}"
        n = 1
        while self.hub.nick_taken(ns_name, nick):
            # Someone chose "guest-<our id>" by hand; stay unique.
            nick = f"guest-{conn_id}-{n}"
            n += 1
        return nick

    def _on_second_hello(self, conn: Connection, body: bytes) -> None:
        raise P.ProtocolError(P.NOT_HELLO, "HELLO was already received")

    @staticmethod
    def _set_prefixes(conn: Connection) -> None:
        nick = conn.nick.encode("utf-8")
        conn.prefix_room = P.event_prefix(P.TARGET_ROOM, nick)
        conn.prefix_direct = P.event_prefix(P.TARGET_DIRECT, nick)
        conn.prefix_bcast = P.event_prefix(P.TARGET_BROADCAST, nick)

    # ================================================================= EMIT
    def _on_emit(self, conn: Connection, body: bytes) -> None:
        req, flags, kind, rtarget, revent, _ = P.parse_emit_head(body)
        if self._rate and not self._take_token(conn):
            self._reply_error(conn, req, P.RATE_LIMITED, f"over {self._rate:g} messages/s")
            return
        if self._events.get(revent) is None:
            self._reply_error(conn, req, P.INVALID_NAME, self._events.why(revent))
            return
        if kind == P.TARGET_ROOM:
            name = self._rooms.get(rtarget)
            if name is None:
                self._reply_error(conn, req, P.INVALID_NAME, self._rooms.why(rtarget))
                return
            room = conn.rooms.get(name)
            if room is None:
                self._reply_error(conn, req, P.NOT_MEMBER, f"not a member of room {name!r}")
                return
            # The EMIT tail (str8 target, str8 event, payload) *is* the EVENT
            # tail for a room: forward it behind this sender's prefix.
            tail = body[6:]
            frame = LENGTH.pack(len(conn.prefix_room) + len(tail)) + conn.prefix_room + tail
            members = room.members
        elif kind == P.TARGET_DIRECT:
            nick = self._nicks.get(rtarget)
            if nick is None:
                self._reply_error(conn, req, P.INVALID_NAME, self._nicks.why(rtarget))
                return
            target = conn.ns.nicks.get(nick)
            if target is None:
                self._reply_error(conn, req, P.NO_SUCH_TARGET, f"no one is called {nick!r} here")
                return
            # Source is empty for a direct message: str8 "" then event+payload.
            tail = body[7 + len(rtarget) :]
            prefix = conn.prefix_direct
            frame = LENGTH.pack(len(prefix) + 1 + len(tail)) + prefix + b"\x00" + tail
            members = (target,)
        else:
            tail = body[6:]  # target is empty, so the tail starts with str8 ""
            frame = LENGTH.pack(len(conn.prefix_bcast) + len(tail)) + conn.prefix_bcast + tail
            members = conn.ns.members
        for member in members:
            member.out.append(frame)
        count = len(members)
        if not flags & P.EMIT_ECHO and conn in members:
            conn.out.pop()  # the sender got it last in the loop above
            count -= 1
        self.pending.update(members)
        self.stats["deliveries"] += count
        if req:
            conn.out.append(P.REPLY_COUNT.pack(11, P.REPLY, req, P.OK, count))
            self.frames_out_by_type[P.REPLY] += 1
            self.pending.add(conn)

    def _take_token(self, conn: Connection) -> bool:
        """Token bucket: ``rate_limit`` per second, up to ``rate_burst`` saved."""
        now = self.loop.now
        tokens = conn.tokens + (now - conn.tokens_at) * self._rate
        conn.tokens_at = now
        if tokens > self._burst:
            tokens = self._burst
        if tokens < 1.0:
            conn.tokens = tokens
            return False
        conn.tokens = tokens - 1.0
        return True

    # ============================================================ requests
    def _reply_error(self, conn: Connection, req: int, status: int, message: str) -> None:
        conn.out.append(P.reply_error(req, status, message))
        self.pending.add(conn)
        self.frames_out_by_type[P.REPLY] += 1
        errors = self.stats["reply_errors"]
        errors[status] = errors.get(status, 0) + 1

    def _reply(self, conn: Connection, frame: bytes) -> None:
        conn.out.append(frame)
        self.pending.add(conn)
        self.frames_out_by_type[frame[4]] += 1  # REPLY, PONG or PING

    def _send_changes(self, changes) -> None:
        for recipients, presence in changes:
            frame = P.encode(presence)
            for member in recipients:
                member.out.append(frame)
            self.pending.update(recipients)
            self.frames_out_by_type[P.PRESENCE] += len(recipients)

    def _membership(self, conn: Connection, req: int, change) -> None:
        """JOIN, LEAVE, NICK: run the hub change, tell the watchers, answer."""
        try:
            changes = change()
        except HubError as exc:
            self._reply_error(conn, req, exc.status, exc.message)
            return
        self._send_changes(changes)
        self._reply(conn, P.reply_ok(req))

    def _on_join(self, conn: Connection, body: bytes) -> None:
        msg = P.decode(P.JOIN, body)
        presence = bool(msg.flags & P.JOIN_PRESENCE)
        self._membership(conn, msg.req, lambda: self.hub.join(conn, msg.room, presence))

    def _on_leave(self, conn: Connection, body: bytes) -> None:
        msg = P.decode(P.LEAVE, body)
        self._membership(conn, msg.req, lambda: self.hub.leave(conn, msg.room))

    def _on_nick(self, conn: Connection, body: bytes) -> None:
        msg = P.decode(P.NICK, body)

        def rename():
            changes = self.hub.rename(conn, msg.nick)
            self._set_prefixes(conn)  # EVENTs carry the new nick from now on
            return changes

        self._membership(conn, msg.req, rename)

    def _on_who(self, conn: Connection, body: bytes) -> None:
        msg = P.decode(P.WHO, body)
        try:
            nicks = self.hub.who(conn, msg.room)
        except HubError as exc:
            self._reply_error(conn, msg.req, exc.status, exc.message)
            return
        entries = [P.str8(n) for n in nicks]
        head = P.U32.pack(msg.req) + P.U16.pack(P.OK) + P.U32.pack(len(nicks))
        self._reply(conn, self._listing(head, entries))

    def _on_rooms(self, conn: Connection, body: bytes) -> None:
        msg = P.decode(P.ROOMS, body)
        rooms = self.hub.rooms(conn, all_rooms=msg.scope == 1)
        entries = [P.str8(name) + P.U32.pack(count) for name, count in rooms]
        head = P.U32.pack(msg.req) + P.U16.pack(P.OK) + P.U32.pack(len(rooms))
        self._reply(conn, self._listing(head, entries))

    def _listing(self, head: bytes, entries: list[bytes]) -> bytes:
        """A REPLY listing as many entries as fit under max_frame (and u16)."""
        room_left = self.config.max_frame - 1 - len(head) - 2
        listed = 0
        for entry in entries:
            if listed == 0xFFFF or len(entry) > room_left:
                break
            room_left -= len(entry)
            listed += 1
        return P.encode_frame(P.REPLY, head + P.U16.pack(listed) + b"".join(entries[:listed]))

    def _on_ping(self, conn: Connection, body: bytes) -> None:
        if len(body) != 8:
            raise P.ProtocolError(P.BAD_FRAME, "PING: body must be exactly 8 bytes")
        self._reply(conn, P.encode_frame(P.SERVER_PONG, body))

    def _on_pong(self, conn: Connection, body: bytes) -> None:
        if len(body) != 8:
            raise P.ProtocolError(P.BAD_FRAME, "PONG: body must be exactly 8 bytes")
        # Any frame counts as alive; last_rx was already updated on read.

    def _on_bye(self, conn: Connection, body: bytes) -> None:
        if body:
            raise P.ProtocolError(P.BAD_FRAME, "BYE: body must be empty")
        log.debug(
            "bye #%d %s from %s", conn.id, conn.nick, conn.peer,
            extra={"conn": conn.id, "peer": conn.peer, "nick": conn.nick, "reason": "BYE"},
        )  # fmt: skip
        self._leave_everything(conn)
        self._begin_close(conn)

    # ======================================================= output, limits
    def flush(self) -> None:
        """Before-sleep hook: one send per pending connection."""
        max_output = self.config.max_output
        loop = self.loop
        self._turn += 1
        while self.pending:
            pending = self.pending
            self.pending = set()
            # Members of a room get the very same frames in a turn: join them
            # once and send that one bytes object to all of them.
            joined: dict = {}
            for conn in pending:
                if conn.state == CLOSED:
                    continue
                out = conn.out
                n = len(out)
                data = None
                if n > 1:
                    key = (n, id(out[0]), id(out[-1]))
                    hit = joined.get(key)
                    if hit is not None and hit[0] == out:
                        data = hit[1]
                    else:
                        data = b"".join(out)
                        joined[key] = (out.copy(), data)
                try:
                    left = conn.flush(loop, data)
                except OSError:
                    self._lost(conn)
                    continue
                conn.frames_out += n
                if left:
                    if left > max_output and conn.state == OPEN:
                        self._slow_consumer(conn)
                elif conn.state == CLOSING:
                    self._finish_output(conn)

    def _slow_consumer(self, conn: Connection) -> None:
        dropped = conn.discard_unsent()
        self.stats["slow_consumers"] += 1
        # The one info line for this disconnect (_fatal does not log it again).
        log.info(
            "slow consumer #%d %s from %s: %d unsent bytes dropped, disconnecting",
            conn.id, conn.nick, conn.peer, dropped,
            extra={
                "conn": conn.id, "peer": conn.peer, "nick": conn.nick,
                "reason": "SLOW_CONSUMER", "dropped_bytes": dropped,
            },
        )  # fmt: skip
        self._fatal(
            conn,
            P.SLOW_CONSUMER,
            f"unsent output passed {self.config.max_output} bytes",
        )

    def _fatal(self, conn: Connection, code: int, message: str) -> None:
        """Queue ERROR ``code`` behind what is already queued, then close."""
        if conn.state >= CLOSING:
            return
        errors = self.stats["errors"]
        errors[code] = errors.get(code, 0) + 1
        if code not in (P.SHUTTING_DOWN, P.LIMIT, P.SLOW_CONSUMER):
            reason = P.STATUS_NAMES.get(code, code)
            log.info(
                "closing #%d %s from %s: %s (%s)",
                conn.id, conn.nick or "-", conn.peer, reason, message,
                extra={
                    "conn": conn.id, "peer": conn.peer, "nick": conn.nick,
                    "reason": reason, "detail": message,
                },
            )  # fmt: skip
        self._leave_everything(conn)
        conn.out.append(P.error_frame(code, message))
        self._begin_close(conn)

    def _leave_everything(self, conn: Connection) -> None:
        """Drop the connection from the hub now, so nothing queues behind its end."""
        if conn.ns is not None:
            self._send_changes(self.hub.detach(conn))

    def _begin_close(self, conn: Connection) -> None:
        conn.state = CLOSING
        self.pending.add(conn)
        timeout = self.config.drain_timeout
        if self.shutting_down:
            timeout = max(0.0, self._shutdown_deadline - self.loop.time())
        conn.close_timer = self.loop.call_later(timeout, self._close, conn)

    def _finish_output(self, conn: Connection) -> None:
        """Everything is sent: FIN, then discard input until EOF or timeout."""
        if conn.eof:
            self._close(conn)
            return
        conn.half_close()
        conn.state = DRAINING
        conn.set_interest(self.loop, EVENT_READ)

    def _close(self, conn: Connection) -> None:
        if conn.state == CLOSED:
            return
        if conn.state in (OPEN, HELLO_WAIT):
            self._leave_everything(conn)
        conn.close(self.loop)
        self.conns.pop(conn.id, None)
        closed = self.closed_totals
        closed[0] += conn.frames_in
        closed[1] += conn.frames_out
        closed[2] += conn.bytes_in
        closed[3] += conn.bytes_out
        if conn.counted:
            self._live -= 1
        if self.shutting_down and not self.conns:
            self.loop.stop()

    # ============================================================ liveness
    def _sweep(self) -> None:
        """Periodic timer: heartbeats, idle timeouts, HELLO timeouts."""
        cfg = self.config
        now = self.loop.time()
        interval, timeout = cfg.ping_interval, cfg.ping_timeout
        for conn in list(self.conns.values()):
            state = conn.state
            if state == OPEN:
                verdict = liveness(now, conn.last_rx, conn.last_ping, interval, timeout)
                if verdict == SEND_PING:
                    self._ping_nonce += 1
                    conn.last_ping = now
                    self._reply(conn, P.ping_frame(P.SERVER_PING, self._ping_nonce))
                elif verdict == TIMED_OUT:
                    self._fatal(
                        conn,
                        P.IDLE_TIMEOUT,
                        f"nothing received for {interval + timeout:g} s",
                    )
            elif state == HELLO_WAIT and now - conn.connected_at >= cfg.hello_timeout:
                self._fatal(conn, P.IDLE_TIMEOUT, f"no HELLO within {cfg.hello_timeout:g} s")
        if not self.shutting_down:
            self.loop.call_later(self._sweep_interval, self._sweep)

    # ============================================================ shutdown
    def begin_shutdown(self) -> None:
        """Stop accepting; flush; ERROR SHUTTING_DOWN to everyone; stop the loop."""
        if self.shutting_down:
            return
        log.info("shutting down: %d connections to drain", len(self.conns))
        self.shutting_down = True
        self._shutdown_deadline = self.loop.time() + self.config.drain_timeout
        self._stop_accepting()
        for lsock in self.listeners:
            lsock.close()
        self.listeners.clear()
        # No PRESENCE storm on the way out: everyone is leaving at once, so
        # take them all out of the hub first, then queue the errors.
        for conn in self.conns.values():
            if conn.state in (OPEN, HELLO_WAIT):
                conn.ns = None
        self.hub.namespaces.clear()
        for conn in list(self.conns.values()):
            if conn.state in (OPEN, HELLO_WAIT):
                self._fatal(conn, P.SHUTTING_DOWN, "server is shutting down")
            elif conn.close_timer is not None:
                conn.close_timer.cancel()
                conn.close_timer = self.loop.call_later(self.config.drain_timeout, self._close, conn)
        self.loop.call_later(self.config.drain_timeout, self._force_stop)
        if not self.conns:
            self.loop.stop()

    def _force_stop(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self.loop.stop()

    def close(self) -> None:
        """Release every socket (after the loop has stopped)."""
        for conn in list(self.conns.values()):
            conn.close(self.loop)
        self.conns.clear()
        for lsock in self.listeners:
            self.loop.unregister(lsock)
            lsock.close()
        self.listeners.clear()
