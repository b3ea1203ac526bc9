"""One muxserver connection, two greenlets: how a Locust user drives a Client.

A load-test user must never let sending wait on receiving: Locust's task
loop writes EMITs at a fixed pace while the server's deliveries, REPLYs and
PINGs keep coming. :class:`LoadClient` wraps a connected
:class:`muxserver.client.Client` for that, with nothing but its public API:

* a receive greenlet runs ``client.run_forever()``, which hands every Event,
  Ack and error to the user's handlers as it is parsed, and answers PINGs;
* the task loop sends with ``client.emit(..., ack=True, wait=False)``, which
  writes the EMIT and returns without reading (gevent allows one reader per
  socket): its REPLY reaches ``on_ack`` through the receive greenlet, with
  the round trip measured by the client (``Ack.rtt``);
* the client serializes the two greenlets' writes (EMITs, PONGs) itself.
"""

from __future__ import annotations

import time

import gevent

from muxserver.client import Client

EVENT_NAME = "load"  # the event name of every load-test message
BYE_WAIT_S = 5.0  # close(): how long the reader may take to reach the server's FIN


class LoadClient:
    """A connected Client whose own greenlet reads, for a sink that counts.

    ``sink`` has ``on_event(event)``, ``on_ack(ack)``, ``on_error(exc)`` (a
    refused EMIT: ``exc.req`` is its id, or 0 without ack) and
    ``on_died(exc)`` (the connection ended before :meth:`close`), all called
    in the receive greenlet. ``target`` is emit's target: ``room=``, ``nick=``
    or ``broadcast=True``.
    """

    def __init__(self, client: Client, sink, **target) -> None:
        self.client = client
        self.target = target
        self.sink = sink
        client.on("*", sink.on_event)
        client.on_ack(sink.on_ack)
        client.on_error(sink.on_error)
        self.reader = gevent.spawn(self._read)

    @property
    def unacked(self) -> int:
        """EMITs sent with an ack whose REPLY has not arrived (lost for good once dead)."""
        return len(self.client.pending_acks)

    def send(self, payload: bytes, ack: bool) -> None:
        """Write one EMIT; with ``ack`` its Ack (or error) comes to the sink later."""
        self.client.emit(EVENT_NAME, payload, ack=ack, wait=False, **self.target)

    def close(self, grace: float = 2.0) -> None:
        """Give outstanding acks ``grace`` seconds, say BYE, and let the reader finish.

        The reader reads on to the server's FIN (what arrives meanwhile is
        still counted), so the connection ends cleanly, never with a reset.
        """
        deadline = time.monotonic() + grace
        while self.unacked and not self.reader.dead and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self.client.close()  # BYE; run_forever returns at the FIN
        self.reader.join(BYE_WAIT_S)
        self.reader.kill(block=True)  # a no-op unless the server never closed

    def _read(self) -> None:
        try:
            self.client.run_forever()  # returns after close()
        except Exception as exc:  # the end of the connection, or a bug: the sink tells which
            self.sink.on_died(exc)
