"""The monitoring port: /metrics, /healthz, /connz, /roomz over HTTP/1.1.

Why it runs on the server's own event loop and not in a thread: every figure
it reports is a plain attribute of objects the loop owns (the counters,
frames by type, each session's counters, the hub), handed over by
``Server.snapshot()``. Read
between two loop turns they need no lock and are never half-updated. The
hot path pays only integer increments; the summing, sorting and formatting
(stats.py) happen when someone asks. The price is that a scrape runs on the
loop: /connz over ten thousand connections takes a few milliseconds out of
one turn, which is why it pages.

HTTP is parsed by h11 (sans-I/O, like our own framing); this module only
moves bytes between sockets and ``h11.Connection`` objects. Every HTTP
client is bounded so the monitoring port cannot be used to hurt the server:
at most ``MAX_CLIENTS`` at once, request heads up to ``MAX_HEAD`` bytes, no
request bodies to speak of, one response buffered at a time (we stop
reading while it is unsent, so pipelining cannot pile responses up), and a
deadline of ``CLIENT_TIMEOUT`` seconds for each request to arrive and its
response to leave (which also ends idle keep-alive and slowloris clients).
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import socket
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11

from .listener import Listener
from .logs import format_peer
from .loop import EVENT_READ, EVENT_WRITE
from .stats import CONNZ_SORTS, BadQuery, connz, render_metrics, roomz

log = logging.getLogger("muxserver.monitor")

MAX_CLIENTS = 64
MAX_HEAD = 16 * 1024  # request line + headers (h11's max_incomplete_event_size)
MAX_BODY = 4096  # we serve GET: a body is tolerated, not wanted
CLIENT_TIMEOUT = 10.0
RECV_SIZE = 65536

INDEX = (
    "muxserver monitoring\n"
    "  /metrics  Prometheus text exposition\n"
    "  /healthz  200 while accepting, 503 while draining\n"
    "  /connz    connections: ?limit=&offset=&sort=" + "|".join(CONNZ_SORTS) + "\n"
    "  /roomz    rooms per namespace: ?namespace=&limit=\n"
)

# ====================================================================== HTTP


class _Client:
    __slots__ = (
        "sock", "peer", "http", "out", "interest", "callback", "timer",
        "request", "body", "eof", "closing", "closed",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, peer) -> None:
        self.sock = sock
        self.peer = peer
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.out = bytearray()
        self.interest = 0
        self.callback = None
        self.timer = None
        self.request: h11.Request | None = None
        self.body = 0  # body bytes of the current request
        self.eof = False  # the peer has closed its side
        self.closing = False  # close once ``out`` is sent
        self.closed = False


class Monitor:
    """The HTTP monitoring endpoint of one Server, on that server's loop."""

    def __init__(
        self, server, host: str = "127.0.0.1", port: int = 0, token: str | None = None
    ) -> None:
        self.server = server
        self.loop = server.loop
        self.host = host
        self.port = port
        token = server.config.token if token is None else token
        self._token = token.encode("utf-8") if token else b""
        self.listener: Listener | None = None
        self.address: tuple[str, int] | None = None
        self.clients: set[_Client] = set()

    # ------------------------------------------------------------- listen
    def start(self) -> tuple[str, int]:
        """Bind and listen; raises OSError (e.g. EADDRINUSE) if it cannot."""
        self.listener = Listener(
            self.loop, self.host, self.port, self._on_socket, backlog=64, per_wakeup=16,
            name="monitor accept",
        )  # fmt: skip
        self.address = self.listener.address
        self.listener.start()
        return self.address

    def close(self) -> None:
        for client in list(self.clients):
            self._close(client)
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _on_socket(self, sock: socket.socket, peer) -> None:
        if len(self.clients) >= MAX_CLIENTS:
            sock.close()  # a scraper that keeps 64 connections open is a bug
            return
        sock.setblocking(False)
        client = _Client(sock, peer)
        client.callback = functools.partial(self._on_event, client)
        self.clients.add(client)
        self._set_interest(client, EVENT_READ)
        client.timer = self.loop.call_later(CLIENT_TIMEOUT, self._close, client)

    # ---------------------------------------------------------------- I/O
    def _set_interest(self, client: _Client, events: int) -> None:
        if events == client.interest or client.closed:
            return
        if client.interest == 0:
            self.loop.register(client.sock, events, client.callback)
        else:
            self.loop.modify(client.sock, events, client.callback)
        client.interest = events

    def _on_event(self, client: _Client, mask: int) -> None:
        if mask & EVENT_READ:
            self._on_readable(client)
        else:
            self._pump(client)

    def _on_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        if client.closing:
            # Response sent and FIN gone out: discard input until EOF, so
            # closing never turns into a reset that eats the response.
            if not data:
                self._close(client)
            return
        if not data:
            client.eof = True
        client.http.receive_data(data)
        self._pump(client)

    def _pump(self, client: _Client) -> None:
        """Send what is queued, then answer requests while answers leave at once.

        One loop rather than send -> handle -> send recursion, so a buffer of
        thousands of pipelined requests costs iterations, not stack.
        """
        http = client.http
        while not client.closed:
            if client.out and not self._write(client):
                # Not reading while a response is unsent: a pipelining
                # client cannot make us buffer more than one response.
                self._set_interest(client, EVENT_WRITE)
                return
            if client.closing or http.our_state in (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
                self._finish(client)
                return
            if http.our_state is h11.DONE:
                if http.their_state is not h11.DONE:
                    self._finish(client)  # answered early (413): the body is not wanted
                    return
                http.start_next_cycle()
                self._restart_timer(client)
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                self._respond(client, exc.error_status_hint, f"bad request: {exc}\n", close=True)
                continue
            if event is h11.NEED_DATA:
                if client.eof:
                    self._close(client)
                else:
                    self._set_interest(client, EVENT_READ)
                return
            if isinstance(event, h11.Request):
                client.request = event
                client.body = 0
            elif isinstance(event, h11.Data):
                client.body += len(event.data)
                if client.body > MAX_BODY:
                    self._respond(client, 413, "request body too large\n", close=True)
            elif isinstance(event, h11.EndOfMessage):
                self._handle(client)
            else:  # ConnectionClosed (or PAUSED, which the cycle above rules out)
                self._close(client)
                return

    def _write(self, client: _Client) -> bool:
        """Send as much of ``out`` as the socket takes; True once it is all gone."""
        out = client.out
        while out:
            try:
                sent = client.sock.send(out)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self._close(client)
                return False
            del out[:sent]
        return True

    def _finish(self, client: _Client) -> None:
        """Everything is sent and the connection ends: FIN, then drain until EOF."""
        if client.eof:
            self._close(client)
            return
        client.closing = True
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(client)
            return
        self._set_interest(client, EVENT_READ)

    def _restart_timer(self, client: _Client) -> None:
        if client.timer is not None:
            client.timer.cancel()
        client.timer = self.loop.call_later(CLIENT_TIMEOUT, self._close, client)

    def _close(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self.clients.discard(client)
        if client.timer is not None:
            client.timer.cancel()
            client.timer = None
        if client.interest:
            self.loop.unregister(client.sock)
            client.interest = 0
        try:
            client.sock.close()
        except OSError:
            pass

    # ----------------------------------------------------------- requests
    def _respond(
        self,
        client: _Client,
        status: int,
        body: str | bytes,
        content_type: str = "text/plain; charset=utf-8",
        headers: list | None = None,
        close: bool = False,
    ) -> None:
        http = client.http
        if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self._close(client)
            return
        data = body.encode("utf-8") if isinstance(body, str) else body
        fields = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            *(headers or ()),
        ]
        if close:
            fields.append(("Connection", "close"))
        try:
            out = client.out
            reason = HTTPStatus(status).phrase.encode("ascii")
            out += http.send(h11.Response(status_code=status, headers=fields, reason=reason))
            # A response to HEAD has no body (h11 enforces it).
            if data and not (client.request is not None and client.request.method == b"HEAD"):
                out += http.send(h11.Data(data=data))
            out += http.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            # e.g. HEAD bookkeeping or a peer in an odd state: drop the client.
            log.debug("monitor: cannot respond to %s", format_peer(client.peer), exc_info=True)
            self._close(client)
            return
        if close:
            client.closing = True

    def _authorized(self, request: h11.Request) -> bool:
        if not self._token:
            return True
        given = b""
        for name, value in request.headers:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = credentials.strip()
        # Constant time, like the HELLO token check.
        return hmac.compare_digest(given, self._token)

    def _handle(self, client: _Client) -> None:
        """A complete request: route it and queue the response."""
        request = client.request
        method = request.method
        if client.body > MAX_BODY:
            return  # already answered 413
        if method not in (b"GET", b"HEAD"):
            self._respond(client, 405, "only GET and HEAD\n", headers=[("Allow", "GET, HEAD")])
            return
        if not self._authorized(request):
            self._respond(
                client, 401, "unauthorized: send Authorization: Bearer <token>\n",
                headers=[("WWW-Authenticate", 'Bearer realm="muxserver"')],
            )  # fmt: skip
            return
        parts = urlsplit(request.target.decode("ascii", "replace"))
        query = parse_qs(parts.query, keep_blank_values=True)
        path = parts.path.rstrip("/") or "/"
        snap = self.server.snapshot()
        try:
            if path == "/metrics":
                page = render_metrics(snap)
                backplane = getattr(self.server, "backplane", None)  # cluster mode
                if backplane is not None:
                    page += backplane.metrics_text()
                self._respond(client, 200, page, "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/healthz":
                if snap.shutting_down:
                    self._respond(client, 503, "draining\n")
                else:
                    self._respond(client, 200, "ok\n")
            elif path == "/connz":
                self._respond(client, 200, _json(connz(snap, query)), "application/json")
            elif path == "/roomz":
                self._respond(client, 200, _json(roomz(snap, query)), "application/json")
            elif path == "/":
                self._respond(client, 200, INDEX)
            else:
                self._respond(client, 404, "not found; see /\n")
        except BadQuery as exc:
            self._respond(client, 400, _json({"error": str(exc)}), "application/json")


def _json(doc) -> bytes:
    return (json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
