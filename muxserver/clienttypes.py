"""What the clients hand to programs and take from them: errors, events, payloads.

Split from :mod:`muxserver.clientcore` (the request and routing logic) to
keep each under ~700 lines. Programs import every name here from
:mod:`muxserver.client`, which re-exports them.

Decisions worth knowing:

* An ERROR frame raises a class that is both :class:`ConnectionClosed` and
  the subclass for its code (:func:`error_for` builds and caches those), so
  ``except NickTaken`` works for a refused HELLO and a refused NICK alike.
* Payloads are typed as protocol section 8 types them: bytes binary, str
  text, JSON values (dict, list, numbers, bool, None) JSON.
  :class:`Event` decodes its payload once, when it is built, into ``data``;
  ``payload`` keeps the raw bytes, and the repr shows the decoded value.
* The public classes carry ``__module__ = "muxserver.client"``, the module
  programs import them from, so tracebacks, reprs and pickles name that one.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import protocol as P

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7878
# The protocol version the clients ask for in HELLO unless told otherwise:
# version 2 carries payload types (section 8). version=1 talks to older servers.
DEFAULT_VERSION = 2
# Event names that on() keeps for the connection itself (socket.io's reserved names).
RESERVED_EVENTS = frozenset({"connect", "disconnect", "recovery"})
# Measured on loopback (send + recv of a 200-byte message): 2.4 us with 64 KiB,
# 14 us with 256 KiB, where every recv allocates a buffer big enough for
# malloc to use fresh mmap'ed pages. recv_into a per-client buffer saves
# another ~0.1 us but costs 64 KiB per client, held for good: too much for a
# Locust process with thousands of users.
RECV_SIZE = 64 * 1024
CLOSE_LINGER = 2.0  # seconds close() waits for the server's FIN after BYE
# Programs know the public classes below as muxserver.client.X (that module
# re-exports them): tracebacks and reprs say so, and pickle finds them there.
PUBLIC_MODULE = "muxserver.client"


# ================================================================ errors
class MuxError(Exception):
    """Base of every protocol error this library raises.

    ``code`` is the protocol status code (None when there is none, e.g. a
    connection that ended without an ERROR frame), ``message`` the server's
    text. ``req`` is set on errors that answer a request: the request id, or 0
    for an EMIT sent without ``ack``. Errors for EMITs sent without ``ack`` or
    with ``ack=True, wait=False`` arrive later, through ``recv``/``poll`` or the
    ``on_error`` handlers.
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


class Replaced(MuxError):
    """Version 2: this session was resumed on another connection."""

    code = P.REPLACED


class Unavailable(MuxError):
    """The server's cluster link is down (protocol section 12)."""

    code = P.UNAVAILABLE


ERRORS: dict[int, type[MuxError]] = {
    cls.code: cls
    for cls in (
        BadFrame, UnknownType, NotHello, AuthFailed, UnsupportedVersion, TooLarge, NickTaken,
        InvalidName, NotMember, NoSuchTarget, Limit, RateLimited, SlowConsumer, IdleTimeout,
        ShuttingDown, Replaced, Unavailable,
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
    return type(
        cls.__name__, (ConnectionClosed, cls), {"__module__": PUBLIC_MODULE, "__doc__": doc}
    )


def error_for(code: int, message: str, fatal: bool = False) -> MuxError:
    """The exception for status ``code``; ``fatal`` (an ERROR frame) adds ConnectionClosed."""
    cls = ERRORS.get(code, MuxError)
    if fatal:
        return _closed_class(cls)(code, message)
    return cls(message, code)


def check_port(port: Any) -> int:
    """``port`` if it is a TCP port number (0..65535), else ValueError.

    Without this, a port of 99999 reaches the socket layer, which silently
    takes it modulo 65536 and dials 34463.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer 0..65535, not {port!r}")
    return port


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


# ========================================================= what you receive
_UNSET: Any = object()
PAYLOAD_TYPE_NAMES = {P.PAYLOAD_BINARY: "binary", P.PAYLOAD_TEXT: "text", P.PAYLOAD_JSON: "json"}


def encode_payload(data: Any) -> tuple[bytes, int]:
    """A value to send -> (bytes, protocol payload type), as protocol section 8 types them.

    ``bytes`` go as they are (binary), ``str`` as UTF-8 text, and dict, list,
    tuple, numbers, booleans and None as compact UTF-8 JSON, the way a
    socket.io program hands its values to ``emit``.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), P.PAYLOAD_BINARY
    if isinstance(data, str):
        return data.encode("utf-8"), P.PAYLOAD_TEXT
    if data is None or isinstance(data, (dict, list, tuple, int, float)):
        try:
            text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"payload cannot be sent as JSON: {exc}") from None
        return text.encode("utf-8"), P.PAYLOAD_JSON
    raise TypeError(
        f"payload must be bytes, str, or a JSON value (dict, list, number, bool, None), "
        f"not {type(data).__name__}"
    )


def decode_payload(payload: bytes, payload_type: int) -> Any:
    """The value a payload stands for: bytes, str, or the JSON value.

    The server does not check the sender's word (section 8), so text that is
    not UTF-8 is decoded with replacement characters, and a "JSON" payload
    that does not parse stays the raw bytes rather than failing the reader.
    """
    if payload_type == P.PAYLOAD_TEXT:
        return payload.decode("utf-8", "replace")
    if payload_type == P.PAYLOAD_JSON:
        try:
            return json.loads(payload)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
            return payload
    return payload


@dataclass(frozen=True, slots=True)
class Event:
    """An EVENT: ``kind`` is "room" (``room`` set), "direct" or "broadcast".

    ``data`` is the decoded value: a dict/list/number (JSON), str (text) or
    bytes (binary, and everything a version-1 session receives, since that
    version carries no payload type). ``payload`` is always the raw bytes.
    ``payload_type`` is the protocol's number (0 binary, 1 text, 2 JSON).

    ``seq`` is the message's number in a sequenced room (protocol section 9;
    0 when the server keeps no history), None for everything else.
    ``replayed`` is True for a message from the room's history, sent because
    of a JOIN (a catch-up after a reconnect, or ``join(room, history=N)``),
    not live.
    """

    event: str
    payload: bytes
    sender: str
    kind: str
    room: str | None = None
    payload_type: int = P.PAYLOAD_BINARY
    data: Any = field(default=_UNSET, compare=False)
    seq: int | None = None
    replayed: bool = False

    def __post_init__(self) -> None:
        if self.data is _UNSET:
            object.__setattr__(self, "data", decode_payload(self.payload, self.payload_type))

    @property
    def text(self) -> str:
        """The payload as UTF-8 text (undecodable bytes replaced)."""
        return self.payload.decode("utf-8", "replace")

    def __repr__(self) -> str:
        where = f", room={self.room!r}" if self.room is not None else ""
        if self.seq is not None:
            where += f", seq={self.seq}" + (", replayed=True" if self.replayed else "")
        return (
            f"Event(event={self.event!r}, data={self.data!r}, sender={self.sender!r}, "
            f"kind={self.kind!r}{where})"
        )

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Presence:
    """A PRESENCE: ``kind`` is "join", "leave" or "nick" (then ``new_nick`` is set)."""

    kind: str
    room: str
    nick: str
    new_nick: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    """The answer to an EMIT sent with ``ack=True, wait=False``: it was queued to ``recipients``.

    ``req`` is the id ``emit`` returned. ``rtt`` is the seconds from just
    before the EMIT was written to when its REPLY was read (not compared, so
    ``ack == Ack(req, 3)`` works). A refused EMIT arrives as its error instead,
    with ``.req`` set.
    """

    req: int
    recipients: int
    rtt: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a sequenced JOIN found (protocol section 9), for ``on("recovery")`` handlers.

    ``outcome`` is "fresh" (a first join), "complete" (a re-join that missed
    nothing: ``replayed`` messages come back), "gap" (messages
    ``missing[0]..missing[1]`` are gone for good) or "reset" (the room's
    history restarted under a new ``epoch``: what was missed cannot be
    known, and the replay is the latest messages of the new history). The
    replayed messages are ``first..last`` (none when ``first > last``), and
    live ones follow. A GAP frame met during a replay is a Recovery too:
    outcome "gap", ``first`` the seq the replay goes on from.
    """

    room: str
    outcome: str
    epoch: int
    first: int
    last: int
    missing: tuple[int, int] | None = None
    replayed: int = 0


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


for _cls in (
    MuxError, ConnectionClosed, NotConnected, *ERRORS.values(),
    Event, Presence, Ack, Recovery, RoomInfo, Listing, Backoff,
):  # fmt: skip
    _cls.__module__ = PUBLIC_MODULE
