"""The frame types of wire protocol versions 1 and 2 as small immutable types, with encode/decode.

Pure code. ``decode(type, body)`` gives a NamedTuple or raises
:class:`ProtocolError` with the status the protocol names; ``encode(msg)``
the whole frame. The EMIT fast path slices instead (:func:`parse_emit_head`,
the prefix helpers): an EVENT ends with the EMIT body's last three fields.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple

from .framing import (  # noqa: F401  (ProtocolError, str8 and the U* structs are re-exported)
    LENGTH,
    U8,
    U16,
    U32,
    U64,
    BodyReader,
    ProtocolError,
    encode_frame,
    str8,
)
from .names import NameCache, check_name  # noqa: F401  (re-exported: part of the codec's API)

# The version a client speaks by default, and every version the server accepts.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1, 2)

# ---------------------------------------------------------------- frame types
HELLO = 0x01
JOIN = 0x02
LEAVE = 0x03
NICK = 0x04
EMIT = 0x05
PING = 0x06
PONG = 0x07
WHO = 0x08
ROOMS = 0x09
BYE = 0x0A

WELCOME = 0x81
REPLY = 0x82
EVENT = 0x83
PRESENCE = 0x84
ERROR = 0x85
SERVER_PING = 0x86
SERVER_PONG = 0x87
EVENT_SEQ = 0x88  # version 2: u64 seq, then an EVENT body
GAP = 0x89  # version 2: str8 room, u64 first_missing, u64 last_missing

TYPE_NAMES = {
    HELLO: "HELLO", JOIN: "JOIN", LEAVE: "LEAVE", NICK: "NICK", EMIT: "EMIT",
    PING: "PING", PONG: "PONG", WHO: "WHO", ROOMS: "ROOMS", BYE: "BYE",
    WELCOME: "WELCOME", REPLY: "REPLY", EVENT: "EVENT", PRESENCE: "PRESENCE",
    ERROR: "ERROR", SERVER_PING: "PING", SERVER_PONG: "PONG",
    EVENT_SEQ: "EVENT_SEQ", GAP: "GAP",
}  # fmt: skip

# ------------------------------------------------------------- status codes
OK = 0
BAD_FRAME = 1
UNKNOWN_TYPE = 2
NOT_HELLO = 3
AUTH_FAILED = 4
UNSUPPORTED_VERSION = 5
TOO_LARGE = 6
NICK_TAKEN = 7
INVALID_NAME = 8
NOT_MEMBER = 9
NO_SUCH_TARGET = 10
LIMIT = 11
RATE_LIMITED = 12
SLOW_CONSUMER = 13
IDLE_TIMEOUT = 14
SHUTTING_DOWN = 15
REPLACED = 16  # version 2: the session was resumed on another connection
UNAVAILABLE = 17  # the cluster link is down

STATUS_NAMES = {
    OK: "OK", BAD_FRAME: "BAD_FRAME", UNKNOWN_TYPE: "UNKNOWN_TYPE",
    NOT_HELLO: "NOT_HELLO", AUTH_FAILED: "AUTH_FAILED",
    UNSUPPORTED_VERSION: "UNSUPPORTED_VERSION", TOO_LARGE: "TOO_LARGE",
    NICK_TAKEN: "NICK_TAKEN", INVALID_NAME: "INVALID_NAME",
    NOT_MEMBER: "NOT_MEMBER", NO_SUCH_TARGET: "NO_SUCH_TARGET", LIMIT: "LIMIT",
    RATE_LIMITED: "RATE_LIMITED", SLOW_CONSUMER: "SLOW_CONSUMER",
    IDLE_TIMEOUT: "IDLE_TIMEOUT", SHUTTING_DOWN: "SHUTTING_DOWN",
    REPLACED: "REPLACED", UNAVAILABLE: "UNAVAILABLE",
}  # fmt: skip

# EMIT target kinds, also EVENT source kinds.
TARGET_ROOM = 0
TARGET_DIRECT = 1
TARGET_BROADCAST = 2

# PRESENCE kinds.
PRESENCE_JOIN = 1
PRESENCE_LEAVE = 2
PRESENCE_NICK = 3

# Flags.
JOIN_PRESENCE = 0x01
JOIN_SEQUENCED = 0x02  # version 2: epoch, after, replay_max follow the room name
EMIT_ECHO = 0x01

# Version 2 payload types: EMIT flags bits 1-2, EVENT source_kind bits 4-5.
PAYLOAD_BINARY = 0
PAYLOAD_TEXT = 1
PAYLOAD_JSON = 2
EMIT_TYPE_SHIFT = 1
EMIT_TYPE_MASK = 0x06
EVENT_TYPE_SHIFT = 4
EVENT_KIND_MASK = 0x03

# Recovery outcomes of a SEQUENCED JOIN (section 9).
FRESH = 0
COMPLETE = 1
GAP_RECOVERY = 2
RESET = 3
RECOVERY_NAMES = {FRESH: "fresh", COMPLETE: "complete", GAP_RECOVERY: "gap", RESET: "reset"}
REPLAY_ALL = 0xFFFF  # replay_max: no cap but the history's

# Frames the server sends may be this much longer than max_frame (an EVENT
# carries the sender's nick on top of what was emitted).
SERVER_FRAME_SLACK = 512


# ------------------------------------------------------------------ structs
REQ = U32
REQ_U8 = struct.Struct(">IB")
EMIT_HEAD = struct.Struct(">IBBB")  # req, flags, target_kind, len(target)
REPLY_HEAD = struct.Struct(">IBIH")  # frame length, type, req, status
REPLY_COUNT = struct.Struct(">IBIHI")  # ... + u32 recipients
REPLY_COUNT_SEQ = struct.Struct(">IBIHIQ")  # version 2: ... + u32 recipients, u64 seq
JOIN_SEQ_TAIL = struct.Struct(">QQH")  # epoch, after, replay_max
JOIN_SEQ_REPLY = struct.Struct(">IBIHBQQQ")  # header, req, status, recovery, epoch, first, last
SEQ_HEAD = struct.Struct(">IBQ")  # EVENT_SEQ: frame length, type, seq
PING_FRAME = struct.Struct(">IBQ")  # frame length (9), type, nonce
ERROR_HEAD = struct.Struct(">IBH")


# ------------------------------------------------------------ frame tuples
class Hello(NamedTuple):
    version: int = PROTOCOL_VERSION
    namespace: str = "/"
    nick: str = ""
    token: str = ""
    resume: str = ""  # version 2 only: a resume token from an earlier WELCOME


class Join(NamedTuple):
    req: int
    room: str
    flags: int = 0
    # Version 2, only with flags & JOIN_SEQUENCED (section 9).
    epoch: int = 0
    after: int = 0
    replay_max: int = 0


class Leave(NamedTuple):
    req: int
    room: str


class Nick(NamedTuple):
    req: int
    nick: str


class Emit(NamedTuple):
    req: int
    target_kind: int
    target: str
    event: str
    payload: bytes = b""
    flags: int = 0


class Ping(NamedTuple):
    nonce: int


class Pong(NamedTuple):
    nonce: int


class Who(NamedTuple):
    req: int
    room: str


class Rooms(NamedTuple):
    req: int
    scope: int = 0


class Bye(NamedTuple):
    pass


class Welcome(NamedTuple):
    version: int
    conn_id: int
    nick: str
    max_frame: int
    ping_interval_ms: int
    server_name: str
    # Version 2 only (section 10).
    resume_token: str = ""
    resume_window_ms: int = 0
    resumed: int = 0


class Reply(NamedTuple):
    """REPLY. ``body`` is the raw bytes after status; see the helpers below."""

    req: int
    status: int
    body: bytes = b""

    @property
    def message(self) -> str:
        return self.body.decode("utf-8", "replace") if self.status else ""


def _kind(self) -> int:
    """EVENT source kind (bits 0-1 of source_kind)."""
    return self.source_kind & EVENT_KIND_MASK


def _payload_type(self) -> int:
    """Version 2 payload type (bits 4-5 of source_kind)."""
    return (self.source_kind >> EVENT_TYPE_SHIFT) & 3


class Event(NamedTuple):
    source_kind: int  # version 2: bits 0-1 the kind, bits 4-5 the payload type
    sender: str
    source: str
    event: str
    payload: bytes

    kind = property(_kind)
    payload_type = property(_payload_type)


class EventSeq(NamedTuple):
    """EVENT_SEQ (version 2): an EVENT of a sequenced room with its seq."""

    seq: int
    source_kind: int
    sender: str
    source: str
    event: str
    payload: bytes

    kind = property(_kind)
    payload_type = property(_payload_type)


class Gap(NamedTuple):
    """GAP (version 2): messages first..last of ``room`` are gone."""

    room: str
    first_missing: int
    last_missing: int


class Presence(NamedTuple):
    kind: int
    room: str
    nick: str
    new_nick: str = ""


class Error(NamedTuple):
    code: int
    message: str = ""

    @property
    def name(self) -> str:
        return STATUS_NAMES.get(self.code, str(self.code))


class ServerPing(NamedTuple):
    nonce: int


class ServerPong(NamedTuple):
    nonce: int


# --------------------------------------------------------------- decoding
def _d_hello(r: BodyReader) -> Hello:
    version = r.u8()
    if version not in SUPPORTED_VERSIONS:
        # The layout of an unknown version is unknown: the answer is
        # UNSUPPORTED_VERSION whatever follows, so nothing more is parsed.
        return Hello(version, "", "", "")
    # Names are checked against the name rules by the server, which answers
    # INVALID_NAME; here we only insist on well-formed str8 fields.
    ns, nick, token = r.raw8(), r.raw8(), r.raw8()
    resume = r.raw8() if version >= 2 else b""
    r.end()
    return Hello(version, _text(ns), _text(nick), _text(token), _text(resume))


def _text(raw: bytes) -> str:
    """Decode a client-sent name field.

    "Valid UTF-8" is a *name rule* (status INVALID_NAME), not a framing rule
    (BAD_FRAME), so undecodable bytes survive as lone surrogates
    (surrogateescape) for :func:`check_name` to reject.
    """
    return raw.decode("utf-8", "surrogateescape")


def _d_join(r: BodyReader, version: int = 2) -> Join:
    req, flags, room = r.u32(), r.u8(), _text(r.raw8())
    if version >= 2 and flags & JOIN_SEQUENCED:
        epoch, after, replay_max = r.u64(), r.u64(), r.u16()
        r.end()
        return Join(req, room, flags, epoch, after, replay_max)
    r.end()
    # Bits a version does not define are reserved: kept here, ignored by the
    # server (a version-1 session's SEQUENCED bit means nothing).
    return Join(req, room, flags)


def decode_join(body: bytes, version: int) -> Join:
    """JOIN as the session's version reads it (SEQUENCED exists from version 2)."""
    return _d_join(BodyReader(body, "JOIN"), version)


def _d_leave(r: BodyReader) -> Leave:
    req, room = r.u32(), _text(r.raw8())
    r.end()
    return Leave(req, room)


def _d_nick(r: BodyReader) -> Nick:
    req, nick = r.u32(), _text(r.raw8())
    r.end()
    return Nick(req, nick)


def _d_emit(r: BodyReader) -> Emit:
    req, flags, kind = r.u32(), r.u8(), r.u8()
    target, event = _text(r.raw8()), _text(r.raw8())
    payload = r.rest()
    _check_target(kind, target)
    return Emit(req, kind, target, event, payload, flags)


def emit_flags(echo: bool = False, payload_type: int = PAYLOAD_BINARY) -> int:
    """EMIT flags byte: bit0 echo, bits 1-2 the payload type (version 2)."""
    return (1 if echo else 0) | (payload_type << EMIT_TYPE_SHIFT)


def payload_type_of(emit_flags_byte: int) -> int:
    """The payload type an EMIT's flags carry (3 is reserved: BAD_FRAME)."""
    return (emit_flags_byte & EMIT_TYPE_MASK) >> EMIT_TYPE_SHIFT


def _check_target(kind: int, target) -> None:
    if kind > TARGET_BROADCAST:
        raise ProtocolError(BAD_FRAME, f"EMIT: unknown target_kind {kind}")
    if kind == TARGET_BROADCAST and target:
        raise ProtocolError(BAD_FRAME, "EMIT: broadcast must have an empty target")


def _d_nonce(cls, r: BodyReader):
    if len(r.body) != 8:
        raise ProtocolError(BAD_FRAME, f"{r.kind}: body must be exactly 8 bytes")
    return cls(r.u64())


def _d_who(r: BodyReader) -> Who:
    req, room = r.u32(), _text(r.raw8())
    r.end()
    return Who(req, room)


def _d_rooms(r: BodyReader) -> Rooms:
    req, scope = r.u32(), r.u8()
    r.end()
    if scope > 1:
        raise ProtocolError(BAD_FRAME, f"ROOMS: unknown scope {scope}")
    return Rooms(req, scope)


def _d_bye(r: BodyReader) -> Bye:
    r.end()
    return Bye()


def _d_welcome(r: BodyReader) -> Welcome:
    w = Welcome(r.u8(), r.u32(), r.str8(), r.u32(), r.u32(), r.str8())
    if w.version >= 2:
        w = w._replace(resume_token=r.str8(), resume_window_ms=r.u32(), resumed=r.u8())
    r.end()
    return w


def _d_reply(r: BodyReader) -> Reply:
    return Reply(r.u32(), r.u16(), r.rest())


def _d_event(r: BodyReader) -> Event:
    return Event(r.u8(), r.str8(), r.str8(), r.str8(), r.rest())


def _d_event_seq(r: BodyReader) -> EventSeq:
    return EventSeq(r.u64(), r.u8(), r.str8(), r.str8(), r.str8(), r.rest())


def _d_gap(r: BodyReader) -> Gap:
    g = Gap(r.str8(), r.u64(), r.u64())
    r.end()
    return g


def _d_presence(r: BodyReader) -> Presence:
    p = Presence(r.u8(), r.str8(), r.str8(), r.str8())
    r.end()
    return p


def _d_error(r: BodyReader) -> Error:
    return Error(r.u16(), r.rest().decode("utf-8", "replace"))


_DECODERS = {
    HELLO: _d_hello, JOIN: _d_join, LEAVE: _d_leave, NICK: _d_nick, EMIT: _d_emit,
    PING: lambda r: _d_nonce(Ping, r), PONG: lambda r: _d_nonce(Pong, r),
    WHO: _d_who, ROOMS: _d_rooms, BYE: _d_bye,
    WELCOME: _d_welcome, REPLY: _d_reply, EVENT: _d_event, PRESENCE: _d_presence,
    ERROR: _d_error, EVENT_SEQ: _d_event_seq, GAP: _d_gap,
    SERVER_PING: lambda r: _d_nonce(ServerPing, r),
    SERVER_PONG: lambda r: _d_nonce(ServerPong, r),
}  # fmt: skip

CLIENT_TYPES = frozenset(range(HELLO, BYE + 1))
SERVER_TYPES = frozenset(range(WELCOME, GAP + 1))


def decode(ftype: int, body: bytes):
    """Frame body -> NamedTuple. Raises ProtocolError(BAD_FRAME / UNKNOWN_TYPE)."""
    fn = _DECODERS.get(ftype)
    if fn is None:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown frame type 0x{ftype:02x}")
    return fn(BodyReader(body, TYPE_NAMES[ftype]))


# --------------------------------------------------------------- encoding
def encode(msg) -> bytes:
    """NamedTuple -> whole frame bytes (length prefix included)."""
    return _ENCODERS[type(msg)](msg)


def _e_reply(m: Reply) -> bytes:
    return encode_frame(REPLY, U32.pack(m.req) + U16.pack(m.status) + m.body)


_ENCODERS = {
    Hello: lambda m: encode_frame(
        HELLO,
        bytes((m.version,)) + str8(m.namespace) + str8(m.nick) + str8(m.token)
        + (str8(m.resume) if m.version >= 2 else b""),
    ),
    Join: lambda m: encode_frame(
        JOIN,
        REQ_U8.pack(m.req, m.flags) + str8(m.room)
        + (JOIN_SEQ_TAIL.pack(m.epoch, m.after, m.replay_max)
           if m.flags & JOIN_SEQUENCED else b""),
    ),
    Leave: lambda m: encode_frame(LEAVE, REQ.pack(m.req) + str8(m.room)),
    Nick: lambda m: encode_frame(NICK, REQ.pack(m.req) + str8(m.nick)),
    Emit: lambda m: encode_frame(
        EMIT,
        REQ_U8.pack(m.req, m.flags)
        + bytes((m.target_kind,))
        + str8(m.target)
        + str8(m.event)
        + bytes(m.payload),
    ),
    Ping: lambda m: encode_frame(PING, U64.pack(m.nonce)),
    Pong: lambda m: encode_frame(PONG, U64.pack(m.nonce)),
    Who: lambda m: encode_frame(WHO, REQ.pack(m.req) + str8(m.room)),
    Rooms: lambda m: encode_frame(ROOMS, REQ_U8.pack(m.req, m.scope)),
    Bye: lambda m: encode_frame(BYE),
    Welcome: lambda m: encode_frame(
        WELCOME,
        bytes((m.version,)) + U32.pack(m.conn_id) + str8(m.nick)
        + U32.pack(m.max_frame) + U32.pack(m.ping_interval_ms) + str8(m.server_name)
        + (str8(m.resume_token) + U32.pack(m.resume_window_ms) + bytes((m.resumed,))
           if m.version >= 2 else b""),
    ),
    Reply: _e_reply,
    Event: lambda m: encode_frame(
        EVENT,
        bytes((m.source_kind,)) + str8(m.sender) + str8(m.source) + str8(m.event)
        + bytes(m.payload),
    ),
    EventSeq: lambda m: encode_frame(
        EVENT_SEQ,
        U64.pack(m.seq) + bytes((m.source_kind,)) + str8(m.sender) + str8(m.source)
        + str8(m.event) + bytes(m.payload),
    ),
    Gap: lambda m: encode_frame(GAP, str8(m.room) + U64.pack(m.first_missing)
                                + U64.pack(m.last_missing)),
    Presence: lambda m: encode_frame(
        PRESENCE, bytes((m.kind,)) + str8(m.room) + str8(m.nick) + str8(m.new_nick)
    ),
    Error: lambda m: encode_frame(ERROR, U16.pack(m.code) + m.message.encode("utf-8")),
    ServerPing: lambda m: encode_frame(SERVER_PING, U64.pack(m.nonce)),
    ServerPong: lambda m: encode_frame(SERVER_PONG, U64.pack(m.nonce)),
}  # fmt: skip


# ------------------------------------------------------- REPLY bodies
# The body of an OK REPLY depends on the request it answers; the reply frame
# itself does not say which, so the client calls the one that fits.
def parse_count(body: bytes) -> int:
    """EMIT ok: u32 recipients (version 2 adds a u64 seq: see parse_emit_reply)."""
    return parse_emit_reply(body)[0]


def parse_emit_reply(body: bytes) -> tuple[int, int]:
    """EMIT ok: (recipients, seq); seq is 0 in version 1 and outside sequenced rooms."""
    r = BodyReader(body, "EMIT reply")
    count = r.u32()
    seq = r.u64() if len(body) > 4 else 0
    r.end()
    return count, seq


def parse_join_reply(body: bytes) -> tuple[int, int, int, int]:
    """SEQUENCED JOIN ok: (recovery, epoch, first, last); empty body: (FRESH, 0, 1, 0)."""
    if not body:
        return FRESH, 0, 1, 0
    r = BodyReader(body, "JOIN reply")
    out = (r.u8(), r.u64(), r.u64(), r.u64())
    r.end()
    return out


def parse_who(body: bytes) -> tuple[int, list[str]]:
    """WHO ok: (total members, the nicks listed, in join order)."""
    r = BodyReader(body, "WHO reply")
    total, listed = r.u32(), r.u16()
    nicks = [r.str8() for _ in range(listed)]
    r.end()
    return total, nicks


def parse_rooms(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    """ROOMS ok: (total rooms, [(room, members), ...] listed)."""
    r = BodyReader(body, "ROOMS reply")
    total, listed = r.u32(), r.u16()
    rooms = [(r.str8(), r.u32()) for _ in range(listed)]
    r.end()
    return total, rooms


# ----------------------------------------------------- server fast helpers
def reply_ok(req: int) -> bytes:
    return REPLY_HEAD.pack(7, REPLY, req, OK)


def reply_count(req: int, count: int) -> bytes:
    return REPLY_COUNT.pack(11, REPLY, req, OK, count)


def reply_count_v1(req: int, count: int, seq: int = 0) -> bytes:
    """Version 1 EMIT REPLY with ``reply_count_seq``'s signature (version 1 sends no seq)."""
    return REPLY_COUNT.pack(11, REPLY, req, OK, count)


def reply_count_seq(req: int, count: int, seq: int) -> bytes:
    """Version 2 EMIT REPLY: recipients and the message's seq (0 outside history)."""
    return REPLY_COUNT_SEQ.pack(19, REPLY, req, OK, count, seq)


def reply_join_seq(req: int, recovery: int, epoch: int, first: int, last: int) -> bytes:
    """REPLY to a SEQUENCED JOIN (section 9)."""
    return JOIN_SEQ_REPLY.pack(32, REPLY, req, OK, recovery, epoch, first, last)


def gap_frame(room: bytes, first_missing: int, last_missing: int) -> bytes:
    return encode_frame(GAP, str8(room) + U64.pack(first_missing) + U64.pack(last_missing))


def reply_error(req: int, status: int, message: str) -> bytes:
    raw = message.encode("utf-8")
    return REPLY_HEAD.pack(7 + len(raw), REPLY, req, status) + raw


def error_frame(code: int, message: str) -> bytes:
    raw = message.encode("utf-8")
    return ERROR_HEAD.pack(3 + len(raw), ERROR, code) + raw


def ping_frame(ftype: int, nonce: int) -> bytes:
    return PING_FRAME.pack(9, ftype, nonce)


def parse_emit_head(body: bytes) -> tuple[int, int, int, bytes, bytes, int]:
    """Split an EMIT body without copying the payload.

    Returns ``(req, flags, target_kind, raw_target, raw_event, payload_start)``.
    Raises ProtocolError(BAD_FRAME) for a body that does not parse.
    """
    n = len(body)
    if n < 8:
        raise ProtocolError(BAD_FRAME, "EMIT body too short")
    req, flags, kind, tlen = EMIT_HEAD.unpack_from(body)
    tend = 7 + tlen
    if tend >= n:
        raise ProtocolError(BAD_FRAME, "EMIT: string longer than the body")
    eend = tend + 1 + body[tend]
    if eend > n:
        raise ProtocolError(BAD_FRAME, "EMIT: string longer than the body")
    _check_target(kind, tlen)
    return req, flags, kind, body[7:tend], body[tend + 1 : eend], eend


# The EMIT body from this offset on (str8 target, str8 event, payload) is the
# tail of the EVENT a room or broadcast EMIT becomes, so the server forwards
# it unchanged behind a new prefix; the EVENT is then this much shorter than
# prefix + EMIT body.
EMIT_TAIL_OFFSET = 6  # u32 req, u8 flags, u8 target_kind
EVENT_LENGTH_DELTA = EMIT_TAIL_OFFSET


def emit_event_offset(body: bytes) -> int:
    """Where the str8 event starts in an EMIT body (after the str8 target)."""
    return EMIT_TAIL_OFFSET + 1 + body[EMIT_TAIL_OFFSET]


def reply_count_seq0(req: int, count: int) -> bytes:
    """Version 2 EMIT REPLY of a message that has no seq (seq 0)."""
    return REPLY_COUNT_SEQ.pack(19, REPLY, req, OK, count, 0)


def listing_reply(req: int, entries: list[bytes], max_frame: int) -> bytes:
    """WHO / ROOMS REPLY: u32 total, u16 listed, then as many entries as fit under max_frame."""
    head = U32.pack(req) + U16.pack(OK) + U32.pack(len(entries))
    room_left = max_frame - 1 - len(head) - 2
    listed = 0
    for entry in entries:
        if listed == 0xFFFF or len(entry) > room_left:
            break
        room_left -= len(entry)
        listed += 1
    return encode_frame(REPLY, head + U16.pack(listed) + b"".join(entries[:listed]))


def event_prefix(source_kind: int, sender_nick: bytes) -> bytes:
    """The EVENT bytes between the frame header and the forwarded EMIT tail."""
    return bytes((EVENT, source_kind, len(sender_nick))) + sender_nick


def direct_tail(emit_body: bytes) -> bytes:
    """A direct EVENT's tail: empty source, then the EMIT's event and payload."""
    return b"\x00" + emit_body[emit_event_offset(emit_body) :]


def typed_prefix(prefix: bytes, ptype: int) -> bytes:
    """An EVENT prefix with a version-2 payload type in its source_kind byte."""
    return prefix[:1] + bytes((prefix[1] | ptype << EVENT_TYPE_SHIFT,)) + prefix[2:]


def event_kind_byte(kind: int, payload_type: int) -> int:
    """Version 2 EVENT source_kind: the kind in bits 0-1, payload type in bits 4-5."""
    return kind | (payload_type << EVENT_TYPE_SHIFT)


EVENT_SEQ_EXTRA = 8  # EVENT_SEQ = EVENT with a u64 seq after the type byte: this much longer


@functools.lru_cache(maxsize=64)
def event_seq_head(sprefix_len: int) -> struct.Struct:
    """EVENT_SEQ length, type, seq, then an EVENT prefix without its type byte (one ``pack``)."""
    return struct.Struct(f">IBQ{sprefix_len}s")


def event_seq_frame(seq: int, prefix: bytes, tail) -> bytes:
    """EVENT_SEQ frame of the EVENT ``prefix`` + ``tail`` (prefix starts with the EVENT type byte)."""
    head = SEQ_HEAD.pack(len(prefix) + EVENT_SEQ_EXTRA + len(tail), EVENT_SEQ, seq)
    return head + prefix[1:] + tail


def event_frame(prefix: bytes, tail) -> bytes:
    """EVENT frame = length + prefix (type byte included) + EMIT tail."""
    return LENGTH.pack(len(prefix) + len(tail)) + prefix + tail
