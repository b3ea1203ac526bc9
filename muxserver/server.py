"""The server: glue between the loop, the listener, transports, sessions and the router.

Nothing here knows a byte offset or a protocol rule: those live in the codec
(framing.py, protocol.py) and in session.py. What this module owns is the
life of a connection and the shape of one loop turn:

1. ``select`` says which sockets are readable; each gets *one* ``recv_into``
   of the shared read buffer (capping what a flooding client takes per
   turn); its transport decodes the frames, its session handles them.
2. Handlers never send. The router appends finished frame bytes to the
   recipients' ``out`` lists and puts them in ``pending``.
3. Right before the next ``select`` (a before-sleep hook), every pending
   connection is flushed with one send; the output bound is checked there.

A bug in handling one connection (any exception but the peer's protocol
error) is logged with its traceback, counted, and closes that connection.
"""

from __future__ import annotations

import logging
import socket
import ssl

from . import protocol as P
from . import sniffing
from .config import Config
from .framing import FrameError
from .hub import Hub
from .limits import InputLimits
from .listener import Listener
from .loop import EVENT_READ, EVENT_WRITE, EventLoop
from .output import flush_pending
from .router import Router
from .session import CLOSED, CLOSING, DRAINING, HELLO_WAIT, OPEN, Session, SessionProtocol
from .stats import Snapshot, new_counters, take_snapshot, waiting_for
from .transport.stream import WOULD_BLOCK, StreamTransport, server_tls_context

log = logging.getLogger("muxserver")

READ_CHUNK = 256 * 1024  # most bytes taken from one connection per turn


class Server:
    def __init__(self, config: Config, loop: EventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or EventLoop()
        self.hub = Hub(max_rooms=config.max_rooms)
        self.router = Router()
        self.stats = new_counters()  # plain ints, read when scraped
        self.protocol = SessionProtocol(config, self.hub, self.router, self.loop, self, self.stats)
        self.limits = InputLimits(config, self.protocol, self.stats)
        self.sessions: dict[int, Session] = {}  # conn id -> session
        self._close_timers: dict = {}  # session -> close timer (closing ones only)
        self.listeners: list[Listener] = []
        self.address: tuple[str, int] | None = None
        self.shutting_down = False
        self._next_id = 0
        self._live = 0  # connections counted against max_connections
        self._rbuf = bytearray(READ_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._tls = server_tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        self._shutdown_deadline = 0.0
        # Closed connections' frames in/out, bytes in/out: totals never go down.
        self.closed_totals = [0, 0, 0, 0]
        self.loop.add_before_sleep(self.flush)
        self._on_event_shared = self._on_event  # one bound method for every transport

    # =============================================================== start
    def start(self) -> tuple[str, int]:
        """Bind and listen; returns the (host, port) actually bound."""
        cfg = self.config
        listener = Listener(self.loop, cfg.host, cfg.port, self.adopt, reuse_port=cfg.reuse_port)
        self.listeners.append(listener)
        self.address = listener.address
        listener.start()
        self._sweep_interval = max(
            0.01, min(1.0, cfg.ping_interval / 4, cfg.ping_timeout / 4, cfg.hello_timeout / 4)
        )
        self.loop.call_later(self._sweep_interval, self._sweep)
        return self.address

    def run(self) -> None:
        self.loop.run()

    def snapshot(self) -> Snapshot:
        return take_snapshot(self)

    # ============================================================== accept
    def adopt(self, sock: socket.socket, peer=None) -> Session:
        """Take over a connected socket (accepted, or a socketpair in tests)."""
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            # The handshake runs on the loop like any other I/O (see
            # _handshake); the accept path never blocks on a slow client.
            sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        # sniff: raw or HTTP, the first bytes decide (sniffing.py)
        return self.attach(StreamTransport(sock, self.config.max_frame, sniff=True), peer)

    def attach(self, transport, peer=None) -> Session:
        """A new session over ``transport`` (a socket's, or an in-memory one in tests)."""
        self._next_id += 1
        sess = Session(self._next_id, transport, peer, self.loop.now)
        transport.callback, transport.owner = self._on_event_shared, sess
        transport.set_interest(self.loop, EVENT_READ)
        self.sessions[sess.id] = sess
        self.stats["accepted"] += 1
        if self._live >= self.config.max_connections or self.shutting_down:
            self.stats["refused_limit"] += 1
            sniffing.refuse(self, sess)  # ERROR LIMIT in its own transport (section 11)
            return sess
        # Counted until its socket is closed: a closing connection still
        # holds a file descriptor.
        sess.counted = True
        self._live += 1
        log.debug("connect #%d from %s", sess.id, peer, extra={"conn": sess.id, "peer": peer})
        return sess

    # ============================================================== events
    def _on_event(self, sess: Session, mask: int) -> None:
        try:
            transport = sess.transport
            if transport.handshaking:
                self._handshake(sess)
                return
            if mask & EVENT_WRITE and sess.state != CLOSED:
                self._on_writable(sess)
            if mask & EVENT_READ and sess.state != CLOSED:
                self._on_readable(sess)
        except Exception:
            self._internal_error(sess, "handling its input")

    def _internal_error(self, sess: Session, doing: str) -> None:
        """Our bug, not the peer's: contain it to this one connection."""
        self.stats["internal_errors"] += 1
        log.exception(
            "internal error while %s for #%d %s; closing it", doing, sess.id, sess.nick or "-",
            extra={"conn": sess.id, "peer": sess.peer, "reason": "INTERNAL_ERROR"},
        )  # fmt: skip
        try:
            if sess.state in (OPEN, HELLO_WAIT):
                self.protocol.detach(sess)
        except Exception:
            log.exception("internal error while detaching #%d", sess.id)
            sess.ns = None
        sess.state = DRAINING  # _close must not detach again
        try:
            self._close(sess)
        except Exception:  # the containment itself must never stop the loop
            log.exception("internal error while closing #%d", sess.id)
            self.sessions.pop(sess.id, None)

    def _on_writable(self, sess: Session) -> None:
        transport = sess.transport
        before = transport.wbytes
        try:
            left = transport.on_writable(self.loop)
        except OSError:
            self._close(sess)
            return
        if sess.state == CLOSING:
            if not left and not transport.out:
                self._finish_output(sess)
            elif left < before and not self.shutting_down:
                # A slow reader still reading: its grace counts from its last
                # progress, so its ERROR is not cut off while it reads.
                self._restart_close_timer(sess, self.config.drain_timeout)

    def _handshake(self, sess: Session) -> None:
        """Advance a non-blocking TLS handshake by whatever the socket allows."""
        transport = sess.transport
        if sess.state != HELLO_WAIT:
            # Refused or timed out mid-handshake: no TLS session to send an ERROR in.
            self._close(sess)
            return
        try:
            wanted = transport.handshake()
        except (ssl.SSLError, OSError) as exc:
            # A plain-TCP client, a wrong certificate, a scanner: close it quietly.
            self.stats["refused_tls_handshake"] += 1
            log.info(
                "TLS handshake failed for #%d from %s: %s", sess.id, sess.peer, exc,
                extra={"conn": sess.id, "peer": sess.peer, "reason": "TLS_HANDSHAKE"},
            )  # fmt: skip
            self._close(sess)
            return
        transport.set_interest(self.loop, wanted or EVENT_READ)
        if not wanted and transport.more_buffered():
            self.loop.call_later(0, self._read_again, transport)

    def _read_again(self, transport) -> None:
        """TLS: buffered bytes get no readiness event; the connection's owner *now* (resumes move it)."""
        if (sess := transport.owner) is not None and sess.state != CLOSED:
            self._on_event(sess, EVENT_READ)

    def _on_readable(self, sess: Session) -> None:
        transport = sess.transport
        try:
            n = transport.sock.recv_into(self._rbuf)
        except WOULD_BLOCK:
            return
        except OSError:
            n = 0  # reset: lost, like end of stream
        if n == 0:
            self.lost(sess)
            return
        self.received(sess, self._rview[:n])
        sess = sess.successor or sess
        # transport.tls first: a plain socket's read pays no call for this.
        if (
            transport.tls
            and sess.state <= OPEN
            and sess.deferred is None
            and transport.more_buffered()
        ):
            self.loop.call_later(0, self._read_again, transport)

    def received(self, sess: Session, data) -> None:
        """Bytes from the peer: decode them and let the session handle the frames."""
        transport = sess.transport
        transport.bytes_in += len(data)
        sess.last_rx = self.loop.now
        if sess.state > OPEN:
            # CLOSING / DRAINING: input is thrown away (a WebSocket's Close ends the drain).
            if sess.state == DRAINING and transport.drained(data):
                self._close(sess)
            return
        try:
            if transport.first is not None:  # sniffing may make it a WebSocket
                transport, data = sniffing.first_bytes(self, sess, data)
                if data is None:
                    return
            try:
                frames = transport.receive(data)
                error = None
            except FrameError as exc:
                frames, error = exc.frames, exc
            self.protocol.receive(sess, frames, error)
            sess = sess.successor or sess  # a HELLO that resumed hands the connection over
            if transport.wants is not None:
                sniffing.transport_wants(self, sess, transport)
            self.limits.after_read(sess, bool(frames), self.loop.now)
        except Exception:
            self._internal_error(sess.successor or sess, "handling its input")

    def writable(self, sess: Session) -> None:
        """The kernel has room again (EVENT_WRITE, or an in-memory peer that read)."""
        self._on_event(sess, EVENT_WRITE)

    def lost(self, sess: Session) -> None:
        """The peer closed (or reset) its side."""
        if sess.state in (OPEN, HELLO_WAIT):
            log.debug(
                "disconnect #%d %s from %s", sess.id, sess.nick, sess.peer,
                extra={"conn": sess.id, "peer": sess.peer, "nick": sess.nick, "reason": "peer closed"},
            )  # fmt: skip
            sess = self.protocol.release(sess)
        transport = sess.transport
        if sess.state == CLOSING and transport.blocked:
            # Peer half-closed but may still read: finish sending, then close.
            transport.eof = True
            transport.set_interest(self.loop, transport.interest & ~EVENT_READ)
            return
        self._close(sess)

    # ======================================================= output, limits
    def flush(self) -> None:
        """Before-sleep hook: one send per pending connection (output.py)."""
        flush_pending(self)

    # ============================================================= closing
    def closing(self, sess: Session) -> None:
        """SessionProtocol's host hook: its last frame is queued; close once it is sent."""
        sess.transport.closing()
        timeout = self.config.drain_timeout
        if self.shutting_down:
            timeout = max(0.0, self._shutdown_deadline - self.loop.time())
        self._restart_close_timer(sess, timeout)

    def _restart_close_timer(self, sess: Session, timeout: float) -> None:
        self._cancel_close_timer(sess)
        self._close_timers[sess] = self.loop.call_later(timeout, self._close, sess)

    def _cancel_close_timer(self, sess: Session) -> None:
        timer = self._close_timers.pop(sess, None)
        if timer is not None:
            timer.cancel()

    def _finish_output(self, sess: Session) -> None:
        """Everything is sent: FIN, then discard input until EOF or timeout."""
        transport = sess.transport
        if transport.eof:
            self._close(sess)
            return
        transport.half_close()
        sess.state = DRAINING
        transport.set_interest(self.loop, EVENT_READ)

    def _close(self, sess: Session) -> None:
        if sess.state == CLOSED:
            return
        if sess.state in (OPEN, HELLO_WAIT):
            sess = self.protocol.release(sess)
        sess.state = CLOSED
        self._cancel_close_timer(sess)
        transport = sess.transport
        transport.close(self.loop)
        self.limits.closed(sess)
        self.sessions.pop(sess.id, None)
        these = (sess.frames_in, sess.frames_out, transport.bytes_in, transport.bytes_out)
        self.closed_totals = [a + b for a, b in zip(self.closed_totals, these, strict=True)]
        if sess.counted:
            self._live -= 1
        if self.shutting_down and not self.sessions:
            self.loop.stop()

    # ============================================================ liveness
    def _sweep(self) -> None:
        """Periodic timer: heartbeats, idle timeouts, HELLO timeouts (session.py's rules)."""
        self.protocol.sweep(list(self.sessions.values()), (now := self.loop.time()))
        self.limits.sweep(now)
        if not self.shutting_down:
            self.loop.call_later(self._sweep_interval, self._sweep)

    # ============================================================ shutdown
    def begin_shutdown(self) -> None:
        """Stop accepting; flush; ERROR SHUTTING_DOWN to everyone; stop the loop."""
        if self.shutting_down:
            return
        drain = self.config.drain_timeout
        log.info(
            "shutting down: waiting for %s up to %g s", waiting_for(self.sessions.values()), drain
        )
        self.shutting_down = True
        self._shutdown_deadline = self.loop.time() + drain
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()
        # No PRESENCE storm on the way out: everyone is leaving at once, so
        # take them all out of the hub first, then queue the errors.
        for sess in self.sessions.values():
            if sess.state in (OPEN, HELLO_WAIT):
                sess.ns = None
        self.hub.namespaces.clear()
        for sess in list(self.sessions.values()):
            if sess.state in (OPEN, HELLO_WAIT):
                self.protocol.fatal(sess, P.SHUTTING_DOWN, "server is shutting down")
            elif sess in self._close_timers:
                self._restart_close_timer(sess, drain)
        self.loop.call_later(drain, self._force_stop)
        if not self.sessions:
            self.loop.stop()

    def _force_stop(self) -> None:
        for sess in list(self.sessions.values()):
            self._close(sess)
        self.loop.stop()

    def close(self) -> None:
        """Release every socket (after the loop has stopped)."""
        for sess in list(self.sessions.values()):
            sess.state = CLOSED
            sess.transport.close(self.loop)
        self.sessions.clear()
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()
