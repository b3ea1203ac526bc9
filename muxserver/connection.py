"""One client connection: its socket, its frame decoder, its output queue.

It knows nothing of rooms or frames' meaning. What it owns is the output
side, which is where a fan-out server spends its care:

* ``out`` is a plain list. Handlers append the *same* bytes object to many
  connections' lists (encode once, share everywhere) and add the connection
  to the server's pending set; there is no method call and no byte counting
  per recipient (measured: that halved fan-out throughput).
* Once per loop turn the server calls :meth:`flush`: one ``send`` of the
  joined list. Only if the kernel takes less than everything do we keep the
  rest in ``chunks`` and ask the selector for EVENT_WRITE; write interest is
  dropped again when the backlog drains. A connection therefore costs one
  ``selector.modify`` when its socket fills, never one per message.
* The backlog is measured at flush time; the caller compares it with the
  output bound. The bound can be overshot by one turn's worth of input,
  which is the price of not counting per message.
* Each chunk in ``chunks`` starts on a frame boundary, so when a slow
  consumer's backlog is thrown away the partly-sent frame at the front can
  still be finished (the stream stays whole) by walking that one chunk.
"""

from __future__ import annotations

import socket
import ssl
from collections import deque

from .framing import LENGTH, FrameDecoder
from .loop import EVENT_READ, EVENT_WRITE

# Connection states, in the order a connection moves through them.
HELLO_WAIT = 0  # connected, no HELLO yet
OPEN = 1  # past HELLO: a member of a namespace
CLOSING = 2  # error or BYE queued: flushing the last output, input discarded
DRAINING = 3  # FIN sent: reading and discarding until EOF or drain_timeout
CLOSED = 4

# Buffers handed to one sendmsg call; Linux's IOV_MAX is 1024.
_IOV_BATCH = 64

# "Try again later" from a plain or a TLS socket. A TLS write can want a read
# (and the other way round) only around handshakes, which TLS 1.3 and our
# server never renegotiate, so treating both as "kernel full" is enough.
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Connection:
    __slots__ = (
        # transport
        "sock", "fd", "id", "peer", "decoder", "state", "interest", "callback",
        "out", "chunks", "woff", "wbytes", "eof", "close_timer",
        "connected_at", "last_rx", "last_ping", "counted", "tls", "handshaking",
        "tokens", "tokens_at",
        # session fields, owned by the hub (see hub.Member) and the server
        "nick", "ns", "rooms", "prefix_room", "prefix_direct", "prefix_bcast",
        # counters for monitoring: plain integers, summed when scraped
        "frames_in", "frames_out", "bytes_in", "bytes_out",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, conn_id: int, peer, max_frame: int, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.id = conn_id
        self.peer = peer
        self.decoder = FrameDecoder(max_frame)
        self.state = HELLO_WAIT
        self.interest = 0
        self.callback = None
        self.out: list[bytes] = []
        self.chunks: deque | None = None  # unsent backlog, only while blocked
        self.woff = 0  # bytes of chunks[0] already sent
        self.wbytes = 0  # unsent bytes in chunks
        self.eof = False
        self.counted = False  # held against max_connections
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.handshaking = self.tls  # TLS handshake still to finish
        self.tokens = 0.0  # rate-limit bucket, filled by the server
        self.tokens_at = now
        self.close_timer = None
        self.connected_at = now
        self.last_rx = now
        self.last_ping = now
        self.nick = ""
        self.ns = None
        self.rooms: dict = {}
        self.prefix_room = self.prefix_direct = self.prefix_bcast = b""
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = 0

    def __repr__(self) -> str:
        return f"<Connection #{self.id} {self.nick or '-'} state={self.state}>"

    # ---------------------------------------------------------- interest
    def set_interest(self, loop, events: int) -> None:
        """Change what the selector watches for; 0 means nothing."""
        if events == self.interest:
            return
        if events == 0:
            loop.unregister(self.sock)
        elif self.interest == 0:
            loop.register(self.sock, events, self.callback)
        else:
            loop.modify(self.sock, events, self.callback)
        self.interest = events

    # ------------------------------------------------------------- output
    @property
    def pending_bytes(self) -> int:
        """Unsent output: the blocked backlog plus this turn's queue."""
        return self.wbytes + sum(map(len, self.out))

    def flush(self, loop, data=None) -> int:
        """Send what ``out`` holds; return the unsent backlog in bytes.

        Raises OSError if the socket is dead (the caller closes it).
        """
        out = self.out
        if self.chunks is not None:
            # Kernel buffer was full last time: queue behind the backlog and
            # wait for EVENT_WRITE rather than trying a send that would fail.
            if out:
                if data is None:
                    data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                self.chunks.append(data)
                self.wbytes += len(data)
            return self.wbytes
        if not out:
            return 0
        if data is None:
            data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        try:
            sent = self.sock.send(data)
        except WOULD_BLOCK:
            sent = 0
        self.bytes_out += sent
        if sent == len(data):
            return 0
        self.chunks = deque((data,))
        self.woff = sent
        self.wbytes = len(data) - sent
        self.set_interest(loop, self.interest | EVENT_WRITE)
        return self.wbytes

    def on_writable(self, loop) -> int:
        """Send backlog until the kernel is full again; return what is left.

        Raises OSError if the socket is dead.
        """
        chunks = self.chunks
        while chunks:
            head = memoryview(chunks[0])[self.woff :]
            try:
                if self.tls:  # SSLSocket has no sendmsg
                    sent = self.sock.send(head)
                else:
                    bufs = [head]
                    bufs.extend(chunks[i] for i in range(1, min(len(chunks), _IOV_BATCH)))
                    sent = self.sock.sendmsg(bufs)
            except WOULD_BLOCK:
                break
            self.bytes_out += sent
            self.wbytes -= sent
            sent += self.woff
            while chunks and sent >= len(chunks[0]):
                sent -= len(chunks.popleft())
            self.woff = sent
            if sent:
                break  # partial: the kernel buffer is full again
        if not chunks:
            self.chunks = None
            self.woff = 0
            self.set_interest(loop, self.interest & ~EVENT_WRITE)
        return self.wbytes

    def discard_unsent(self) -> int:
        """Drop queued output, keeping the rest of a partly-sent frame.

        Returns the number of bytes thrown away.
        """
        dropped = sum(map(len, self.out))
        self.out.clear()
        chunks = self.chunks
        if chunks:
            head, woff = chunks[0], self.woff
            keep = b""
            if woff:
                # Walk this chunk's frames to the end of the one cut at woff.
                pos = 0
                while pos < woff:
                    pos += 4 + LENGTH.unpack_from(head, pos)[0]
                keep = head[woff:pos]
            dropped += self.wbytes - len(keep)
            chunks.clear()
            self.woff = 0
            self.wbytes = len(keep)
            if keep:
                chunks.append(keep)
        return dropped

    # -------------------------------------------------------------- close
    def half_close(self) -> None:
        """Send FIN after the last byte, keep reading (protocol section 6)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self, loop) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if self.interest:
            loop.unregister(self.sock)
            self.interest = 0
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.out.clear()
        self.chunks = None
        self.wbytes = 0
        self.callback = None  # it refers back to us: let refcounting free us now
        try:
            self.sock.close()
        except OSError:
            pass


__all__ = [
    "CLOSED", "CLOSING", "DRAINING", "EVENT_READ", "EVENT_WRITE", "HELLO_WAIT", "OPEN",
    "WOULD_BLOCK", "Connection",
]  # fmt: skip
