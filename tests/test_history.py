"""history: seq, epoch, the four bounds, join plans and paged replay, on fake time.

The examples pin each rule of protocol section 9 by hand; the state machine at
the end runs random appends, membership changes, expiry, joins and paged reads
against a deliberately naive list-based model of the same rules.
"""

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from muxserver.history import (
    COMPLETE,
    FRESH,
    GAP,
    REPLAY_ALL,
    RESET,
    History,
    JoinPlan,
    Page,
)

K = ("/", "room")
K2 = ("/", "other")


def counter(start=1):
    """A deterministic epoch source: 1, 2, 3, ..."""
    it = itertools.count(start)
    return lambda bits: next(it)


def hist(**kw):
    kw.setdefault("randbits", counter())
    return History(**kw)


def fill(h, key, n, now=0.0, size=1, members=1):
    """n appends of distinct items of `size` bytes (b'<seq>' padded), returning the seqs."""
    h.set_members(key, members, now)
    out = []
    for _ in range(n):
        seq = h.next_seq(key, now)
        out.append(h.append(key, f"{seq}".encode().ljust(size, b"."), now))
    return out


def item(seq, size=1):
    return f"{seq}".encode().ljust(size, b".")


def read_all(h, key, epoch, first, now, until, **kw):
    """Drain a cursor: (items, gaps)."""
    items, gaps, seq = [], [], first
    while True:
        page = h.read(key, epoch, seq, now, until=until, **kw)
        if page.gap:
            gaps.append(page.gap)
        items += page.items
        seq = page.next_seq
        if page.done:
            return items, gaps


# ------------------------------------------------------------ numbering
def test_seq_counts_per_room_from_one():
    h = hist()
    assert fill(h, K, 3) == [1, 2, 3]
    assert fill(h, K2, 2) == [1, 2]
    assert h.next_seq(K, 0.0) == 4
    assert h.position(K, 0.0) == (1, 3)
    assert h.position(K2, 0.0) == (2, 2)
    assert h.position(("/", "nobody"), 0.0) == (0, 0)
    assert (h.rooms_held, h.messages_held, h.bytes_held) == (2, 5, 5)


def test_epoch_is_random_nonzero_u64():
    h = History()
    h.set_members(K, 1, 0.0)
    epoch = h.position(K, 0.0)[0]
    assert 0 < epoch < 1 << 64
    zeros = iter([0, 0, 1 << 64 | 0, 42])  # 2**64 masks to 0: redrawn too
    h = History(randbits=lambda bits: next(zeros))
    h.set_members(K, 1, 0.0)
    assert h.position(K, 0.0)[0] == 42
    h = History(randbits=lambda bits: 0)
    with pytest.raises(RuntimeError, match="epoch source"):
        h.set_members(K, 1, 0.0)


@pytest.mark.parametrize(
    "kw",
    [{"size": -1}, {"max_bytes": -1}, {"memory": -5}, {"ttl": -1.0}, {"ttl": float("nan")}],
)
def test_bad_configuration_is_refused(kw):
    with pytest.raises(ValueError, match="history"):
        History(**kw)


def test_bad_read_and_join_arguments_are_refused():
    h = hist()
    fill(h, K, 2)
    with pytest.raises(ValueError, match="seq 1"):
        h.read(K, 1, 0, 0.0)
    with pytest.raises(ValueError, match="replay_max"):
        h.plan_join(K, 0, 0, -1, 0.0)


# -------------------------------------------------------------- plans
def test_fresh_join_replays_the_latest_replay_max():
    h = hist()
    fill(h, K, 5)
    assert h.plan_join(K, 0, 0, 3, 0.0) == JoinPlan(FRESH, 1, 3, 5)
    assert h.plan_join(K, 0, 0, 0, 0.0) == JoinPlan(FRESH, 1, 6, 5)
    assert h.plan_join(K, 0, 0, REPLAY_ALL, 0.0) == JoinPlan(FRESH, 1, 1, 5)
    assert h.plan_join(K, 0, 0, 50, 0.0) == JoinPlan(FRESH, 1, 1, 5)
    assert read_all(h, K, 1, 3, 0.0, 5) == ([item(3), item(4), item(5)], [])


def test_fresh_join_of_a_new_room_starts_its_history():
    h = hist()
    plan = h.plan_join(K, 0, 0, 10, 0.0)
    assert plan == JoinPlan(FRESH, 1, 1, 0)  # an epoch to resume with later
    assert h.rooms_held == 1


def test_resume_with_nothing_missing_is_complete():
    h = hist()
    fill(h, K, 5)
    assert h.plan_join(K, 1, 5, 10, 0.0) == JoinPlan(COMPLETE, 1, 6, 5)
    assert h.plan_join(K, 1, 2, 10, 0.0) == JoinPlan(COMPLETE, 1, 3, 5)
    assert h.plan_join(K, 1, 2, REPLAY_ALL, 0.0) == JoinPlan(COMPLETE, 1, 3, 5)
    assert h.plan_join(K, 1, 5, 0, 0.0) == JoinPlan(COMPLETE, 1, 6, 5)
    assert read_all(h, K, 1, 3, 0.0, 5) == ([item(3), item(4), item(5)], [])


def test_resume_past_evicted_messages_is_a_gap():
    h = hist(size=3)
    fill(h, K, 6)
    assert h.plan_join(K, 1, 1, REPLAY_ALL, 0.0) == JoinPlan(GAP, 1, 4, 6)  # 2..3 gone
    assert h.plan_join(K, 1, 3, REPLAY_ALL, 0.0) == JoinPlan(COMPLETE, 1, 4, 6)


def test_resume_capped_by_replay_max_keeps_the_newest():
    h = hist()
    fill(h, K, 6)
    # wanted 2..6, at most 2: the newest two; 2..4 are the GAP (first - 1 = 4)
    assert h.plan_join(K, 1, 1, 2, 0.0) == JoinPlan(GAP, 1, 5, 6)
    assert h.plan_join(K, 1, 1, 0, 0.0) == JoinPlan(GAP, 1, 7, 6)
    assert h.plan_join(K, 1, 4, 2, 0.0) == JoinPlan(COMPLETE, 1, 5, 6)


def test_wrong_epoch_is_a_reset_with_a_fresh_replay():
    h = hist(size=4)
    fill(h, K, 6)
    assert h.plan_join(K, 99, 2, 2, 0.0) == JoinPlan(RESET, 1, 5, 6)
    assert h.plan_join(K, 99, 2, REPLAY_ALL, 0.0) == JoinPlan(RESET, 1, 3, 6)
    assert h.plan_join(K, 99, 2, 0, 0.0) == JoinPlan(RESET, 1, 7, 6)


def test_resume_ahead_of_the_room_is_a_reset():
    h = hist()
    fill(h, K, 3)
    assert h.plan_join(K, 1, 9, REPLAY_ALL, 0.0) == JoinPlan(RESET, 1, 1, 3)


def test_aged_out_messages_keep_epoch_and_numbering_while_members_stay():
    h = hist(ttl=10.0)
    fill(h, K, 3, now=0.0)
    h.expire(20.0)
    assert h.messages_held == 0 and h.rooms_held == 1
    assert h.plan_join(K, 1, 1, REPLAY_ALL, 20.0) == JoinPlan(GAP, 1, 4, 3)
    assert h.append(K, b"x", 20.0) == 4


# ------------------------------------------------------------- bounds
def test_size_bound_keeps_the_newest():
    h = hist(size=3)
    fill(h, K, 5)
    assert h.messages_held == 3
    assert read_all(h, K, 1, 1, 0.0, None)[0] == [item(3), item(4), item(5)]


def test_byte_bound_per_room():
    h = hist(max_bytes=25)
    fill(h, K, 3, size=10)
    assert (h.messages_held, h.bytes_held) == (2, 20)
    fill(h, K2, 2, size=10)  # the other room is not touched
    assert (h.messages_held, h.bytes_held) == (4, 40)
    h.append(K, b"y" * 30, 0.0)  # bigger than the bound: it gets a seq but is not kept
    assert h.position(K, 0.0) == (1, 4)
    assert h.plan_join(K, 1, 3, REPLAY_ALL, 0.0) == JoinPlan(GAP, 1, 5, 4)
    assert (h.messages_held, h.bytes_held) == (2, 20)


def test_ttl_bound_on_append_and_on_expire():
    h = hist(ttl=10.0)
    h.set_members(K, 1, 0.0)
    h.set_members(K2, 1, 0.0)
    h.append(K, b"a", 0.0)
    h.append(K2, b"b", 0.0)
    h.append(K, b"c", 5.0)
    h.append(K, b"d", 10.0)  # lazily drops "a" (age exactly ttl)
    assert h.plan_join(K, 0, 0, REPLAY_ALL, 10.0) == JoinPlan(FRESH, 1, 2, 3)
    assert h.bytes_held == 3  # K2's "b" waits for the timer
    h.expire(10.0)
    assert (h.messages_held, h.bytes_held) == (2, 2)
    h.expire(14.99)
    assert h.messages_held == 2
    h.expire(15.0)
    assert h.messages_held == 1
    # reads age the room themselves, whatever the timer did
    assert h.read(K, 1, 1, 25.0) == Page([], 4, (1, 3), True)


def test_memory_bound_evicts_the_oldest_of_all_rooms():
    h = hist(memory=40)
    rooms = [("/", f"r{i}") for i in range(3)]
    for r in rooms:
        h.set_members(r, 1, 0.0)
    for i in range(4):
        for r in rooms:
            h.append(r, f"{r[1]}-{i}".encode().ljust(5, b"."), float(i))
    assert h.bytes_held == 40 and h.messages_held == 8  # r0-0, r1-0, r2-0, r0-1 went first
    assert [h.plan_join(r, 0, 0, REPLAY_ALL, 4.0).first for r in rooms] == [3, 2, 2]
    h.set_members(("/", "big"), 1, 4.0)
    h.append(("/", "big"), b"z" * 20, 4.0)
    assert h.bytes_held == 40 and h.messages_held == 5
    assert [h.plan_join(r, 0, 0, REPLAY_ALL, 4.0).first for r in rooms] == [4, 4, 3]
    # the heap keeps one entry per room however much went through it
    assert len(h._heap) <= len(rooms) + 1


def test_memory_bound_with_many_rooms_stays_exact():
    h = hist(memory=1000, size=1000)
    keys = [("/", f"r{i}") for i in range(50)]
    for k in keys:
        h.set_members(k, 1, 0.0)
    order = []
    for i in range(2000):
        k = keys[(i * 7) % 50]
        seq = h.append(k, b"0123456789", float(i))
        order.append((k, seq))
    kept = order[-100:]  # 1000 bytes / 10: exactly the last 100 of all rooms
    assert h.messages_held == 100
    for k in keys:
        seqs = [s for kk, s in kept if kk == k]
        plan = h.plan_join(k, 0, 0, REPLAY_ALL, 2000.0)
        assert list(range(plan.first, plan.last + 1)) == seqs


# -------------------------------------------------- room lifetime (ttl)
def test_room_refilled_within_ttl_keeps_epoch_and_counting():
    h = hist(ttl=10.0)
    fill(h, K, 3, now=0.0)
    h.set_members(K, 0, 1.0)
    h.expire(10.99)
    assert h.rooms_held == 1
    h.set_members(K, 1, 10.99)
    assert h.position(K, 11.0) == (1, 3)
    assert h.append(K, b"x", 11.0) == 4


def test_room_empty_for_ttl_starts_a_new_epoch():
    h = hist(ttl=10.0)
    fill(h, K, 3, now=0.0)
    h.set_members(K, 0, 1.0)
    h.expire(11.0)
    assert (h.rooms_held, h.messages_held, h.bytes_held) == (0, 0, 0)
    h.set_members(K, 1, 11.0)
    assert h.position(K, 11.0) == (2, 0)
    assert h.append(K, b"x", 11.0) == 1
    assert h.plan_join(K, 1, 3, REPLAY_ALL, 11.0) == JoinPlan(RESET, 2, 1, 1)


def test_room_grace_ends_without_the_timer():
    h = hist(ttl=10.0)
    fill(h, K, 3, now=0.0)
    h.set_members(K, 0, 1.0)
    assert h.position(K, 11.0) == (0, 0)  # no expire() ran: the lookup ages it
    assert h.next_seq(K, 11.0) == 1
    assert h.append(K, b"x", 11.0) == 1  # a memberless append starts a new epoch
    assert h.position(K, 11.0) == (2, 1)


def test_memberless_append_extends_the_grace():
    h = hist(ttl=10.0)
    fill(h, K, 1, now=0.0)
    h.set_members(K, 0, 1.0)
    h.append(K, b"late", 8.0)  # e.g. from another node
    h.expire(15.0)
    assert h.position(K, 15.0) == (1, 2)
    h.expire(18.0)
    assert h.rooms_held == 0


def test_leave_of_a_room_without_history_creates_nothing():
    h = hist()
    h.set_members(K, 0, 0.0)
    assert h.rooms_held == 0


# -------------------------------------------------------------- paging
def test_pages_by_items_and_bytes():
    h = hist()
    fill(h, K, 5, size=10)
    assert h.read(K, 1, 1, 0.0, max_items=2) == Page([item(1, 10), item(2, 10)], 3, None, False)
    assert h.read(K, 1, 3, 0.0, max_bytes=25) == Page([item(3, 10), item(4, 10)], 5, None, False)
    assert h.read(K, 1, 5, 0.0, max_bytes=1) == Page([item(5, 10)], 6, None, True)  # at least one
    assert h.read(K, 1, 6, 0.0) == Page([], 6, None, True)


def test_page_stops_at_until_and_runs_on_to_the_head_without_it():
    h = hist()
    fill(h, K, 3)
    plan = h.plan_join(K, 0, 0, REPLAY_ALL, 0.0)
    first = h.read(K, 1, plan.first, 0.0, max_items=2, until=plan.last)
    assert first == Page([item(1), item(2)], 3, None, False)
    fill(h, K, 2)  # live messages arrive during the replay
    assert h.read(K, 1, 3, 0.0, until=plan.last) == Page([item(3)], 4, None, True)
    assert h.read(K, 1, 3, 0.0) == Page([item(3), item(4), item(5)], 6, None, True)


def test_eviction_between_pages_is_reported_once():
    h = hist(size=4)
    fill(h, K, 4)
    plan = h.plan_join(K, 0, 0, REPLAY_ALL, 0.0)
    assert plan == JoinPlan(FRESH, 1, 1, 4)
    page = h.read(K, 1, 1, 0.0, max_items=1, until=plan.last)
    assert page == Page([item(1)], 2, None, False)
    fill(h, K, 5)  # 2..5 evicted before the cursor reaches them; 6..9 held
    page = h.read(K, 1, page.next_seq, 0.0, max_items=2)
    assert page == Page([item(6), item(7)], 8, (2, 5), False)
    page = h.read(K, 1, page.next_seq, 0.0, max_items=2)
    assert page == Page([item(8), item(9)], 10, None, True)


def test_gap_inside_the_plan_only():
    h = hist(size=2)
    fill(h, K, 3)
    plan = h.plan_join(K, 0, 0, REPLAY_ALL, 0.0)  # 2..3
    fill(h, K, 4)  # everything of the plan is gone
    assert h.read(K, 1, plan.first, 0.0, until=plan.last) == Page([], 4, (2, 3), True)


def test_read_of_a_restarted_history():
    h = hist(ttl=10.0)
    fill(h, K, 3)
    h.set_members(K, 0, 0.0)
    page = h.read(K, 1, 1, 20.0)
    assert page.restarted and page.done and page.items == []
    h.set_members(K, 1, 20.0)
    assert h.read(K, 1, 1, 20.0).restarted


# ---------------------------------------------------------------- off
def test_size_zero_turns_history_off():
    h = hist(size=0)
    h.set_members(K, 3, 0.0)
    assert h.enabled is False
    assert [h.append(K, b"x", 0.0) for _ in range(3)] == [0, 0, 0]
    assert h.next_seq(K, 0.0) == 0
    assert h.position(K, 0.0) == (0, 0)
    assert h.plan_join(K, 0, 0, REPLAY_ALL, 0.0) == JoinPlan(FRESH, 0, 1, 0)
    assert h.plan_join(K, 7, 3, REPLAY_ALL, 0.0) == JoinPlan(RESET, 0, 1, 0)
    assert h.read(K, 0, 1, 0.0) == Page([], 1, None, True)
    h.expire(1000.0)
    assert (h.rooms_held, h.messages_held, h.bytes_held) == (0, 0, 0)


# ------------------------------------------------------ reference model
class Model:
    """The same rules, written the slow and obvious way: lists, eager ageing."""

    def __init__(self, size, max_bytes, ttl, memory):
        self.size, self.max_bytes, self.ttl, self.memory = size, max_bytes, ttl, memory
        self.rooms = {}  # key -> dict(epoch, last, msgs=[(gid, seq, t, item)], members, idle)
        self.gid = 0
        self.epochs = itertools.count(1)

    def age(self, now):
        for key in list(self.rooms):
            r = self.rooms[key]
            r["msgs"] = [m for m in r["msgs"] if now - m[2] < self.ttl]
            if r["members"] == 0 and now - r["idle"] >= self.ttl:
                del self.rooms[key]

    def room(self, key, now):
        if key not in self.rooms:
            self.rooms[key] = {
                "epoch": next(self.epochs), "last": 0, "msgs": [], "members": 0, "idle": now,
            }  # fmt: skip
        return self.rooms[key]

    def append(self, key, item, now):
        if self.size == 0:
            return 0
        self.age(now)
        r = self.room(key, now)
        if r["members"] == 0:
            r["idle"] = now
        r["last"] += 1
        self.gid += 1
        r["msgs"].append((self.gid, r["last"], now, item))
        while len(r["msgs"]) > self.size or sum(len(m[3]) for m in r["msgs"]) > self.max_bytes:
            r["msgs"].pop(0)
        while self.total() > self.memory:
            oldest = min((m[0], k) for k, rr in self.rooms.items() for m in rr["msgs"])
            self.rooms[oldest[1]]["msgs"].pop(0)
        return r["last"]

    def total(self):
        return sum(len(m[3]) for r in self.rooms.values() for m in r["msgs"])

    def set_members(self, key, count, now):
        if self.size == 0:
            return
        self.age(now)
        if count > 0:
            self.room(key, now)["members"] = count
        elif key in self.rooms and self.rooms[key]["members"] != 0:
            self.rooms[key]["members"] = 0
            self.rooms[key]["idle"] = now

    def position(self, key, now):
        self.age(now)
        r = self.rooms.get(key) if self.size else None
        return (0, 0) if r is None else (r["epoch"], r["last"])

    def plan_join(self, key, epoch, after, replay_max, now):
        if self.size == 0:
            return JoinPlan(FRESH if epoch == 0 else RESET, 0, 1, 0)
        self.age(now)
        r = self.room(key, now)
        held = [m[1] for m in r["msgs"]]
        last = r["last"]

        def newest(seqs):
            if replay_max == REPLAY_ALL:
                return seqs
            return seqs[max(0, len(seqs) - replay_max) :] if replay_max else []

        if epoch == 0 or epoch != r["epoch"] or after > last:
            chosen = newest(held)
            recovery = FRESH if epoch == 0 else RESET
        else:
            chosen = newest([s for s in held if s > after])
            recovery = COMPLETE if (chosen[0] if chosen else last + 1) == after + 1 else GAP
        return JoinPlan(recovery, r["epoch"], chosen[0] if chosen else last + 1, last)

    def read(self, key, epoch, from_seq, now, max_items, max_bytes, until):
        self.age(now)
        r = self.rooms.get(key) if self.size else None
        if r is None or r["epoch"] != epoch:
            return Page([], from_seq, None, True, self.size > 0)
        stop = r["last"] if until is None else min(until, r["last"])
        if from_seq > stop:
            return Page([], from_seq, None, True)
        due = [m for m in r["msgs"] if from_seq <= m[1] <= stop]
        gap = None
        start = due[0][1] if due else stop + 1
        if start > from_seq:
            gap = (from_seq, start - 1)
        items = []
        for m in due:
            if items and (len(items) >= max_items or sum(map(len, items)) + len(m[3]) > max_bytes):
                break
            items.append(m[3])
        return Page(items, start + len(items), gap, start + len(items) > stop)


KEYS = [("/", "a"), ("/", "b"), ("/x", "a")]


class HistoryMachine(RuleBasedStateMachine):
    @initialize(
        size=st.sampled_from([0, 1, 2, 3, 5]),
        max_bytes=st.sampled_from([0, 4, 10, 30, 1000]),
        ttl=st.sampled_from([0.0, 5.0, 10.0]),
        memory=st.sampled_from([0, 8, 20, 45, 10_000]),
    )
    def setup(self, size, max_bytes, ttl, memory):
        self.h = History(size, max_bytes, ttl, memory, randbits=counter())
        self.m = Model(size, max_bytes, ttl, memory)
        self.now = 0.0
        self.n = 0
        self.cursors = []  # [key, epoch, next_seq, until]

    @rule(dt=st.sampled_from([0.0, 0.25, 1.0, 2.5, 4.75, 5.0, 10.0, 30.0]))
    def advance(self, dt):
        self.now += dt

    @rule(key=st.sampled_from(KEYS), pad=st.integers(0, 12))
    def append(self, key, pad):
        self.n += 1
        data = f"{self.n}".encode() + b"." * pad
        expected = self.m.position(key, self.now)[1] + 1 if self.m.size else 0
        assert self.h.next_seq(key, self.now) == expected
        got = self.h.append(key, data, self.now)
        assert got == self.m.append(key, data, self.now)

    @rule(key=st.sampled_from(KEYS), pads=st.lists(st.integers(0, 12), min_size=1, max_size=9))
    def extend(self, key, pads):
        """A run of messages in one call (the server's batch) is appends in a row."""
        items = []
        for pad in pads:
            self.n += 1
            items.append(f"{self.n}".encode() + b"." * pad)
        want = 0
        for item in items:
            want = self.m.append(key, item, self.now)
        assert self.h.extend(key, items, self.now) == want

    @rule(key=st.sampled_from(KEYS), count=st.sampled_from([0, 0, 1, 3]))
    def set_members(self, key, count):
        self.h.set_members(key, count, self.now)
        self.m.set_members(key, count, self.now)

    @rule(key=st.sampled_from(KEYS))
    def position(self, key):
        got = self.h.position(key, self.now)
        assert got == self.m.position(key, self.now)
        assert self.h.next_seq(key, self.now) == (got[1] + 1 if self.m.size else 0)

    @rule()
    def expire(self):
        self.h.expire(self.now)
        self.m.age(self.now)
        assert self.h.rooms_held == (len(self.m.rooms) if self.m.size else 0)
        assert self.h.messages_held == sum(len(r["msgs"]) for r in self.m.rooms.values())
        assert self.h.bytes_held == self.m.total()

    @rule(
        key=st.sampled_from(KEYS),
        which=st.sampled_from(["fresh", "current", "wrong"]),
        after=st.integers(0, 12),
        replay_max=st.sampled_from([0, 1, 2, 4, REPLAY_ALL]),
        live=st.booleans(),
    )
    def join(self, key, which, after, replay_max, live):
        epoch = {"fresh": 0, "current": self.m.position(key, self.now)[0], "wrong": 10**6}[which]
        plan = self.h.plan_join(key, epoch, after, replay_max, self.now)
        assert plan == self.m.plan_join(key, epoch, after, replay_max, self.now)
        assert plan.first >= 1 and plan.first <= plan.last + 1
        if plan.recovery in (COMPLETE, GAP):
            assert plan.first >= after + 1
            assert (plan.recovery == COMPLETE) == (plan.first == after + 1)
        self.cursors.append([key, plan.epoch, plan.first, None if live else plan.last])

    @rule(
        index=st.integers(0, 7),
        max_items=st.sampled_from([1, 2, 100]),
        max_bytes=st.sampled_from([1, 12, 1000]),
    )
    def read(self, index, max_items, max_bytes):
        if not self.cursors:
            return
        cur = self.cursors[index % len(self.cursors)]
        key, epoch, seq, until = cur
        page = self.h.read(key, epoch, seq, self.now, max_items, max_bytes, until)
        assert page == self.m.read(key, epoch, seq, self.now, max_items, max_bytes, until)
        cur[2] = page.next_seq
        if page.done:
            self.cursors.remove(cur)

    @invariant()
    def internals_consistent(self):
        h = getattr(self, "h", None)
        if h is None:
            return
        rooms = list(h._rooms.values())
        assert h.bytes_held == sum(r.bytes for r in rooms)
        for r in rooms:
            assert r.bytes == sum(map(len, r.items[r.head :]))
            assert r.held <= h.size
            assert r.head * 8 < len(r.items) or not r.items  # the dead front is cut in time
            assert not r.held or r.in_heap
            if r.held:
                assert r.stamps[-1][0] == r.last  # the newest batch ends at the latest seq
        in_heap = [id(room) for _, room in h._heap]
        assert len(in_heap) == len(set(in_heap))  # one entry per room, never more
        assert {id(r) for r in rooms if r.held} <= set(in_heap)
        for key, room in h._heap:
            assert not room.held or key <= room.front()[1]  # a key is a lower bound
        assert set(h._idle) == {r.key for r in rooms if r.members == 0}
        idle = [r.idle_since for r in h._idle.values()]
        assert idle == sorted(idle)  # what lets expire stop at the first young room


TestHistoryMachine = HistoryMachine.TestCase
TestHistoryMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


@pytest.mark.parametrize("seed", range(20))
def test_extend_is_append_in_a_loop(seed):
    """History.extend (the server's per-run call) leaves exactly what appends would."""
    import random

    rnd = random.Random(seed)
    bounds = dict(
        size=rnd.choice([1, 5, 50]),
        max_bytes=rnd.choice([40, 400, 1 << 20]),
        ttl=rnd.choice([0.5, 5.0]),
        memory=rnd.choice([100, 1000, 1 << 20]),
    )
    one, many = (History(**bounds, randbits=lambda n: 7) for _ in range(2))
    now = 0.0
    b_members = rnd.choice([0, 1])  # "b" memberless: extend falls back to append
    for h in (one, many):
        h.set_members("a", 1, now)
        h.set_members("b", b_members, now)
    for _ in range(60):
        now += rnd.random()
        key = rnd.choice("ab")
        items = [bytes(rnd.randint(1, 30)) for _ in range(rnd.randint(1, 8))]
        seq = 0
        for item in items:
            seq = one.append(key, item, now)
        assert many.extend(key, items, now) == seq
        for k in "ab":
            assert one.position(k, now) == many.position(k, now)
            want = one.read(k, 7, 1, now, 1000, 1 << 20)
            assert many.read(k, 7, 1, now, 1000, 1 << 20) == want
        assert (one.bytes_held, one.messages_held) == (many.bytes_held, many.messages_held)
