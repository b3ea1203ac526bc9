"""TCP and TLS: the raw-protocol transport, and what a fan-out server spends its care on.

* ``out`` is a plain list. The router appends the *same* bytes object to many
  transports' lists (encode once, share everywhere) and marks their sessions
  pending; there is no method call and no byte counting per recipient
  (measured: that halved fan-out throughput).
* Once per loop turn the server calls :meth:`StreamTransport.flush`: one
  ``send`` of the joined list. Only if the kernel takes less than everything
  do we keep the rest in ``chunks`` and ask the selector for EVENT_WRITE;
  write interest is dropped again when the backlog drains. A connection
  therefore costs one ``selector.modify`` when its socket fills, never one
  per message.
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

from ..framing import LENGTH, FrameDecoder
from ..loop import EVENT_READ, EVENT_WRITE

# Buffers handed to one sendmsg call; Linux's IOV_MAX is 1024.
_IOV_BATCH = 64

# "Try again later" from a plain or a TLS socket. A TLS write can want a read
# (and the other way round) only around handshakes, which TLS 1.3 and our
# server never renegotiate, so treating both as "kernel full" is enough.
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class SharedDecoder(FrameDecoder):
    """The decoder every idle connection of one ``max_frame`` shares.

    Most reads end on a frame boundary, and then a decoder holds nothing
    between reads; a connection takes a decoder of its own (``detach``) only
    while a read has ended inside a frame, and gives it back when the frame
    is complete: 64 bytes less per idle connection. Safe because the server
    is one thread and ``feed`` on an empty decoder stores state only at its
    very end, after the last check that can raise.
    """

    __slots__ = ()


_SHARED: dict[int, SharedDecoder] = {}


def shared_decoder(max_frame: int) -> SharedDecoder:
    decoder = _SHARED.get(max_frame)
    if decoder is None:
        decoder = _SHARED[max_frame] = SharedDecoder(max_frame)
    return decoder


def boundary_at_or_after(chunk: bytes, offset: int) -> int:
    """The first frame boundary of ``chunk`` (which starts on one) at or after ``offset``."""
    pos = 0
    while pos < offset:
        pos += 4 + LENGTH.unpack_from(chunk, pos)[0]
    return pos


def server_tls_context(cert: str, key: str = "") -> ssl.SSLContext:
    """Server-side TLS; raises OSError/SSLError if the files are unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key or None)
    return ctx


class StreamTransport:
    """Plain TCP and TLS (and the base of websocket.py's transport)."""

    __slots__ = (
        "sock", "decoder", "interest", "callback", "owner", "out", "chunks", "woff", "wbytes",
        "eof", "tls", "handshaking", "closed", "bytes_in", "bytes_out", "first",
    )  # fmt: skip
    # Set by a transport that needs its host after a read (websocket.py); never here.
    wants = None

    def __init__(self, sock: socket.socket, max_frame: int, sniff: bool = False) -> None:
        self.sock = sock
        self.decoder: FrameDecoder = shared_decoder(max_frame)
        self.interest = 0
        # The loop calls the transport itself; it calls ``callback(owner, mask)``.
        # One bound method shared by every connection plus this slot, instead of
        # a functools.partial per connection (256 bytes with its parts).
        self.callback = None
        self.owner = None
        self.out: list[bytes] = []
        self.chunks: deque | None = None  # unsent backlog, only while blocked
        self.woff = 0  # bytes of chunks[0] already sent
        self.wbytes = 0  # unsent bytes in chunks
        self.eof = False  # the peer closed its side
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.handshaking = self.tls  # TLS handshake still to finish
        self.closed = False
        self.bytes_in = self.bytes_out = 0
        # The first bytes while a new socket's protocol is undecided (the
        # server's sniff, protocol section 11); None once decided.
        self.first: bytearray | None = bytearray() if sniff else None

    @property
    def fd(self) -> int:
        # Asked only when interest changes; not kept: an fd int is 32 bytes.
        return self.sock.fileno()

    def __call__(self, mask: int) -> None:
        self.callback(self.owner, mask)

    # ------------------------------------------------------------ input
    def receive(self, data) -> list[tuple[int, bytes]]:
        """Complete frames in ``data`` (plus what was buffered); raises FrameError."""
        decoder = self.decoder
        frames = decoder.feed(data)
        if decoder.buffered:  # rare: the read ended inside a frame
            if type(decoder) is SharedDecoder:
                self.decoder = decoder.detach()
        elif type(decoder) is not SharedDecoder:
            self.decoder = shared_decoder(decoder.max_frame)
        return frames

    @property
    def held(self) -> int:
        """Memory of the incomplete frame waiting for the rest (input memory accounting):
        what its buffer occupies, not just the bytes in it, so the bound is the memory's."""
        decoder = self.decoder
        # Asked after every read: the shared (idle) decoder holds nothing by definition.
        return 0 if type(decoder) is SharedDecoder else decoder.allocated

    def discard_input(self) -> None:
        """Free the incomplete frame: this connection's input is no longer read."""
        if type(self.decoder) is not SharedDecoder:
            self.decoder = shared_decoder(self.decoder.max_frame)

    def drained(self, data) -> bool:
        """DRAINING: does this input end the connection? (A raw stream waits for EOF.)"""
        return False

    def more_buffered(self) -> bool:
        """TLS: decrypted bytes waiting in the SSL object raise no readiness event."""
        return self.tls and self.sock.pending() > 0

    def handshake(self) -> int:
        """Advance the TLS handshake: 0 when done, else the event it waits for.

        Raises ssl.SSLError or OSError when it fails.
        """
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return EVENT_READ
        except ssl.SSLWantWriteError:
            return EVENT_WRITE
        self.handshaking = False
        return 0

    # ---------------------------------------------------------- interest
    def set_interest(self, loop, events: int) -> None:
        """Change what the selector watches for; 0 means nothing."""
        if events == self.interest or self.closed:
            return
        if events == 0:
            loop.unregister(self.fd)
        elif self.interest == 0:
            loop.register(self.fd, events, self)
        else:
            loop.modify(self.fd, events, self)
        self.interest = events

    # ------------------------------------------------------------- output
    @property
    def pending_bytes(self) -> int:
        """Unsent output: the blocked backlog plus this turn's queue."""
        return self.wbytes + sum(map(len, self.out))

    @property
    def blocked(self) -> bool:
        """Output is waiting for the kernel (or still queued this turn)."""
        return bool(self.out or self.chunks)

    def flush(self, loop, data=None) -> int:
        """Send what ``out`` holds; return the unsent backlog in bytes.

        ``data``, when given, is ``b"".join(out)`` made once for every
        transport that queued the same frames. Raises OSError if the socket is
        dead (the caller closes it).
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
        return self.keep_unsent(loop, data, sent)

    def keep_unsent(self, loop, data: bytes, sent: int) -> int:
        """The kernel took ``sent`` bytes of ``data``, all that was queued: keep
        the rest as the backlog, wait for EVENT_WRITE; return the backlog's bytes."""
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
            sent = self.send_backlog()
            if sent < 0:
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

    def send_backlog(self) -> int:
        """One send of the backlog's head (from ``woff``) and what follows it; -1: kernel full."""
        chunks = self.chunks
        head = memoryview(chunks[0])[self.woff :]
        try:
            if self.tls:  # SSLSocket has no sendmsg
                return self.sock.send(head)
            bufs = [head]
            bufs.extend(chunks[i] for i in range(1, min(len(chunks), _IOV_BATCH)))
            return self.sock.sendmsg(bufs)
        except WOULD_BLOCK:
            return -1

    def discard_unsent(self) -> int:
        """Drop queued output, keeping the rest of a partly-sent frame.

        Returns the number of bytes thrown away.
        """
        dropped = sum(map(len, self.out))
        self.out.clear()
        chunks = self.chunks
        if chunks:
            head, woff = chunks[0], self.woff
            # Walk the first chunk's frames to the end of the one cut at woff.
            keep = head[woff : boundary_at_or_after(head, woff)]
            dropped += self.wbytes - len(keep)
            chunks.clear()
            self.woff = 0
            self.wbytes = len(keep)
            if keep:
                chunks.append(keep)
        return dropped

    # -------------------------------------------------------------- close
    def closing(self) -> None:
        """The session queued its last frame; a raw stream adds nothing (WebSocket: its Close)."""

    def half_close(self) -> None:
        """Send FIN after the last byte, keep reading (protocol section 6)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self, loop) -> None:
        if self.closed:
            return
        if self.interest:
            loop.unregister(self.fd)
            self.interest = 0
        self.closed = True
        self.out.clear()
        self.chunks = None
        self.wbytes = 0
        self.owner = None  # it refers back to the session: let refcounting free both
        try:
            self.sock.close()
        except OSError:
            pass
