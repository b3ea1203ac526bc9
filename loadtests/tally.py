"""Counting for the Locust load test: payloads, loss detection, latency histogram, summary.

Kept apart from the locustfile because importing Locust monkey-patches the
whole process (gevent): this module imports neither Locust nor gevent, so
pytest can test the counting directly, and the runner script can format a
summary it reads back from JSON.

Decisions worth knowing:

* Every delivery is counted here, in plain integers and one dict increment,
  and never through a Locust event: at hundreds of thousands of deliveries a
  second a Locust event per delivery (about 2 us each) would measure Locust.
  The locustfile fires ``deliver`` events for a systematic sample only.
* Latency percentiles come from a histogram with buckets about 1 % wide, so
  node tallies merge exactly by adding counts (workers ship them to the
  master) and memory stays bounded however long the run.
* Loss is judged per (sender, receiver) stream, which the protocol orders:
  a receiver learns a sender's position from the first message it gets from
  it (it cannot expect what was sent before it joined), and from then on
  every sequence number must be exactly the next one.
"""

from __future__ import annotations

import struct
import textwrap
from dataclasses import dataclass, field

# sender id (random per connection), per-sender sequence, send time (time.time()).
# Wall-clock time because sender and receiver may be different processes (Locust
# workers); they share the machine's clock.
PAYLOAD_HEAD = struct.Struct(">QId")
MIN_PAYLOAD = PAYLOAD_HEAD.size
_FILL = b"muxserver-loadtest-" * 4096

# A receiver remembers at most this many missing sequence numbers per sender,
# to tell a late (reordered) message from a duplicate; past it, gaps are only counted.
MAX_REMEMBERED_GAPS = 4096


def make_payload(sender: int, seq: int, now: float, size: int) -> bytes:
    """A payload of ``size`` bytes (at least MIN_PAYLOAD) carrying sender, sequence and time."""
    head = PAYLOAD_HEAD.pack(sender, seq & 0xFFFFFFFF, now)
    if size <= MIN_PAYLOAD:
        return head
    return head + padding(size)


def padding(size: int) -> bytes:
    """The filler after the header in a payload of ``size`` bytes (build once, reuse)."""
    pad = max(0, size - MIN_PAYLOAD)
    if pad > len(_FILL):
        return (_FILL * (pad // len(_FILL) + 1))[:pad]
    return _FILL[:pad]


def bucket(us: int) -> int:
    """Histogram bucket of a latency in microseconds: exact below 1 ms, then ~1 % wide."""
    if us < 1_000:
        return us if us > 0 else 0
    if us < 10_000:
        return us - us % 10
    if us < 100_000:
        return us - us % 100
    if us < 1_000_000:
        return us - us % 1_000
    return us - us % 10_000


def percentile(hist: dict[int, int], q: float) -> int | None:
    """The ``q`` quantile (0..1) of a bucket -> count histogram, in microseconds."""
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, int(q * total + 0.999999))  # nearest-rank
    seen = 0
    for key in sorted(hist):
        seen += hist[key]
        if seen >= rank:
            return key
    return max(hist)


class SequenceTracker:
    """Per-receiver loss check: the next expected sequence number of every sender.

    ``check`` is the slow path; the hot path in the locustfile compares
    against ``expected`` inline and only calls ``check`` on a mismatch.
    """

    __slots__ = ("expected", "missing")

    def __init__(self) -> None:
        self.expected: dict[int, int] = {}
        self.missing: dict[int, set[int]] = {}

    def check(self, sender: int, seq: int) -> tuple[str, int]:
        """Record one arrival; returns ("ok"|"gap"|"reordered"|"duplicate", count)."""
        nxt = self.expected.get(sender)
        if nxt is None or seq == nxt:
            self.expected[sender] = seq + 1
            return "ok", 0
        if seq > nxt:
            lost = seq - nxt
            self.expected[sender] = seq + 1
            miss = self.missing.setdefault(sender, set())
            room = MAX_REMEMBERED_GAPS - len(miss)
            if room > 0:
                miss.update(range(nxt, nxt + min(lost, room)))
            return "gap", lost
        miss = self.missing.get(sender)
        if miss and seq in miss:
            miss.discard(seq)
            return "reordered", 1
        return "duplicate", 1


HISTOGRAMS = ("latency", "loop_lag")


@dataclass
class Tally:
    """What one Locust process counted; ``merge`` adds another process's tally.

    Times are wall-clock (time.time()) so tallies of different processes
    line up. ``steady`` holds rates between "all users spawned" and "senders
    stopped", per process; rates of processes that ran side by side add up.
    """

    sent: int = 0  # EMITs written
    acked: int = 0  # EMIT REPLYs with status OK
    expected: int = 0  # sum of the recipient counts in those REPLYs
    unacked: int = 0  # acked EMITs whose REPLY has not come (yet)
    delivered: int = 0  # EVENTs received
    gaps: int = 0  # sequence numbers skipped (minus those that came late)
    reordered: int = 0  # arrived after a later one from the same sender
    duplicates: int = 0  # arrived twice
    foreign: int = 0  # EVENTs without our payload header (someone else's traffic)
    cycles: int = 0  # churn: connect/join/leave/bye cycles completed
    # recovery: cuts, resumes, replays, announced gaps... (loadtests/recovery.py)
    recovery: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # status name -> count
    latency: dict[int, int] = field(default_factory=dict)  # bucket (us) -> count
    # How late the process's event loop woke a timer (us buckets): the delay
    # Locust itself adds to every latency measured while it is busy.
    loop_lag: dict[int, int] = field(default_factory=dict)
    t_start: float = 0.0
    t_ramped: float = 0.0
    t_stop: float = 0.0
    at_ramp: dict[str, int] = field(default_factory=dict)  # counters when all users were up
    delivered_at_stop: int = 0  # deliveries that arrived while senders were sending
    # Per second while every user was up; per process, so processes' rates add up.
    steady: dict[str, float] = field(default_factory=dict)  # counter name -> rate
    nodes: int = 1
    users: int = 0

    STEADY = ("sent", "delivered", "cycles")

    def error(self, name: str, count: int = 1) -> None:
        self.errors[name] = self.errors.get(name, 0) + count

    def mark_ramped(self, now: float) -> None:
        self.t_ramped = now
        self.at_ramp = {name: getattr(self, name) for name in self.STEADY}

    def mark_stopped(self, now: float) -> None:
        """Senders stopped: freeze the steady-state rates (drain deliveries do not count)."""
        self.t_stop = now
        self.delivered_at_stop = self.delivered
        t0 = self.t_ramped or self.t_start
        span = now - t0
        if span > 0.5:  # shorter windows say more about timer noise than the server
            self.steady = {
                name: (getattr(self, name) - self.at_ramp.get(name, 0)) / span
                for name in self.STEADY
            }

    # ------------------------------------------------------------ transport
    def to_dict(self) -> dict:
        """Plain data for Locust's msgpack messages (no int dict keys)."""
        data = dict(self.__dict__)
        data["errors"] = dict(self.errors)
        data["recovery"] = dict(self.recovery)
        for name in HISTOGRAMS:
            data[name] = [[k, v] for k, v in getattr(self, name).items()]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Tally:
        data = dict(data)
        hists = {name: {int(k): int(v) for k, v in data.pop(name, [])} for name in HISTOGRAMS}
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known, **hists)

    def merge(self, other: Tally) -> None:
        for name in (
            "sent", "acked", "expected", "unacked", "delivered", "gaps", "reordered",
            "duplicates", "foreign", "cycles", "users", "delivered_at_stop",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name, rate in other.steady.items():
            self.steady[name] = self.steady.get(name, 0.0) + rate
        for name, count in other.errors.items():
            self.error(name, count)
        for name, count in other.recovery.items():
            self.recovery[name] = self.recovery.get(name, 0) + count
        for name in HISTOGRAMS:
            mine = getattr(self, name)
            for key, count in getattr(other, name).items():
                mine[key] = mine.get(key, 0) + count
        if other.t_start and (not self.t_start or other.t_start < self.t_start):
            self.t_start = other.t_start
        self.t_stop = max(self.t_stop, other.t_stop)
        self.nodes += other.nodes


# ------------------------------------------------------------------ summary
def verdict(tally: Tally, acks: bool) -> list[str]:
    """Why the run failed (empty: it passed). ``acks``: expected counts are known."""
    problems = []
    if tally.errors:
        problems.append(
            "errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(tally.errors.items()))
        )
    if tally.gaps:
        why = "lost, or refused: a refused EMIT leaves a gap at every receiver"
        problems.append(f"{tally.gaps} sequence gaps ({why if tally.errors else 'lost'})")
    if tally.reordered:
        problems.append(f"{tally.reordered} messages out of order")
    if tally.duplicates:
        problems.append(f"{tally.duplicates} duplicate deliveries")
    if acks:
        if tally.unacked:
            problems.append(f"{tally.unacked} EMITs never acknowledged")
        if tally.delivered != tally.expected:
            problems.append(
                f"received {tally.delivered} deliveries, the server queued {tally.expected}"
            )
    return problems


def recovery_problems(tally: Tally) -> list[str]:
    """What fails a recovery run besides unannounced loss (counted as gaps and the like)."""
    problems = []
    if not tally.recovery.get("cuts"):
        problems.append("no connection was cut: nothing was recovered")
    if tally.unacked:
        problems.append(f"{tally.unacked} EMITs neither acknowledged nor cut off")
    return problems


def _quantiles_ms(hist: dict[int, int]) -> dict[str, float | None]:
    return {
        name: (None if (v := percentile(hist, q)) is None else v / 1000)
        for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
    }


def summary_dict(
    tally: Tally, scenario: str, acks: bool, sample: int, offered: float | None = None
) -> dict:
    """The figures the summary prints, also written as JSON for scripts and tests.

    ``offered``: messages/s (churn: cycles/s) the options asked for; a run that
    sent clearly less was limited by the load generator, not the server.
    """
    t0 = tally.t_start
    t1 = tally.t_stop or t0
    span = max(t1 - t0, 1e-9)
    problems = verdict(tally, acks)
    if scenario == "recovery":
        problems += recovery_problems(tally)
    return {
        "scenario": scenario,
        "users": tally.users,
        "processes": tally.nodes,
        "seconds": round(t1 - t0, 3),
        "sent": tally.sent,
        "acked": tally.acked,
        "unacked": tally.unacked,
        "expected": tally.expected if acks else None,
        "delivered": tally.delivered,
        "missing": (tally.expected - tally.delivered) if acks else None,
        "deliveries_per_s": round(tally.delivered_at_stop / span, 1),
        "steady_deliveries_per_s": round(tally.steady.get("delivered", 0.0), 1),
        "messages_per_s": round(tally.steady.get("sent", 0.0), 1),
        "offered_per_s": offered,
        "latency_ms": _quantiles_ms(tally.latency),
        "loop_lag_ms": _quantiles_ms(tally.loop_lag),
        "gaps": tally.gaps,
        "reordered": tally.reordered,
        "duplicates": tally.duplicates,
        "foreign": tally.foreign,
        "cycles": tally.cycles,
        "cycles_per_s": round(tally.steady.get("cycles", 0.0), 1),
        "errors": dict(tally.errors),
        "recovery": dict(tally.recovery) if scenario == "recovery" else None,
        "deliver_sample": sample,
        "passed": not problems,
        "problems": problems,
    }


WIDTH = 100  # every line the load test prints fits a terminal this wide
LABEL = 24  # the summary's label column


def fit(lines: list[str], width: int = WIDTH, indent: int = LABEL) -> str:
    """Lines wrapped at ``width`` columns; continuations indented under the values."""
    out = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
            continue
        out.extend(
            textwrap.wrap(
                line,
                width,
                subsequent_indent=" " * indent,
                break_on_hyphens=False,
                drop_whitespace=True,
            )  # fmt: skip
        )
    return "\n".join(out)


def format_progress(
    elapsed: float, total: float, users: int, deliveries_per_s: float, loss: int,
    draining: bool = False,
) -> str:  # fmt: skip
    """The line ``make loadtest`` prints every few seconds, e.g.

    ``loadtest   10 s of 30 s   200 users   1,234 deliveries/s   loss so far 0``
    """
    when = f"{elapsed:4.0f} s of {total:.0f} s" if not draining else f"{elapsed:4.0f} s, draining"
    line = (
        f"loadtest {when}   {users:,} users   {deliveries_per_s:,.0f} deliveries/s   "
        f"loss so far {loss:,}"
    )
    return line[:WIDTH]


def _recovery_lines(s: dict, n, ms) -> list[str]:
    """The recovery scenario's part of the summary (its loss is judged by seqs, not counts)."""
    r = s.get("recovery") or {}

    def g(name: str) -> str:
        return n(r.get(name, 0))

    lines = [
        f"  messages sent         {n(s['sent'])}  ({n(s['messages_per_s'])}/s"
        + (f" of {n(s['offered_per_s'])}/s asked)" if s.get("offered_per_s") else ")")
        + f", {n(s['acked'])} acked, {g('unconfirmed')} unconfirmed (in flight at a cut)",
        f"  deliveries received   {n(s['delivered'])}  ({g('replayed')} of them replayed "
        "after a resume)",
        f"  deliveries/s          {n(s['steady_deliveries_per_s'])} with all users up, "
        f"{n(s['deliveries_per_s'])} over the whole run",
        f"  fan-out latency       p50 {ms('p50')}  p95 {ms('p95')}  p99 {ms('p99')}  "
        f"max {ms('max')}  (live deliveries)",
        f"  generator loop lag    p50 {ms('p50', 'loop_lag_ms')}  "
        f"p99 {ms('p99', 'loop_lag_ms')}  max {ms('max', 'loop_lag_ms')}",
        f"  cuts                  {g('cuts')} sockets closed without BYE, {g('resumed')} "
        f"resumed; re-joins complete {g('rejoin_complete')}, reset {g('rejoin_reset')}",
        f"  announced gaps        {g('announced')} messages gone, as the server said "
        f"({g('gap_notices')} notices: re-join REPLY or GAP)",
        f"  unannounced loss      gaps {n(s['gaps'])} (tail {g('tail_missing')})  "
        f"duplicates {n(s['duplicates'])}  reordered {n(s['reordered'])}",
        f"  deliver rows          1 in {s['deliver_sample']} live deliveries",
    ]
    if r.get("dropped_for_test"):
        lines.append(
            f"  dropped for the test  {g('dropped_for_test')} deliveries ignored "
            "(--drop-for-test): each must show as loss"
        )
    return lines


def format_summary(s: dict) -> str:
    """Human-readable summary of ``summary_dict`` output, at most 100 columns wide."""

    def n(v) -> str:
        return "n/a" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:,.0f}"

    def ms(key: str, hist: str = "latency_ms") -> str:
        v = (s.get(hist) or {}).get(key)
        return "-" if v is None else f"{v:.2f} ms"

    lines = [
        f"muxserver load test: scenario {s['scenario']}, {s['users']} users, "
        f"{s['processes']} process(es), {s['seconds']:.1f} s of sending",
    ]
    if s["scenario"] == "churn":
        lines += [
            f"  churn cycles          {n(s['cycles'])}  "
            f"({n(s['cycles_per_s'])} connections/s with all users up"
            + (f", {n(s['offered_per_s'])}/s asked)" if s.get("offered_per_s") else ")"),
        ]
    elif s["scenario"] == "recovery":
        lines += _recovery_lines(s, n, ms)
    else:
        lines += [
            f"  messages sent         {n(s['sent'])}  ({n(s['messages_per_s'])}/s"
            + (f" of {n(s['offered_per_s'])}/s asked)" if s.get("offered_per_s") else ")"),
            f"  deliveries expected   {n(s['expected'])}"
            + ("" if s["expected"] is not None else "  (--no-ack: the server did not say)"),
            f"  deliveries received   {n(s['delivered'])}",
            f"  deliveries/s          {n(s['steady_deliveries_per_s'])} with all users up, "
            f"{n(s['deliveries_per_s'])} over the whole run",
            f"  fan-out latency       p50 {ms('p50')}  p95 {ms('p95')}  p99 {ms('p99')}  "
            f"max {ms('max')}  (every delivery)",
            f"  generator loop lag    p50 {ms('p50', 'loop_lag_ms')}  "
            f"p99 {ms('p99', 'loop_lag_ms')}  max {ms('max', 'loop_lag_ms')}",
            "                        (Locust's own delay, included in every latency above)",
            f"  loss                  missing {n(s['missing'])}  gaps {n(s['gaps'])}  "
            f"duplicates {n(s['duplicates'])}  reordered {n(s['reordered'])}",
            f"  deliver rows          1 in {s['deliver_sample']} deliveries "
            f"(Locust's 'deliver' count x {s['deliver_sample']} = deliveries)",
        ]
    errors = ", ".join(f"{k} x{v}" for k, v in sorted(s["errors"].items())) or "none"
    lines.append(f"  errors                {errors}")
    verdict_line = "PASS" if s["passed"] else "FAIL: " + "; ".join(s["problems"])
    lines.append(f"  result                {verdict_line}")
    return fit(lines)


__all__ = [
    "MIN_PAYLOAD", "PAYLOAD_HEAD", "WIDTH", "SequenceTracker", "Tally", "bucket", "fit",
    "format_progress", "format_summary", "make_payload", "padding", "percentile",
    "summary_dict", "verdict",
]  # fmt: skip
