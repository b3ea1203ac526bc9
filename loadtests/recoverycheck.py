"""The loss check of the ``recovery`` load-test scenario, apart from the client's bookkeeping.

In the recovery scenario users cut their own connections and resume while
others keep talking (loadtests/recovery.py). What arrives then is a mix of
live EVENT_SEQs and replays, and the client (muxserver.client) keeps its own
positions and drops duplicates. A check that read those positions would
share any bug it is meant to find, so this one is built only from what each
user saw with its own handlers: every message's room ``seq`` (EVENT_SEQ),
its payload's (sender, n), and what the server announced (the JOIN REPLY's
recovery outcome, GAP frames). Like tally.py it imports neither Locust nor
gevent, so pytest tests it directly.

Per receiver and room (:class:`RoomCheck`):

* seqs go up by exactly one. A jump is an *unannounced gap* unless every
  skipped seq lies in a range the server announced missing (a GAP frame, or
  a JOIN REPLY with outcome "gap"); an announced range is counted apart, as
  loss the protocol owns up to. A seq at or below the last one is a
  *duplicate*, or *reordered* if it is one that a gap had skipped;
* per sender, ``n`` goes up (not necessarily by one: a sender's EMITs written
  just before its own cut may never have reached the server, which is not
  loss but at-most-once delivery). The same ``n`` twice is a duplicate (a
  resent message gets a new seq, so only this catches it); a lower one is
  reordering;
* the epoch changes only with an announced "reset"; numbering then restarts
  where the REPLY says.

Findings are returned, not counted here, so the hot path in the user can
handle the common case (``seq == last + 1``) inline and call in only on a
mismatch, as the other scenarios do with tally.SequenceTracker.
"""

from __future__ import annotations

MAX_REMEMBERED = 4096  # missing seqs kept per room, to tell reordered from duplicate

OK = ("ok", 0)
NOTHING: list = []  # event(): nothing found (shared; never appended to)


class RoomCheck:
    """One receiver's view of one sequenced room: epoch, last seq, announced ranges."""

    __slots__ = ("epoch", "last", "announced", "missing", "senders")

    def __init__(self) -> None:
        self.epoch: int | None = None  # None until the first JOIN REPLY
        self.last = 0  # the last seq seen (or the REPLY's first - 1)
        self.announced: list[tuple[int, int]] = []  # ranges the server said are gone
        self.missing: set[int] = set()  # skipped without announcement (for "reordered")
        self.senders: dict[int, int] = {}  # sender id -> highest n seen

    # ------------------------------------------------------- announcements
    def recovery(
        self, outcome: str, epoch: int, first: int, missing: tuple[int, int] | None
    ) -> tuple[str, int]:
        """A JOIN REPLY's recovery; returns ("ok"|"announced"|"reset"|"epoch", count).

        "announced": ``count`` messages announced gone; "reset": the server
        said the history restarted; "epoch": the epoch changed *without* a
        reset (a failure). A fresh join (or the first REPLY) sets the position.
        """
        if outcome == "fresh" or self.epoch is None:
            self._restart(epoch, first)
            return OK
        if outcome == "reset":
            self._restart(epoch, first)
            return "reset", 1
        if epoch != self.epoch:
            self._restart(epoch, first)
            return "epoch", 1
        if missing is not None:
            return "announced", self.announce(*missing)
        return OK

    def gap(self, first_missing: int, last_missing: int) -> tuple[str, int]:
        """A GAP frame: messages ``first_missing..last_missing`` are gone."""
        return "announced", self.announce(first_missing, last_missing)

    def announce(self, a: int, b: int) -> int:
        if b < a:
            return 0
        self.announced.append((a, b))
        return b - a + 1

    def _restart(self, epoch: int, first: int) -> None:
        self.epoch = epoch
        self.last = first - 1
        self.announced.clear()
        self.missing.clear()

    # --------------------------------------------------------- deliveries
    def event(self, seq: int, sender: int, n: int) -> list[tuple[str, int]]:
        """One EVENT_SEQ; returns its findings: ("gap"|"duplicate"|"reordered", count)."""
        nxt = self.last + 1
        found = NOTHING
        if seq > nxt:
            lost = self._unannounced(nxt, seq - 1)
            if lost:
                found = [("gap", lost)]
        elif seq < nxt:
            if seq in self.missing:
                self.missing.discard(seq)
                return [("reordered", 1)]
            return [("duplicate", 1)]  # by seq: the per-sender check would only repeat it
        self.last = seq
        prev = self.senders.get(sender)
        if prev is not None and n <= prev:
            return [*found, ("duplicate", 1) if n == prev else ("reordered", 1)]
        self.senders[sender] = n
        return found

    def _unannounced(self, a: int, b: int) -> int:
        """How many of ``a..b`` no announced range covers; drops the ranges used up."""
        left = [(a, b)]
        for lo, hi in self.announced:
            nxt = []
            for x, y in left:
                if hi < x or lo > y:
                    nxt.append((x, y))
                    continue
                if x < lo:
                    nxt.append((x, lo - 1))
                if y > hi:
                    nxt.append((hi + 1, y))
            left = nxt
        self.announced = [(lo, hi) for lo, hi in self.announced if hi > b]
        lost = sum(y - x + 1 for x, y in left)
        room = MAX_REMEMBERED - len(self.missing)
        for x, y in left:
            if room <= 0:
                break
            take = min(y - x + 1, room)
            self.missing.update(range(x, x + take))
            room -= take
        return lost

    def tail(self, room_last: int) -> int:
        """At the end: messages up to ``room_last`` neither received nor announced."""
        if room_last <= self.last:
            return 0
        lost = self._unannounced(self.last + 1, room_last)
        self.last = room_last
        return lost
