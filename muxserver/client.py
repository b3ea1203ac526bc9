"""Blocking client for muxserver; also the public home of every client name.

Programs (bots, tests, the Locust users, ``muxchat``) should not hand-roll
sockets and ``struct`` calls to talk to muxserver. This module reuses
:mod:`muxserver.framing` and :mod:`muxserver.protocol`, so the project keeps
one codec. What it shares with :mod:`muxserver.aio` lives in
:mod:`muxserver.clientcore` and :mod:`muxserver.clienttypes`, re-exported
here: import it all from ``muxserver.client``.

Decisions worth knowing:

* The blocking client uses plain sockets, ``select.poll`` and a
  ``threading.Lock``, all looked up when used: by default no threads of its
  own, so it runs unchanged under gevent monkey-patching (``ssl`` included).
  The price is that server PINGs are answered only while the program is
  inside a client call, so a program must call ``recv``/``poll``/
  ``run_forever`` (or make any request) at least once per ``ping_interval +
  ping_timeout`` (45 s by default) or the server cuts it with IDLE_TIMEOUT.
  ``heartbeat=True`` lifts that (muxserver/heartbeat.py).
* One greenlet (or thread) may read while others send EMITs that wait for
  nothing (``ack=False``, or ``ack=True, wait=False``): the Locust users'
  pattern. Three things make that safe. The socket's timeout is set once, to
  ``timeout``, and bounds writes only: a read with a deadline first waits
  for readability with ``poll``, a read without one retries on timeout, so a
  reader never changes the timeout under a concurrent ``send`` (a zero
  timeout there failed it with BlockingIOError). Every frame is written
  whole under a write lock, so a PONG written by the reader never lands in
  the middle of another frame. And a call that would read while another
  greenlet reads -- a failed send looking for the server's last ERROR, a due
  reconnect, ``close`` waiting for the FIN -- leaves that to the reader.
* With TLS, every read also drains what the SSL object has already
  decrypted, so a caller that selects on :attr:`Client.sock` never sleeps
  while a message sits in user space where the selector cannot see it.
* Reconnecting is lazy and single-threaded. A lost connection is noticed by
  whichever call is running, which raises :class:`ConnectionClosed`;
  ``recv``/``poll``/``run_forever`` instead wait out the backoff and
  reconnect by themselves. A request made while the next attempt is not yet
  due raises :class:`NotConnected`: nothing is dropped quietly.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections import deque
from typing import Any, NoReturn

from . import protocol as P
from .clientcore import (
    _UNSET,
    CLOSE_LINGER,
    ERRORS,  # noqa: F401 (re-exported: importable from here as before the split)
    PERMANENT,  # noqa: F401
    RECV_SIZE,
    Ack,
    AuthFailed,
    Backoff,
    BadFrame,
    ConnectionClosed,
    Event,
    IdleTimeout,
    InvalidName,
    Limit,
    Listing,
    MuxError,
    NickTaken,
    NoSuchTarget,
    NotConnected,
    NotHello,
    NotMember,
    Presence,
    RateLimited,
    Recovery,
    Replaced,
    RoomInfo,
    ShuttingDown,
    SlowConsumer,
    TooLarge,
    Unavailable,
    UnknownType,
    UnsupportedVersion,
    _Call,
    _Core,
    _why,
    error_for,
)
from .heartbeat import Heartbeat

__all__ = [
    "Ack", "AuthFailed", "Backoff", "BadFrame", "Client", "ConnectionClosed", "Event", "IdleTimeout",
    "InvalidName", "Limit", "Listing", "MuxError", "NickTaken", "NoSuchTarget", "NotConnected",
    "NotHello", "NotMember", "Presence", "RateLimited", "Recovery", "Replaced", "RoomInfo", "ShuttingDown",
    "SlowConsumer", "TooLarge", "Unavailable", "UnknownType", "UnsupportedVersion", "connect",
    "error_for",
]  # fmt: skip

# Reads that mean "nothing yet", not "connection lost": a timeout, or the
# EAGAIN of a socket a program made non-blocking (an SSLSocket raises
# SSLWant*Error, an OSError, where a plain one raises BlockingIOError).
_NOTHING_YET = (TimeoutError, BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError)  # fmt: skip
# A send that made no progress yet but may: wait for the socket, do not fail.
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _ready(sock: socket.socket, events: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``events`` (or EOF, or an error) on ``sock``.

    poll, not select: select cannot watch a file descriptor over 1023, and a
    Locust process holds thousands. Looked up at each call, so a gevent
    program gets gevent's poll, which blocks only the calling greenlet.
    """
    timeout = max(0.0, timeout)
    if not hasattr(select, "poll"):  # Windows
        watch = ([sock], [], []) if events & select.POLLIN else ([], [sock], [])
        return any(select.select(*watch, timeout))
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(timeout * 1000))


def _shutdown(sock: socket.socket) -> None:
    """Shut both directions down, waking whoever is blocked reading ``sock``.

    socket.socket's shutdown (gevent's when patched), not SSLSocket's, which
    would also drop the TLS state a reader may still decrypt the rest with.
    """
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


# ======================================================= blocking client
class Client(_Core):
    """A blocking muxserver client: ``Client.connect(...)``, or ``with Client(...) as c:``.

    ``Client(...)`` takes :meth:`connect`'s arguments and connects in
    :meth:`open` or on entering ``with``, so handlers can be registered first.
    One thread or greenlet at a time reads: it calls ``recv``/``poll``/
    ``run_forever`` or any request that waits for its answer. Others may
    meanwhile call ``emit`` without ``ack`` or with ``ack=True, wait=False``
    (their answers reach the reader), and ``close``. Otherwise use one client
    per thread or greenlet.
    """

    def __init__(self, *args, heartbeat: bool | float = False, **kwargs) -> None:
        # Same arguments as connect() (documented there), kept in one place:
        # _Core.__init__.
        super().__init__(*args, **kwargs)
        self._heartbeat = Heartbeat.check(heartbeat)
        self._hb: Heartbeat | None = None
        self._last_send = time.monotonic()  # read by the heartbeat
        self._opened = False
        self._sock: socket.socket | None = None
        self._inbox: deque = deque()
        self._pongs: set[int] = set()
        self._retry_at: float | None = None  # monotonic time of the next attempt
        # threading.Lock is gevent's when monkey-patched: it then yields.
        self._wlock = threading.Lock()  # one frame at a time on the wire
        self._reader: int | None = None  # threading.get_ident() of the caller inside a read
        # Set by a send that failed while another greenlet was reading: that
        # reader reports it when it sees the end of the connection.
        self._broken: ConnectionClosed | None = None

    @classmethod
    def connect(cls, *args, **kwargs) -> Client:
        """Connect and complete HELLO/WELCOME: ``Client(*args, **kwargs).open()``.

        Arguments (one list, kept in ``_Core.__init__``): ``host``, ``port``,
        ``nick``, ``namespace``, ``token``, ``timeout``; keywords
        ``reconnect=True``, ``backoff``, ``tls``, ``ca``, ``version``,
        ``sequenced=True`` and, for this client, ``heartbeat``.

        ``reconnect`` re-establishes a lost connection with ``backoff``, rooms
        re-joined (sequenced ones from :attr:`positions`); ``version`` is the
        protocol version to ask for; ``sequenced`` the default of ``join``;
        ``heartbeat``
        (True, or seconds) keeps the connection alive from a background thread
        (muxserver/heartbeat.py). A port outside 0..65535 raises ValueError.

        With ``tls`` (or ``ca``, a PEM file of CAs to trust instead of the
        system's) the connection is TLS and the server's certificate must be
        valid for ``host``. Raises OSError if the server cannot be reached
        (``ssl.SSLError`` if the TLS handshake fails, e.g. an untrusted
        certificate) and a ConnectionClosed subclass if it refuses the HELLO
        (e.g. NickTaken, AuthFailed). The first connection is never retried,
        even with ``reconnect=True``.
        """
        client = cls(*args, **kwargs)
        client.open()
        return client

    def open(self) -> Client:
        """Connect as :meth:`connect` does, then call the ``on("connect")`` handlers; once."""
        if self._opened:
            raise RuntimeError("this client has been opened already")
        self._opened = True
        self._open()
        self._up = True
        if self._heartbeat:
            self._hb = Heartbeat(self, self._heartbeat)
            self._hb.start()
        for fn in list(self._connect_handlers):
            fn()
        return self

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def sock(self) -> socket.socket | None:
        """The current socket (None while disconnected), for callers with their own selector."""
        return self._sock

    def __enter__(self) -> Client:
        if not self._opened:
            self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------- requests
    def join(self, room: str, presence: bool = False, *, sequenced: bool | None = None,
             history: int = 0) -> Recovery | None:  # fmt: skip
        """Join ``room``; with ``presence`` receive Presence for it.

        Version 2 joins *sequenced* (section 9) unless ``sequenced=False`` (or
        ``Client(sequenced=False)``): events carry ``seq``, a reconnect catches
        up, and this returns the :class:`Recovery` (None for a plain join).
        ``history=N`` first replays the latest N messages (``replayed``).
        """
        return self._request(self._join_call(room, presence, sequenced, history))

    def leave(self, room: str) -> None:
        self._request(self._leave_call(room))

    def set_nick(self, nick: str) -> None:
        self._request(self._nick_call(nick))

    def emit(
        self,
        event: str,
        data: Any = b"",
        room: str | None = None,
        *,
        nick: str | None = None,
        broadcast: bool = False,
        echo: bool = False,
        ack: bool = False,
        wait: bool = True,
        to: Any = _UNSET,
    ) -> int | None:
        """Send an event to a ``room``, one person (``nick``) or the namespace (``broadcast``).

        ``data`` is bytes (binary), str (text) or a JSON value (dict, list,
        number, bool, None); on a version-2 session the receiver gets the
        same kind of value back as ``event.data``. ``to=`` raises TypeError
        naming ``room=`` and ``nick=`` (it is ambiguous between them).

        With ``ack`` waits for the REPLY and returns the recipient count (an
        error raises here). With ``ack=True, wait=False`` returns the request
        id as soon as the EMIT is written, without reading (nor reconnecting:
        while disconnected it raises NotConnected): the answer comes later
        through ``recv``/``poll`` as an :class:`Ack` (``on_ack``) or, if
        refused, as its error with ``.req`` set (``on_error``). Without
        ``ack`` returns None at once, and an error arrives later (``.req`` 0).
        """
        call = self._emit_call(event, data, room, nick, broadcast, echo, ack, to)
        if ack and not wait:
            return self._send_nowait(call)
        return self._request(call)

    def who(self, room: str) -> Listing:
        """Nicks in ``room`` in join order (``.total`` is the full count)."""
        return self._request(self._who_call(room))

    def rooms(self, all: bool = False) -> Listing:
        """RoomInfo(name, members) for my rooms, or every room of my namespace."""
        return self._request(self._rooms_call(all))

    def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        self._ensure()
        nonce, frame = self._ping_frame()
        start = time.monotonic()
        deadline = start + self.timeout
        self._send(frame)
        while nonce not in self._pongs:
            if not self._pump(deadline):
                raise TimeoutError(f"no PONG within {self.timeout:g} s")
        self._pongs.discard(nonce)
        return time.monotonic() - start

    def close(self) -> None:
        """Say BYE and close. Idempotent; a closed client never reconnects.

        Called while another greenlet reads (``run_forever``, say), it sends
        BYE and returns; that reader then reads to the server's FIN, closes
        the socket and stops (``run_forever`` returns, ``recv`` raises
        NotConnected).
        """
        if self._closed:
            return
        self._closed = True
        self._retry_at = None
        if self._hb is not None:
            self._hb.stop()
        sock = self._sock
        if sock is not None and self._up:
            self._up = False
            try:
                with self._wlock:
                    self._send_all(sock, P.encode(P.Bye()))
                if self._reading_elsewhere():
                    return  # the server closes after BYE: that reader sees it
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self._linger(sock)
        self._drop()

    def _linger(self, sock: socket.socket) -> None:
        """After BYE, read (and drop) what comes until the server's FIN.

        Closing with unread input would make the kernel reset the connection
        instead of ending it cleanly.
        """
        deadline = time.monotonic() + CLOSE_LINGER
        with contextlib.suppress(OSError):
            while (left := deadline - time.monotonic()) > 0 and _ready(sock, select.POLLIN, left):
                if not sock.recv(RECV_SIZE):
                    break

    # --------------------------------------------------------- receiving
    def recv(self, timeout: float | None = None) -> Event | Presence | Ack | Recovery | None:
        """The next Event, Presence, Ack or Recovery; None if ``timeout`` seconds pass first.

        An Ack answers ``emit(..., ack=True, wait=False)``, a Recovery a
        re-join after a reconnect or a GAP in a replay (not ``join()``'s). A
        sequenced Event counts as handled (:attr:`positions`) once returned.
        Raises an error that arrived for an EMIT sent without ack or without
        waiting, and ConnectionClosed when the connection ends (with
        ``reconnect`` on, it reconnects instead and keeps waiting).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._wait_input(deadline):
            item = self._for_recv(self._inbox.popleft())
            if item is not None:
                return item
        return None

    def poll(self, timeout: float | None = 0.0) -> int:
        """Dispatch what has arrived to the handlers, waiting up to ``timeout`` for something.

        Returns how many items were dispatched.
        """
        if not self._wait_input(None if timeout is None else time.monotonic() + timeout):
            return 0
        count = 0
        while self._inbox and not self._closed:
            item = self._seq.take(self._inbox.popleft())
            if item is None:  # a duplicate of a sequenced message handled already
                continue
            count += 1
            for fn in self._handlers_for(item):
                fn(item)
            self._seq.done(item)  # only now: a handler that raised leaves the position
        return count

    def run_forever(self) -> None:
        """Dispatch to the handlers until :meth:`close` (from a handler or another greenlet)."""
        outer, self._reader = self._reader, threading.get_ident()  # handlers included
        try:
            while not self._closed:
                try:
                    self.poll(None)
                except NotConnected:
                    if self._closed:  # by another greenlet, while this one read
                        return
                    raise
        finally:
            self._reader = outer
        if self._sock is not None:  # closed by another greenlet while a handler ran
            self._linger(self._sock)
            self._drop()

    # ------------------------------------------------------------ guts
    def _dial(self) -> socket.socket:
        """A connected socket to the server (a subclass may speak another transport)."""
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                # The handshake runs here, under the socket's timeout: a
                # server that never answers it raises TimeoutError.
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _open(self) -> None:
        sock = self._dial()
        deadline = time.monotonic() + self.timeout
        self._fresh_session()
        self._sock = sock
        self._broken = None
        try:
            self._send(self._hello_frame())
            while self._welcome is None:
                if not self._pump(deadline):
                    raise TimeoutError(f"no WELCOME within {self.timeout:g} s")
        except BaseException:
            self._drop()
            raise
        self._accept_welcome()

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        self._up = False
        self._pending.clear()
        self._pongs.clear()
        if sock is not None:
            _shutdown(sock)  # a thread blocked reading it wakes up; close() alone would not
            with contextlib.suppress(OSError):
                sock.close()

    def _schedule(self, exc: MuxError) -> None:
        """Remember why we are down and when to try again (None: never)."""
        self._down = exc
        delay = self._next_delay() if self._can_retry(exc) else None
        self._retry_at = None if delay is None else time.monotonic() + delay

    def _lost(self, exc: MuxError) -> NoReturn:
        if self._closed:  # by another greenlet, which said BYE: the end it asked for
            self._drop()
            raise NotConnected("the client is closed")
        was_up = self._up
        self._drop()
        self._schedule(exc)
        if was_up:
            for fn in list(self._disconnect_handlers):
                fn(exc)
        raise exc

    def _try_reconnect(self) -> None:
        self._retry_at = None
        try:
            self._open()
            self._rejoin()
        except ConnectionClosed:
            # _lost has scheduled the next attempt; when it gave up instead,
            # the caller learns why.
            if self._retry_at is None:
                raise
            return
        except OSError as exc:
            self._drop()
            why = ConnectionClosed(
                None, f"reconnect to {self.host}:{self.port} failed: {_why(exc)}"
            )
            self._schedule(why)
            if self._retry_at is None:
                raise why from None
            return
        self._up = True
        self._attempt = 0
        for fn in [*self._reconnect_handlers, *self._connect_handlers]:
            fn()

    def _rejoin(self) -> None:
        """Re-join every room (sequenced: from its position), pipelined; refusals are delivered."""
        calls = [(room, self._rejoin_call(room, flag)) for room, flag in self._joined.items()]
        if not calls:
            return
        for _, call in calls:
            self._pending[call.req] = None
        self._send(b"".join(call.frame for _, call in calls))
        for room, call in calls:
            try:
                self._finish(call, self._wait_reply(call.req))
            except ConnectionClosed:
                raise
            except MuxError as exc:
                self._rejoin_refused(room)
                self._deliver(exc)

    def _ensure(self, reconnect: bool = True) -> None:
        """Raise NotConnected unless connected (trying a reconnect that is due first)."""
        if self._up:
            return
        if self._closed:
            raise NotConnected("the client is closed")
        due = self._retry_at is not None and time.monotonic() >= self._retry_at
        if due and reconnect and not self._reading_elsewhere():  # else the reader does
            self._try_reconnect()
            if self._up:
                return
        if self._retry_at is None:
            raise NotConnected(f"not connected ({self._down}); not reconnecting")
        left = max(0.0, self._retry_at - time.monotonic())
        raise NotConnected(f"not connected ({self._down}); next attempt in {left:.1f} s")

    def _request(self, call: _Call) -> Any:
        self._ensure()
        if call.req:
            self._pending[call.req] = None
        self._send(call.frame)
        if not call.req:
            return None
        return self._finish(call, self._wait_reply(call.req))

    def _wait_reply(self, req: int) -> P.Reply:
        deadline = time.monotonic() + self.timeout
        while self._pending.get(req) is None:
            if not self._pump(deadline):
                del self._pending[req]
                self._abandoned.add(req)
                raise TimeoutError(f"no reply to request {req} within {self.timeout:g} s")
        return self._pending.pop(req)

    def _send_nowait(self, call: _Call) -> int:
        """Write an acked EMIT without reading; its REPLY becomes an Ack for the reader."""
        self._ensure(reconnect=False)  # a reconnect reads: the reading calls do it
        self._ack_sent(call.req)  # first: the reader may read the REPLY before we return
        try:
            self._send(call.frame)
        except BaseException:
            self._acks.pop(call.req, None)
            raise
        return call.req

    def _send(self, frame: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise NotConnected("not connected")
        if self._broken is not None:
            raise self._broken
        try:
            with self._wlock:
                self._send_all(sock, frame)
            self._last_send = time.monotonic()
        except OSError as exc:
            why = ConnectionClosed(None, f"connection lost: {_why(exc)}")
            if self._reading_elsewhere():
                # The reader reads on to the end (and to any ERROR the server
                # sent before it) and does the rest: wake it and leave it to it.
                self._break(sock, why)
                raise why from None
            # The server may have said why in an ERROR frame before closing:
            # read what is buffered so the caller gets that, not EPIPE.
            while self._pump(time.monotonic()):
                pass
            self._lost(why)

    def _send_all(self, sock: socket.socket, data: bytes) -> None:
        """Write all of ``data``; the caller holds the write lock.

        sendall, except that a send that would block (a socket some program
        made non-blocking; SSLWant*) waits for the socket instead of failing
        half-way: only ``timeout`` seconds without progress (or a real error)
        raise, and then the connection is unusable anyway.
        """
        view = data  # a memoryview only once a send was partial: most are whole
        while True:
            try:
                sent = sock.send(view)
            except _WOULD_BLOCK:
                if not _ready(sock, select.POLLOUT, self.timeout):
                    raise TimeoutError(f"send made no progress in {self.timeout:g} s") from None
                continue
            if sent == len(view):
                return
            view = memoryview(view)[sent:]

    def _break(self, sock: socket.socket, why: ConnectionClosed) -> None:
        """Mark the connection failed and shut it down, for the reader to report ``why``."""
        self._broken = why
        _shutdown(sock)  # the reader's recv returns at once

    def _reading_elsewhere(self) -> bool:
        """True while another thread or greenlet is inside a read of this client."""
        reader = self._reader
        return reader is not None and reader != threading.get_ident()

    def _pump(self, deadline: float | None) -> bool:
        """One read, until ``deadline`` (None: no limit); False if nothing came."""
        sock = self._sock
        if sock is None:
            raise NotConnected("not connected")
        outer, self._reader = self._reader, threading.get_ident()
        try:
            return self._read(sock, deadline)
        finally:
            self._reader = outer

    def _read(self, sock: socket.socket, deadline: float | None) -> bool:
        try:
            if deadline is not None:
                # Waiting here, not in recv, leaves the socket's timeout alone.
                if not _ready(sock, select.POLLIN, deadline - time.monotonic()):
                    return False
            while True:
                try:
                    data = sock.recv(RECV_SIZE)
                    break
                except _NOTHING_YET:
                    if deadline is not None:  # e.g. half a TLS record, its rest late
                        return False
                    # No deadline: the socket's timeout is for writes, and a
                    # socket some program made non-blocking must not spin.
                    _ready(sock, select.POLLIN, self.timeout)
            if self._tls is not None and data:
                while more := sock.pending():  # decrypted already: no selector sees it
                    data += sock.recv(more)
        except _NOTHING_YET:
            return False
        except OSError as exc:
            self._lost(self._broken or ConnectionClosed(None, f"connection lost: {_why(exc)}"))
        if not data:
            self._lost(self._broken or ConnectionClosed(None, "the server closed the connection"))
        msgs, bad = self._parse(data)
        try:
            for msg in msgs:
                self._incoming(msg)
        except MuxError as exc:
            self._lost(exc)
        if bad is not None:
            self._lost(bad)
        return True

    def _wait_input(self, deadline: float | None) -> bool:
        """Read (and reconnect) until the inbox has something; False at ``deadline``.

        The caller is marked as the reader meanwhile, so that a greenlet
        sending at the same time leaves reading and reconnecting to it.
        """
        outer, self._reader = self._reader, threading.get_ident()
        try:
            while not self._inbox:
                try:
                    if not self._step(deadline):
                        return False
                except ConnectionClosed:
                    if self._retry_at is None:
                        raise
            return True
        finally:
            self._reader = outer

    def _step(self, deadline: float | None) -> bool:
        """Wait for input, or for and through the next reconnect attempt; False at the deadline."""
        if self._sock is not None:
            return self._pump(deadline)
        if self._closed:
            raise NotConnected("the client is closed")
        if self._retry_at is None:
            raise NotConnected(f"not connected ({self._down}); not reconnecting")
        now = time.monotonic()
        if deadline is not None and self._retry_at > deadline:
            time.sleep(max(0.0, deadline - now))
            return False
        time.sleep(max(0.0, self._retry_at - now))
        if self._closed:  # by another greenlet, while this one slept
            raise NotConnected("the client is closed")
        self._try_reconnect()
        return True

    # I/O hooks for _Core.
    def _deliver(self, item: Event | Presence | Ack | Recovery | MuxError) -> None:
        self._inbox.append(item)

    def _on_reply(self, reply: P.Reply) -> None:
        self._pending[reply.req] = reply

    def _on_pong(self, nonce: int) -> None:
        if nonce <= self._nonce:
            self._pongs.add(nonce)

    def _write(self, frame: bytes) -> None:
        # A PONG, written by the reader: if it fails, the next read says so.
        sock = self._sock
        if sock is None:
            return
        try:
            with self._wlock:
                self._send_all(sock, frame)
            self._last_send = time.monotonic()
        except OSError as exc:
            # Maybe half a frame went out: nothing more may follow it.
            self._break(sock, ConnectionClosed(None, f"connection lost: {_why(exc)}"))


connect = Client.connect
