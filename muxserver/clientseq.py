"""The client side of sequenced rooms (protocol sections 9 and 10): positions, no sockets.

Both clients (:mod:`muxserver.client`, :mod:`muxserver.aio`) keep, per
sequenced room, where the program is: ``(epoch, last)``, the seq of the last
message the program has *finished with*. A reconnect re-joins with that
position and the server replays what came after it, or says what is gone.
This module is that bookkeeping, pure, so the two clients share it and the
tests can drive it frame by frame.

Two moments matter for every item, and they are kept apart:

* **receipt** (:meth:`Tracker.on_reply`, :meth:`Tracker.on_event`,
  :meth:`Tracker.on_gap`), when the reader decodes a frame. The stream is in
  order here, so this is where an EVENT_SEQ learns whether it is part of the
  replay (``seq <= last`` of the room's latest JOIN REPLY) and where a JOIN
  REPLY becomes a :class:`Recovery`, queued *before* the replayed messages.
* **hand-out** (:meth:`Tracker.take`, then :meth:`Tracker.done`), when the
  program gets the item. ``done`` runs only after the handlers returned
  (a handler that raises leaves the position alone), so a reconnect asks
  again for a message whose handler never finished. Items still queued when
  the connection drops are replayed again after the re-join; ``take`` drops
  them (seq at or below the position) instead of handing them out twice.

The position's epoch changes when the Recovery of a JOIN that reported a new
epoch is handed out, not when it is received: the messages of the old epoch
queued before it are handed out (and counted) under the old one. That
assumes one consumer of the client's items at a time, which both clients
document.
"""

from __future__ import annotations

from typing import Any

from . import protocol as P
from .clienttypes import Event, Recovery

_NO_HISTORY = 0  # epoch of a server with --history-size 0: seq 0 everywhere, nothing to track


class PendingJoin:
    """A SEQUENCED JOIN in flight: what it asked for, and its Recovery once answered.

    ``quiet``: the program called ``join()`` and gets the Recovery as its
    result, so ``recv()`` does not hand it out a second time (the
    ``on("recovery")`` handlers still get it).
    """

    __slots__ = ("room", "epoch", "after", "quiet", "recovery")

    def __init__(self, room: str, epoch: int, after: int, quiet: bool) -> None:
        self.room, self.epoch, self.after, self.quiet = room, epoch, after, quiet
        self.recovery: Recovery | None = None


class Quiet:
    """A queued Recovery that ``join()`` returned already: for the handlers only."""

    __slots__ = ("recovery",)

    def __init__(self, recovery: Recovery) -> None:
        self.recovery = recovery


class _Room:
    """One sequenced room: the position handed out, and what the reader last learnt."""

    __slots__ = ("epoch", "last", "recv_epoch", "replay_last")

    def __init__(self, epoch: int, last: int) -> None:
        self.epoch, self.last = epoch, last  # the position (advanced by done)
        self.recv_epoch = epoch  # epoch of the latest JOIN REPLY read
        self.replay_last = last  # its ``last``: seqs up to here are the replay


def check_history(history: Any) -> int:
    """``history`` for ``join(room, history=N)``: an int 0..0xFFFE, else ValueError.

    0xFFFF is the protocol's "no cap" and means something else on a resume.
    """
    if isinstance(history, bool) or not isinstance(history, int) or not 0 <= history < 0xFFFF:
        raise ValueError(f"history must be an integer 0..65534, not {history!r}")
    return history


class Tracker:
    """Positions and replay state of every sequenced room of one client."""

    def __init__(self) -> None:
        self._rooms: dict[str, _Room] = {}
        self._joins: dict[int, PendingJoin] = {}  # req -> a SEQUENCED JOIN not answered yet

    # ------------------------------------------------------------ state
    @property
    def positions(self) -> dict[str, tuple[int, int]]:
        return {room: (r.epoch, r.last) for room, r in self._rooms.items()}

    def __contains__(self, room: str) -> bool:
        return room in self._rooms

    def forget(self, room: str) -> None:
        """The room was left (or refused, or re-joined plain): no position any more."""
        self._rooms.pop(room, None)

    # ------------------------------------------------------------ sending
    def join(self, req: int, room: str, history: int, quiet: bool) -> tuple[PendingJoin, P.Join]:
        """The JOIN for ``room``: a resume from its position if it has one, else fresh.

        A resume asks for everything after the position (REPLAY_ALL: no cap
        but the history's); a fresh join for the latest ``history`` messages.
        """
        r = self._rooms.get(room)
        if r is None:
            epoch, after, replay_max = 0, 0, history
        else:
            epoch, after, replay_max = r.epoch, r.last, P.REPLAY_ALL
        pending = PendingJoin(room, epoch, after, quiet)
        return pending, P.Join(req, room, 0, epoch, after, replay_max)

    def sent(self, req: int, pending: PendingJoin) -> None:
        """Enter a JOIN about to be written (before: the reader may see its REPLY first)."""
        self._joins[req] = pending

    # ------------------------------------------------------------ receipt
    def expects(self, req: int) -> bool:
        return req in self._joins

    def on_reply(self, reply: P.Reply) -> Recovery | Quiet | None:
        """A REPLY to a SEQUENCED JOIN, read: the item to queue before its replay, if any."""
        pending = self._joins.pop(reply.req)
        if reply.status != P.OK:
            return None
        try:
            code, epoch, first, last = P.parse_join_reply(reply.body)
        except P.ProtocolError:
            return None  # the waiting call parses it again and reports BadFrame
        outcome = P.RECOVERY_NAMES.get(code, str(code))
        missing = (pending.after + 1, first - 1) if code == P.GAP_RECOVERY else None
        rec = Recovery(pending.room, outcome, epoch, first, last, missing, max(0, last - first + 1))
        pending.recovery = rec
        r = self._rooms.get(pending.room)
        if r is None:  # first join: the position starts just before the replay
            r = self._rooms[pending.room] = _Room(epoch, first - 1)
        r.recv_epoch, r.replay_last = epoch, last
        return Quiet(rec) if pending.quiet else rec

    def on_event(self, msg: P.EventSeq, room: str | None) -> bool | None:
        """An EVENT_SEQ, read: whether it is replayed, or None for a duplicate to drop."""
        r = self._rooms.get(room) if room is not None else None
        if r is None:
            return False
        if msg.seq <= r.last and r.recv_epoch == r.epoch != _NO_HISTORY:
            return None  # handed out already (replayed again after a re-join)
        return msg.seq <= r.replay_last

    def on_gap(self, msg: P.Gap) -> Recovery:
        """A GAP frame: messages were evicted before the replay reached them."""
        r = self._rooms.get(msg.room)
        epoch, last = (r.recv_epoch, r.replay_last) if r is not None else (0, 0)
        first = msg.last_missing + 1
        return Recovery(
            msg.room, "gap", epoch, first, last, (msg.first_missing, msg.last_missing),
            max(0, last - first + 1),
        )  # fmt: skip

    # ------------------------------------------------------------ hand-out
    def take(self, item: Any) -> Any:
        """An item the program is about to get, or None: a duplicate, not to be handed out.

        A Recovery moves the position to its epoch and past what is gone.
        """
        if type(item) is Quiet:
            item = item.recovery
        if type(item) is Event:
            r = self._rooms.get(item.room) if item.seq is not None else None
            if r is not None and item.seq <= r.last and r.epoch != _NO_HISTORY:
                return None
        elif type(item) is Recovery:
            r = self._rooms.get(item.room)
            if r is not None:
                # Past the replay's start (or the GAP's end), never back within an epoch.
                start = item.first - 1
                if r.epoch != item.epoch:
                    r.epoch, r.last = item.epoch, start
                else:
                    r.last = max(r.last, start)
        return item

    def done(self, item: Any) -> None:
        """The handlers of ``item`` returned: the position moves up to its seq."""
        if type(item) is Event and item.seq:
            r = self._rooms.get(item.room)
            if r is not None and item.seq > r.last:
                r.last = item.seq
