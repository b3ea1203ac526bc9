"""A muxserver Client that one greenlet reads while another writes: the Locust users' connection.

:class:`muxserver.client.Client` is one-caller-at-a-time: a request writes
its frame and then reads until its REPLY. A load-test user needs a reader
greenlet that never stops reading (so sending never waits on receiving) and
a writer that sends EMITs at a fixed pace without waiting for their REPLYs.
Two greenlets cannot both read one socket under gevent, so the REPLY to a
pipelined EMIT has to reach the writer through the reader.

:class:`LoadClient` does that through the I/O hooks that Client's base class
(``muxserver.clientcore._Core``) documents for its subclasses, and keeps
everything else of Client: connect/HELLO, JOIN, LEAVE, BYE, the codec,
PING answers, error mapping.

* ``emit_nowait`` writes an EMIT (built with muxserver.protocol) and
  registers its request id in ``_pending``, which is how ``_incoming``
  decides to hand a REPLY to ``_on_reply`` instead of dropping an OK one.
* ``_deliver`` and ``_on_reply`` pass every Event, error and REPLY straight
  to the sink (the Locust user) in the reading greenlet: nothing waits in
  Client's inbox, so ``run_forever`` never returns until the connection ends.
* ``_write`` (PONGs, written by the reader) and ``emit_nowait`` share a
  lock, so a frame written while the other greenlet is blocked half-way
  through ``sendall`` cannot land in the middle of it.
"""

from __future__ import annotations

import time

from gevent.lock import Semaphore

from muxserver import protocol as P
from muxserver.client import Client, ConnectionClosed, Event

EVENT_NAME = "load"  # the event name of every load-test message


class LoadClient(Client):
    """A Client one greenlet reads while another writes pipelined EMITs.

    ``sink`` (the user) gets every Event, REPLY to a pipelined EMIT and
    error as it is parsed, in the reading greenlet.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sink = None  # has on_event, on_ack, on_other
        self._early: list = []  # what arrived before attach(): during connect/join
        self._wlock = Semaphore()  # one frame at a time on the wire: EMITs and PONGs
        self.sent_at: dict[int, float] = {}  # req -> perf_counter() when written

    def attach(self, sink) -> None:
        self.sink = sink
        early, self._early = self._early, []
        for item in early:
            self._deliver(item)

    def emit_nowait(self, kind: int, target: str, payload: bytes, ack: bool) -> None:
        """Write one EMIT; with ``ack`` its REPLY goes to ``sink.on_ack`` later."""
        sock = self.sock
        if sock is None or not self.connected:
            raise ConnectionClosed(None, "not connected")
        req = self._next_req() if ack else 0
        frame = P.encode(P.Emit(req, kind, target, EVENT_NAME, payload, 0))
        if req:
            # _incoming hands a REPLY to _on_reply only for ids in _pending.
            self._pending[req] = None
            self.sent_at[req] = time.perf_counter()
        try:
            with self._wlock:
                sock.sendall(frame)
        except BaseException:
            self.sent_at.pop(req, None)
            self._pending.pop(req, None)
            raise

    # Client's I/O hooks (see _Core).
    def _deliver(self, item) -> None:
        sink = self.sink
        if sink is None:
            self._early.append(item)
        elif type(item) is Event:
            sink.on_event(item)
        else:
            sink.on_other(item)

    def _on_reply(self, reply: P.Reply) -> None:
        sent = self.sent_at.pop(reply.req, None)
        if sent is None:  # a request some call is waiting for (join before the reader ran)
            super()._on_reply(reply)
            return
        self._pending.pop(reply.req, None)
        self.sink.on_ack(reply, sent)

    def _write(self, frame: bytes) -> None:
        with self._wlock:
            super()._write(frame)
