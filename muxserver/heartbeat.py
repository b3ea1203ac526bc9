"""The blocking client's opt-in background heartbeat (``Client(..., heartbeat=True)``).

Why it exists: the blocking client answers server PINGs only while the
program is inside one of its calls, so a bot that sleeps longer than
``ping_interval + ping_timeout`` is cut with IDLE_TIMEOUT. This daemon thread
(a greenlet under gevent's monkey-patching) keeps such a connection alive.

Decisions worth knowing:

* It only writes, never reads: reading stays with the program's one reader
  (see muxserver/client.py). Any frame from a client counts as alive, so a
  client PING every half ``ping_interval`` means the server never needs to
  PING it; the PONGs wait in the socket until the next read drops them
  (their nonces carry the top bit, so they never answer a ``ping()`` call).
* Each PING is written whole under the client's write lock, like every
  other frame, so it never lands inside a half-sent EMIT. A failed write is
  handed to the reader the same way a failed PONG is (``Client._break``).
* It wakes only when something is due: after each write it sleeps until half
  an interval has passed since the last frame the client wrote.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from . import protocol as P
from .clienttypes import ConnectionClosed, _why

NONCE_BIT = 1 << 63  # heartbeat PING nonces: never one of ping()'s


class Heartbeat:
    """Writes a PING whenever ``client`` wrote nothing for one period."""

    def __init__(self, client: Any, every: bool | float) -> None:
        # ``client`` is a muxserver.client.Client (not imported: client.py imports us).
        self.client = client
        self.every = every  # True: half the server's ping interval; else seconds
        self.count = 0
        self._stop = threading.Event()

    @staticmethod
    def check(every: bool | float) -> bool | float:
        """``every`` if it is a heartbeat setting (True/False, or seconds > 0), else ValueError."""
        if isinstance(every, bool) or (isinstance(every, (int, float)) and every > 0):
            return every
        raise ValueError(f"heartbeat must be True, False or seconds > 0, not {every!r}")

    def start(self) -> None:
        name = f"muxserver-heartbeat-{self.client.nick}"
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def period(self) -> float:
        if self.every is not True:
            return float(self.every)
        # Half the server's interval: a PING goes out well before the server
        # starts counting us as silent (ping_interval + ping_timeout).
        return max(0.05, (self.client.ping_interval or 25.0) / 2)

    def _run(self) -> None:
        client, stop = self.client, self._stop
        while not stop.is_set():
            every = self.period()
            idle = time.monotonic() - client._last_send
            if idle < every:
                stop.wait(every - idle)
                continue
            sock = client._sock
            if sock is None or not client._up or client._broken is not None:
                stop.wait(every)  # disconnected: the reading calls reconnect
                continue
            self.count += 1
            frame = P.encode(P.Ping(NONCE_BIT | (self.count & (NONCE_BIT - 1))))
            try:
                with client._wlock:
                    if sock is client._sock:
                        client._send_all(sock, frame)
                client._last_send = time.monotonic()
            except OSError as exc:
                client._break(sock, ConnectionClosed(None, f"connection lost: {_why(exc)}"))
