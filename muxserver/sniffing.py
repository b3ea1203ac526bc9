"""One port, two transports: the first-bytes sniff and what a WebSocket asks of the server.

Protocol section 11: a new connection's first four bytes say whether it is
the raw protocol (it goes on as a :class:`StreamTransport`) or HTTP (its
transport becomes a :class:`WebSocketTransport`, on the same socket, with the
same ``out`` list). Kept out of server.py so the glue stays small; the
server calls :func:`first_bytes` while ``transport.first`` is set and
:func:`transport_wants` when a transport left something in ``wants``.

A connection over max_connections is refused in its own transport, so the
decision waits for these bytes: raw gets ERROR LIMIT, an HTTP request 503,
a WebSocket upgrade the 101 and then ERROR LIMIT with Close 4011.
"""

from __future__ import annotations

from . import protocol as P
from .listener import RAW, sniff
from .session import OPEN
from .transport.websocket import END, WebSocketTransport


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
            server.protocol.fatal(sess, P.LIMIT, "server is full (max_connections)")
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
        server.protocol.detach(sess)
        server.protocol.begin_close(sess)
    elif isinstance(wants, tuple):
        server.protocol.fatal(sess, *wants)
