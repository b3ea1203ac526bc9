"""A reference model of one connection: given the bytes a client sends, what must come back.

The fuzz run is differential against docs/protocol.md, not against the
server's code. This module is written from the protocol text alone and
imports only constants from muxserver (type numbers, status codes), so a
mistake in muxserver's decoder or name checks cannot hide by being shared
with its checker.

The model walks a byte stream exactly as the protocol says a server must:
length prefix first (over ``max_frame`` is TOO_LARGE from the four bytes
alone, zero is BAD_FRAME), then the frame type, then the body field by field.
It returns the answers the server owes (WELCOME, REPLY with the statuses
allowed, PONG, the fatal ERROR) and how the stream ends: still open, stuck
in the middle of a frame, closed by an ERROR, or closed by BYE.

What the model cannot know, because other connections change it (how many
members a shared room has, whose nicks are live), it leaves open: a count is
checked against a lower bound only, a nick is "taken" only if it belongs to a
well-behaved client that stays for the whole run. Where the protocol allows
more than one answer (a request with two faults), every allowed status is
accepted. Readings of protocol.md where the text is not explicit:

* A non-HELLO first frame is NOT_HELLO whatever its type or body; a second
  HELLO is NOT_HELLO whatever its body (the type decides before the body).
* HELLO: a version other than 1 and 2 is UNSUPPORTED_VERSION whatever
  follows it (the layout of an unknown version is unknown); then a body that
  does not parse for its version is BAD_FRAME (version 2 has a str8 resume
  token after the token), then the names (namespace, then nick), then whether
  the nick is taken (without regard to case: NFKC, case-folded).
* Names: "valid UTF-8" and "no control characters" are name rules
  (INVALID_NAME), not framing rules. A control character is Unicode category
  Cc (C0, DEL, C1).
* An EMIT's target_kind and broadcast-target rules are frame rules
  (BAD_FRAME) and come before any name rule (a REPLY).
"""

from __future__ import annotations

import struct
import unicodedata
from collections.abc import Callable
from typing import NamedTuple

from muxserver import protocol as P


def _nick_key(nick: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", nick).casefold())


U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

SHARED_NS = "/"

# How a stream ends, from the server's side.
OPEN = "open"  # every frame complete, session goes on
PARTIAL = "partial"  # the last frame is incomplete: the server waits for more
FATAL = "fatal"  # an ERROR closes the connection
BYE = "bye"  # the client said BYE: the server flushes and closes


class World(NamedTuple):
    """What the model knows about the server and the other clients."""

    max_frame: int
    max_rooms: int
    # Nicks held in the shared namespace for the whole run (the well-behaved
    # clients), and how many of them are in each shared room.
    taken: frozenset = frozenset()
    room_members: dict = {}  # a NamedTuple default: shared, never mutated


class Expect(NamedTuple):
    """One frame the server must send, in order."""

    kind: str  # "WELCOME", "REPLY", "PONG", "ERROR"
    value: int = 0  # REPLY: req; PONG: nonce; ERROR: code
    statuses: frozenset = frozenset()  # REPLY: the statuses allowed
    check: Callable | None = None  # REPLY OK: body -> problem; WELCOME: frame -> problem
    note: str = ""  # the request it answers, for reports

    def describe(self) -> str:
        if self.kind == "REPLY":
            names = "|".join(sorted(P.STATUS_NAMES[s] for s in self.statuses))
            return f"REPLY req={self.value} {names} ({self.note})"
        if self.kind == "ERROR":
            return f"ERROR {P.STATUS_NAMES[self.value]} ({self.note})"
        if self.kind == "PONG":
            return f"PONG {self.value}"
        return self.kind + (f" ({self.note})" if self.note else "")


class Verdict(NamedTuple):
    expects: list
    end: str
    frames: int  # frames the server reads, up to and including the one that ends it


# ----------------------------------------------------------- name rules
def name_ok(raw: bytes, kind: str) -> bool:
    """Protocol section 1 name rules, restated."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if kind == "nick":
        if not 1 <= len(raw) <= 32:
            return False
        return not any(unicodedata.category(ch) == "Cc" or ch.isspace() for ch in text)
    if not 1 <= len(raw) <= 255:
        return False
    if kind == "namespace" and not text.startswith("/"):
        return False
    return not any(unicodedata.category(ch) == "Cc" for ch in text)


# ------------------------------------------------------------ body reading
class Malformed(Exception):
    """The body does not parse as its type: BAD_FRAME."""


class Body:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Malformed
        start = self.pos
        self.pos += n
        return self.data[start : self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return U32.unpack(self.take(4))[0]

    def str8(self) -> bytes:
        return self.take(self.u8())

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise Malformed


# --------------------------------------------------------- reply checks
def check_welcome(nick: str | None) -> Callable:
    """WELCOME carries the nick asked for, or ``guest-<conn_id>`` for none."""

    def check(welcome) -> str | None:
        if nick is not None:
            ok = welcome.nick == nick
        else:  # a hand-picked "guest-<id>" already in use makes it guest-<id>-<n>
            guest = f"guest-{welcome.conn_id}"
            ok = welcome.nick == guest or welcome.nick.startswith(guest + "-")
        return None if ok else f"WELCOME nick {welcome.nick!r}, expected {nick or 'guest-<id>'!r}"

    return check


def check_empty(body: bytes) -> str | None:
    return None if body == b"" else f"OK reply to JOIN/LEAVE/NICK has a body {body[:16]!r}"


def check_count(low: int, high: int | None) -> Callable[[bytes], str | None]:
    def check(body: bytes) -> str | None:
        if len(body) != 4:
            return f"EMIT OK reply body is {len(body)} bytes, not a u32"
        (count,) = U32.unpack(body)
        if count < low or (high is not None and count > high):
            want = f"{low}" if high == low else f">= {low}" if high is None else f"{low}..{high}"
            return f"EMIT OK reply counts {count} recipients, expected {want}"
        return None

    return check


def parse_listing(body: bytes, with_counts: bool) -> tuple[int, list]:
    """WHO / ROOMS OK body -> (total, entries); raises Malformed."""
    r = Body(body)
    total, listed = r.u32(), r.u16()
    entries = []
    for _ in range(listed):
        name = r.str8().decode("utf-8")  # a name the server sends is valid UTF-8
        entries.append((name, r.u32()) if with_counts else name)
    r.end()
    if listed > total:
        raise Malformed
    return total, entries


def check_who(mine: str | None) -> Callable[[bytes], str | None]:
    """``mine``: the caller's nick if the room is its own private room."""

    def check(body: bytes) -> str | None:
        try:
            total, nicks = parse_listing(body, False)
        except (Malformed, UnicodeDecodeError):
            return f"WHO OK reply does not parse: {body[:32]!r}"
        if mine is not None and (total, nicks) != (1, [mine]):
            return f"WHO of a private room lists {total} {nicks}, expected only {mine!r}"
        return None

    return check


def check_rooms(expected: list | None) -> Callable[[bytes], str | None]:
    """``expected``: the exact room names (any order), when the model knows them."""

    def check(body: bytes) -> str | None:
        try:
            total, rooms = parse_listing(body, True)
        except (Malformed, UnicodeDecodeError):
            return f"ROOMS OK reply does not parse: {body[:32]!r}"
        if expected is not None:
            names = sorted(name for name, _ in rooms)
            if total != len(expected) or names != sorted(expected):
                return f"ROOMS lists {total} {names}, expected {sorted(expected)}"
            if any(count < 1 for _, count in rooms):
                return f"ROOMS lists a room with no members: {rooms}"
        return None

    return check


# ------------------------------------------------------------------ model
class Model:
    """One connection as the protocol sees it; ``run(stream)`` -> Verdict.

    ``token`` is unique to the connection: rooms whose names contain it, and
    any namespace other than "/", belong to this connection alone, so member
    counts there are exact.
    """

    def __init__(self, world: World, token: str) -> None:
        self.world = world
        self.token = token
        self.hello_done = False
        self.ns = ""
        self.nick: str | None = None  # None: a guest nick the server picks
        self.rooms: dict[str, None] = {}

    def run(self, stream: bytes) -> Verdict:
        expects: list[Expect] = []
        pos = frames = 0
        max_frame = self.world.max_frame
        while True:
            left = len(stream) - pos
            if left < 4:
                return Verdict(expects, PARTIAL if left else OPEN, frames)
            (length,) = U32.unpack_from(stream, pos)
            if length > max_frame:
                expects.append(Expect("ERROR", P.TOO_LARGE, note=f"length {length}"))
                return Verdict(expects, FATAL, frames + 1)
            if length == 0:
                expects.append(Expect("ERROR", P.BAD_FRAME, note="length 0"))
                return Verdict(expects, FATAL, frames + 1)
            if left < 4 + length:
                return Verdict(expects, PARTIAL, frames)
            ftype = stream[pos + 4]
            body = stream[pos + 5 : pos + 4 + length]
            pos += 4 + length
            frames += 1
            end = self.frame(ftype, body, expects)
            if end is not None:
                return Verdict(expects, end, frames)

    # ---------------------------------------------------------- frames
    def frame(self, ftype: int, body: bytes, out: list) -> str | None:
        name = P.TYPE_NAMES[ftype] if ftype in P.CLIENT_TYPES else f"type 0x{ftype:02x}"
        if not self.hello_done:
            if ftype != P.HELLO:
                return _fatal(out, P.NOT_HELLO, f"{name} before HELLO")
            return self.hello(body, out)
        if ftype == P.HELLO:
            return _fatal(out, P.NOT_HELLO, "second HELLO")
        handler = self.HANDLERS.get(ftype)
        if handler is None:
            return _fatal(out, P.UNKNOWN_TYPE, name)
        try:
            return handler(self, body, out)
        except Malformed:
            return _fatal(out, P.BAD_FRAME, f"{name} body {body[:24]!r}")

    def hello(self, body: bytes, out: list) -> str | None:
        if not body:
            return _fatal(out, P.BAD_FRAME, "HELLO body is empty")
        version = body[0]
        if version not in P.SUPPORTED_VERSIONS:
            return _fatal(out, P.UNSUPPORTED_VERSION, f"version {version}")
        try:
            r = Body(body)
            version, ns, nick, _token = r.u8(), r.str8(), r.str8(), r.str8()
            if version >= 2:
                r.str8()  # resume token: unknown ones start a fresh session
            r.end()
        except Malformed:
            return _fatal(out, P.BAD_FRAME, f"HELLO body {body[:24]!r}")
        if not name_ok(ns, "namespace") or (nick and not name_ok(nick, "nick")):
            return _fatal(out, P.INVALID_NAME, f"HELLO ns={ns!r} nick={nick!r}")
        # No token is configured on the fuzzed server: a token is ignored.
        self.ns = ns.decode()
        self.nick = nick.decode() if nick else None
        if self.shared and self.nick is not None and self._taken(self.nick):
            return _fatal(out, P.NICK_TAKEN, f"HELLO nick={self.nick!r}")
        self.hello_done = True
        out.append(Expect("WELCOME", check=check_welcome(self.nick), note=f"nick={self.nick!r}"))
        return None

    def _taken(self, nick: str) -> bool:
        """Held by a well-behaved client of the shared namespace (any case)."""
        return _nick_key(nick) in {_nick_key(n) for n in self.world.taken}

    @property
    def shared(self) -> bool:
        return self.ns == SHARED_NS

    def private_room(self, room: str) -> bool:
        return not self.shared or self.token in room

    def _join(self, body: bytes, out: list) -> None:
        r = Body(body)
        req, _flags, raw = r.u32(), r.u8(), r.str8()
        r.end()
        if not name_ok(raw, "room"):
            return _reply(out, req, {P.INVALID_NAME}, f"JOIN {raw!r}")
        room = raw.decode()
        if room in self.rooms:
            return _reply(out, req, {P.OK}, f"JOIN {room!r} again", check_empty)
        if len(self.rooms) >= self.world.max_rooms:
            return _reply(out, req, {P.LIMIT}, f"JOIN {room!r} past max_rooms")
        self.rooms[room] = None
        return _reply(out, req, {P.OK}, f"JOIN {room!r}", check_empty)

    def _leave(self, body: bytes, out: list) -> None:
        r = Body(body)
        req, raw = r.u32(), r.str8()
        r.end()
        if not name_ok(raw, "room"):
            return _reply(out, req, {P.INVALID_NAME}, f"LEAVE {raw!r}")
        self.rooms.pop(raw.decode(), None)
        return _reply(out, req, {P.OK}, f"LEAVE {raw!r}", check_empty)

    def _nick(self, body: bytes, out: list) -> None:
        r = Body(body)
        req, raw = r.u32(), r.str8()
        r.end()
        if not name_ok(raw, "nick"):
            return _reply(out, req, {P.INVALID_NAME}, f"NICK {raw!r}")
        nick = raw.decode()
        same_person = self.nick is not None and _nick_key(nick) == _nick_key(self.nick)
        if not same_person and self.shared and self._taken(nick):
            return _reply(out, req, {P.NICK_TAKEN}, f"NICK {nick!r}")
        self.nick = nick
        return _reply(out, req, {P.OK}, f"NICK {nick!r}", check_empty)

    def _emit(self, body: bytes, out: list) -> None:
        r = Body(body)
        req, flags, kind = r.u32(), r.u8(), r.u8()
        target, event = r.str8(), r.str8()
        r.rest()
        if kind > 2 or (kind == 2 and target):
            raise Malformed
        echo = 1 if flags & 1 else 0
        faults = set()
        if not name_ok(event, "event"):
            faults.add(P.INVALID_NAME)
        low, high = 0, None
        if kind == 0:
            if not name_ok(target, "room"):
                faults.add(P.INVALID_NAME)
            elif target.decode() not in self.rooms:
                faults.add(P.NOT_MEMBER)
            elif self.private_room(target.decode()):
                low = high = echo
            else:
                low = self.world.room_members.get(target.decode(), 0) + echo
        elif kind == 1:
            nick = target.decode("utf-8", "replace")
            if not name_ok(target, "nick"):
                faults.add(P.INVALID_NAME)
            elif self.nick is not None and _nick_key(nick) == _nick_key(self.nick):
                low = high = echo
            elif self.shared and self._taken(nick):
                low = high = 1
            else:
                faults.add(P.NO_SUCH_TARGET)
        elif not self.shared:
            low = high = echo
        else:
            low = len(self.world.taken) + echo
        note = f"EMIT kind={kind} target={target[:40]!r} event={event[:40]!r}"
        if faults:
            return _reply(out, req, faults, note)  # never silent, even with req 0
        if req:
            return _reply(out, req, {P.OK}, note, check_count(low, high))
        return None

    def _ping(self, body: bytes, out: list) -> None:
        if len(body) != 8:
            raise Malformed
        out.append(Expect("PONG", U64.unpack(body)[0]))

    def _pong(self, body: bytes, out: list) -> None:
        if len(body) != 8:
            raise Malformed

    def _who(self, body: bytes, out: list) -> None:
        r = Body(body)
        req, raw = r.u32(), r.str8()
        r.end()
        if not name_ok(raw, "room"):
            return _reply(out, req, {P.INVALID_NAME}, f"WHO {raw!r}")
        room = raw.decode()
        mine = None
        if room in self.rooms and self.private_room(room) and self.nick is not None:
            mine = self.nick
        return _reply(out, req, {P.OK}, f"WHO {room!r}", check_who(mine))

    def _rooms(self, body: bytes, out: list) -> None:
        r = Body(body)
        req, scope = r.u32(), r.u8()
        r.end()
        if scope > 1:
            raise Malformed
        known = list(self.rooms) if scope == 0 or not self.shared else None
        return _reply(out, req, {P.OK}, f"ROOMS scope={scope}", check_rooms(known))

    def _bye(self, body: bytes, out: list) -> str:
        if body:
            raise Malformed
        return BYE

    HANDLERS = {
        P.JOIN: _join,
        P.LEAVE: _leave,
        P.NICK: _nick,
        P.EMIT: _emit,
        P.PING: _ping,
        P.PONG: _pong,
        P.WHO: _who,
        P.ROOMS: _rooms,
        P.BYE: _bye,
    }


def _fatal(out: list, code: int, note: str) -> str:
    out.append(Expect("ERROR", code, note=note))
    return FATAL


def _reply(out: list, req: int, statuses: set, note: str, check=None) -> None:
    out.append(Expect("REPLY", req, frozenset(statuses), check, note))
