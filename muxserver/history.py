"""Per-room message history: seq, epoch, bounded ring, "what after seq N" (protocol section 9).

Pure: no sockets, no loop, no clock of its own. Every call that can age
something takes ``now`` (seconds from a monotonic clock, never decreasing) so
tests run on fake time; the epoch comes from an injectable ``randbits``
(default :func:`secrets.randbits`). The server stores opaque ``bytes`` items
(each message's tail: muxserver.sequenced) and counts ``len(item)`` against
the byte bounds.

Layout, chosen for the per-message hot path (the server hands each run of
EMITs to ``extend``, one call per run): each room keeps its items in a plain
list, live from index ``head``, and one *stamp* ``(last seq, gid, time)`` per
call that added to it (a batch: every message of one ``extend`` arrived in
the same loop turn). So ``extend`` is ``list += items`` and a size eviction is
``head += k``, both without a per-message step in Python; the dead front is
cut off with one ``del`` once it is an eighth of the list (amortised O(1) per
message; that eighth is the most the list holds beyond its live items). Every
bound evicts a room's *oldest* message, so a room always holds a contiguous
run of seqs ending at ``room.last``: a seq is never stored, it is
``last - held + 1 + index``. The global bound (``memory``) needs the oldest
message of all rooms; rather than a global FIFO of entries (which keeps one
dead entry per message evicted by a room's own bounds, millions of them at
500k messages/s) it is a heap with ONE entry per non-empty room, keyed by a
global arrival counter (``gid``, one per batch) of that room's front batch at
push time. Fronts only move forward, so a key is a lower bound; a stale top
is re-keyed when met. The heap is touched only when the global bound or
``expire`` needs the global oldest, never by the common path. ``expire`` (the
periodic timer) walks the same heap for aged messages, and an OrderedDict of
memberless rooms (in idle order) for rooms whose history has run out: both
stop at the first entry that is still young, so a tick costs what it removes,
not what is held. Lookups also check age and idleness themselves, so results
never depend on how often ``expire`` runs.

Readings of section 9 chosen here:

* Age: a message is gone once ``now - added >= ttl``; a memberless room's
  history (epoch and numbering) is gone once ``now - idle_since >= ttl``, where
  ``idle_since`` is the later of "its last member left" and "its last append"
  (an append can reach a memberless room through a backplane, and must not be
  dropped before its own ttl). A room's history starts (epoch drawn) on its
  first member, first append or first SEQUENCED JOIN, so the REPLY to the
  first JOIN of a new room already carries a usable epoch.
* Messages all aged out while members remain: the epoch and the numbering are
  kept (the history has not restarted); a resume then gets GAP, not RESET.
* ``replay_max`` on a resume caps from the NEWEST end. GAP is defined as
  "messages ``after+1 .. first-1`` are gone" and the replay as exactly
  ``first..last`` followed by live seq > last: the missing run has to sit
  between ``after`` and ``first``, so a cap can only drop the oldest wanted
  messages; the client learns what it missed from ``first - 1``.
* 0xFFFF (:data:`REPLAY_ALL`) means "no cap" for fresh, resume and RESET joins
  alike; 0 means no replay (a resume with ``after < last`` is then a GAP).
* A resume whose ``after`` is beyond the room's ``last`` in the same epoch
  names a position this history never had: it is answered as RESET (the
  client's numbering cannot be trusted), never as a COMPLETE whose ``first``
  would skip past live messages.
* History off (``size == 0``): seq 0, epoch 0, nothing held; a JOIN with
  epoch 0 is FRESH, any other epoch RESET, and the replay is empty
  (``first = last + 1 = 1``).

The item is built by the caller, who may need the seq inside it (EVENT_SEQ
starts with it): ``seq = next_seq(key, now)``, build the frame, then
``append(key, frame, now)`` returns that same seq. Two calls on one thread
with nothing in between; a ``make_item(seq)`` callback would cost a call and,
for the server, a closure per message, and would still not hand the frame back.

Measured with timeit (CPython 3.11, shared 2-core machine, 100-byte items,
one room at its size bound so every append also evicts one): ``append``
~230 ns (~45 ns of it the call and the dict lookup), ``next_seq`` ~60 ns;
1,000 rooms in turn ~290 ns per append; with the global memory bound evicting
on every append ~760 ns (the heap re-key is O(log rooms), paid only past
``memory``).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from heapq import heappop, heappush, heapreplace
from typing import NamedTuple

# JoinPlan.recovery values: the u8 "recovery" of the REPLY to a SEQUENCED JOIN.
FRESH = 0
COMPLETE = 1
GAP = 2
RESET = 3

# replay_max meaning "no cap but the history's".
REPLAY_ALL = 0xFFFF

_U64 = (1 << 64) - 1


class JoinPlan(NamedTuple):
    """The REPLY fields of a SEQUENCED JOIN; replay ``first..last`` (none when first > last)."""

    recovery: int
    epoch: int
    first: int
    last: int


class Page(NamedTuple):
    """One page of a replay cursor.

    ``items``: the stored frames of seqs ``next_seq - len(items) .. next_seq - 1``.
    ``gap``: ``(first_missing, last_missing)`` when messages the cursor had not
    reached were evicted (send one GAP frame, before ``items``), else None.
    ``done``: the cursor has passed its end (``until``, or the room's latest
    seq). ``restarted``: the room's history is not the cursor's epoch any more
    (it was dropped and began again); nothing more can be read from it.
    """

    items: list[bytes]
    next_seq: int
    gap: tuple[int, int] | None
    done: bool
    restarted: bool = False


class _Room:
    __slots__ = (
        "key", "epoch", "last", "items", "head", "stamps", "bytes", "members", "idle_since",
        "in_heap",
    )  # fmt: skip

    def __init__(self, key: Hashable, epoch: int, now: float) -> None:
        self.key = key
        self.epoch = epoch
        self.last = 0  # latest seq given out in this epoch
        self.items: list[bytes] = []  # held messages are items[head:], oldest first
        self.head = 0
        # (last seq, gid, time) per batch that added items, oldest first; the
        # front one is the batch of items[head] (older ones are popped).
        self.stamps: deque[tuple[int, int, float]] = deque()
        self.bytes = 0
        self.members = 0
        self.idle_since = now
        self.in_heap = False  # has its one entry in History._heap

    @property
    def held(self) -> int:
        return len(self.items) - self.head

    def front(self) -> tuple[int, int, float]:
        """The stamp of the oldest held message (the room holds one)."""
        stamps = self.stamps
        first = self.last - len(self.items) + self.head + 1
        while stamps[0][0] < first:
            stamps.popleft()
        return stamps[0]

    def drop(self, k: int) -> int:
        """Forget the ``k`` oldest held messages; return their bytes."""
        items, head = self.items, self.head
        n = len(items[head]) if k == 1 else sum(map(len, items[head : head + k]))
        head += k
        if head * 8 >= len(items):  # amortised: the live part moved is < 7x what went
            del items[:head]
            head = 0
        self.head = head
        self.bytes -= n
        return n


class History:
    """All rooms' histories with their four bounds; see the module docstring."""

    __slots__ = (
        "size",
        "max_bytes",
        "ttl",
        "memory",
        "enabled",
        "bytes_held",
        "_randbits",
        "_rooms",
        "_idle",
        "_heap",
        "_gid",
    )

    def __init__(
        self,
        size: int = 100,
        max_bytes: int = 1 << 20,
        ttl: float = 120.0,
        memory: int = 64 << 20,
        randbits: Callable[[int], int] | None = None,
    ) -> None:
        for name, value in (("size", size), ("max_bytes", max_bytes), ("memory", memory)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"history {name} must be an integer >= 0, got {value!r}")
        if not ttl >= 0:  # also refuses NaN
            raise ValueError(f"history ttl must be >= 0 seconds, got {ttl!r}")
        self.size = size
        self.max_bytes = max_bytes
        self.ttl = float(ttl)
        self.memory = memory
        self.enabled = size > 0
        self.bytes_held = 0
        self._randbits = randbits or secrets.randbits
        self._rooms: dict[Hashable, _Room] = {}
        # Memberless rooms in idle_since order (appends and leaves move a room
        # to the end, and now never decreases): expire stops at the first young one.
        self._idle: OrderedDict[Hashable, _Room] = OrderedDict()
        self._heap: list[tuple[int, _Room]] = []
        self._gid = 0

    # ------------------------------------------------------------ metrics
    @property
    def rooms_held(self) -> int:
        return len(self._rooms)

    @property
    def messages_held(self) -> int:
        # Summed on demand (a /metrics scrape) to keep a counter off the hot path.
        return sum(room.held for room in self._rooms.values())

    # ----------------------------------------------------------- hot path
    def append(self, key: Hashable, item: bytes, now: float) -> int:
        """Keep ``item`` as the room's next message; return its seq (0 when history is off)."""
        room = self._rooms.get(key)
        if room is None or room.members == 0:
            if not self.enabled:
                return 0
            room = self._room(key, now)
            room.idle_since = now  # a memberless room lives on ttl after its last append
            self._idle.move_to_end(key)
        seq = room.last = room.last + 1
        self._gid = gid = self._gid + 1
        if not room.in_heap:
            heappush(self._heap, (gid, room))
            room.in_heap = True
        room.items.append(item)
        room.stamps.append((seq, gid, now))
        n = len(item)
        room.bytes += n
        self.bytes_held += n
        # The usual case at steady state: the room is at its size bound and
        # its oldest message goes; anything rarer takes the slow path.
        if len(room.items) - room.head > self.size:
            self.bytes_held -= room.drop(1)
        if room.bytes > self.max_bytes or self.bytes_held > self.memory:
            self._trim(room, now)
            self._evict_memory()
        elif now - room.front()[2] >= self.ttl:
            self._trim(room, now)
        return seq

    def extend(self, key: Hashable, items: list[bytes], now: float, size: int = -1) -> int:
        """``append`` each of ``items`` in order; return the last one's seq (0 when off).

        For the server's runs of EMITs (muxserver.session): one call and one
        room lookup per run, not per message. ``size``, when the caller knows
        it, is the items' total length (a run's comes from its joined frames:
        summing it here was 3 % of a pipelined message's cost).
        """
        if not items:
            return self.position(key, now)[1]
        room = self._rooms.get(key)
        n = size if size >= 0 else sum(map(len, items))
        if room is None or room.members == 0 or self.bytes_held + n > self.memory:
            # Memberless rooms, and runs that cross the global bound, one by
            # one: evicting for ``memory`` after each message (which the
            # room's own bounds may then undo) is not the same as after all.
            seq = 0
            for item in items:
                seq = self.append(key, item, now)
            return seq
        self._gid = gid = self._gid + 1
        if not room.in_heap:
            heappush(self._heap, (gid, room))
            room.in_heap = True
        held = room.items
        held += items
        last = room.last = room.last + len(items)
        room.stamps.append((last, gid, now))
        room.bytes += n
        self.bytes_held += n
        over = len(held) - room.head - self.size
        if over > 0:
            self.bytes_held -= room.drop(over)
        if room.bytes > self.max_bytes or now - room.front()[2] >= self.ttl:
            self._trim(room, now)
        return last

    def next_seq(self, key: Hashable, now: float) -> int:
        """The seq the next ``append`` to ``key`` will return (0 when off), for frames carrying it."""
        room = self._rooms.get(key)
        if room is not None and room.members:
            return room.last + 1  # the hot case, without the grace check
        if not self.enabled:
            return 0
        room = self._get(key, now)
        return 1 if room is None else room.last + 1

    # ------------------------------------------------------------ members
    def set_members(self, key: Hashable, count: int, now: float) -> None:
        """Tell the history how many members the room has (call after every join/leave).

        At 0 the room's history starts its ``ttl`` of grace; a member coming
        back within it keeps the epoch and the numbering.
        """
        if not self.enabled:
            return
        if count > 0:
            room = self._room(key, now)
            if room.members == 0:
                self._idle.pop(key, None)
            room.members = count
            return
        room = self._get(key, now)
        if room is not None and room.members != 0:
            room.members = 0
            room.idle_since = now
            self._idle[key] = room

    # ----------------------------------------------------------- queries
    def position(self, key: Hashable, now: float) -> tuple[int, int]:
        """``(epoch, last seq)`` of the room's history, ``(0, 0)`` when it has none."""
        room = self._get(key, now) if self.enabled else None
        return (0, 0) if room is None else (room.epoch, room.last)

    def plan_join(
        self, key: Hashable, epoch: int, after: int, replay_max: int, now: float
    ) -> JoinPlan:
        """Answer a SEQUENCED JOIN (section 9): recovery, epoch, and the replay ``first..last``."""
        if not self.enabled:
            return JoinPlan(FRESH if epoch == 0 else RESET, 0, 1, 0)
        if replay_max < 0:
            raise ValueError(f"replay_max must be >= 0, got {replay_max!r}")
        room = self._room(key, now)
        self._trim(room, now)
        last = room.last
        oldest = last - room.held + 1  # last + 1 when nothing is held
        if epoch == 0 or epoch != room.epoch or after > last:
            first = oldest
            if replay_max != REPLAY_ALL:
                first = max(first, last - replay_max + 1)
            return JoinPlan(FRESH if epoch == 0 else RESET, room.epoch, first, last)
        first = max(after + 1, oldest)
        if replay_max != REPLAY_ALL:
            first = max(first, last - replay_max + 1)  # cap keeps the newest
        return JoinPlan(COMPLETE if first == after + 1 else GAP, room.epoch, first, last)

    def read(
        self,
        key: Hashable,
        epoch: int,
        from_seq: int,
        now: float,
        max_items: int = 256,
        max_bytes: int = 256 << 10,
        until: int | None = None,
    ) -> Page:
        """Pull the next page of a replay cursor at ``from_seq``.

        Reads up to ``until`` (the plan's ``last``), or with ``until=None`` up
        to the room's latest seq, so a cursor can run on into messages that
        arrived during the replay and hand over to live delivery when
        ``done``. A page holds at least one item when any is due, then stops
        before ``max_items`` or ``max_bytes`` would be passed. If messages
        from ``from_seq`` on were evicted, ``gap`` names them once and the
        page goes on from the oldest message held.
        """
        if from_seq < 1:
            raise ValueError(f"a replay starts at seq 1 or later, got {from_seq!r}")
        room = self._get(key, now) if self.enabled else None
        if room is None or room.epoch != epoch:
            return Page([], from_seq, None, True, self.enabled)
        self._trim(room, now)
        last = room.last
        stop = last if until is None else min(until, last)
        if from_seq > stop:
            return Page([], from_seq, None, True)
        oldest = last - room.held + 1
        gap = None
        if from_seq < oldest:
            gap = (from_seq, min(oldest - 1, stop))
            from_seq = gap[1] + 1
            if from_seq > stop:
                return Page([], from_seq, gap, True)
        items: list[bytes] = []
        total = 0
        at = room.head - oldest
        for item in room.items[at + from_seq : at + stop + 1]:
            if items and (len(items) >= max_items or total + len(item) > max_bytes):
                break
            items.append(item)
            total += len(item)
        next_seq = from_seq + len(items)
        return Page(items, next_seq, gap, next_seq > stop)

    # --------------------------------------------------------- expiry
    def expire(self, now: float) -> None:
        """Drop aged messages and memberless rooms idle for ``ttl``; for a periodic timer."""
        if not self.enabled:
            return
        ttl = self.ttl
        while True:
            room = self._oldest()
            if room is None:
                break
            last, _, added = room.front()
            if now - added < ttl:
                break
            # The whole front batch is as old: it goes at once.
            self.bytes_held -= room.drop(last - room.last + room.held)
        idle = self._idle
        while idle:
            key = next(iter(idle))
            if now - idle[key].idle_since < ttl:
                break
            self._drop(key)

    # --------------------------------------------------------- internals
    def _get(self, key: Hashable, now: float) -> _Room | None:
        """The room's live history, dropping it first if it has outlived its grace."""
        room = self._rooms.get(key)
        if room is not None and room.members == 0 and now - room.idle_since >= self.ttl:
            self._drop(key)
            return None
        return room

    def _room(self, key: Hashable, now: float) -> _Room:
        """The room's history, started (new epoch) when it has none."""
        room = self._get(key, now)
        if room is None:
            room = self._rooms[key] = _Room(key, self._new_epoch(), now)
            self._idle[key] = room  # memberless until set_members says otherwise
        return room

    def _new_epoch(self) -> int:
        for _ in range(64):
            epoch = self._randbits(64) & _U64
            if epoch:
                return epoch
        raise RuntimeError("history epoch source returned 0 sixty-four times in a row")

    def _drop(self, key: Hashable) -> None:
        room = self._rooms.pop(key)
        self._idle.pop(key, None)
        self.bytes_held -= room.bytes
        room.bytes = 0
        room.items.clear()  # its heap entry, if any, is discarded when met
        room.head = 0
        room.stamps.clear()

    def _trim(self, room: _Room, now: float) -> None:
        """Apply the room's own bounds (size, bytes, age), oldest first."""
        over = room.held - self.size
        if over > 0:
            self.bytes_held -= room.drop(over)
        max_bytes, ttl = self.max_bytes, self.ttl
        while room.held and (room.bytes > max_bytes or now - room.front()[2] >= ttl):
            self.bytes_held -= room.drop(1)

    def _oldest(self) -> _Room | None:
        """The room holding the oldest message of all, fixing stale heap keys on the way."""
        heap = self._heap
        while heap:
            key, room = heap[0]
            if not room.held:
                heappop(heap)
                room.in_heap = False
                continue
            gid = room.front()[1]
            if gid != key:
                heapreplace(heap, (gid, room))
            else:
                return room
        return None

    def _evict_memory(self) -> None:
        while self.bytes_held > self.memory:
            room = self._oldest()
            if room is None:  # cannot happen: held bytes live in some room's list
                break
            self.bytes_held -= room.drop(1)
