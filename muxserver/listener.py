"""Accepting connections: listening sockets, out-of-fd backoff, and the first-bytes sniff.

Shared by the protocol port and the monitoring port, so both survive running
out of file descriptors the same way: when ``accept`` fails with EMFILE (or
ENFILE, ENOBUFS, ENOMEM) the pending connection stays in the kernel's
backlog and the listening socket stays readable, so a loop that kept
watching it would spin at 100 % CPU. We stop watching for ``backoff``
seconds instead and log it once per episode.

``sniff`` is the hook for "look at the first bytes before deciding the
protocol" (protocol section 11): the four bytes of a length prefix can never
look like the start of an HTTP request line, so one port serves both.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

from .loop import EVENT_READ

log = logging.getLogger("muxserver")

_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

RAW, HTTP = "raw", "http"


def sniff(first: bytes) -> str | None:
    """RAW or HTTP from a connection's first bytes; None while fewer than 4 arrived.

    HTTP when they can start a request line: an ASCII capital letter, then
    capitals or a space (``GET ``, ``POST``, ``HEAD``). Read as a length
    prefix those are at least 0x41202020, above any allowed max_frame.
    """
    if len(first) < 4:
        return None
    if 0x41 <= first[0] <= 0x5A and all(0x41 <= b <= 0x5A or b == 0x20 for b in first[1:4]):
        return HTTP
    return RAW


def listening_socket(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (raises OSError if it can't)."""
    family, stype, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    lsock = socket.socket(family, stype, proto)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        lsock.bind(addr)
        lsock.listen(backlog)
    except OSError:
        lsock.close()
        raise
    lsock.setblocking(False)
    return lsock


class Listener:
    """One listening socket on the loop; hands each accepted socket to ``on_socket``."""

    def __init__(
        self,
        loop,
        host: str,
        port: int,
        on_socket: Callable[[socket.socket, object], None],
        backlog: int = 4096,
        per_wakeup: int = 64,
        backoff: float = 0.5,
        name: str = "accept",
        reuse_port: bool = False,
    ) -> None:
        self.loop = loop
        self.on_socket = on_socket
        self.per_wakeup = per_wakeup
        self.backoff = backoff
        self.name = name
        self.sock: socket.socket | None = listening_socket(host, port, backlog, reuse_port)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.accepting = False
        self._logged = False
        self._timer = None

    def start(self) -> None:
        if self.accepting or self.sock is None:
            return
        self.loop.register(self.sock, EVENT_READ, self._on_accept)
        self.accepting = True

    def pause(self) -> None:
        if self.accepting:
            self.loop.unregister(self.sock)
            self.accepting = False

    def close(self) -> None:
        self.pause()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _on_accept(self, _mask: int) -> None:
        for _ in range(self.per_wakeup):
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    if not self._logged:
                        log.warning("%s: %s; pausing accepts", self.name, exc.strerror)
                        self._logged = True
                    self.pause()
                    self._timer = self.loop.call_later(self.backoff, self._resume)
                    return
                continue  # ECONNABORTED and friends: that peer is gone already
            self._logged = False
            self.on_socket(sock, peer)
            if self.sock is None:
                return  # on_socket closed us (shutdown)

    def _resume(self) -> None:
        self._timer = None
        self.start()
