"""WebSocket: the inbound codec, outbound headers, and the transport behind the seam.

Browsers reach the server on its own port (protocol.md section 11). A new
connection whose first four bytes look like an HTTP request line becomes a
:class:`WebSocketTransport`: first its HTTP phase (``http.HttpFront``, h11:
static files, error statuses, the RFC 6455 upgrade), then WebSocket
messages (:class:`WsInbound`, wsproto), each binary message fed to the same
``FrameDecoder`` a TCP connection uses.

Decisions worth knowing about:

* Inbound frames are wsproto's ``Connection`` (sans-I/O, pairs with h11,
  Autobahn-clean here). Measured against the sans-I/O ``Protocol`` of
  ``websockets`` (C unmasking): about 20 us vs 6 us per small message, 40
  vs 10 us per 6 KB masked message. That matters only where clients send
  one tiny message at a time at full speed (the 50 <-> 50 benchmark); a
  browser's input is chat-sized and the fan-out (outbound, below) is where
  a busy server spends its time, so wsproto stays until that changes.
  wsproto hands out message data as it arrives (partial frames), and
  :class:`WsInbound` counts those bytes, so a message over ``max_message``
  is refused while at most one read past the cap is held, never the
  declared length.
* Outbound frames are built here by hand (:func:`binary_header`): a server
  frame is unmasked, so the header is two to ten bytes in front of the
  payload, and one shared payload ``bytes`` can go to every member with
  ``sendmsg([header, payload])`` instead of one wsproto call (and copy) per
  recipient. permessage-deflate is never negotiated, for the same reason.
* The transport never talks to the session itself: what it needs from its
  host (flush a Pong, close without an ERROR, an ERROR LIMIT after the
  upgrade) is left in ``wants`` for the server to act on after the read.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from typing import NamedTuple

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from .. import protocol as P
from ..framing import LENGTH, FrameDecoder, FrameError
from ..listener import HTTP, sniff
from ..loop import EVENT_WRITE
from .http import (  # noqa: F401  (re-exported: the HTTP front door lives in http.py)
    MAX_HEAD,
    SERVER_NAME,
    SUBPROTOCOL,
    WS_PATH,
    HttpFront,
    Respond,
    Upgraded,
    http_response,
    origin_allowed,
    static_file,
)
from .stream import WOULD_BLOCK, StreamTransport

__all__ = [
    "Binary",
    "Closed",
    "Fail",
    "HttpFront",
    "MAX_HEAD",
    "Respond",
    "Send",
    "SUBPROTOCOL",
    "Text",
    "Upgraded",
    "WS_PATH",
    "WebSocketTransport",
    "WsInbound",
    "binary_header",
    "close_frame",
    "frame_header",
    "looks_like_http",
]

# Close codes (RFC 6455 section 7.4.1) the codec itself produces.
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003
CLOSE_NO_STATUS = 1005
# Fatal protocol errors close with 4000 + the error code (section 11).
CLOSE_ERROR_BASE = 4000
_TOO_LARGE = 6  # protocol.TOO_LARGE, repeated so the transport imports no session code

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_U16 = struct.Struct(">BBH")
_U64 = struct.Struct(">BBQ")
_CODE = struct.Struct(">H")


# ============================================================== sniffing
def looks_like_http(first4: bytes) -> bool:
    """True when 4 bytes can start an HTTP request line (section 11): listener.sniff's rule."""
    return sniff(first4) == HTTP


# ============================================================ outbound
def frame_header(opcode: int, n: int) -> bytes:
    """Header of one final, unmasked server frame carrying ``n`` payload bytes."""
    first = 0x80 | opcode
    if n < 126:
        return bytes((first, n))
    if n < 0x10000:
        return _U16.pack(first, 126, n)
    return _U64.pack(first, 127, n)


def binary_header(n: int) -> bytes:
    """Header of one final binary message of ``n`` bytes (send it before the payload)."""
    return frame_header(OP_BINARY, n)


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A whole Ping/Pong frame (payload at most 125 bytes, RFC 6455 5.5)."""
    return frame_header(opcode, len(payload)) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A whole Close frame; the reason is cut to fit 125 bytes on a character boundary."""
    raw = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    payload = _CODE.pack(code) + raw
    return frame_header(OP_CLOSE, len(payload)) + payload


# ============================================================ inbound
class Binary(NamedTuple):
    """One complete binary message."""

    data: bytes


class Text(NamedTuple):
    """One complete text message (only when WsInbound was built with ``text=True``)."""

    data: str


class Send(NamedTuple):
    """Bytes to write now: a Pong, or the reply to the peer's Close."""

    data: bytes


class Closed(NamedTuple):
    """The peer's Close arrived (its code; 1005 when it gave none): end like EOF."""

    code: int
    reason: str = ""


class Fail(NamedTuple):
    """A protocol violation: send ``close_frame(close_code, reason)`` and close.

    ``error`` is the muxserver status to send first as an ERROR frame, when
    there is one (TOO_LARGE for a message over ``max_message``).
    """

    close_code: int
    reason: str
    error: int | None = None


class WsInbound:
    """Inbound side of an upgraded connection: ``feed(data)`` -> list of events.

    Events: :class:`Binary`, :class:`Text` (``text=True`` only; otherwise a
    text message is ``Fail(1003)``), :class:`Send`, :class:`Closed`,
    :class:`Fail`. After Closed or Fail the connection is over and further
    input is discarded (``feed`` returns []). ``close(code, reason)`` builds
    our own Close and remembers it, so the peer's answering Close is
    reported as Closed without another reply.
    """

    __slots__ = ("max_message", "text", "_conn", "_parts", "_size", "_kind", "done", "close_sent")

    def __init__(self, max_message: int, *, text: bool = False) -> None:
        self.max_message = max_message
        self.text = text
        self._conn = Connection(ConnectionType.SERVER)
        self._parts: list = []
        self._size = 0
        self._kind = None  # BytesMessage / TextMessage while a message is open
        self.done = False
        self.close_sent = False

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished message held so far."""
        return self._size

    def discard(self) -> None:
        """Forget the unfinished message held so far (its connection is being cut)."""
        self._parts = []
        self._size = 0

    def close(self, code: int, reason: str = "") -> bytes:
        """Our Close frame; later the peer's Close is just reported."""
        self.close_sent = True
        return close_frame(code, reason)

    def feed(self, data: bytes) -> list:
        if self.done:
            return []
        conn = self._conn
        conn.receive_data(bytes(data))
        out: list = []
        for event in conn.events():
            if isinstance(event, BytesMessage) or isinstance(event, TextMessage):
                if isinstance(event, TextMessage) and not self.text:
                    return self._fail(out, CLOSE_UNSUPPORTED, "text messages are not supported")
                self._size += len(event.data)
                if self._size > self.max_message:
                    return self._fail(
                        out,
                        CLOSE_ERROR_BASE + _TOO_LARGE,
                        "TOO_LARGE",
                        _TOO_LARGE,
                    )
                self._parts.append(event.data)
                if event.message_finished:
                    if isinstance(event, TextMessage):
                        msg = Text("".join(self._parts))
                    else:
                        msg = Binary(b"".join(self._parts))
                    self._parts = []
                    self._size = 0
                    if not self.close_sent:
                        out.append(msg)
            elif isinstance(event, Ping):
                if not self.close_sent:
                    out.append(Send(control_frame(OP_PONG, bytes(event.payload))))
            elif isinstance(event, CloseConnection):
                return self._on_close(out, event)
            # A Pong needs no answer: it only proves liveness, which any input does.
        return out

    def _on_close(self, out: list, event: CloseConnection) -> list:
        self.done = True
        self._parts = []
        self._size = 0
        if self._conn.state is ConnectionState.OPEN:
            # wsproto reports a frame it could not parse as a CloseConnection
            # without a Close having arrived: that is the peer failing.
            out.append(Fail(int(event.code), event.reason or "protocol error"))
            return out
        code = int(event.code)
        if not self.close_sent:
            # Echo the peer's code (RFC 6455 5.5.1); no code in, no code out.
            if code == CLOSE_NO_STATUS:
                out.append(Send(control_frame(OP_CLOSE)))
            else:
                out.append(Send(close_frame(code)))
            self.close_sent = True
        out.append(Closed(code, event.reason or ""))
        return out

    def _fail(self, out: list, code: int, reason: str, error: int | None = None) -> list:
        self.done = True
        self._parts = []
        self._size = 0
        out.append(Fail(code, reason, error))
        return out


# ============================================================ transport
# What a WebSocketTransport asks of its host after a read (``wants``):
FLUSH = 1  # bytes of its own are queued (the 101, a Pong): flush this turn
END = 2  # close once the queued output is out, without an ERROR frame
# ... or (code, message): a fatal ERROR (LIMIT after an upgrade over max_connections).

# Section 11: a server message is at most 1 MiB, unless one frame is larger.
MAX_MESSAGE_OUT = 1 << 20
_ERROR_CODE = struct.Struct(">H")
_SHORT_HEADERS = tuple(bytes((0x80 | OP_BINARY, n)) for n in range(126))


def split_frames(data, limit: int = MAX_MESSAGE_OUT) -> list:
    """Cut ``data`` (whole frames) on frame boundaries into pieces of at most ``limit`` bytes.

    A single frame larger than ``limit`` is a piece of its own. The pieces
    are memoryviews of ``data``: nothing is copied.
    """
    view = memoryview(data)
    n = len(data)
    parts = []
    pos = 0
    unpack = LENGTH.unpack_from
    while pos < n:
        end = pos
        while end < n:
            nxt = end + 4 + unpack(data, end)[0]
            if nxt - pos > limit and end > pos:
                break
            end = nxt
        parts.append(view[pos:end])
        pos = end
    return parts


# The last split: members of a room flush the very same joined bytes one
# after another, so the frame walk is done once per turn, not per member
# (it keeps that one bytes object alive until the next split).
_last_split: list = [None, ()]


def _split_shared(data) -> list:
    if _last_split[0] is not data:
        _last_split[:] = [data, split_frames(data)]
    return _last_split[1]


def _close_for(out: list) -> tuple[int, str]:
    """Close code and reason after the session's last frame: 4000 + an ERROR's code, else 1000."""
    last = out[-1] if out else b""
    if len(last) >= 7 and last[4] == P.ERROR:
        code = _ERROR_CODE.unpack_from(last, 5)[0]
        return CLOSE_ERROR_BASE + code, P.STATUS_NAMES.get(code, str(code))
    return CLOSE_NORMAL, "BYE"


class WebSocketTransport(StreamTransport):
    """A connection sniffed as HTTP: HTTP phase, then our frames in binary messages.

    Same seam as :class:`StreamTransport` (``out``, ``receive``, ``flush``,
    ``on_writable``, ``discard_unsent``...), plus what a WebSocket needs:

    * ``ctrl``: whole wire frames of our own (the 101, an HTTP response, a
      Pong) sent before the next message; ``last``: our Close, sent after
      everything the session queued.
    * ``flush(loop, data)`` sends ``[binary_header(len(data)), data]`` with
      one ``sendmsg`` (TLS: one send of the joined bytes), so ``data`` is the
      very object every TCP member of the room sends too.
    * The backlog keeps its pieces apart (``ends`` says which piece finishes
      a wire unit: a message or a control frame), so ``discard_unsent`` can
      finish the message being sent and keep the message stream whole.
    """

    __slots__ = ("front", "inbound", "wants", "ctrl", "last", "pending", "ends", "midunit", "full")

    def __init__(
        self,
        sock: socket.socket,
        max_frame: int,
        *,
        allowed_origins=(),
        web: bool = True,
        full: bool = False,
    ) -> None:
        super().__init__(sock, max_frame)
        # A decoder of its own: a message ending inside a frame raises with
        # the frame still held, which the idle connections' shared one must
        # never be left holding (stream.SharedDecoder).
        self.decoder = FrameDecoder(max_frame)
        self.full = full
        self.front: HttpFront | None = HttpFront(
            tls=self.tls, allowed_origins=allowed_origins, web=web, full=full
        )
        self.inbound: WsInbound | None = None
        self.wants = None
        self.ctrl: list = []
        self.last = b""
        # The Close the WebSocket layer chose (the echo of the peer's, or a
        # failure's): it becomes ``last`` only if the session did not end
        # first on a frame that came before it (see end_by_transport).
        self.pending = b""
        self.ends: deque | None = None
        self.midunit = False  # bytes of the unit at chunks[0] were sent already

    @classmethod
    def take_over(cls, stream: StreamTransport, **options) -> WebSocketTransport:
        """Replace a just-sniffed StreamTransport: same socket, interest, callback and ``out``."""
        ws = cls(stream.sock, stream.decoder.max_frame, **options)
        ws.interest = stream.interest
        ws.callback, ws.owner = stream.callback, stream.owner
        ws.out = stream.out  # the session holds this very list
        ws.bytes_in, ws.bytes_out = stream.bytes_in, stream.bytes_out
        ws.handshaking = stream.handshaking
        # The loop still calls ``stream`` until ws changes its interest: it
        # forwards to ws, so that handing the connection to another session
        # (a park or a resume re-points ws.owner, handover.py) is followed.
        stream.callback, stream.owner = cls.__call__, ws
        return ws

    # ------------------------------------------------------------ input
    def receive(self, data) -> list[tuple[int, bytes]]:
        """Frames carried by the complete binary messages in ``data``; raises FrameError."""
        inbound = self.inbound
        if inbound is None:
            return self._http(data)
        frames: list = []
        decoder = self.decoder
        for event in inbound.feed(data):
            kind = type(event)
            if kind is Binary:
                try:
                    frames += decoder.feed(event.data)
                except FrameError as exc:
                    exc.frames = frames + exc.frames
                    raise
                if decoder.buffered:
                    # Section 11: a message carries whole frames, never part of one.
                    raise FrameError(
                        P.BAD_FRAME, "a WebSocket message ended inside a frame", frames
                    )
            elif kind is Send:
                if event.data[0] == 0x80 | OP_CLOSE:
                    # The echo of the peer's Close: it goes after whatever the
                    # session answers to the messages before it, never ahead.
                    self.pending = event.data
                    continue
                self.ctrl.append(event.data)
                if self.wants is None:
                    self.wants = FLUSH
            elif kind is Closed:
                # The close handshake is complete once our echo is out:
                # close TCP then, like after EOF.
                self.eof = True
                self.wants = END
            elif kind is Fail:
                if event.error is not None:
                    raise FrameError(
                        event.error, f"WebSocket message over {inbound.max_message} bytes", frames
                    )
                self.pending = close_frame(event.close_code, event.reason)
                self.wants = END
        return frames

    @property
    def held(self) -> int:
        """Bytes of the unfinished message (input memory bound, limits.py)."""
        inbound = self.inbound
        return inbound.buffered if inbound is not None else 0

    def discard_input(self) -> None:
        """Free the unfinished message: the connection is being cut."""
        if self.inbound is not None:
            self.inbound.discard()

    def _http(self, data) -> list:
        decision = self.front.feed(data)
        if decision is None:
            return []
        if type(decision) is Respond:
            if decision.data:
                self.ctrl.append(decision.data)
            self.wants = END
            return []
        self.ctrl.append(decision.data)
        self.inbound = WsInbound(self.decoder.max_frame + 4)
        self.front = None
        if self.full:
            # Section 11: a browser cannot read a refused upgrade's status, but
            # it can read ERROR LIMIT and Close 4011.
            self.wants = (P.LIMIT, "server is full (max_connections)")
            return []
        self.wants = FLUSH
        return self.receive(decision.leftover) if decision.leftover else []

    def end_by_transport(self) -> None:
        """The session ends because of the WebSocket layer (wants END): its Close goes last."""
        if not self.last:
            self.last = self.pending

    def drained(self, data) -> bool:
        """DRAINING after our Close: True once the peer's Close (or anything, after a failure) came."""
        inbound = self.inbound
        if inbound is None:
            return False
        if inbound.done:
            return True
        return any(type(e) in (Closed, Fail) for e in inbound.feed(data))

    # ------------------------------------------------------------- output
    def closing(self) -> None:
        """The session queued its last frame (BYE or a fatal ERROR): add the Close that ends it."""
        inbound = self.inbound
        if inbound is None:
            if self.front is not None and not self.front.done:
                # Still in HTTP: a timeout or a shutdown answers in HTTP.
                code, _ = _close_for(self.out)
                if code == CLOSE_ERROR_BASE + P.IDLE_TIMEOUT:
                    answer = http_response(408, b"request not complete in time\n")
                else:
                    answer = http_response(503, b"server shutting down\n")
                self.ctrl.append(answer.data)
                self.front.done = True
            self.out.clear()
            return
        # Called before end_by_transport when a frame that came before the
        # WebSocket layer's own Close or failure ended the session (BYE, an
        # ERROR): then its Close is the one that follows (section 11).
        if not self.last:
            self.last = inbound.close(*_close_for(self.out))

    @property
    def pending_bytes(self) -> int:
        return self.wbytes + sum(map(len, self.out)) + sum(map(len, self.ctrl))

    @property
    def blocked(self) -> bool:
        return bool(self.out or self.chunks or self.ctrl or self.last)

    def flush(self, loop, data=None) -> int:
        """Send our frames, then ``out`` as binary messages, then our Close; return the backlog."""
        out = self.out
        if out and self.chunks is None and not self.ctrl and not self.last and not self.tls:
            # The fan-out path: one message, one sendmsg of [header, shared data].
            if self.inbound is not None:
                if data is None:
                    data = out[0] if len(out) == 1 else b"".join(out)
                n = len(data)
                if n <= MAX_MESSAGE_OUT:
                    out.clear()
                    head = _SHORT_HEADERS[n] if n < 126 else binary_header(n)
                    try:
                        sent = self.sock.sendmsg((head, data))
                    except WOULD_BLOCK:
                        sent = 0
                    self.bytes_out += sent
                    if sent == n + len(head):
                        return 0
                    return self._blocked(loop, [head, data], [False, True], sent)
        pieces: list = []
        ends: list = []
        if self.ctrl:
            pieces += self.ctrl
            ends += [True] * len(self.ctrl)
            self.ctrl = []
        if out:
            if self.inbound is None:
                out.clear()  # HTTP phase: protocol frames have no way out
            else:
                if data is None:
                    data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                if len(data) <= MAX_MESSAGE_OUT:
                    pieces += (binary_header(len(data)), data)
                    ends += (False, True)
                else:
                    for part in _split_shared(data):
                        pieces += (binary_header(len(part)), part)
                        ends += (False, True)
        if self.last:
            pieces.append(self.last)
            ends.append(True)
            self.last = b""
        if not pieces:
            return self.wbytes
        total = sum(map(len, pieces))
        if self.chunks is not None:
            # Kernel buffer was full last time: queue behind the backlog.
            self.chunks.extend(pieces)
            self.ends.extend(ends)
            self.wbytes += total
            return self.wbytes
        try:
            if self.tls:  # SSLSocket has no sendmsg; one record for header and data
                sent = self.sock.send(b"".join(pieces))
            else:
                sent = self.sock.sendmsg(pieces)
        except WOULD_BLOCK:
            sent = 0
        self.bytes_out += sent
        if sent == total:
            return 0
        return self._blocked(loop, pieces, ends, sent)

    def _blocked(self, loop, pieces: list, ends: list, sent: int) -> int:
        """The kernel took ``sent`` bytes of ``pieces``: keep the rest, wait for EVENT_WRITE."""
        self.chunks = deque(pieces)
        self.ends = deque(ends)
        self.woff = 0
        self.midunit = False
        self.wbytes = sum(map(len, pieces))
        self._consumed(sent)
        self.set_interest(loop, self.interest | EVENT_WRITE)
        return self.wbytes

    def _consumed(self, sent: int) -> None:
        """``sent`` more bytes of the backlog reached the kernel."""
        chunks, ends = self.chunks, self.ends
        self.wbytes -= sent
        sent += self.woff
        while chunks and sent >= len(chunks[0]):
            sent -= len(chunks.popleft())
            self.midunit = not ends.popleft()
        self.woff = sent
        if sent:
            self.midunit = True

    def on_writable(self, loop) -> int:
        chunks = self.chunks
        while chunks:
            sent = self.send_backlog()
            if sent < 0:
                break
            self.bytes_out += sent
            before = len(chunks)
            self._consumed(sent)
            if self.woff or len(chunks) == before:
                break  # partial: the kernel buffer is full again
        if not chunks:
            self.chunks = self.ends = None
            self.woff = 0
            self.midunit = False
            self.set_interest(loop, self.interest & ~EVENT_WRITE)
        return self.wbytes

    def discard_unsent(self) -> int:
        """Drop queued output, keeping the rest of a partly-sent message (the stream stays whole)."""
        dropped = sum(map(len, self.out))
        self.out.clear()
        chunks = self.chunks
        if chunks:
            keep = 0
            if self.midunit:
                for i, end in enumerate(self.ends):
                    if end:
                        keep = i + 1
                        break
            kept = [chunks[i] for i in range(keep)]
            kept_ends = [self.ends[i] for i in range(keep)]
            left = sum(map(len, kept)) - self.woff if kept else 0
            dropped += self.wbytes - left
            chunks.clear()
            chunks.extend(kept)
            self.ends = deque(kept_ends)
            self.wbytes = left
            if not kept:
                self.woff = 0
                self.midunit = False
        return dropped
