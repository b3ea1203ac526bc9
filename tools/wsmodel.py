"""What a server owes a WebSocket client for the bytes it sent (RFC 6455 + protocol.md section 11).

The WebSocket half of the fuzz model: tools.model decides what the protocol
frames inside binary messages earn, this module decides what the WebSocket
framing around them earns. Like tools.model it is written from the texts
alone (RFC 6455 sections 5 and 7, protocol.md section 11), not from the
server's code or wsproto's, so a bug shared by both cannot hide.

It walks the client's byte stream frame by frame and returns a
:class:`WsVerdict`: the protocol answers owed (from tools.model, one
complete binary message at a time), the Pongs owed, and how the connection
ends. Readings where the texts leave room:

* A framing violation (reserved bit, unknown opcode, unmasked client frame,
  a control frame over 125 bytes or fragmented, a length not in its minimal
  form or with the top bit set, a continuation with no message open, a new
  data frame inside an open message, a Close of 1 byte or with a code no
  endpoint may send) fails the connection with Close 1002.
* A text message: Close 1003 (section 11). If its bytes are not valid
  UTF-8, 1007 (RFC 8.1) is accepted as well: which one a server reports
  depends on how much of the message one read delivered.
* A Close reason that is not UTF-8: 1007. Close codes 1012-1014 were
  registered after RFC 6455: echoing them or failing with 1002 are both
  accepted.
* A binary message over max_frame + 4 bytes: ERROR TOO_LARGE (Close 4006)
  as soon as the bytes received pass that size, its frames unread.
* A violation in a frame header is owed once the whole header (through
  the masking key) has arrived: a server may decide from fewer bytes, and
  a stream that stops inside a header is "partial", where nothing more is
  checked. (Deciding from the first byte alone is allowed, never required.)
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from muxserver import protocol as P

from .model import BYE, FATAL, OPEN, PARTIAL, Expect, Model, World

WS_FAIL = "ws-fail"  # the server fails the connection with a Close code, no ERROR frame
PEER_CLOSE = "peer-close"  # the client's Close: the server echoes it and ends the session

CONTROL = (0x8, 0x9, 0xA)
DATA = (0x0, 0x1, 0x2)
VALID_CLOSE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011}
LATER_CLOSE = {1012, 1013, 1014}  # IANA-registered after the RFC: echo or 1002


class WsVerdict(NamedTuple):
    expects: list  # protocol answers (tools.model Expect), in order
    pongs: list  # Pong payloads owed, in order
    later_pings: list  # pings after the end point: their Pongs may come too
    end: str  # OPEN, PARTIAL, FATAL, BYE, WS_FAIL, PEER_CLOSE
    close_codes: frozenset  # the server's Close code: any of these (FATAL/BYE/WS_FAIL/PEER_CLOSE)
    frames: int  # protocol frames the server had to decode
    note: str = ""
    hello: bool = False  # the session is past HELLO (a probe PING gets PONG, not NOT_HELLO)
    client_closed: bool = False  # a Close of the client's follows the end point

    def describe(self) -> str:
        codes = "|".join(map(str, sorted(self.close_codes)))
        answers = "; ".join(e.describe() for e in self.expects) or "no protocol answer"
        return f"end={self.end} close={codes or '-'} pongs={len(self.pongs)} ({self.note}); {answers}"


def unmask(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    n = len(data)
    whole = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(whole, "big")).to_bytes(n, "big")


def _utf8_ok(data: bytes, final: bool) -> bool:
    """No invalid sequence in ``data``; a sequence cut at the end is fine unless ``final``."""
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError as exc:
        return not final and exc.reason == "unexpected end of data"


class _Header(NamedTuple):
    fin: bool
    opcode: int
    length: int
    key: bytes
    end: int  # offset of the payload


class _Stop(Exception):
    """The walk ends here: a partial header, or a violation (``codes``)."""

    def __init__(self, codes: frozenset = frozenset(), note: str = "") -> None:
        self.codes, self.note = codes, note


def _fail(note: str, *codes: int) -> _Stop:
    return _Stop(frozenset(codes or (1002,)), note)


def parse_header(data: bytes, pos: int) -> _Header:
    """One client frame header at ``pos`` (RFC 6455 5.2), checked field by field."""
    n = len(data)
    if pos + 1 > n:
        raise _Stop()
    b0 = data[pos]
    fin, rsv, opcode = bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F
    if opcode not in CONTROL + DATA:
        raise _fail(f"opcode 0x{opcode:x}")
    if rsv:
        raise _fail(f"reserved bits {rsv:03b}")
    if opcode in CONTROL and not fin:
        raise _fail("fragmented control frame")
    if pos + 2 > n:
        raise _Stop()
    b1 = data[pos + 1]
    masked, length = bool(b1 & 0x80), b1 & 0x7F
    if opcode in CONTROL and length > 125:
        raise _fail(f"control frame of {length} bytes")
    at = pos + 2
    if length == 126:
        if at + 2 > n:
            raise _Stop()
        (length,) = struct.unpack_from(">H", data, at)
        at += 2
        if length < 126:
            raise _fail("16-bit length for a short payload")
    elif length == 127:
        if at + 8 > n:
            raise _Stop()
        (length,) = struct.unpack_from(">Q", data, at)
        at += 8
        if length >> 63:
            raise _fail("64-bit length with the top bit set")
        if length < 0x10000:
            raise _fail("64-bit length for a 16-bit payload")
    if not masked:
        raise _fail("unmasked client frame")
    if at + 4 > n:
        raise _Stop()
    return _Header(fin, opcode, length, data[at : at + 4], at + 4)


def header_complete(data: bytes, pos: int) -> bool:
    """The whole header of the frame at ``pos`` (extended length and masking key) is there."""
    if pos + 2 > len(data):
        return False
    n7, masked = data[pos + 1] & 0x7F, data[pos + 1] & 0x80
    size = 2 + (2 if n7 == 126 else 8 if n7 == 127 else 0) + (4 if masked else 0)
    return pos + size <= len(data)


def _close_codes(payload: bytes) -> tuple[str, frozenset, str]:
    """(end, codes, note) for the client's Close with this (unmasked) payload."""
    if not payload:
        return PEER_CLOSE, frozenset({1005}), "Close without a code"  # 1005: echoed without one
    if len(payload) == 1:
        return WS_FAIL, frozenset({1002}), "Close of 1 byte"
    (code,) = struct.unpack_from(">H", payload)
    if not _utf8_ok(payload[2:], True):
        return WS_FAIL, frozenset({1007, 1002} if code not in VALID_CLOSE else {1007}), (
            "Close reason not UTF-8"
        )
    if code in VALID_CLOSE or 3000 <= code <= 4999:
        return PEER_CLOSE, frozenset({code}), f"Close {code}"
    if code in LATER_CLOSE:
        return PEER_CLOSE, frozenset({code, 1002}), f"Close {code}"
    return WS_FAIL, frozenset({1002}), f"Close with code {code}"


def later_frames(data: bytes, pos: int) -> tuple[list, bool]:
    """Ping payloads in the well-formed frames from ``pos`` on (their Pongs may still come),
    and whether a Close is among them (the client has already sent its Close)."""
    found = []
    try:
        while pos < len(data):
            h = parse_header(data, pos)
            if h.end + h.length > len(data):
                break
            if h.opcode == 0x9:
                found.append(unmask(data[h.end : h.end + h.length], h.key))
            elif h.opcode == 0x8:
                return found, True
            pos = h.end + h.length
    except _Stop:
        pass
    return found, False


def verdict(stream: bytes, world: World, token: str) -> WsVerdict:
    """The server's debt for ``stream`` (the bytes after the 101) on one connection."""
    proto = Model(world, token)
    max_message = world.max_frame + 4
    expects: list = []
    pongs: list = []
    frames = 0
    pos = 0
    kind = None  # opcode of the open message
    message = b""

    def done(end: str, codes=frozenset(), note: str = "", at: int | None = None) -> WsVerdict:
        later, closed = later_frames(stream, at) if at is not None else ([], False)
        return WsVerdict(
            expects, pongs, later, end, frozenset(codes), frames, note, proto.hello_done, closed
        )

    while True:
        if pos == len(stream):
            return done(PARTIAL if kind is not None else OPEN, note="stream ends")
        try:
            h = parse_header(stream, pos)
        except _Stop as stop:
            if stop.codes and header_complete(stream, pos):
                return done(WS_FAIL, stop.codes, stop.note)
            return done(PARTIAL, note="stream ends inside a header")
        body = stream[h.end : h.end + h.length]
        complete = len(body) == h.length
        payload = unmask(body, h.key)
        nxt = h.end + h.length
        if h.opcode in DATA:
            if h.opcode == 0 and kind is None:
                return done(WS_FAIL, {1002}, "continuation with no message open")
            if h.opcode != 0 and kind is not None:
                return done(WS_FAIL, {1002}, "new message inside a fragmented one")
            this = h.opcode or kind
            if this == 0x1:
                if h.opcode and h.length and not body:
                    return done(PARTIAL, note="text frame without its payload yet")
                ok = _utf8_ok(message + payload, complete and h.fin)
                return done(WS_FAIL, {1003} if ok else {1003, 1007}, "text message")
            message += payload
            if len(message) > max_message:
                expects.append(Expect("ERROR", P.TOO_LARGE, note=f"message of {len(message)}+"))
                return done(FATAL, {4000 + P.TOO_LARGE}, "message over max_frame + 4", nxt)
            if not complete:
                return done(PARTIAL, note="stream ends inside a data frame")
            kind = this
            pos = nxt
            if not h.fin:
                continue
            v = proto.run(message)
            kind, message = None, b""
            expects += v.expects
            frames += v.frames
            if v.end == PARTIAL:
                expects.append(Expect("ERROR", P.BAD_FRAME, note="message ends inside a frame"))
                return done(FATAL, {4000 + P.BAD_FRAME}, "message ends inside a frame", nxt)
            if v.end == FATAL:
                code = v.expects[-1].value
                return done(FATAL, {4000 + code}, "protocol error", nxt)
            if v.end == BYE:
                return done(BYE, {1000}, "BYE", nxt)
            continue
        if not complete:
            return done(PARTIAL, note="stream ends inside a control frame")
        if h.opcode == 0x9:
            pongs.append(payload)
        elif h.opcode == 0x8:
            end, codes, note = _close_codes(payload)
            return done(end, codes, note, nxt)
        pos = nxt
