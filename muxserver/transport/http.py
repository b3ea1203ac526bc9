"""The HTTP front door of a connection sniffed as HTTP (protocol.md section 11), sans-I/O.

:class:`HttpFront` parses the request with h11 and decides once: a static
file or an error status (:class:`Respond`: send, then close), or the RFC 6455
upgrade (:class:`Upgraded`: send the 101, then hand the leftover bytes to
``websocket.WsInbound``). Nothing here touches a socket.

* The handshake itself (key check, 101 headers, subprotocol) is wsproto's
  ``H11Handshake``, fed the request our own h11 parser already produced
  (``initiate_upgrade_connection``), so the head is parsed once and bounded
  once: 16 KiB, checked on the complete head too (h11 only bounds an
  incomplete one).
* Responses are built by hand, not through h11: after a parse error h11's
  state machine refuses to send anything, and every answer here is one shot.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import NamedTuple
from urllib.parse import urlsplit

import h11
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection
from wsproto.events import Request as WsRequest
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

MAX_HEAD = 16 * 1024  # request line + headers (section 11: over it is 431)
SUBPROTOCOL = "muxserver"
WS_PATH = "/ws"
SERVER_NAME = b"muxserver"

# h11 accepts bare LF line endings too; the head ends at the first blank line.
_HEAD_END = re.compile(rb"\n\r?\n")


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
    "/muxcodec.js": _Static("muxcodec.js", b"text/javascript; charset=utf-8"),
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
    408: b"Request Timeout",
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
