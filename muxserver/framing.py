"""Length-prefixed framing: bytes in, frames out; frames in, bytes out.

Every message on the wire is ``u32 length (big-endian) | u8 type | body``,
where ``length`` counts the type byte and the body. This module is pure
(no sockets) so that the server, the client library, the load tests and the
benchmarks all share one decoder and nobody writes a second one.

It also holds the section 1 primitive types that frame bodies are made of
(the ``U*`` structs, :func:`str8`, :class:`BodyReader`) and
:class:`ProtocolError`, so that every parser in the project reads bodies the
same way.

Two decisions worth knowing about:

* The size cap is enforced from the four length bytes alone, before any body
  byte is buffered (h11's ``max_incomplete_event_size`` idea), so a hostile
  length prefix costs us four bytes of memory, not ``max_frame``.
* When the decoder has nothing buffered (the common case: reads end on frame
  boundaries), frames are sliced straight out of the caller's buffer and only
  a trailing partial frame is copied into the decoder.
"""

from __future__ import annotations

import struct

__all__ = [
    "U8",
    "U16",
    "U32",
    "U64",
    "BodyReader",
    "ProtocolError",
    "str8",
    "DEFAULT_MAX_FRAME",
    "FrameDecoder",
    "FrameError",
    "LENGTH",
    "encode_frame",
]

DEFAULT_MAX_FRAME = 1024 * 1024

# Built once: struct.Struct objects skip the format-string cache lookup.
LENGTH = struct.Struct(">I")
HEADER = struct.Struct(">IB")
# Section 1 primitive types inside frame bodies.
U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# Status codes used by framing errors (the full table lives in protocol.py;
# repeated here as plain ints so this module has no imports of its own).
_BAD_FRAME = 1
_TOO_LARGE = 6


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame stream.

    This is always the peer's fault: the right answer is an ERROR frame with
    ``code`` and closing that peer. ``frames`` holds the complete frames that
    arrived *before* the bad one in the same read, so the caller can still act
    on them in order before closing.
    """

    def __init__(self, code: int, message: str, frames: list | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frames = frames if frames is not None else []


class ProtocolError(FrameError):
    """A frame body that breaks the protocol: the peer's fault, fatal."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


class BodyReader:
    """Cursor over one frame body (section 1 primitive types); every shortfall is BAD_FRAME."""

    __slots__ = ("body", "pos", "kind")

    def __init__(self, body: bytes, kind: str) -> None:
        self.body = body
        self.pos = 0
        self.kind = kind

    def _need(self, n: int) -> int:
        pos = self.pos
        if pos + n > len(self.body):
            raise ProtocolError(_BAD_FRAME, f"{self.kind} body too short")
        self.pos = pos + n
        return pos

    def u8(self) -> int:
        return self.body[self._need(1)]

    def u16(self) -> int:
        return U16.unpack_from(self.body, self._need(2))[0]

    def u32(self) -> int:
        return U32.unpack_from(self.body, self._need(4))[0]

    def u64(self) -> int:
        return U64.unpack_from(self.body, self._need(8))[0]

    def raw8(self) -> bytes:
        n = self.u8()
        if self.pos + n > len(self.body):
            raise ProtocolError(_BAD_FRAME, f"{self.kind}: string longer than the body")
        start = self.pos
        self.pos = start + n
        return self.body[start : self.pos]

    def str8(self) -> str:
        raw = self.raw8()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(_BAD_FRAME, f"{self.kind}: string is not valid UTF-8") from None

    def rest(self) -> bytes:
        start = self.pos
        self.pos = len(self.body)
        return self.body[start:]

    def end(self) -> None:
        if self.pos != len(self.body):
            raise ProtocolError(_BAD_FRAME, f"{self.kind}: trailing bytes after the last field")


def str8(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if len(raw) > 255:
        raise ValueError(f"string of {len(raw)} bytes does not fit a str8")
    return bytes((len(raw),)) + raw


def encode_frame(ftype: int, body: bytes = b"") -> bytes:
    """One frame as bytes: length prefix, type byte, body."""
    return HEADER.pack(len(body) + 1, ftype) + body


def _bad_length(length: int, max_frame: int, frames: list) -> FrameError:
    """The error for a length prefix outside 1..max_frame (``frames``: those before it)."""
    if length:
        return FrameError(
            _TOO_LARGE, f"frame length {length} exceeds max_frame {max_frame}", frames
        )
    return FrameError(_BAD_FRAME, "frame length 0 (no type byte)", frames)


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` returns the complete frames.

    Each frame is a ``(type, body)`` tuple with ``body`` as ``bytes``.
    Raises :class:`FrameError` (code TOO_LARGE or BAD_FRAME) as soon as a
    length prefix is bad; after that the decoder is unusable, as is the
    connection.

    ``buffered`` is a plain attribute (read once per read by the server's
    input-memory accounting): the bytes of the one incomplete frame held.
    """

    __slots__ = ("max_frame", "_buf", "_need", "buffered")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        # Only allocated while a partial frame is waiting for more bytes, so
        # thousands of idle connections cost no buffer memory.
        self._buf: bytearray | None = None
        self._need = 0  # 4 + length of the held frame; 0 while its prefix is incomplete
        self.buffered = 0

    @property
    def allocated(self) -> int:
        """Memory the held partial frame occupies: its buffer's capacity, which a bytearray
        growing by amortised appends keeps up to an eighth above ``buffered``."""
        buf = self._buf
        return buf.__alloc__() if buf is not None else 0

    def clear(self) -> None:
        """Forget the held partial frame (its connection is closing)."""
        self._buf = None
        self._need = self.buffered = 0

    def detach(self) -> FrameDecoder:
        """A new decoder holding this one's partial frame; this one is left empty.

        Lets many connections share one idle decoder and take a decoder of
        their own only while a read has ended inside a frame (transport/stream.py).
        """
        other = FrameDecoder(self.max_frame)
        other._buf, other._need, other.buffered = self._buf, self._need, self.buffered
        self.clear()
        return other

    def feed(self, data) -> list[tuple[int, bytes]]:
        """Decode ``data`` (bytes-like) together with anything buffered."""
        if self._buf is None and len(data) > 4:
            # The read that is exactly one frame (a chat message, one EMIT per
            # turn): no loop and one copy, not the read's and then the body's.
            (length,) = LENGTH.unpack_from(data)
            if length == len(data) - 4 and length <= self.max_frame:
                return [(data[4], bytes(data[5:]))]
        frames: list[tuple[int, bytes]] = []
        if self._buf is not None:
            data = self._continue(data, frames)
            if data is None:
                return frames
        elif type(data) is not bytes:
            # One copy of the whole read (a memoryview of the caller's reused
            # buffer, say) makes every body below a plain bytes slice: one
            # allocation each, and nothing points into the caller's buffer.
            data = bytes(data)
        end = len(data)
        pos = 0
        unpack = HEADER.unpack_from  # length and type in one call
        max_frame = self.max_frame
        length = 0
        append = frames.append
        limit = end - 5  # a whole frame has at least its length and type
        while pos <= limit:
            length, ftype = unpack(data, pos)
            if not 0 < length <= max_frame:  # one test per frame for both errors
                raise _bad_length(length, max_frame, frames)
            stop = pos + 4 + length
            if stop > end:
                break
            append((ftype, data[pos + 5 : stop]))
            pos = stop
        else:
            if end - pos == 4:  # a lone length prefix ends the read: check it now
                (length,) = LENGTH.unpack_from(data, pos)
                if not 0 < length <= max_frame:
                    raise _bad_length(length, max_frame, frames)
        if pos < end:
            self._buf = bytearray(memoryview(data)[pos:])
            self._need = 4 + length if end - pos >= 4 else 0
            self.buffered = end - pos
        return frames

    def _continue(self, data, frames: list):
        """Grow the held partial frame by ``data``; what is left of ``data`` after it.

        The partial frame grows in place (a bytearray's amortised append), so
        a frame arriving in many reads is copied a constant number of times,
        not once per read; None means all of ``data`` went into it.
        """
        buf = self._buf
        if not self._need:
            # Fewer than four bytes held: complete the length prefix first.
            take = 4 - len(buf)
            buf += data[:take]
            if len(buf) < 4:
                self.buffered = len(buf)
                return None
            data = memoryview(data)[take:]
            (length,) = LENGTH.unpack_from(buf)
            if not 0 < length <= self.max_frame:
                raise _bad_length(length, self.max_frame, [])
            self._need = 4 + length
        missing = self._need - len(buf)
        if len(data) < missing:
            buf += data
            self.buffered = len(buf)
            return None
        buf += data[:missing]
        frames.append((buf[4], bytes(memoryview(buf)[5:])))
        self._buf = None
        self._need = self.buffered = 0
        return bytes(memoryview(data)[missing:])
