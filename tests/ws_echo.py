"""A WebSocket echo server on muxserver's own loop and codec, for Autobahn (tests/test_autobahn.py).

It exists to prove the sans-I/O pieces of ``muxserver.transport.websocket``
(HttpFront, WsInbound, the hand-built outbound headers) against a real
conformance suite over real sockets, before the server itself uses them.
Unlike the real server it echoes text messages too (Autobahn's cases are
mostly text); everything else is the transport as the server will drive it:
sniff the first bytes, decide the HTTP request, then feed every read to
WsInbound and write what it says.

Closing follows section 6/11: after our Close (or the reply to the peer's)
we half-close, discard input until the peer closes or DRAIN seconds pass,
then close, so no reset eats the Close frame.

Run: ``python -m tests.ws_echo [--port N]``; prints ``ws-echo listening on HOST:PORT``.
"""

from __future__ import annotations

import argparse
import functools
import socket
import sys

from muxserver.listener import listening_socket
from muxserver.loop import EVENT_READ, EVENT_WRITE, EventLoop
from muxserver.transport.websocket import (
    OP_TEXT,
    Binary,
    Closed,
    Fail,
    HttpFront,
    Respond,
    Send,
    Text,
    Upgraded,
    WsInbound,
    binary_header,
    frame_header,
    looks_like_http,
)

READY = "ws-echo listening on "
RECV = 65536
DRAIN = 2.0
# Autobahn's 9.x cases send messages up to 16 MiB.
MAX_MESSAGE = 32 * 1024 * 1024


class _Conn:
    __slots__ = ("sock", "first", "front", "inbound", "out", "interest", "closing", "timer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.first = b""  # bytes read before the sniff could decide
        self.front: HttpFront | None = None
        self.inbound: WsInbound | None = None
        self.out = bytearray()
        self.interest = 0
        self.closing = False  # half-close once ``out`` is sent
        self.timer = None


class EchoServer:
    def __init__(self, loop: EventLoop, host: str = "127.0.0.1", port: int = 0) -> None:
        self.loop = loop
        self.lsock = listening_socket(host, port, backlog=128)
        self.address = self.lsock.getsockname()[:2]
        loop.register(self.lsock, EVENT_READ, self._on_accept)

    def _on_accept(self, _mask: int) -> None:
        for _ in range(16):
            try:
                sock, _peer = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self._interest(conn, EVENT_READ)

    def _interest(self, conn: _Conn, events: int) -> None:
        if events == conn.interest:
            return
        cb = functools.partial(self._on_event, conn)
        if conn.interest == 0:
            self.loop.register(conn.sock, events, cb)
        elif events == 0:
            self.loop.unregister(conn.sock)
        else:
            self.loop.modify(conn.sock, events, cb)
        conn.interest = events

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if mask & EVENT_WRITE:
            self._flush(conn)
        if mask & EVENT_READ and conn.sock.fileno() >= 0:
            self._on_read(conn)

    def _on_read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if conn.closing:
            if not data:
                self._close(conn)
            return  # draining: input after our Close is discarded
        if conn.inbound is not None:
            if not data:
                self._close(conn)  # EOF without a Close: the session just ends
                return
            self._ws_events(conn, conn.inbound.feed(data))
        elif conn.front is not None:
            self._decide(conn, conn.front.feed(data))
        else:
            conn.first += data
            if len(conn.first) < 4 and data:
                return
            if not looks_like_http(conn.first[:4]):
                self._close(conn)  # the raw protocol is the real server's business
                return
            conn.front = HttpFront()
            first, conn.first = conn.first, b""
            self._decide(conn, conn.front.feed(first))
        self._flush(conn)

    def _decide(self, conn: _Conn, decision) -> None:
        if isinstance(decision, Respond):
            conn.out += decision.data
            conn.closing = True
        elif isinstance(decision, Upgraded):
            conn.out += decision.data
            conn.inbound = WsInbound(MAX_MESSAGE, text=True)
            if decision.leftover:
                self._ws_events(conn, conn.inbound.feed(decision.leftover))

    def _ws_events(self, conn: _Conn, events: list) -> None:
        out = conn.out
        for ev in events:
            if isinstance(ev, Binary):
                out += binary_header(len(ev.data))
                out += ev.data
            elif isinstance(ev, Text):
                raw = ev.data.encode("utf-8")
                out += frame_header(OP_TEXT, len(raw))
                out += raw
            elif isinstance(ev, Send):
                out += ev.data
            elif isinstance(ev, Closed):
                conn.closing = True
            elif isinstance(ev, Fail):
                out += conn.inbound.close(ev.close_code, ev.reason)
                conn.closing = True

    def _flush(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            del conn.out[:sent]
        if conn.out:
            self._interest(conn, EVENT_READ | EVENT_WRITE)
            return
        self._interest(conn, EVENT_READ)
        if conn.closing and conn.timer is None:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(conn)
                return
            conn.timer = self.loop.call_later(DRAIN, self._close, conn)

    def _close(self, conn: _Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
        if conn.sock.fileno() >= 0:
            self.loop.unregister(conn.sock)
            conn.sock.close()
        conn.interest = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    loop = EventLoop()
    server = EchoServer(loop, args.host, args.port)
    print(f"{READY}{server.address[0]}:{server.address[1]}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
