"""Sequenced rooms on the server (protocol section 9): SEQUENCED JOIN, replay cursors, the pump.

muxserver.history keeps the numbers and the messages and knows no sockets;
this module is what the server does with them. A SEQUENCED member of a room
is in one of two sets of the hub's Room: ``seq`` (it gets EVENT_SEQ frames
live, from the router) or ``held`` (it gets nothing live: a replay cursor is
catching it up, or it is a resumed session that has not re-joined yet).

* SEQUENCED JOIN: the hub join (idempotent), ``plan_join``, and the REPLY is
  queued at once, so it precedes every replayed frame. A plan with something
  to replay puts the member in ``held`` with a cursor; otherwise it is live.
* The replay is pulled, not pushed. After each flush the server calls
  :meth:`Sequencer.pump`, which gives every replaying session whose unsent
  output is under ``LOW_WATER`` pages of at most ``LOW_WATER`` bytes until it
  is over it. A replay therefore never trips ``--max-output``, however large
  the history, and goes exactly as fast as the client reads.
* Live messages wait behind the replay by construction: a held member gets
  nothing live, the cursor reads on past the plan's ``last`` into whatever
  arrived meanwhile (it is all in the history), and the member turns live in
  the same call that reads the room's latest message. Nothing is skipped or
  sent twice, and no live message is buffered per member.
* A member catching up gets the room's history as it is, its own messages
  included (a resumed client needs them too); the echo rule applies to live
  delivery only.

What the history holds per message is its *tail* (the EMIT's target, event
and payload: the bytes the EMIT run has already sliced), not an EVENT_SEQ
frame: building a frame per message costs the hot path a pack and a copy for
every room, sequenced members or not. The sender's prefix (source_kind and
nick) is kept once per run of one sender, in ``senders``: per room a short
deque of ``(first seq, prefix)``, at most ``--history-size`` long (each entry
covers at least one message, so the newest ``size`` entries cover every
message held). A replay builds its frames from the two.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque

from . import protocol as P
from .history import History

# Unsent bytes below which a replaying session is given more, and the most one
# page adds (at least one message): the backlog a replay causes stays under
# about twice this. Never more than a quarter of --max-output.
LOW_WATER = 64 << 10
PAGE_ITEMS = 1024
# pump/flush rounds in one loop turn before other connections get their turn.
PUMP_ROUNDS = 16

_OPEN = 1  # session.OPEN (not imported: session.py imports this module)


class Sequencer:
    """Replay cursors of every session, over one :class:`History`."""

    __slots__ = (
        "history", "router", "clock", "stats", "replaying", "low_water", "senders", "on_bug",
    )  # fmt: skip

    def __init__(
        self, history: History, router, clock, stats: dict, max_output: int, on_bug
    ) -> None:
        self.on_bug = on_bug
        self.low_water = max(1, min(LOW_WATER, max_output // 4))
        self.history = history
        self.router = router
        self.clock = clock
        self.stats = stats
        for name in P.RECOVERY_NAMES.values():
            stats.setdefault("replays", {}).setdefault(name, 0)
        stats.setdefault("replayed_messages", 0)
        stats.setdefault("replay_gaps", 0)
        # session -> {room: [epoch, next seq to send]}, only while replaying.
        self.replaying: dict = {}
        self.senders: dict = {}  # room key -> deque of (first seq, sender prefix)

    # ---------------------------------------------------------- keeping
    def keep(self, key, tails: list, first: int, sprefix: bytes, size: int = -1) -> None:
        """Keep a run of one sender's messages, seqs ``first..``, in the room's history.

        ``sprefix``: the EVENT prefix without its type byte (source_kind,
        str8 sender), as EVENT_SEQ carries it after the seq.
        """
        ranges = self.senders.get(key)
        if ranges is None or first == 1:
            # Numbering starts at 1 in every epoch: a new history, new ranges.
            ranges = self.senders[key] = deque(maxlen=self.history.size + 1)
        if not ranges or ranges[-1][1] != sprefix:
            ranges.append((first, sprefix))
        self.history.extend(key, tails, self.clock.now, size)

    def frames(self, key, first: int, tails: list) -> list[bytes]:
        """EVENT_SEQ frames of the held messages ``first, first+1, ...`` (their tails)."""
        ranges = self.senders[key]
        i = max(0, bisect_right(ranges, first, key=_first) - 1)
        upto = ranges[i + 1][0] if i + 1 < len(ranges) else None  # next sender's first seq
        sprefix = ranges[i][1]
        pack = P.event_seq_head(len(sprefix)).pack
        base = len(sprefix) + 1 + P.EVENT_SEQ_EXTRA  # frame length without the tail
        out = []
        seq = first
        for tail in tails:
            if seq == upto:
                i += 1
                upto = ranges[i + 1][0] if i + 1 < len(ranges) else None
                sprefix = ranges[i][1]
                pack = P.event_seq_head(len(sprefix)).pack
                base = len(sprefix) + 1 + P.EVENT_SEQ_EXTRA
            out.append(pack(base + len(tail), P.EVENT_SEQ, seq, sprefix) + tail)
            seq += 1
        return out

    def expire(self, now: float) -> None:
        """The history's periodic expiry; drop sender ranges of histories that are gone."""
        history = self.history
        history.expire(now)
        if len(self.senders) > history.rooms_held:
            for key in [k for k in self.senders if history.position(k, now)[0] == 0]:
                del self.senders[key]

    # ------------------------------------------------------------ joins
    def join(self, sess, room, msg: P.Join) -> bytes:
        """A SEQUENCED JOIN of ``room`` (already joined in the hub); returns the REPLY frame."""
        plan = self.history.plan_join(
            room.key, msg.epoch, msg.after, msg.replay_max, self.clock.now
        )
        self.stats["replays"][P.RECOVERY_NAMES[plan.recovery]] += 1
        cursors = self.replaying.get(sess)
        if cursors is not None:
            cursors.pop(room, None)  # a new position replaces the old cursor
        if plan.first <= plan.last:
            room.seq.pop(sess, None)
            room.held[sess] = None
            self.replaying.setdefault(sess, {})[room] = [plan.epoch, plan.first]
        else:
            room.held.pop(sess, None)
            room.seq[sess] = None
        return P.reply_join_seq(msg.req, plan.recovery, plan.epoch, plan.first, plan.last)

    def unsequence(self, sess, room) -> None:
        """A plain JOIN of a room joined SEQUENCED: plain EVENTs from now on."""
        room.seq.pop(sess, None)
        room.held.pop(sess, None)
        cursors = self.replaying.get(sess)
        if cursors is not None:
            cursors.pop(room, None)

    def hold(self, sess) -> None:
        """Silence every SEQUENCED membership of ``sess`` (parked, or resumed, section 10)."""
        for room in sess.rooms.values():
            if sess in room.seq:
                del room.seq[sess]
                room.held[sess] = None
        self.replaying.pop(sess, None)

    # ------------------------------------------------------------- pump
    def pump(self) -> bool:
        """Queue replay pages to sessions under ``low_water``; True if any page was queued.

        A bug while replaying to one session is contained like one in its
        input handling: ``on_bug(session)`` (the server logs it and closes
        that connection), and every other replay goes on.
        """
        queued = False
        for sess, cursors in list(self.replaying.items()):
            if sess.state != _OPEN:
                del self.replaying[sess]  # closing, or parked: hold() ran
                continue
            try:
                queued |= self._pump_one(sess, cursors)
            except Exception:
                self.replaying.pop(sess, None)
                self.on_bug(sess)
                continue
            if not cursors:
                self.replaying.pop(sess, None)
        return queued

    def _pump_one(self, sess, cursors: dict) -> bool:
        history, now, low, stats = self.history, self.clock.now, self.low_water, self.stats
        transport = sess.transport
        queued = False
        for room, cursor in list(cursors.items()):
            if sess.rooms.get(room.name) is not room or sess not in room.held:
                del cursors[room]  # left the room, or joined it plain again
                continue
            out = sess.out
            while transport.pending_bytes < low:
                page = history.read(room.key, cursor[0], cursor[1], now, PAGE_ITEMS, low)
                if page.gap is not None:
                    out.append(P.gap_frame(room.name.encode("utf-8"), *page.gap))
                    stats["replay_gaps"] += 1
                if page.items:
                    first = page.next_seq - len(page.items)
                    out.extend(self.frames(room.key, first, page.items))
                    stats["replayed_messages"] += len(page.items)
                queued = True
                cursor[1] = page.next_seq
                if page.done or page.restarted:
                    del cursors[room]
                    del room.held[sess]
                    room.seq[sess] = None  # live from the next message on
                    break
            self.router.pending.add(sess)
        return queued

    def pump_rounds(self, flush, loop) -> None:
        """Before-sleep hook after the server's: pump, ``flush``, again while kernels take it all.

        At most PUMP_ROUNDS rounds a turn; if replays could take more after
        that, a zero-delay timer keeps the next select from sleeping.
        """
        if not self.replaying:
            return
        for _ in range(PUMP_ROUNDS):
            if not self.pump():
                return
            flush()
        if self.replaying:
            loop.call_later(0, _nothing)


def gauges(protocol) -> dict:
    """History and resume figures for /metrics (Server.snapshot)."""
    history = protocol.history
    return {
        "history_messages": history.messages_held,
        "history_bytes": history.bytes_held,
        "history_rooms": history.rooms_held,
        "parked": protocol.resumer.parked_count,
        "replaying": len(protocol.sequencer.replaying),
    }


def _first(entry: tuple) -> int:
    return entry[0]


def _nothing() -> None:
    """A timer that only keeps the next select from sleeping (a replay has more to send)."""
