"""Server-wide bound on input memory, and the frame timeout (slow bodies).

A connection's transport holds the one incomplete frame (or WebSocket
message) it is reading. Alone each is bounded by ``max_frame``, but together
they are bounded only by ``max_connections x max_frame``: 3,000 clients that
each send half of a 1 MiB frame pin 1.5 GB. :class:`InputBudget` counts those
bytes over all connections; past ``max_input_memory`` the server cuts the
connection holding the *largest* incomplete frame (``ERROR LIMIT``), again
and again until it is under the bound, so the attacker with the most
memory goes first and small, healthy frames are never the ones cut.

Decisions:

* Transports only expose ``held`` (bytes in their incomplete frame or
  message). The server reports it here once per read, after the read's
  frames were handled (:meth:`InputLimits.after_read`), so every transport
  is accounted the same way and none needs a reference back to its session.
* "A new frame started in this read" needs no help from the transport: if
  the read produced a complete frame, whatever it holds now began after that
  frame (frames come out in order). The frame's clock starts then.
* The frame timeout is checked from the server's existing sweep timer over
  the holders only (usually none), never with a timer per read.
"""

from __future__ import annotations

import logging

from . import protocol as P
from .session import OPEN

log = logging.getLogger("muxserver")


class InputBudget:
    """Bytes held in incomplete frames, per holder and in total; pure, no I/O."""

    __slots__ = ("limit", "total", "held", "since", "peak")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.held: dict = {}  # holder -> bytes of its incomplete frame
        self.since: dict = {}  # holder -> when that frame started
        self.peak = 0  # most bytes ever held at once

    def grow(self, holder, n: int, now: float) -> bool:
        """``holder``'s incomplete frame grew by ``n`` bytes; True if over the limit."""
        held = self.held
        if holder not in held:
            held[holder] = 0
            self.since[holder] = now
        held[holder] += n
        total = self.total = self.total + n
        if total > self.peak:
            self.peak = total
        return total > self.limit

    def release(self, holder) -> int:
        """``holder`` holds nothing any more (its frame completed, or it closed)."""
        n = self.held.pop(holder, 0)
        if holder in self.since:
            del self.since[holder]
            self.total -= n
        return n

    def update(self, holder, held: int, fresh: bool, now: float) -> bool:
        """``holder`` now holds ``held`` bytes; ``fresh`` if its old frame completed."""
        old = self.held.get(holder)
        if old is not None and (fresh or held < old):
            self.release(holder)
            old = None
        if held:
            return self.grow(holder, held - (old or 0), now)
        return self.total > self.limit

    @property
    def over(self) -> bool:
        return self.total > self.limit

    def largest(self):
        """The holder of the largest incomplete frame (the budget must not be empty)."""
        held = self.held
        return max(held, key=held.__getitem__)

    def expired(self, now: float, timeout: float) -> list:
        """Holders whose frame started ``timeout`` seconds ago or more."""
        return [h for h, t in self.since.items() if now - t >= timeout]


class InputLimits:
    """The server's side of the budget: cut whom it says, when it says.

    ``protocol`` is the SessionProtocol (for ``fatal``); sessions' transports
    have ``held`` and ``discard_input()``.
    """

    def __init__(self, config, protocol, stats: dict) -> None:
        self.budget = InputBudget(config.max_input_memory)
        self.frame_timeout = config.frame_timeout
        self.protocol = protocol
        self.stats = stats
        stats["input_memory_cuts"] = 0
        stats["frame_timeouts"] = 0

    def after_read(self, sess, fresh: bool, now: float) -> None:
        """A read was handled; ``fresh`` if it produced a complete frame."""
        budget = self.budget
        transport = sess.transport
        if not transport.held and sess not in budget.held:
            return  # the common case: the read ended on a frame boundary
        if sess.state > OPEN:  # closing: its input is thrown away from now on
            transport.discard_input()
            budget.release(sess)
            return
        if budget.update(sess, transport.held, fresh, now):
            while budget.over:
                victim = budget.largest()
                log.info(
                    "input memory full (%d of %d bytes in incomplete frames): cutting #%d %s"
                    " from %s, holding %d bytes",
                    budget.total, budget.limit, victim.id, victim.nick or "-", victim.peer,
                    budget.held[victim],
                    extra={"conn": victim.id, "peer": victim.peer, "reason": "LIMIT"},
                )  # fmt: skip
                self.stats["input_memory_cuts"] += 1
                self._cut(victim, P.LIMIT, "server input memory full")

    def sweep(self, now: float) -> None:
        """From the server's sweep timer: frames that took too long to arrive."""
        timeout = self.frame_timeout
        for sess in self.budget.expired(now, timeout):
            if sess.state > OPEN:  # closed for another reason since: input not read
                self.closed(sess)
                continue
            self.stats["frame_timeouts"] += 1
            self._cut(sess, P.IDLE_TIMEOUT, f"frame not complete after {timeout:g} s")

    def figures(self) -> tuple[int, int, int]:
        """For Server.snapshot: bytes held, connections holding, the bound."""
        budget = self.budget
        return budget.total, len(budget.held), budget.limit

    def closed(self, sess) -> None:
        """``sess`` is closing: its input is not read any more, so free what it holds."""
        if sess in self.budget.held:
            self.budget.release(sess)
            sess.transport.discard_input()

    def _cut(self, sess, code: int, message: str) -> None:
        self.closed(sess)
        self.protocol.fatal(sess, code, message)
