"""One port, two transports: the first-bytes sniff and what a WebSocket asks of the server.

Protocol section 11: a new connection's first four bytes say whether it is
the raw protocol (it goes on as a :class:`StreamTransport`) or HTTP (its
transport becomes a :class:`WebSocketTransport`, on the same socket, with the
same ``out`` list). Kept out of server.py so the glue stays small; the
server calls :func:`first_bytes` while ``transport.first`` is set and
:func:`transport_wants` when a transport left something in ``wants``.

A connection over max_connections is refused in its own transport, so the
decision waits for these bytes: raw gets ERROR LIMIT, an HTTP request 503,
a WebSocket upgrade the 101 and then ERROR LIMIT with Close 4011. It waits
:data:`REFUSE_WAIT` at most: a client that sends nothing gets the raw ERROR
LIMIT then, so a flood of silent connections past the limit holds its file
descriptors for half a second, not for the HELLO timeout.
"""

from __future__ import annotations

from . import protocol as P
from .listener import RAW, sniff
from .session import HELLO_WAIT, OPEN
from .transport.websocket import END, WebSocketTransport

REFUSE_WAIT = 0.5  # seconds an over-the-limit connection has to show its transport

_FULL = "server is full (max_connections)"


def refuse(server, sess) -> None:
    """Over max_connections: ERROR LIMIT now, or once the first bytes show the transport."""
    if sess.transport.first is None or server.shutting_down:
        server.protocol.fatal(sess, P.LIMIT, _FULL)
        return
    wait = min(REFUSE_WAIT, server.config.hello_timeout)
    server.loop.call_later(wait, _refuse_silent, server, sess)


def _refuse_silent(server, sess) -> None:
    if sess.state == HELLO_WAIT and sess.transport.first is not None:
        server.protocol.fatal(sess, P.LIMIT, _FULL)  # nothing came: the raw protocol


def first_bytes(server, sess, data):
    """Buffer until 4 bytes decide; then (transport, bytes to decode); bytes None: not yet."""
    transport = sess.transport
    transport.first += data
    kind = sniff(transport.first)
    if kind is None:
        return transport, None
    data, transport.first = bytes(transport.first), None
    if kind == RAW:
        if not sess.counted:  # over max_connections (Server.attach)
            server.protocol.fatal(sess, P.LIMIT, _FULL)
            return transport, None
        return transport, data
    cfg = server.config
    origins = [o for o in cfg.allowed_origins.split(",") if o.strip()]
    sess.transport = WebSocketTransport.take_over(
        transport, allowed_origins=origins, web=cfg.web, full=not sess.counted
    )
    return sess.transport, data


def transport_wants(server, sess, transport) -> None:
    """After a read: a flush (the 101, a Pong), a close without ERROR, or a fatal ERROR."""
    wants, transport.wants = transport.wants, None
    server.router.pending.add(sess)
    if sess.state > OPEN:
        return
    if wants == END:
        if transport.inbound is not None:
            transport.end_by_transport()
        # A Close without BYE ends the session like EOF (section 11), and EOF
        # parks a session that may resume (section 10): a phone's browser
        # whose socket died comes back as the same session.
        sess = server.protocol.release(sess)
        server.router.pending.add(sess)
        server.protocol.begin_close(sess)
    elif isinstance(wants, tuple):
        server.protocol.fatal(sess, *wants)
