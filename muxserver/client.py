"""Blocking client for muxserver, and everything the asyncio client shares with it.

Programs (bots, tests, the Locust users, ``muxchat``) should not hand-roll
sockets and ``struct`` calls to talk to muxserver. This module reuses
:mod:`muxserver.framing` and :mod:`muxserver.protocol`, so the project keeps
one codec.

Decisions worth knowing:

* :class:`_Core` holds everything that is not I/O: request ids, the frame each
  request sends, how each REPLY body is read, how status codes become
  exceptions, handler lookup and the reconnect policy. :class:`Client`
  (blocking sockets) and :class:`muxserver.aio.AsyncClient` (asyncio streams)
  only move bytes and wait.
* The blocking client uses plain sockets with timeouts: no threads and no
  selectors, so it runs unchanged under gevent monkey-patching. The price is
  that server PINGs are answered only while the program is inside a client
  call, so a program must call ``recv``/``poll``/``run_forever`` (or make any
  request) at least once per ``ping_interval + ping_timeout`` (45 s by
  default) or the server cuts it with IDLE_TIMEOUT.
* Reconnecting is lazy and single-threaded. A lost connection is noticed by
  whichever call is running, which raises :class:`ConnectionClosed`;
  ``recv``/``poll``/``run_forever`` instead wait out the backoff and
  reconnect by themselves. A request made while the next attempt is not yet
  due raises :class:`NotConnected`: nothing is dropped quietly.
"""

from __future__ import annotations

import functools
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

from . import protocol as P
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameError

__all__ = [
    "AuthFailed", "Backoff", "BadFrame", "Client", "ConnectionClosed", "Event", "IdleTimeout",
    "InvalidName", "Limit", "Listing", "MuxError", "NickTaken", "NoSuchTarget", "NotConnected",
    "NotHello", "NotMember", "Presence", "RateLimited", "RoomInfo", "ShuttingDown",
    "SlowConsumer", "TooLarge", "UnknownType", "UnsupportedVersion", "connect", "error_for",
]  # fmt: skip

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7878
RECV_SIZE = 256 * 1024
CLOSE_LINGER = 2.0  # seconds close() waits for the server's FIN after BYE


# ================================================================ errors
class MuxError(Exception):
    """Base of every protocol error this library raises.

    ``code`` is the protocol status code (None when there is none, e.g. a
    connection that ended without an ERROR frame), ``message`` the server's
    text. ``req`` is set on errors that answer a request: the request id, or 0
    for an EMIT sent without ``ack`` (those errors arrive later, through
    ``recv``/``poll`` or the ``on_error`` handlers).
    """

    code: int | None = None

    def __init__(self, message: str = "", code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.req: int | None = None

    @property
    def name(self) -> str:
        """The status name, e.g. ``"NICK_TAKEN"`` (empty when there is no code)."""
        return "" if self.code is None else P.STATUS_NAMES.get(self.code, str(self.code))

    def __str__(self) -> str:
        return f"{self.name}: {self.message}" if self.code is not None else self.message


class ConnectionClosed(MuxError):
    """The connection ended: by an ERROR frame (``code`` says why) or EOF/socket error (None).

    An ERROR frame raises a class that is *also* the subclass for its code, so
    ``except NickTaken`` catches a nick collision at HELLO as well as a
    refused NICK request, and ``except ConnectionClosed`` catches both ends.
    """

    def __init__(self, code: int | None = None, message: str = "connection closed") -> None:
        super().__init__(message, code)


class NotConnected(ConnectionClosed):
    """A request made while there is no connection (closed, or between reconnects); not sent."""

    def __init__(self, message: str = "not connected") -> None:
        super().__init__(None, message)


class BadFrame(MuxError):
    code = P.BAD_FRAME


class UnknownType(MuxError):
    code = P.UNKNOWN_TYPE


class NotHello(MuxError):
    code = P.NOT_HELLO


class AuthFailed(MuxError):
    code = P.AUTH_FAILED


class UnsupportedVersion(MuxError):
    code = P.UNSUPPORTED_VERSION


class TooLarge(MuxError):
    code = P.TOO_LARGE


class NickTaken(MuxError):
    code = P.NICK_TAKEN


class InvalidName(MuxError):
    code = P.INVALID_NAME


class NotMember(MuxError):
    code = P.NOT_MEMBER


class NoSuchTarget(MuxError):
    code = P.NO_SUCH_TARGET


class Limit(MuxError):
    code = P.LIMIT


class RateLimited(MuxError):
    code = P.RATE_LIMITED


class SlowConsumer(MuxError):
    code = P.SLOW_CONSUMER


class IdleTimeout(MuxError):
    code = P.IDLE_TIMEOUT


class ShuttingDown(MuxError):
    code = P.SHUTTING_DOWN


ERRORS: dict[int, type[MuxError]] = {
    cls.code: cls
    for cls in (
        BadFrame, UnknownType, NotHello, AuthFailed, UnsupportedVersion, TooLarge, NickTaken,
        InvalidName, NotMember, NoSuchTarget, Limit, RateLimited, SlowConsumer, IdleTimeout,
        ShuttingDown,
    )
}  # fmt: skip

# Refusals that a fresh HELLO would only get again: reconnecting stops.
# NICK_TAKEN is not here: after a cut the server may still hold our old nick
# for a moment.
PERMANENT = frozenset({P.AUTH_FAILED, P.UNSUPPORTED_VERSION, P.INVALID_NAME})


@functools.cache
def _closed_class(cls: type[MuxError]) -> type[ConnectionClosed]:
    if cls is MuxError:
        return ConnectionClosed
    doc = f"ERROR {P.STATUS_NAMES[cls.code]}: both {cls.__name__} and ConnectionClosed."
    return type(cls.__name__, (ConnectionClosed, cls), {"__module__": __name__, "__doc__": doc})


def error_for(code: int, message: str, fatal: bool = False) -> MuxError:
    """The exception for status ``code``; ``fatal`` (an ERROR frame) adds ConnectionClosed."""
    cls = ERRORS.get(code, MuxError)
    if fatal:
        return _closed_class(cls)(code, message)
    return cls(message, code)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


# ========================================================= what you receive
@dataclass(frozen=True, slots=True)
class Event:
    """An EVENT: ``kind`` is "room" (``room`` set), "direct" or "broadcast"."""

    event: str
    payload: bytes
    sender: str
    kind: str
    room: str | None = None

    @property
    def text(self) -> str:
        """The payload as UTF-8 text (undecodable bytes replaced)."""
        return self.payload.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Presence:
    """A PRESENCE: ``kind`` is "join", "leave" or "nick" (then ``new_nick`` is set)."""

    kind: str
    room: str
    nick: str
    new_nick: str | None = None


class RoomInfo(NamedTuple):
    name: str
    members: int


class Listing(list):
    """A WHO or ROOMS answer: what the server listed, plus ``total``.

    The server may list fewer entries than ``total`` to keep the REPLY under
    ``max_frame``.
    """

    def __init__(self, items: list | tuple = (), total: int | None = None) -> None:
        super().__init__(items)
        self.total = len(self) if total is None else total


_SOURCE_KINDS = {P.TARGET_ROOM: "room", P.TARGET_DIRECT: "direct", P.TARGET_BROADCAST: "broadcast"}
_PRESENCE_KINDS = {P.PRESENCE_JOIN: "join", P.PRESENCE_LEAVE: "leave", P.PRESENCE_NICK: "nick"}


# ================================================================ backoff
@dataclass
class Backoff:
    """Reconnect delays: ``initial`` doubling (``factor``) up to ``maximum``, with jitter.

    ``jitter`` spreads each delay by up to that fraction either way, so
    clients cut at the same moment do not all come back in the same
    millisecond. ``max_attempts`` (None: forever) bounds consecutive failed
    attempts before the client gives up.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait before attempt number ``attempt`` (0-based)."""
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return max(0.0, min(self.maximum, base * (1 + self.jitter * (2 * rng() - 1))))


# ======================================================= shared, no I/O
class _Call(NamedTuple):
    """One request: its id (0: no REPLY expected), its frame, and how to read an OK body."""

    req: int
    frame: bytes
    finish: Callable[[bytes], Any]


def _read_count(body: bytes) -> int:
    return P._Reader(body, "EMIT reply").u32()


def _read_who(body: bytes) -> Listing:
    r = P._Reader(body, "WHO reply")
    total, listed = r.u32(), r.u16()
    return Listing([r.str8() for _ in range(listed)], total)


def _read_rooms(body: bytes) -> Listing:
    r = P._Reader(body, "ROOMS reply")
    total, listed = r.u32(), r.u16()
    return Listing([RoomInfo(r.str8(), r.u32()) for _ in range(listed)], total)


class _Core:
    """Session state and protocol logic shared by the blocking and asyncio clients.

    Subclasses provide the I/O hooks ``_deliver`` (an Event, Presence or
    MuxError for the receiving side), ``_on_reply``, ``_on_pong`` and
    ``_write`` (send a frame now, best effort), and keep ``_pending`` keyed by
    the request ids they wait for.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        nick: str | None = None,
        namespace: str = "/",
        token: str | None = None,
        timeout: float = 10.0,
        reconnect: bool = False,
        backoff: Backoff | None = None,
    ) -> None:
        self.host, self.port, self.namespace = host, port, namespace
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
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME + P.SERVER_FRAME_SLACK)
        self._joined: dict[str, bool] = {}  # room -> presence flag, for re-joining
        self._pending: dict[int, Any] = {}
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
        self._disconnect_handlers: list[Callable] = []
        self._reconnect_handlers: list[Callable] = []

    # ---------------------------------------------------------- handlers
    def on(self, event: str, fn: Callable | None = None) -> Callable:
        """Call ``fn(event)`` for each Event named ``event`` ("*": every event).

        Usable as a decorator: ``@client.on("chat")``.
        """
        if fn is None:
            return lambda f: self.on(event, f)
        self._handlers.setdefault(event, []).append(fn)
        return fn

    def on_presence(self, fn: Callable) -> Callable:
        """Call ``fn(presence)`` for each Presence."""
        self._presence_handlers.append(fn)
        return fn

    def on_error(self, fn: Callable) -> Callable:
        """Call ``fn(exc)`` for errors that answer no waiting call (an EMIT without ack).

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

    def _handlers_for(self, item: Event | Presence | MuxError) -> list[Callable]:
        if isinstance(item, Event):
            return [*self._handlers.get(item.event, ()), *self._handlers.get("*", ())]
        if isinstance(item, Presence):
            return list(self._presence_handlers)
        if not self._error_handlers:
            raise item
        return list(self._error_handlers)

    @property
    def joined(self) -> dict[str, bool]:
        """Rooms this client is in (room -> presence flag), as re-joined after a reconnect."""
        return dict(self._joined)

    # ---------------------------------------------------------- session
    def _hello_frame(self) -> bytes:
        nick = self._wanted_nick or ""
        return self._encode(P.Hello(P.PROTOCOL_VERSION, self.namespace, nick, self._token))

    def _fresh_session(self) -> None:
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME + P.SERVER_FRAME_SLACK)
        self._welcome = None
        self._pending.clear()
        self._abandoned.clear()

    def _accept_welcome(self) -> None:
        w = self._welcome
        self.nick, self.conn_id, self.max_frame = w.nick, w.conn_id, w.max_frame
        self.server_name, self.ping_interval = w.server_name, w.ping_interval_ms / 1000
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

    def _join_call(self, room: str, presence: bool) -> _Call:
        def done(_body: bytes) -> None:
            self._joined[room] = presence

        req = self._next_req()
        flags = P.JOIN_PRESENCE if presence else 0
        return _Call(req, self._encode(P.Join(req, room, flags)), done)

    def _leave_call(self, room: str) -> _Call:
        def done(_body: bytes) -> None:
            self._joined.pop(room, None)

        req = self._next_req()
        return _Call(req, self._encode(P.Leave(req, room)), done)

    def _nick_call(self, nick: str) -> _Call:
        def done(_body: bytes) -> None:
            self.nick = self._wanted_nick = nick

        req = self._next_req()
        return _Call(req, self._encode(P.Nick(req, nick)), done)

    def _emit_call(
        self, event: str, payload: Any, room: str | None, to: str | None,
        broadcast: bool, echo: bool, ack: bool,
    ) -> _Call:  # fmt: skip
        if (room is not None) + (to is not None) + bool(broadcast) != 1:
            raise ValueError("emit() needs exactly one target: room=, to= or broadcast=True")
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        elif not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes or str, not {type(payload).__name__}")
        if room is not None:
            kind, target = P.TARGET_ROOM, room
        elif to is not None:
            kind, target = P.TARGET_DIRECT, to
        else:
            kind, target = P.TARGET_BROADCAST, ""
        req = self._next_req() if ack else 0
        flags = P.EMIT_ECHO if echo else 0
        return _Call(
            req, self._encode(P.Emit(req, kind, target, event, payload, flags)), _read_count
        )

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

    def _incoming(self, msg: Any) -> None:
        """Act on one server message; raises the error for an ERROR frame."""
        kind = type(msg)
        if kind is P.Event:
            room = msg.source if msg.source_kind == P.TARGET_ROOM else None
            source = _SOURCE_KINDS.get(msg.source_kind, str(msg.source_kind))
            self._deliver(Event(msg.event, msg.payload, msg.sender, source, room))
        elif kind is P.Reply:
            if msg.req and msg.req in self._pending:
                self._on_reply(msg)
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

    # I/O hooks, provided by the subclasses.
    def _deliver(self, item: Event | Presence | MuxError) -> None:
        raise NotImplementedError

    def _on_reply(self, reply: P.Reply) -> None:
        raise NotImplementedError

    def _on_pong(self, nonce: int) -> None:
        raise NotImplementedError

    def _write(self, frame: bytes) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        state = "connected" if self._up else "closed" if self._closed else "disconnected"
        return f"<{type(self).__name__} {self.nick or '-'} {self.host}:{self.port} {state}>"


# ======================================================= blocking client
class Client(_Core):
    """A blocking muxserver client. Make one with :meth:`Client.connect`.

    Not thread-safe: use one client per thread (or greenlet).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        nick: str | None = None,
        namespace: str = "/",
        token: str | None = None,
        timeout: float = 10.0,
        *,
        reconnect: bool = False,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(host, port, nick, namespace, token, timeout, reconnect, backoff)
        self._sock: socket.socket | None = None
        self._inbox: deque = deque()
        self._pongs: set[int] = set()
        self._retry_at: float | None = None  # monotonic time of the next attempt

    @classmethod
    def connect(
        cls,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        nick: str | None = None,
        namespace: str = "/",
        token: str | None = None,
        timeout: float = 10.0,
        *,
        reconnect: bool = False,
        backoff: Backoff | None = None,
    ) -> Client:
        """Connect and complete HELLO/WELCOME.

        Raises OSError if the server cannot be reached and a ConnectionClosed
        subclass if it refuses the HELLO (e.g. NickTaken, AuthFailed). The
        first connection is never retried, even with ``reconnect=True``.
        """
        client = cls(
            host, port, nick, namespace, token, timeout, reconnect=reconnect, backoff=backoff
        )
        client._open()
        client._up = True
        return client

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def sock(self) -> socket.socket | None:
        """The current socket (None while disconnected), for callers with their own selector."""
        return self._sock

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------- requests
    def join(self, room: str, presence: bool = False) -> None:
        """Join ``room``; with ``presence`` receive Presence for it."""
        self._request(self._join_call(room, presence))

    def leave(self, room: str) -> None:
        self._request(self._leave_call(room))

    def set_nick(self, nick: str) -> None:
        self._request(self._nick_call(nick))

    def emit(
        self,
        event: str,
        payload: bytes | str = b"",
        room: str | None = None,
        *,
        to: str | None = None,
        broadcast: bool = False,
        echo: bool = False,
        ack: bool = False,
    ) -> int | None:
        """Send an event to a ``room``, one nick (``to``) or the namespace (``broadcast``).

        With ``ack`` waits for the REPLY and returns the recipient count (an
        error raises here); without it returns None at once and an error
        arrives later through ``recv``/``poll``/``on_error``.
        """
        return self._request(self._emit_call(event, payload, room, to, broadcast, echo, ack))

    def who(self, room: str) -> Listing:
        """Nicks in ``room`` in join order (``.total`` is the full count)."""
        return self._request(self._who_call(room))

    def rooms(self, all: bool = False) -> Listing:
        """RoomInfo(name, members) for my rooms, or every room of my namespace."""
        return self._request(self._rooms_call(all))

    def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        self._ensure()
        nonce, frame = self._ping_frame()
        start = time.monotonic()
        deadline = start + self.timeout
        self._send(frame)
        while nonce not in self._pongs:
            if not self._pump(deadline):
                raise TimeoutError(f"no PONG within {self.timeout:g} s")
        self._pongs.discard(nonce)
        return time.monotonic() - start

    def close(self) -> None:
        """Say BYE and close. Idempotent; a closed client never reconnects."""
        if self._closed:
            return
        self._closed = True
        self._retry_at = None
        sock = self._sock
        if sock is not None and self._up:
            try:
                sock.settimeout(self.timeout)
                sock.sendall(P.encode(P.Bye()))
                sock.shutdown(socket.SHUT_WR)
                # Read to the server's FIN: closing with unread input would make
                # the kernel reset the connection instead of ending it cleanly.
                deadline = time.monotonic() + CLOSE_LINGER
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    if not sock.recv(RECV_SIZE):
                        break
            except OSError:
                pass
        self._drop()

    # --------------------------------------------------------- receiving
    def recv(self, timeout: float | None = None) -> Event | Presence | None:
        """The next Event or Presence; None if ``timeout`` seconds pass first.

        Raises an error that arrived for an EMIT sent without ack, and
        ConnectionClosed when the connection ends (with ``reconnect`` on, it
        reconnects instead and keeps waiting).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            try:
                if not self._step(deadline):
                    return None
            except ConnectionClosed:
                if self._retry_at is None:
                    raise
        item = self._inbox.popleft()
        if isinstance(item, MuxError):
            raise item
        return item

    def poll(self, timeout: float | None = 0.0) -> int:
        """Dispatch what has arrived to the handlers, waiting up to ``timeout`` for something.

        Returns how many items were dispatched.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            try:
                if not self._step(deadline):
                    return 0
            except ConnectionClosed:
                if self._retry_at is None:
                    raise
        count = 0
        while self._inbox and not self._closed:
            item = self._inbox.popleft()
            count += 1
            for fn in self._handlers_for(item):
                fn(item)
        return count

    def run_forever(self) -> None:
        """Dispatch to the handlers until :meth:`close` (e.g. from a handler)."""
        while not self._closed:
            self.poll(None)

    # ------------------------------------------------------------ guts
    def _open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._fresh_session()
        self._sock = sock
        deadline = time.monotonic() + self.timeout
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._send(self._hello_frame())
            while self._welcome is None:
                if not self._pump(deadline):
                    raise TimeoutError(f"no WELCOME within {self.timeout:g} s")
        except BaseException:
            self._drop()
            raise
        self._accept_welcome()

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        self._up = False
        self._pending.clear()
        self._pongs.clear()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _schedule(self, exc: MuxError) -> None:
        """Remember why we are down and when to try again (None: never)."""
        self._down = exc
        delay = self._next_delay() if self._can_retry(exc) else None
        self._retry_at = None if delay is None else time.monotonic() + delay

    def _lost(self, exc: MuxError) -> NoReturn:
        was_up = self._up
        self._drop()
        self._schedule(exc)
        if was_up:
            for fn in list(self._disconnect_handlers):
                fn(exc)
        raise exc

    def _try_reconnect(self) -> None:
        self._retry_at = None
        try:
            self._open()
            self._rejoin()
        except ConnectionClosed:
            # _lost has scheduled the next attempt; when it gave up instead,
            # the caller learns why.
            if self._retry_at is None:
                raise
            return
        except OSError as exc:
            self._drop()
            why = ConnectionClosed(
                None, f"reconnect to {self.host}:{self.port} failed: {_why(exc)}"
            )
            self._schedule(why)
            if self._retry_at is None:
                raise why from None
            return
        self._up = True
        self._attempt = 0
        for fn in list(self._reconnect_handlers):
            fn()

    def _rejoin(self) -> None:
        """Re-join every room with its presence flag, pipelined; a refusal is delivered."""
        calls = [(room, self._join_call(room, flag)) for room, flag in self._joined.items()]
        if not calls:
            return
        for _, call in calls:
            self._pending[call.req] = None
        self._send(b"".join(call.frame for _, call in calls))
        for room, call in calls:
            try:
                self._finish(call, self._wait_reply(call.req))
            except ConnectionClosed:
                raise
            except MuxError as exc:
                self._joined.pop(room, None)
                self._deliver(exc)

    def _ensure(self) -> None:
        """Raise NotConnected unless connected (trying a reconnect that is due first)."""
        if self._up:
            return
        if self._closed:
            raise NotConnected("the client is closed")
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._try_reconnect()
            if self._up:
                return
        if self._retry_at is None:
            raise NotConnected(f"not connected ({self._down}); not reconnecting")
        left = max(0.0, self._retry_at - time.monotonic())
        raise NotConnected(f"not connected ({self._down}); next attempt in {left:.1f} s")

    def _request(self, call: _Call) -> Any:
        self._ensure()
        if call.req:
            self._pending[call.req] = None
        self._send(call.frame)
        if not call.req:
            return None
        return self._finish(call, self._wait_reply(call.req))

    def _wait_reply(self, req: int) -> P.Reply:
        deadline = time.monotonic() + self.timeout
        while self._pending.get(req) is None:
            if not self._pump(deadline):
                del self._pending[req]
                self._abandoned.add(req)
                raise TimeoutError(f"no reply to request {req} within {self.timeout:g} s")
        return self._pending.pop(req)

    def _send(self, frame: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise NotConnected("not connected")
        sock.settimeout(self.timeout)
        try:
            sock.sendall(frame)
        except OSError as exc:
            # The server may have said why in an ERROR frame before closing:
            # read what is buffered so the caller gets that, not EPIPE.
            while self._pump(time.monotonic()):
                pass
            self._lost(ConnectionClosed(None, f"connection lost: {_why(exc)}"))

    def _pump(self, deadline: float | None) -> bool:
        """One read, until ``deadline`` (None: no limit); False if nothing came."""
        sock = self._sock
        if sock is None:
            raise NotConnected("not connected")
        sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
        try:
            data = sock.recv(RECV_SIZE)
        except (TimeoutError, BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._lost(ConnectionClosed(None, f"connection lost: {_why(exc)}"))
        if not data:
            self._lost(ConnectionClosed(None, "the server closed the connection"))
        msgs, bad = self._parse(data)
        try:
            for msg in msgs:
                self._incoming(msg)
        except MuxError as exc:
            self._lost(exc)
        if bad is not None:
            self._lost(bad)
        return True

    def _step(self, deadline: float | None) -> bool:
        """Wait for input, or for and through the next reconnect attempt; False at the deadline."""
        if self._sock is not None:
            return self._pump(deadline)
        if self._closed:
            raise NotConnected("the client is closed")
        if self._retry_at is None:
            raise NotConnected(f"not connected ({self._down}); not reconnecting")
        now = time.monotonic()
        if deadline is not None and self._retry_at > deadline:
            time.sleep(max(0.0, deadline - now))
            return False
        time.sleep(max(0.0, self._retry_at - now))
        self._try_reconnect()
        return True

    # I/O hooks for _Core.
    def _deliver(self, item: Event | Presence | MuxError) -> None:
        self._inbox.append(item)

    def _on_reply(self, reply: P.Reply) -> None:
        self._pending[reply.req] = reply

    def _on_pong(self, nonce: int) -> None:
        if nonce <= self._nonce:
            self._pongs.add(nonce)

    def _write(self, frame: bytes) -> None:
        # Best effort (a PONG): if the socket is broken, the next read says so.
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(frame)
        except OSError:
            pass


connect = Client.connect
