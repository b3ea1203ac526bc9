"""The before-sleep flush: every connection with output this turn gets one send.

Split from server.py, which owns the connection's life; this is the one
loop over the turn's pending sessions (Redis's handleClientsWithPendingWrites):
a room's members share one joined bytes object, the output bound is checked
on what the kernel did not take, and a CLOSING session whose last bytes went
out moves on to its FIN. The plain TCP/TLS case with one queued item is
StreamTransport.flush written out inline: at one message per loop turn a
Python call per delivery was 6 % of the server's instructions
(``python -m bench.callgrind --rooms 20 2000``: 12,030 -> 11,315 per delivery).
"""

from __future__ import annotations

from .session import CLOSED, CLOSING, OPEN
from .transport.stream import WOULD_BLOCK, StreamTransport


def flush_pending(server) -> None:
    """The server's before-sleep hook: one send per pending connection."""
    max_output = server.config.max_output
    loop = server.loop
    router = server.router
    while router.pending:
        pending = router.pending
        router.pending = set()
        router.new_turn()
        # A room's members get the same frames in a turn: join them once.
        joined: dict = {}
        for sess in pending:
            state = sess.state  # nothing below changes it before the send
            if state >= CLOSED:  # or PARKED: no connection
                continue
            out = sess.out
            transport = sess.transport
            try:
                if (
                    len(out) == 1
                    and type(transport) is StreamTransport
                    and transport.chunks is None
                ):
                    # The usual case: StreamTransport.flush, inline (see above).
                    n = 1
                    data = out[0]
                    out.clear()
                    try:
                        sent = transport.sock.send(data)
                    except WOULD_BLOCK:
                        sent = 0
                    transport.bytes_out += sent
                    left = 0 if sent == len(data) else transport.keep_unsent(loop, data, sent)
                else:
                    n = len(out)
                    data = None
                    if n > 1:
                        key = (n, id(out[0]), id(out[-1]))
                        hit = joined.get(key)
                        if hit is not None and hit[0] == out:
                            data = hit[1]
                        else:
                            data = b"".join(out)
                            joined[key] = (out.copy(), data)
                    left = transport.flush(loop, data)
            except OSError:
                server.lost(sess)
                continue
            except Exception:
                server._internal_error(sess, "sending its output")
                continue
            sess.frames_out += n
            if left:
                if left > max_output and state == OPEN:
                    server.protocol.slow_consumer(sess, transport.discard_unsent())
            elif state == CLOSING:
                server._finish_output(sess)
