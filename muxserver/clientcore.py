"""What the blocking and asyncio clients share: everything but the I/O.

:mod:`muxserver.client` (blocking sockets) and :mod:`muxserver.aio` (asyncio
streams) differ only in how they move bytes and wait. The rest lives here,
once: the TLS context and :class:`_Core`, which builds every request frame,
routes each server frame and turns REPLY bodies into results (with
:func:`muxserver.protocol.parse_who` and friends, so there is still one
codec). The types handed to programs (errors, Event, Presence, Ack, Backoff,
payload encoding) are in :mod:`muxserver.clienttypes`, re-exported here.

Programs import these names from :mod:`muxserver.client`, which re-exports
them; this module is an implementation detail of the two clients.

Decisions worth knowing:

* REPLY bodies are read by a function chosen when the request is built
  (:class:`_Call`), since a REPLY does not say which request it answers.
* An EMIT sent with ``ack=True, wait=False`` is remembered in ``_acks`` (id ->
  send time) before it is written, so the REPLY, which another greenlet or
  task may read before the write even returns, becomes an :class:`Ack` (or
  an error with ``.req``) on the receiving side instead of being dropped.
* Version 2 sessions: EMIT flags carry the payload type and EVENT's
  source_kind is masked (``P.EVENT_KIND_MASK``) before its kind is read; a
  reconnect sends the last WELCOME's resume token, so the server hands the
  parked session back instead of holding its nick.
* Version 2 rooms are joined SEQUENCED unless asked otherwise; the positions
  and the replay bookkeeping are :mod:`muxserver.clientseq`'s. A SEQUENCED
  JOIN's REPLY is turned into a :class:`Recovery` when it is *read* (in
  ``_incoming``), not when the waiting call wakes up, so that it is queued
  ahead of the replayed messages that may have come in the same read.
"""

from __future__ import annotations

import errno
import os
import ssl
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from . import protocol as P
from .clientseq import PendingJoin, Quiet, Tracker, check_history
from .clienttypes import (  # noqa: F401 (re-exported for client.py and aio.py)
    _PRESENCE_KINDS,
    _SOURCE_KINDS,
    _UNSET,
    CLOSE_LINGER,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_VERSION,
    ERRORS,
    PAYLOAD_TYPE_NAMES,
    PERMANENT,
    PUBLIC_MODULE,
    RECV_SIZE,
    RESERVED_EVENTS,
    Ack,
    AuthFailed,
    Backoff,
    BadFrame,
    ConnectionClosed,
    Event,
    IdleTimeout,
    InvalidName,
    Limit,
    Listing,
    MuxError,
    NickTaken,
    NoSuchTarget,
    NotConnected,
    NotHello,
    NotMember,
    Presence,
    RateLimited,
    Recovery,
    Replaced,
    RoomInfo,
    ShuttingDown,
    SlowConsumer,
    TooLarge,
    Unavailable,
    UnknownType,
    UnsupportedVersion,
    _closed_class,
    _why,
    check_port,
    decode_payload,
    encode_payload,
    error_for,
)
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameError


# ======================================================= shared, no I/O
class _Call(NamedTuple):
    """One request: its id (0: no REPLY expected), its frame, and how to read an OK body."""

    req: int
    frame: bytes
    finish: Callable[[bytes], Any]
    join: PendingJoin | None = None  # a SEQUENCED JOIN: entered in the Tracker when sent


def _check_nick_size(nick: str) -> None:
    """A nick too long to encode gets the nick rule, not str8's 255-byte limit."""
    size = len(nick.encode("utf-8", "surrogateescape"))
    if size > 255:
        raise InvalidName(f"nick must be 1..32 bytes (this one is {size})")


def _read_who(body: bytes) -> Listing:
    total, nicks = P.parse_who(body)
    return Listing(nicks, total)


def _read_rooms(body: bytes) -> Listing:
    total, rooms = P.parse_rooms(body)
    return Listing([RoomInfo(name, members) for name, members in rooms], total)


def tls_context(
    tls: bool | ssl.SSLContext = False, ca: str | os.PathLike | None = None
) -> ssl.SSLContext | None:
    """The SSLContext for a client's ``tls``/``ca`` arguments; None for plain TCP.

    ``ca`` (a PEM file of trusted CA certificates) implies TLS: a caller who
    names a CA never means to talk in the clear. Without it the system's
    trust store is used. An SSLContext passed as ``tls`` is used as it is
    (client certificates, pinned ciphers, ...).
    """
    if isinstance(tls, ssl.SSLContext):
        if ca is not None:
            raise ValueError("pass ca= or an SSLContext as tls=, not both")
        return tls
    if not tls and ca is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca)
    except FileNotFoundError:  # OpenSSL's error does not say which file
        raise FileNotFoundError(errno.ENOENT, "CA file not found", os.fspath(ca)) from None


class _Core:
    """Session state and protocol logic shared by the blocking and asyncio clients.

    Subclasses provide the I/O hooks ``_deliver`` (an Event, Presence, Ack or
    MuxError for the receiving side), ``_on_reply``, ``_on_pong`` and
    ``_write`` (send a frame now, best effort), keep ``_pending`` keyed by
    the request ids they wait for, and enter an EMIT sent with
    ``ack=True, wait=False`` in ``_acks`` (with :meth:`_ack_sent`) before
    writing it.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        nick: str | None = None,
        namespace: str = "/",
        token: str | None = None,
        timeout: float = 10.0,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        tls: bool | ssl.SSLContext = False,
        ca: str | os.PathLike | None = None,
        version: int = DEFAULT_VERSION,
        sequenced: bool = True,
    ) -> None:
        check_port(port)
        if version not in P.SUPPORTED_VERSIONS:
            supported = " or ".join(map(str, P.SUPPORTED_VERSIONS))
            raise ValueError(f"version must be {supported}, not {version!r}")
        self.host, self.port, self.namespace = host, port, namespace
        # The version asked for in HELLO; ``session_version`` is what WELCOME said.
        self.version = version
        self.session_version = version
        # Built once: a bad ``ca`` path fails here, and reconnects reuse it.
        self._tls = tls_context(tls, ca)
        self.timeout = timeout
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self._token = token or ""
        # The nick to ask for in HELLO; None lets the server pick a guest nick,
        # on reconnects too (reclaiming "guest-7" could collide on a new server).
        self._wanted_nick = nick
        self.nick: str = ""
        self.conn_id = 0
        self.max_frame = DEFAULT_MAX_FRAME
        self.server_name = ""
        self.ping_interval = 0.0
        self._welcome: P.Welcome | None = None
        # Version 2 (section 10): the token of the last WELCOME, sent in the
        # HELLO of a reconnect so that the server hands back the parked
        # session (nick, rooms) instead of holding the nick for its window.
        self._resume_token = ""
        self.resumed = False  # the last WELCOME resumed a parked session
        self.resume_window = 0.0
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME + P.SERVER_FRAME_SLACK)
        self._joined: dict[str, bool] = {}  # room -> presence flag, for re-joining
        # Version 2: join rooms SEQUENCED unless join(sequenced=False) says otherwise.
        self.sequenced = bool(sequenced)
        self._seq = Tracker()  # positions of the sequenced rooms (muxserver.clientseq)
        self._pending: dict[int, Any] = {}
        # EMITs sent with ack=True, wait=False: req -> time.monotonic() when
        # sent. Kept when the connection is lost (pending_acks then says what
        # went unanswered), cleared when the next one starts.
        self._acks: dict[int, float] = {}
        self._abandoned: set[int] = set()  # requests that timed out; late errors are dropped
        self._req = 0
        self._nonce = 0
        self._attempt = 0
        self._up = False
        self._closed = False
        self._down: MuxError | None = None  # why we are not connected
        self._handlers: dict[str, list[Callable]] = {}
        self._presence_handlers: list[Callable] = []
        self._error_handlers: list[Callable] = []
        self._ack_handlers: list[Callable] = []
        self._disconnect_handlers: list[Callable] = []
        self._reconnect_handlers: list[Callable] = []
        self._connect_handlers: list[Callable] = []
        self._recovery_handlers: list[Callable] = []

    # ---------------------------------------------------------- handlers
    def on(self, event: str, fn: Callable | None = None) -> Callable:
        """Call ``fn(event)`` for each Event named ``event`` ("*": every event).

        Usable as a decorator: ``@client.on("chat")``. Two names are the
        connection's own, as in socket.io: ``"connect"`` (``fn()`` once the
        connection is up: the first one if the handler was registered
        before it, and every reconnect, rooms re-joined) and
        ``"disconnect"`` (``fn(exc)`` when an established connection is lost).
        A third is version 2's: ``"recovery"`` (``fn(recovery)``, a
        :class:`Recovery`, for every sequenced JOIN's answer, re-joins after
        a reconnect included, and for every GAP met during a replay).
        """
        if fn is None:
            return lambda f: self.on(event, f)
        self._handler_list(event).append(fn)
        return fn

    def once(self, event: str, fn: Callable | None = None) -> Callable:
        """As :meth:`on`, but ``fn`` runs for the first matching item only."""
        if fn is None:
            return lambda f: self.once(event, f)

        def one_shot(*args: Any) -> Any:
            self.off(event, fn)
            return fn(*args)

        one_shot.__wrapped__ = fn  # off(event, fn) finds it
        self._handler_list(event).append(one_shot)
        return fn

    def off(self, event: str, fn: Callable | None = None) -> None:
        """Remove handler ``fn`` of ``event`` (registered with on or once); without ``fn``, all.

        Removing a handler that is not registered is not an error.
        """
        handlers = self._handler_list(event)
        if fn is None:
            handlers.clear()
            return
        for i, h in enumerate(handlers):
            if h is fn or getattr(h, "__wrapped__", None) is fn:
                del handlers[i]
                return

    def _handler_list(self, event: str) -> list[Callable]:
        if event == "connect":
            return self._connect_handlers
        if event == "disconnect":
            return self._disconnect_handlers
        if event == "recovery":
            return self._recovery_handlers
        return self._handlers.setdefault(event, [])

    def on_presence(self, fn: Callable) -> Callable:
        """Call ``fn(presence)`` for each Presence."""
        self._presence_handlers.append(fn)
        return fn

    def on_ack(self, fn: Callable) -> Callable:
        """Call ``fn(ack)`` for each :class:`Ack` (the REPLY to ``emit(..., ack=True, wait=False)``)."""
        self._ack_handlers.append(fn)
        return fn

    def on_error(self, fn: Callable) -> Callable:
        """Call ``fn(exc)`` for errors that answer no waiting call.

        Those are refusals of an EMIT sent without ``ack`` (``exc.req`` is 0) or
        with ``ack=True, wait=False`` (``exc.req`` is the id ``emit`` returned).
        Without an error handler such errors are raised by the dispatching call.
        """
        self._error_handlers.append(fn)
        return fn

    def on_disconnect(self, fn: Callable) -> Callable:
        """Call ``fn(exc)`` when an established connection is lost."""
        self._disconnect_handlers.append(fn)
        return fn

    def on_reconnect(self, fn: Callable) -> Callable:
        """Call ``fn()`` after a reconnect, once every room has been re-joined."""
        self._reconnect_handlers.append(fn)
        return fn

    def _handlers_for(self, item: Event | Presence | Ack | MuxError) -> list[Callable]:
        if isinstance(item, Event):
            return [*self._handlers.get(item.event, ()), *self._handlers.get("*", ())]
        if isinstance(item, Ack):
            return list(self._ack_handlers)
        if isinstance(item, Presence):
            return list(self._presence_handlers)
        if isinstance(item, Recovery):
            return list(self._recovery_handlers)
        if not self._error_handlers:
            raise item
        return list(self._error_handlers)

    @property
    def tls(self) -> bool:
        """True when the connection is TLS (re-established with TLS on every reconnect)."""
        return self._tls is not None

    @property
    def pending_acks(self) -> frozenset[int]:
        """Ids of EMITs sent with ``ack=True, wait=False`` whose REPLY has not been read.

        When the connection is lost they are never answered: they stay here
        (for ``on_disconnect`` to count, say) until the next connection.
        """
        return frozenset(self._acks)

    @property
    def positions(self) -> dict[str, tuple[int, int]]:
        """Sequenced rooms -> ``(epoch, last)``: the seq of the last message handled.

        A message counts as handled once every handler for it returned
        (``poll``/``run_forever``; a handler that raises leaves the position
        where it was) or once ``recv`` returned it. A reconnect re-joins from
        here, so what was not handled comes again; anything at or below it
        that comes again is dropped. A copy: changing it changes nothing.
        """
        return self._seq.positions

    @property
    def joined(self) -> dict[str, bool]:
        """Rooms this client is in (room -> presence flag), as re-joined after a reconnect."""
        return dict(self._joined)

    # ---------------------------------------------------------- session
    def _hello_frame(self) -> bytes:
        nick = self._wanted_nick or ""
        _check_nick_size(nick)
        resume = self._resume_token if self.version >= 2 else ""
        return self._encode(P.Hello(self.version, self.namespace, nick, self._token, resume))

    def _fresh_session(self) -> None:
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME + P.SERVER_FRAME_SLACK)
        self._welcome = None
        self._pending.clear()
        self._acks.clear()
        self._abandoned.clear()

    def _accept_welcome(self) -> None:
        w = self._welcome
        self.nick, self.conn_id, self.max_frame = w.nick, w.conn_id, w.max_frame
        self.server_name, self.ping_interval = w.server_name, w.ping_interval_ms / 1000
        self.session_version = w.version
        self._resume_token = w.resume_token
        self.resumed = bool(w.resumed)
        self.resume_window = w.resume_window_ms / 1000  # seconds; 0: no resume
        self._decoder.max_frame = w.max_frame + P.SERVER_FRAME_SLACK

    def _can_retry(self, exc: BaseException | None) -> bool:
        return self.reconnect and not self._closed and getattr(exc, "code", None) not in PERMANENT

    def _next_delay(self) -> float | None:
        """Delay before the next reconnect attempt, or None when attempts are used up."""
        limit = self.backoff.max_attempts
        if limit is not None and self._attempt >= limit:
            return None
        delay = self.backoff.delay(self._attempt)
        self._attempt += 1
        return delay

    # ---------------------------------------------------------- requests
    def _next_req(self) -> int:
        self._req = self._req % 0xFFFFFFFF + 1  # never 0: that means "no REPLY wanted"
        return self._req

    def _encode(self, msg: Any) -> bytes:
        try:
            frame = P.encode(msg)
        except ValueError as exc:  # a str8 field over 255 bytes
            raise InvalidName(f"{exc} (names are at most 255 bytes)") from None
        if len(frame) - 4 > self.max_frame:
            raise TooLarge(f"frame of {len(frame) - 4} bytes exceeds max_frame {self.max_frame}")
        return frame

    def _join_call(
        self, room: str, presence: bool, sequenced: bool | None = None, history: int = 0,
        quiet: bool = True,
    ) -> _Call:  # fmt: skip
        """JOIN ``room``: SEQUENCED (from its position, if it has one) unless told otherwise.

        ``sequenced`` None is the client's default, which a version-1 session
        cannot honour: it joins plain. Asking for SEQUENCED (or ``history``)
        there explicitly is an error, not a quiet downgrade.
        """
        history = check_history(history)
        if sequenced is None:
            sequenced = self.sequenced and self.session_version >= 2
        elif sequenced and self.session_version < 2:
            raise ValueError("sequenced rooms need a version-2 session (this one is version 1)")
        if history and not sequenced:
            raise ValueError("history= needs a sequenced join (version 2, sequenced=True)")
        req = self._next_req()
        flags = P.JOIN_PRESENCE if presence else 0
        if not sequenced:

            def done(_body: bytes) -> None:
                self._joined[room] = presence
                self._seq.forget(room)

            return _Call(req, self._encode(P.Join(req, room, flags)), done)
        pending, msg = self._seq.join(req, room, history, quiet)
        frame = self._encode(msg._replace(flags=flags | P.JOIN_SEQUENCED))

        def done_seq(body: bytes) -> Recovery:
            P.parse_join_reply(body)  # malformed: BadFrame (see _finish)
            self._joined[room] = presence
            return pending.recovery

        # Entered now, before anything is written: the reader may see the
        # REPLY before the writer returns. A JOIN that is never sent leaves
        # an entry that nothing answers, which costs nothing but its bytes.
        self._seq.sent(req, pending)
        return _Call(req, frame, done_seq, pending)

    def _rejoin_call(self, room: str, presence: bool) -> _Call:
        """The JOIN re-sent after a reconnect: sequenced rooms resume from their positions."""
        sequenced = room in self._seq and self.session_version >= 2
        return self._join_call(room, presence, sequenced, 0, quiet=False)

    def _rejoin_refused(self, room: str) -> None:
        self._joined.pop(room, None)
        self._seq.forget(room)

    def _leave_call(self, room: str) -> _Call:
        def done(_body: bytes) -> None:
            self._joined.pop(room, None)
            self._seq.forget(room)

        req = self._next_req()
        return _Call(req, self._encode(P.Leave(req, room)), done)

    def _nick_call(self, nick: str) -> _Call:
        _check_nick_size(nick)

        def done(_body: bytes) -> None:
            self.nick = self._wanted_nick = nick

        req = self._next_req()
        return _Call(req, self._encode(P.Nick(req, nick)), done)

    def _emit_call(
        self, event: str, data: Any, room: str | None, nick: str | None,
        broadcast: bool, echo: bool, ack: bool, to: Any = _UNSET,
    ) -> _Call:  # fmt: skip
        if to is not _UNSET:
            # socket.io's to= names a room; ours once named a nick. Neither
            # guess is safe, so say which spelling means what.
            raise TypeError(
                f"emit() has no to=: write room={to!r} to send to a room, "
                f"nick={to!r} to send to one person, or broadcast=True for everyone"
            )
        if event in RESERVED_EVENTS:
            raise ValueError(
                f"event name {event!r} is reserved for the connection's own "
                f"on({event!r}) handlers; pick another name"
            )
        if (room is not None) + (nick is not None) + bool(broadcast) != 1:
            raise ValueError("emit() needs exactly one target: room=, nick= or broadcast=True")
        payload, ptype = encode_payload(data)
        if room is not None:
            kind, target = P.TARGET_ROOM, room
        elif nick is not None:
            kind, target = P.TARGET_DIRECT, nick
        else:
            kind, target = P.TARGET_BROADCAST, ""
        req = self._next_req() if ack else 0
        # A version-1 session has no payload types: the bytes go untyped.
        flags = P.emit_flags(echo, ptype if self.session_version >= 2 else P.PAYLOAD_BINARY)
        return _Call(
            req, self._encode(P.Emit(req, kind, target, event, payload, flags)), P.parse_count
        )

    def _ack_sent(self, req: int) -> None:
        """Enter an EMIT sent with ``ack=True, wait=False``; call before writing it."""
        self._acks[req] = time.monotonic()

    def _who_call(self, room: str) -> _Call:
        req = self._next_req()
        return _Call(req, self._encode(P.Who(req, room)), _read_who)

    def _rooms_call(self, all_rooms: bool) -> _Call:
        req = self._next_req()
        return _Call(req, self._encode(P.Rooms(req, 1 if all_rooms else 0)), _read_rooms)

    def _ping_frame(self) -> tuple[int, bytes]:
        self._nonce = (self._nonce + 1) & 0xFFFFFFFFFFFFFFFF
        return self._nonce, P.encode(P.Ping(self._nonce))

    @staticmethod
    def _finish(call: _Call, reply: P.Reply) -> Any:
        """The result of a request from its REPLY, or the exception its status names."""
        if reply.status != P.OK:
            exc = error_for(reply.status, reply.message)
            exc.req = reply.req
            raise exc
        try:
            return call.finish(reply.body)
        except P.ProtocolError as exc:
            # The stream is still in step (framing is fine), so this is not fatal.
            raise BadFrame(f"malformed REPLY from the server: {exc.message}") from None

    # ---------------------------------------------------------- incoming
    def _parse(self, data: bytes) -> tuple[list, MuxError | None]:
        """Decode received bytes: the messages, and the error that ends the stream if any."""
        try:
            raw, bad = self._decoder.feed(data), None
        except FrameError as exc:
            raw, bad = exc.frames, error_for(exc.code, f"server sent {exc.message}", fatal=True)
        msgs = []
        for ftype, body in raw:
            try:
                msgs.append(P.decode(ftype, body))
            except P.ProtocolError as exc:
                why = f"server sent a bad frame: {exc.message}"
                return msgs, error_for(exc.code, why, fatal=True)
        return msgs, bad

    def _event(self, msg: P.Event | P.EventSeq, seq: int | None = None, replayed=False) -> Event:
        skind = msg.kind  # source_kind & EVENT_KIND_MASK: bits 4-5 are the payload type
        room = msg.source if skind == P.TARGET_ROOM else None
        source = _SOURCE_KINDS.get(skind, str(skind))
        ptype = msg.payload_type if self.session_version >= 2 else P.PAYLOAD_BINARY
        return Event(msg.event, msg.payload, msg.sender, source, room, ptype, seq=seq,
                     replayed=replayed)  # fmt: skip

    def _incoming(self, msg: Any) -> None:
        """Act on one server message; raises the error for an ERROR frame."""
        kind = type(msg)
        if kind is P.Event:
            self._deliver(self._event(msg))
        elif kind is P.EventSeq:
            room = msg.source if msg.kind == P.TARGET_ROOM else None
            replayed = self._seq.on_event(msg, room)
            if replayed is not None:  # None: a duplicate of what was handed out
                self._deliver(self._event(msg, msg.seq, replayed))
        elif kind is P.Gap:
            self._deliver(self._seq.on_gap(msg))
        elif kind is P.Reply:
            if self._seq.expects(msg.req):
                recovery = self._seq.on_reply(msg)
                if recovery is not None:  # queued ahead of its replay
                    self._deliver(recovery)
            if msg.req and msg.req in self._pending:
                self._on_reply(msg)
            elif msg.req in self._acks:
                self._ack_reply(msg)
            elif msg.status and msg.req not in self._abandoned:
                exc = error_for(msg.status, msg.message)
                exc.req = msg.req
                self._deliver(exc)
            self._abandoned.discard(msg.req)
        elif kind is P.Presence:
            pkind = _PRESENCE_KINDS.get(msg.kind, str(msg.kind))
            self._deliver(Presence(pkind, msg.room, msg.nick, msg.new_nick or None))
        elif kind is P.ServerPing:
            self._write(P.encode(P.Pong(msg.nonce)))
        elif kind is P.ServerPong:
            self._on_pong(msg.nonce)
        elif kind is P.Error:
            raise error_for(msg.code, msg.message, fatal=True)
        elif kind is P.Welcome and self._welcome is None:
            self._welcome = msg
        else:
            raise ConnectionClosed(
                P.BAD_FRAME, f"unexpected {kind.__name__.upper()} frame from the server"
            )

    def _ack_reply(self, reply: P.Reply) -> None:
        """Deliver the REPLY to an EMIT sent with ``ack=True, wait=False``."""
        rtt = time.monotonic() - self._acks.pop(reply.req)
        if reply.status == P.OK:
            try:
                count = P.parse_count(reply.body)
            except P.ProtocolError as e:  # the stream is still in step, as in _finish
                exc = BadFrame(f"malformed REPLY from the server: {e.message}")
            else:
                self._deliver(Ack(reply.req, count, rtt))
                return
        else:
            exc = error_for(reply.status, reply.message)
        exc.req = reply.req
        self._deliver(exc)

    def _for_recv(self, raw: Any) -> Any:
        """What ``recv`` returns for a queued item: None to skip it (a duplicate, or Quiet).

        Raises a queued error. There is no handler to wait for, so a
        sequenced Event counts as handled once handed out.
        """
        if isinstance(raw, MuxError):
            raise raw
        item = self._seq.take(raw)
        if item is None or type(raw) is Quiet:
            return None  # a duplicate, or the Recovery join() returned already
        self._seq.done(item)
        return item

    # I/O hooks, provided by the subclasses.
    def _deliver(self, item: Event | Presence | Ack | Recovery | Quiet | MuxError) -> None:
        raise NotImplementedError

    def _on_reply(self, reply: P.Reply) -> None:
        raise NotImplementedError

    def _on_pong(self, nonce: int) -> None:
        raise NotImplementedError

    def _write(self, frame: bytes) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        state = "connected" if self._up else "closed" if self._closed else "disconnected"
        tls = " tls" if self._tls is not None else ""
        return f"<{type(self).__name__} {self.nick or '-'} {self.host}:{self.port}{tls} {state}>"
