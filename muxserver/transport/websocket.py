"""WebSocket transport, sans-I/O: HTTP front door, inbound messages, outbound headers.

Browsers reach the server on its own port (protocol.md section 11). A new
connection whose first four bytes look like an HTTP request line goes to
:class:`HttpFront`, which parses the request with h11 and decides once:
a static file or an error status (:class:`Respond`: send, then close), or
the RFC 6455 upgrade (:class:`Upgraded`: send the 101, then hand the
leftover bytes to :class:`WsInbound`). Nothing here touches a socket.

Decisions worth knowing about:

* The handshake itself (key check, 101 headers, subprotocol) is wsproto's
  ``H11Handshake``, fed the request our own h11 parser already produced
  (``initiate_upgrade_connection``), so the head is parsed once and bounded
  once: 16 KiB, checked on the complete head too (h11 only bounds an
  incomplete one).
* Inbound frames are wsproto's ``Connection``. It hands out message data as
  it arrives (partial frames), and :class:`WsInbound` counts those bytes, so
  a message over ``max_message`` is refused while at most one read past the
  cap is held, never the declared length.
* Outbound frames are built here by hand (:func:`binary_header`): a server
  frame is unmasked, so the header is two to ten bytes in front of the
  payload, and one shared payload ``bytes`` can go to every member with
  ``sendmsg([header, payload])`` instead of one wsproto call (and copy) per
  recipient. permessage-deflate is never negotiated, for the same reason.
"""

from __future__ import annotations

import re
import struct
from importlib import resources
from typing import NamedTuple
from urllib.parse import urlsplit

import h11
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.events import Request as WsRequest
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

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
    "WsInbound",
    "binary_header",
    "close_frame",
    "frame_header",
    "looks_like_http",
]

MAX_HEAD = 16 * 1024  # request line + headers (section 11: over it is 431)
SUBPROTOCOL = "muxserver"
WS_PATH = "/ws"
SERVER_NAME = b"muxserver"

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

# h11 accepts bare LF line endings too; the head ends at the first blank line.
_HEAD_END = re.compile(rb"\n\r?\n")


# ============================================================== sniffing
def looks_like_http(first4: bytes) -> bool:
    """True when 4 bytes can start an HTTP request line (section 11).

    An ASCII capital letter, then capitals or spaces: ``GET ``, ``POST``,
    ``PUT ``. As a length prefix such bytes are at least 0x41202020, above
    any allowed max_frame, so no raw-protocol client is ever mistaken.
    """
    if len(first4) < 4 or not 0x41 <= first4[0] <= 0x5A:
        return False
    return all(0x41 <= b <= 0x5A or b == 0x20 for b in first4[1:4])


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


# ========================================================= HTTP front
class Respond(NamedTuple):
    """Send ``data`` (a whole HTTP response), then close the connection."""

    data: bytes
    status: int


class Upgraded(NamedTuple):
    """Send ``data`` (the 101), then feed ``leftover`` to a :class:`WsInbound`."""

    data: bytes
    leftover: bytes
    subprotocol: str | None = None


class _Static(NamedTuple):
    name: str
    content_type: bytes


STATIC = {
    "/": _Static("index.html", b"text/html; charset=utf-8"),
    "/index.html": _Static("index.html", b"text/html; charset=utf-8"),
    "/chat.css": _Static("chat.css", b"text/css; charset=utf-8"),
    "/chat.js": _Static("chat.js", b"text/javascript; charset=utf-8"),
    "/muxclient.js": _Static("muxclient.js", b"text/javascript; charset=utf-8"),
}

# The page loads only its own files and talks only to its own /ws, so even a
# rendering bug could not pull in or run someone else's script.
_PAGE_HEADERS = [
    (b"Cache-Control", b"no-cache"),
    (
        b"Content-Security-Policy",
        b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        b"base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    ),
]

_static_cache: dict[str, bytes] = {}


def static_file(name: str) -> bytes:
    """Bytes of one file of ``muxserver/web`` (read once, then kept)."""
    data = _static_cache.get(name)
    if data is None:
        data = resources.files("muxserver.web").joinpath(name).read_bytes()
        _static_cache[name] = data
    return data


_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def http_response(
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Respond:
    """A whole HTTP/1.1 response that ends the connection.

    Built by hand rather than through h11: after a parse error h11's state
    machine refuses to send anything, and every answer here is one shot.
    """
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
        b"Server: " + SERVER_NAME,
        b"Content-Type: " + content_type,
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        # Error bodies quote the request (path, origin): never let a browser
        # sniff them into HTML.
        b"X-Content-Type-Options: nosniff",
    ]
    for name, value in headers or ():
        lines.append(name + b": " + value)
    return Respond(b"\r\n".join(lines) + b"\r\n\r\n" + body, status)


def _text(status: int, message: str, headers=None) -> Respond:
    return http_response(status, message.encode("utf-8") + b"\n", headers=headers)


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` -> (scheme, host, port) with the default port filled in."""
    try:
        parts = urlsplit(origin.strip())
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None
    if not scheme or not host or port is None:
        return None
    return scheme, host, port


def origin_allowed(origin: str | None, host: str | None, tls: bool, allowed) -> bool:
    """The Origin rule of section 11.

    No Origin (not a browser): allowed. Otherwise allowed when it is the
    server's own origin (scheme from ``tls``, host and port from the request's
    Host header) or listed in ``allowed`` (``*``: any).
    """
    if origin is None:
        return True
    if "*" in allowed:
        return True
    key = _origin_key(origin)
    if key is None:
        return False
    scheme = "https" if tls else "http"
    if host is not None:
        own = _origin_key(f"{scheme}://{host}")
        if own is not None and own == key:
            return True
    return any(_origin_key(entry) == key for entry in allowed)


class HttpFront:
    """The HTTP side of one connection sniffed as HTTP: ``feed(data)`` until it decides.

    ``feed`` returns None while more bytes are needed, then one
    :class:`Respond` or :class:`Upgraded`; later calls return None.
    ``feed(b"")`` means the peer closed (EOF): an unfinished request gets
    400, an empty connection ``Respond(b"", 0)`` (just close).

    ``tls``: the listener's scheme, for the own-origin check. ``allowed_origins``:
    extra origins (``*``: any). ``web``: serve the chat page and
    muxclient.js (off: those 404, /ws still upgrades). ``full``: the server is
    over max_connections: plain HTTP gets 503, an upgrade is still accepted so
    the caller can send ERROR LIMIT and Close 4011 where a browser can see them.
    """

    __slots__ = (
        "tls", "allowed_origins", "web", "full", "max_head",
        "_http", "_head", "_request", "done",
    )  # fmt: skip

    def __init__(
        self,
        *,
        tls: bool = False,
        allowed_origins: list[str] | tuple[str, ...] = (),
        web: bool = True,
        full: bool = False,
        max_head: int = MAX_HEAD,
    ) -> None:
        self.tls = tls
        self.allowed_origins = tuple(o.strip() for o in allowed_origins if o.strip())
        self.web = web
        self.full = full
        self.max_head = max_head
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        # Raw bytes until the head is complete (then None): h11 bounds only
        # an incomplete head, so a whole 20 KiB head in one read is ours to catch.
        self._head: bytearray | None = bytearray()
        self._request: h11.Request | None = None
        self.done = False

    def feed(self, data: bytes) -> Respond | Upgraded | None:
        """Bytes from the peer (``b""``: EOF) -> a decision, or None for "need more"."""
        if self.done:
            return None
        decision = self._feed(bytes(data))
        if decision is not None:
            self.done = True
            self._head = None
        return decision

    def _feed(self, data: bytes) -> Respond | Upgraded | None:
        http = self._http
        if not data:
            if self._head is not None and not self._head:
                return Respond(b"", 0)  # connected and left without a byte
        elif self._head is not None:
            head = self._head
            start = max(0, len(head) - 2)
            head += data
            m = _HEAD_END.search(head, start)
            end = len(head) if m is None else m.end()
            if end > self.max_head:
                return _text(431, f"request head over {self.max_head} bytes")
            if m is not None:
                self._head = None
        http.receive_data(data)
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                status = 431 if exc.error_status_hint == 431 else 400
                return _text(status, f"bad request: {exc}")
            if event is h11.PAUSED:
                return self._upgrade_ready()
            if event is h11.NEED_DATA:
                if not data:
                    return _text(400, "bad request: connection closed mid-request")
                return None
            if isinstance(event, h11.ConnectionClosed):
                return _text(400, "bad request: connection closed mid-request")
            if isinstance(event, h11.Request):
                decision = self._route(event)
                if decision is not None:
                    return decision
                self._request = event
            # Data / EndOfMessage of an upgrade request: go on until PAUSED.

    # ---------------------------------------------------------- routing
    def _route(self, req: h11.Request) -> Respond | None:
        """Answer a request at once, or None for an upgrade (decided once it is whole)."""
        target = req.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        headers = {}
        for name, value in req.headers:
            headers.setdefault(name, value)
        if req.http_version not in (b"1.0", b"1.1"):
            return _text(400, f"bad request: HTTP/{req.http_version.decode('ascii', 'replace')}")
        upgrade = headers.get(b"upgrade", b"").lower() == b"websocket"
        if path == WS_PATH and req.http_version == b"1.1" and req.method == b"GET" and upgrade:
            if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
                # A body would keep the connection in HTTP for as long as the
                # client likes, unbounded by the 16 KiB head rule.
                return _text(400, "bad WebSocket upgrade: a request body is not allowed")
            return None
        if self.full:
            return _text(503, "server full: too many connections")
        if req.method != b"GET":
            return _text(
                405,
                f"method {req.method.decode('ascii', 'replace')} not allowed",
                [(b"Allow", b"GET")],
            )
        if path == WS_PATH:
            return _text(400, "expected a WebSocket upgrade (Upgrade: websocket)")
        static = STATIC.get(path) if self.web else None
        if static is None:
            return _text(404, f"not found: {path}")
        return http_response(200, static_file(static.name), static.content_type, _PAGE_HEADERS)

    def _upgrade_ready(self) -> Respond | Upgraded:
        req = self._request
        shake = H11Handshake(ConnectionType.SERVER)
        try:
            shake.initiate_upgrade_connection(list(req.headers), req.target)
            ws_request = next(shake.events(), None)
        except WsRemoteProtocolError as exc:
            hint = exc.event_hint
            status = getattr(hint, "status_code", 400)
            extra = list(getattr(hint, "headers", []) or [])
            if status == 426:
                return _text(426, "unsupported WebSocket version (need 13)", extra)
            return _text(400, f"bad WebSocket upgrade: {exc}")
        except (UnicodeError, ValueError) as exc:
            return _text(400, f"bad WebSocket upgrade: {exc}")
        if not isinstance(ws_request, WsRequest):
            return _text(400, "bad WebSocket upgrade")
        origin = None
        host = None
        for name, value in req.headers:
            if name == b"origin" and origin is None:
                origin = value.decode("latin-1")
            elif name == b"host" and host is None:
                host = value.decode("latin-1")
        if not origin_allowed(origin, host, self.tls, self.allowed_origins):
            return _text(403, f"origin not allowed: {origin}")
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in ws_request.subprotocols else None
        data = shake.send(
            AcceptConnection(subprotocol=subprotocol, extra_headers=[(b"Server", SERVER_NAME)])
        )
        leftover, _closed = self._http.trailing_data
        return Upgraded(bytes(data), bytes(leftover), subprotocol)


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
