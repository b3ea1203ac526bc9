"""Blocking client for muxserver; also the public home of every client name.

Programs (bots, tests, the Locust users, ``muxchat``) should not hand-roll
sockets and ``struct`` calls to talk to muxserver. This module reuses
:mod:`muxserver.framing` and :mod:`muxserver.protocol`, so the project keeps
one codec. What it shares with :mod:`muxserver.aio` -- errors, the Event and
Presence types, Backoff, request bookkeeping -- lives in
:mod:`muxserver.clientcore` and is re-exported here: import it all from
``muxserver.client``.

Decisions worth knowing:

* The blocking client uses plain sockets with timeouts: no threads and no
  selectors, so it runs unchanged under gevent monkey-patching (``ssl``
  included). The price is that server PINGs are answered only while the
  program is inside a client call, so a program must call
  ``recv``/``poll``/``run_forever`` (or make any request) at least once per
  ``ping_interval + ping_timeout`` (45 s by default) or the server cuts it
  with IDLE_TIMEOUT.
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

import os
import socket
import ssl
import time
from collections import deque
from typing import Any, NoReturn

from . import protocol as P
from .clientcore import (
    CLOSE_LINGER,
    DEFAULT_HOST,
    DEFAULT_PORT,
    ERRORS,  # noqa: F401 (re-exported: importable from here as before the split)
    PERMANENT,  # noqa: F401
    RECV_SIZE,
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
    RoomInfo,
    ShuttingDown,
    SlowConsumer,
    TooLarge,
    UnknownType,
    UnsupportedVersion,
    _Call,
    _Core,
    _why,
    error_for,
)

__all__ = [
    "AuthFailed", "Backoff", "BadFrame", "Client", "ConnectionClosed", "Event", "IdleTimeout",
    "InvalidName", "Limit", "Listing", "MuxError", "NickTaken", "NoSuchTarget", "NotConnected",
    "NotHello", "NotMember", "Presence", "RateLimited", "RoomInfo", "ShuttingDown",
    "SlowConsumer", "TooLarge", "UnknownType", "UnsupportedVersion", "connect", "error_for",
]  # fmt: skip

# Reads that mean "nothing yet", not "connection lost". An SSLSocket with a
# zero timeout raises SSLWant*Error (an OSError) where a plain one raises
# BlockingIOError.
_NOTHING_YET = (TimeoutError, BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError)  # fmt: skip


# ======================================================= blocking client
class Client(_Core):
    """A blocking muxserver client. Make one with :meth:`Client.connect`.

    Not thread-safe: use one client per thread (or greenlet).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        nick: str | None = None,
        namespace: str = "/",
        token: str | None = None,
        timeout: float = 10.0,
        *,
        reconnect: bool = False,
        backoff: Backoff | None = None,
        tls: bool | ssl.SSLContext = False,
        ca: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(host, port, nick, namespace, token, timeout, reconnect, backoff, tls, ca)
        self._sock: socket.socket | None = None
        self._inbox: deque = deque()
        self._pongs: set[int] = set()
        self._retry_at: float | None = None  # monotonic time of the next attempt

    @classmethod
    def connect(
        cls,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        nick: str | None = None,
        namespace: str = "/",
        token: str | None = None,
        timeout: float = 10.0,
        *,
        reconnect: bool = False,
        backoff: Backoff | None = None,
        tls: bool | ssl.SSLContext = False,
        ca: str | os.PathLike | None = None,
    ) -> Client:
        """Connect and complete HELLO/WELCOME.

        With ``tls`` (or ``ca``, a PEM file of CAs to trust instead of the
        system's) the connection is TLS and the server's certificate must be
        valid for ``host``. Raises OSError if the server cannot be reached
        (``ssl.SSLError`` if the TLS handshake fails, e.g. an untrusted
        certificate) and a ConnectionClosed subclass if it refuses the HELLO
        (e.g. NickTaken, AuthFailed). The first connection is never retried,
        even with ``reconnect=True``.
        """
        client = cls(
            host, port, nick, namespace, token, timeout,
            reconnect=reconnect, backoff=backoff, tls=tls, ca=ca,
        )  # fmt: skip
        client._open()
        client._up = True
        return client

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def sock(self) -> socket.socket | None:
        """The current socket (None while disconnected), for callers with their own selector."""
        return self._sock

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------- requests
    def join(self, room: str, presence: bool = False) -> None:
        """Join ``room``; with ``presence`` receive Presence for it."""
        self._request(self._join_call(room, presence))

    def leave(self, room: str) -> None:
        self._request(self._leave_call(room))

    def set_nick(self, nick: str) -> None:
        self._request(self._nick_call(nick))

    def emit(
        self,
        event: str,
        payload: bytes | str = b"",
        room: str | None = None,
        *,
        to: str | None = None,
        broadcast: bool = False,
        echo: bool = False,
        ack: bool = False,
    ) -> int | None:
        """Send an event to a ``room``, one nick (``to``) or the namespace (``broadcast``).

        With ``ack`` waits for the REPLY and returns the recipient count (an
        error raises here); without it returns None at once and an error
        arrives later through ``recv``/``poll``/``on_error``.
        """
        return self._request(self._emit_call(event, payload, room, to, broadcast, echo, ack))

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
        """Say BYE and close. Idempotent; a closed client never reconnects."""
        if self._closed:
            return
        self._closed = True
        self._retry_at = None
        sock = self._sock
        if sock is not None and self._up:
            try:
                sock.settimeout(self.timeout)
                sock.sendall(P.encode(P.Bye()))
                sock.shutdown(socket.SHUT_WR)
                # Read to the server's FIN: closing with unread input would make
                # the kernel reset the connection instead of ending it cleanly.
                deadline = time.monotonic() + CLOSE_LINGER
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    if not sock.recv(RECV_SIZE):
                        break
            except OSError:
                pass
        self._drop()

    # --------------------------------------------------------- receiving
    def recv(self, timeout: float | None = None) -> Event | Presence | None:
        """The next Event or Presence; None if ``timeout`` seconds pass first.

        Raises an error that arrived for an EMIT sent without ack, and
        ConnectionClosed when the connection ends (with ``reconnect`` on, it
        reconnects instead and keeps waiting).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            try:
                if not self._step(deadline):
                    return None
            except ConnectionClosed:
                if self._retry_at is None:
                    raise
        item = self._inbox.popleft()
        if isinstance(item, MuxError):
            raise item
        return item

    def poll(self, timeout: float | None = 0.0) -> int:
        """Dispatch what has arrived to the handlers, waiting up to ``timeout`` for something.

        Returns how many items were dispatched.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            try:
                if not self._step(deadline):
                    return 0
            except ConnectionClosed:
                if self._retry_at is None:
                    raise
        count = 0
        while self._inbox and not self._closed:
            item = self._inbox.popleft()
            count += 1
            for fn in self._handlers_for(item):
                fn(item)
        return count

    def run_forever(self) -> None:
        """Dispatch to the handlers until :meth:`close` (e.g. from a handler)."""
        while not self._closed:
            self.poll(None)

    # ------------------------------------------------------------ guts
    def _open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        deadline = time.monotonic() + self.timeout
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                # The handshake runs here, under the socket's timeout: a
                # server that never answers it raises TimeoutError.
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self._fresh_session()
        self._sock = sock
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
            try:
                sock.close()
            except OSError:
                pass

    def _schedule(self, exc: MuxError) -> None:
        """Remember why we are down and when to try again (None: never)."""
        self._down = exc
        delay = self._next_delay() if self._can_retry(exc) else None
        self._retry_at = None if delay is None else time.monotonic() + delay

    def _lost(self, exc: MuxError) -> NoReturn:
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
        for fn in list(self._reconnect_handlers):
            fn()

    def _rejoin(self) -> None:
        """Re-join every room with its presence flag, pipelined; a refusal is delivered."""
        calls = [(room, self._join_call(room, flag)) for room, flag in self._joined.items()]
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
                self._joined.pop(room, None)
                self._deliver(exc)

    def _ensure(self) -> None:
        """Raise NotConnected unless connected (trying a reconnect that is due first)."""
        if self._up:
            return
        if self._closed:
            raise NotConnected("the client is closed")
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
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

    def _send(self, frame: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise NotConnected("not connected")
        sock.settimeout(self.timeout)
        try:
            sock.sendall(frame)
        except OSError as exc:
            # The server may have said why in an ERROR frame before closing:
            # read what is buffered so the caller gets that, not EPIPE.
            while self._pump(time.monotonic()):
                pass
            self._lost(ConnectionClosed(None, f"connection lost: {_why(exc)}"))

    def _pump(self, deadline: float | None) -> bool:
        """One read, until ``deadline`` (None: no limit); False if nothing came."""
        sock = self._sock
        if sock is None:
            raise NotConnected("not connected")
        sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
        try:
            data = sock.recv(RECV_SIZE)
            if self._tls is not None and data:
                while more := sock.pending():  # decrypted already: no selector sees it
                    data += sock.recv(more)
        except _NOTHING_YET:
            return False
        except OSError as exc:
            self._lost(ConnectionClosed(None, f"connection lost: {_why(exc)}"))
        if not data:
            self._lost(ConnectionClosed(None, "the server closed the connection"))
        msgs, bad = self._parse(data)
        try:
            for msg in msgs:
                self._incoming(msg)
        except MuxError as exc:
            self._lost(exc)
        if bad is not None:
            self._lost(bad)
        return True

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
        self._try_reconnect()
        return True

    # I/O hooks for _Core.
    def _deliver(self, item: Event | Presence | MuxError) -> None:
        self._inbox.append(item)

    def _on_reply(self, reply: P.Reply) -> None:
        self._pending[reply.req] = reply

    def _on_pong(self, nonce: int) -> None:
        if nonce <= self._nonce:
            self._pongs.add(nonce)

    def _write(self, frame: bytes) -> None:
        # Best effort (a PONG): if the socket is broken, the next read says so.
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(frame)
        except OSError:
            pass


connect = Client.connect
