"""What the server is doing, read from its counters: Prometheus page, views, summary line.

Pure reading, no sockets: this module turns the plain integers the hot path
keeps, as ``Server.snapshot()`` hands them over (the counters, frames by
type, closed connections' totals, each session's ``frames_*`` / ``bytes_*``,
the loop's turn histogram), into the figures operators see. It runs only when
someone asks (a scrape, a /connz page, the periodic log line), so summing
over every connection here is fine; doing it per message would not be.

monitor.py serves these over HTTP; cli.py starts the periodic summary.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import NamedTuple

from . import __version__
from . import protocol as P
from .logs import format_peer
from .loop import TURN_BUCKETS
from .session import CLOSING, DRAINING, HELLO_WAIT, OPEN, STATE_NAMES

log = logging.getLogger("muxserver.stats")

CONNZ_DEFAULT_LIMIT = 1024
CONNZ_MAX_LIMIT = 100_000

# Taken when the server process imports us, i.e. at start-up.
_STARTED_WALL = time.time()
_STARTED_MONO = time.monotonic()

CLIENT_FRAME_TYPES = (
    P.HELLO,
    P.JOIN,
    P.LEAVE,
    P.NICK,
    P.EMIT,
    P.PING,
    P.PONG,
    P.WHO,
    P.ROOMS,
    P.BYE,
)
SERVER_FRAME_TYPES = (
    P.WELCOME, P.REPLY, P.EVENT, P.PRESENCE, P.ERROR, P.SERVER_PING, P.SERVER_PONG,
    P.EVENT_SEQ, P.GAP,
)  # fmt: skip
# Codes that can appear as a fatal ERROR and as a REPLY status (protocol
# section 5). They are always exported, at 0 until seen, so rate() works from
# the first scrape; any other code that turns up is exported as well.
FATAL_CODES = (
    P.BAD_FRAME, P.UNKNOWN_TYPE, P.NOT_HELLO, P.AUTH_FAILED, P.UNSUPPORTED_VERSION,
    P.TOO_LARGE, P.NICK_TAKEN, P.INVALID_NAME, P.LIMIT, P.SLOW_CONSUMER,
    P.IDLE_TIMEOUT, P.SHUTTING_DOWN,
)  # fmt: skip
REPLY_CODES = (
    P.NICK_TAKEN, P.INVALID_NAME, P.NOT_MEMBER, P.NO_SUCH_TARGET, P.LIMIT, P.RATE_LIMITED,
)  # fmt: skip


def _by_code(counts: dict, always: tuple) -> list:
    codes = sorted(set(always) | set(counts))
    return [({"code": P.STATUS_NAMES.get(c, str(c))}, counts.get(c, 0)) for c in codes]


# =================================================================== figures


class Snapshot(NamedTuple):
    """What monitoring reads (stats.py), taken between two loop turns."""

    name: str
    shutting_down: bool
    sessions: list
    namespaces: dict
    stats: dict
    deliveries: int
    frames_in_by_type: list
    frames_out_by_type: list
    closed_totals: tuple
    turn_counts: list
    turn_seconds: float
    now: float
    # Input memory bound (limits.py): bytes in incomplete frames, holders, limit.
    input_held: int = 0
    input_holders: int = 0
    input_limit: int = 0
    recovery: dict | None = None  # history and resume gauges (sections 9 and 10)


def take_snapshot(server) -> Snapshot:
    """``Server.snapshot()``: what monitoring reads, between two loop turns."""
    loop = server.loop
    return Snapshot(
        server.config.name, server.shutting_down, list(server.sessions.values()),
        server.hub.namespaces, server.stats, server.router.deliveries,
        server.protocol.frames_in_by_type, server.router.frames_out_by_type,
        tuple(server.closed_totals), loop.turn_counts, loop.turn_seconds, loop.time(),
        *server.limits.figures(), server.protocol.gauges(),
    )  # fmt: skip


def new_counters() -> dict:
    """The server's counters; features add their own ``refused_<reason>`` keys."""
    return {
        "accepted": 0,
        "refused_limit": 0,
        "refused_tls_handshake": 0,  # every refused_<reason> is exported
        "slow_consumers": 0,
        "internal_errors": 0,
        "errors": {},  # fatal ERROR code -> count
        "reply_errors": {},  # REPLY status -> count
    }


def waiting_for(sessions) -> str:
    """``1 connection (no HELLO yet)``, ``3 connections (2 open, 1 closing)``: for shutdown."""
    sessions = list(sessions)
    n = len(sessions)
    if not n:
        return "no connections"
    words = {HELLO_WAIT: "no HELLO yet", OPEN: "open", CLOSING: "closing", DRAINING: "draining"}
    counts: dict[str, int] = {}
    for sess in sessions:
        label = words.get(sess.state)
        if label:
            counts[label] = counts.get(label, 0) + 1
    detail = ", ".join(label if n == 1 else f"{c} {label}" for label, c in counts.items())
    return f"{n} connection{'s' if n != 1 else ''}" + (f" ({detail})" if detail else "")


def totals(snap) -> dict:
    """Whole-server figures: one pass over the live connections, plus the closed ones."""
    frames_in, frames_out, bytes_in, bytes_out = snap.closed_totals
    queued = queued_max = 0
    states = dict.fromkeys(STATE_NAMES.values(), 0)
    for conn in snap.sessions:
        frames_in += conn.frames_in
        frames_out += conn.frames_out
        bytes_in += conn.bytes_in
        bytes_out += conn.bytes_out
        pending = conn.pending_bytes
        queued += pending
        if pending > queued_max:
            queued_max = pending
        name = STATE_NAMES.get(conn.state)
        if name is not None:
            states[name] += 1
    namespaces = snap.namespaces
    stats = snap.stats
    return {
        "connections": len(snap.sessions),
        "states": states,
        "accepted": stats["accepted"],
        "namespaces": len(namespaces),
        "rooms": sum(len(ns.rooms) for ns in namespaces.values()),
        "frames_in": frames_in,
        "frames_out": frames_out,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "deliveries": snap.deliveries,
        "slow_consumers": stats["slow_consumers"],
        "errors": sum(stats["errors"].values()),
        "queued": queued,
        "queued_max": queued_max,
        "internal_errors": stats["internal_errors"],
        "loop_seconds": snap.turn_seconds,
    }


def frames_sent_by_type(snap) -> list[int]:
    """Frames queued to clients, by type byte.

    EVENTs and ERRORs are not counted where they are queued: EVENTs are
    exactly the deliveries (already counted once per EMIT, not per
    recipient), ERRORs exactly the ``errors`` by code.
    """
    counts = list(snap.frames_out_by_type)
    counts[P.EVENT] += snap.deliveries
    counts[P.ERROR] += sum(snap.stats["errors"].values())
    return counts


class _Exposition:
    """Prometheus text format 0.0.4, written by hand: it is a dozen lines of rules."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples) -> None:
        """``samples``: a number, or (labels dict, value) pairs (suffixes via label ``__name``)."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        if not isinstance(samples, list):
            samples = [({}, samples)]
        for labels, value in samples:
            labels = dict(labels)
            full = name + labels.pop("__suffix", "")
            if labels:
                inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                full = f"{full}{{{inner}}}"
            self.lines.append(f"{full} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    # Our figures are finite ints and floats; repr keeps full float precision.
    return repr(value) if isinstance(value, float) else str(value)


def render_metrics(snap) -> str:
    """The /metrics page. Label values are fixed names only: no nick, room or
    namespace ever becomes a label, so the series count cannot grow with use."""
    t = totals(snap)
    stats = snap.stats
    out = _Exposition()
    out.family(
        "muxserver_info", "gauge", "Version and name of this server (value is always 1).",
        [({"version": __version__, "name": snap.name}, 1)],
    )  # fmt: skip
    out.family(
        "muxserver_start_time_seconds",
        "gauge",
        "Start time, seconds since the Unix epoch.",
        _STARTED_WALL,
    )
    out.family(
        "muxserver_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        time.monotonic() - _STARTED_MONO,
    )
    out.family(
        "muxserver_up", "gauge", "1 while accepting connections, 0 while draining for shutdown.",
        0 if snap.shutting_down else 1,
    )  # fmt: skip
    out.family(
        "muxserver_connections", "gauge", "Open client connections by state.",
        [({"state": name}, n) for name, n in t["states"].items()],
    )  # fmt: skip
    out.family(
        "muxserver_connections_accepted_total",
        "counter",
        "Client connections accepted.",
        t["accepted"],
    )
    refused = [({"reason": "max_connections"}, stats.get("refused_limit", 0))]
    # Other features count their own refusals as stats["refused_<reason>"].
    refused += [
        ({"reason": key[len("refused_") :]}, value)
        for key, value in sorted(stats.items())
        if key.startswith("refused_") and key != "refused_limit" and isinstance(value, int)
    ]
    out.family(
        "muxserver_connections_refused_total", "counter", "Connections refused, by reason.", refused
    )
    out.family(
        "muxserver_namespaces", "gauge", "Namespaces with at least one connection.", t["namespaces"]
    )
    out.family("muxserver_rooms", "gauge", "Rooms with at least one member.", t["rooms"])

    by_in = snap.frames_in_by_type
    received = [({"type": P.TYPE_NAMES[ft]}, by_in[ft]) for ft in CLIENT_FRAME_TYPES]
    received.append(({"type": "unknown"}, sum(by_in) - sum(by_in[ft] for ft in CLIENT_FRAME_TYPES)))
    out.family(
        "muxserver_frames_received_total", "counter", "Client frames handled, by type.", received
    )
    by_out = frames_sent_by_type(snap)
    out.family(
        "muxserver_frames_sent_total", "counter", "Frames queued to clients, by type.",
        [({"type": P.TYPE_NAMES[ft]}, by_out[ft]) for ft in SERVER_FRAME_TYPES],
    )  # fmt: skip
    out.family(
        "muxserver_received_bytes_total",
        "counter",
        "Bytes read from client sockets.",
        t["bytes_in"],
    )
    out.family(
        "muxserver_sent_bytes_total", "counter", "Bytes written to client sockets.", t["bytes_out"]
    )
    out.family(
        "muxserver_deliveries_total", "counter",
        "EVENTs queued to recipients (one EMIT to a room of M others counts M).", t["deliveries"],
    )  # fmt: skip
    errors, reply_errors = stats["errors"], stats.get("reply_errors", {})
    out.family(
        "muxserver_errors_sent_total", "counter", "Fatal ERROR frames sent, by code.",
        _by_code(errors, FATAL_CODES),
    )  # fmt: skip
    out.family(
        "muxserver_reply_errors_total", "counter", "REPLYs with a non-zero status, by status.",
        _by_code(reply_errors, REPLY_CODES),
    )  # fmt: skip
    out.family(
        "muxserver_slow_consumer_disconnects_total", "counter",
        "Connections cut because their unsent output passed max_output.", t["slow_consumers"],
    )  # fmt: skip
    if snap.recovery is not None:
        _recovery_metrics(out, snap.recovery, stats)
    out.family(
        "muxserver_internal_errors_total", "counter",
        "Exceptions in the server's own code; each closed one connection, nobody else noticed.",
        t["internal_errors"],
    )  # fmt: skip
    out.family(
        "muxserver_input_held_bytes", "gauge",
        "Bytes held in incomplete client frames, all connections (bounded by --max-input-memory).",
        snap.input_held,
    )  # fmt: skip
    out.family(
        "muxserver_input_held_connections", "gauge",
        "Connections holding an incomplete frame.", snap.input_holders,
    )  # fmt: skip
    out.family(
        "muxserver_input_memory_limit_bytes", "gauge",
        "The --max-input-memory bound.", snap.input_limit,
    )  # fmt: skip
    out.family(
        "muxserver_input_memory_cuts_total", "counter",
        "Connections cut (ERROR LIMIT) for holding the largest incomplete frame past the bound.",
        stats.get("input_memory_cuts", 0),
    )  # fmt: skip
    out.family(
        "muxserver_frame_timeouts_total", "counter",
        "Connections cut (ERROR IDLE_TIMEOUT) because a frame did not complete in --frame-timeout.",
        stats.get("frame_timeouts", 0),
    )  # fmt: skip
    out.family(
        "muxserver_output_queued_bytes",
        "gauge",
        "Unsent output bytes, all connections.",
        t["queued"],
    )
    out.family(
        "muxserver_output_queued_max_bytes", "gauge", "Unsent output bytes of the most backed-up connection.",
        t["queued_max"],
    )  # fmt: skip

    buckets, cumulative = [], 0
    counts = snap.turn_counts
    for bound, count in zip(TURN_BUCKETS, counts[:-1], strict=True):
        cumulative += count
        buckets.append(({"__suffix": "_bucket", "le": repr(bound)}, cumulative))
    cumulative += counts[-1]
    buckets.append(({"__suffix": "_bucket", "le": "+Inf"}, cumulative))
    buckets.append(({"__suffix": "_sum"}, snap.turn_seconds))
    buckets.append(({"__suffix": "_count"}, cumulative))
    out.family(
        "muxserver_loop_turn_duration_seconds", "histogram",
        "Busy time of one event-loop turn: handlers, timers and the flush, select excluded.", buckets,
    )  # fmt: skip
    _process_metrics(out)
    return out.text()


def _recovery_metrics(out: _Exposition, rec: dict, stats: dict) -> None:
    """History, replays and resumes (protocol sections 9 and 10)."""
    out.family(
        "muxserver_history_messages", "gauge", "Messages held in room histories.",
        rec["history_messages"],
    )  # fmt: skip
    out.family(
        "muxserver_history_bytes", "gauge", "Bytes of messages held in room histories.",
        rec["history_bytes"],
    )  # fmt: skip
    out.family(
        "muxserver_history_rooms", "gauge",
        "Rooms with a history: members now, or within --history-ttl of the last.",
        rec["history_rooms"],
    )  # fmt: skip
    out.family(
        "muxserver_replays_total", "counter", "SEQUENCED JOINs, by recovery outcome.",
        [({"outcome": k}, v) for k, v in stats.get("replays", {}).items()],
    )  # fmt: skip
    out.family(
        "muxserver_replayed_messages_total", "counter", "Messages sent from history by replays.",
        stats.get("replayed_messages", 0),
    )  # fmt: skip
    out.family(
        "muxserver_replay_gaps_total", "counter",
        "GAP frames sent because messages were evicted before a replay reached them.",
        stats.get("replay_gaps", 0),
    )  # fmt: skip
    out.family(
        "muxserver_replaying_sessions", "gauge", "Sessions with a replay in progress.",
        rec["replaying"],
    )  # fmt: skip
    out.family(
        "muxserver_resumes_total", "counter", "Sessions resumed, by how.",
        [({"how": "parked"}, stats.get("resumes", 0) - stats.get("resumes_replaced", 0)),
         ({"how": "replaced"}, stats.get("resumes_replaced", 0))],
    )  # fmt: skip
    out.family(
        "muxserver_parked_sessions", "gauge", "Sessions waiting for a resume (no connection).",
        rec["parked"],
    )  # fmt: skip
    out.family(
        "muxserver_parked_total", "counter", "Sessions parked (connection lost, resumable).",
        stats.get("parked_total", 0),
    )  # fmt: skip
    out.family(
        "muxserver_parked_expired_total", "counter",
        "Parked sessions whose resume window ended (they left their rooms then).",
        stats.get("parked_expired", 0),
    )  # fmt: skip


def _process_metrics(out: _Exposition) -> None:
    """The standard process_* series (as prometheus_client names them), Linux only where noted."""
    cpu = os.times()
    out.family(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent.",
        cpu.user + cpu.system,
    )
    out.family(
        "process_start_time_seconds",
        "gauge",
        "Start time, seconds since the Unix epoch.",
        _STARTED_WALL,
    )
    try:
        with open("/proc/self/statm") as fh:
            rss_pages = int(fh.read().split()[1])
        out.family(
            "process_resident_memory_bytes", "gauge", "Resident memory size.",
            rss_pages * os.sysconf("SC_PAGESIZE"),
        )  # fmt: skip
        out.family(
            "process_open_fds", "gauge", "Open file descriptors.", len(os.listdir("/proc/self/fd"))
        )
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        out.family(
            "process_max_fds", "gauge", "Limit on open file descriptors.",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )  # fmt: skip
    except (ImportError, OSError, ValueError):
        pass


# ===================================================================== views


class BadQuery(ValueError):
    """A query parameter we cannot use: the client gets 400 with this message."""


def _int_param(query: dict, name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name, [None])[-1]
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadQuery(f"{name}: {raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise BadQuery(f"{name}: must be {lo}..{hi}")
    return value


def _iso(ts: float) -> str:
    return (
        datetime.fromtimestamp(ts, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


# sort key -> (what to sort by, descending?); ties are broken by connection id.
CONNZ_SORTS = {
    "id": (lambda c: 0, False),
    "pending": (lambda c: c.pending_bytes, True),
    "frames_in": (lambda c: c.frames_in, True),
    "frames_out": (lambda c: c.frames_out, True),
    "bytes_in": (lambda c: c.bytes_in, True),
    "bytes_out": (lambda c: c.bytes_out, True),
    "rooms": (lambda c: len(c.rooms), True),
    "idle": (lambda c: -c.last_rx, True),
}


def connz(snap, query: dict) -> dict:
    """GET /connz?limit=&offset=&sort=: one page of connections."""
    limit = _int_param(query, "limit", CONNZ_DEFAULT_LIMIT, 1, CONNZ_MAX_LIMIT)
    offset = _int_param(query, "offset", 0, 0, 2**62)
    sort = query.get("sort", ["id"])[-1] or "id"
    if sort not in CONNZ_SORTS:
        raise BadQuery(f"sort: {sort!r} is not one of {', '.join(CONNZ_SORTS)}")
    key, descending = CONNZ_SORTS[sort]
    conns = list(snap.sessions)
    if sort == "id":
        conns.sort(key=lambda c: c.id)
    else:
        # Descending by the figure, ascending by id among equals.
        sign = -1 if descending else 1
        conns.sort(key=lambda c: (sign * key(c), c.id))
    page = conns[offset : offset + limit]
    mono_now, wall_now = snap.now, time.time()
    items = []
    for conn in page:
        items.append(
            {
                "id": conn.id,
                "peer": format_peer(conn.peer),
                "state": STATE_NAMES.get(conn.state, "closed"),
                "nick": conn.nick,
                "namespace": conn.ns.name if conn.ns is not None else None,
                "rooms": list(conn.rooms),
                "pending_bytes": conn.pending_bytes,
                "frames_in": conn.frames_in,
                "frames_out": conn.frames_out,
                "bytes_in": conn.bytes_in,
                "bytes_out": conn.bytes_out,
                # connected_at / last_rx are on the loop's monotonic clock.
                "connected_since": _iso(wall_now - (mono_now - conn.connected_at)),
                "idle_seconds": round(max(0.0, mono_now - conn.last_rx), 3),
            }
        )
    return {
        "now": _iso(wall_now),
        "total": len(conns),
        "offset": offset,
        "limit": limit,
        "sort": sort,
        "count": len(items),
        "connections": items,
    }


def roomz(snap, query: dict) -> dict:
    """GET /roomz?namespace=&limit=: rooms and member counts, per namespace, biggest first."""
    limit = _int_param(query, "limit", CONNZ_DEFAULT_LIMIT, 1, CONNZ_MAX_LIMIT)
    only = query.get("namespace", [None])[-1]
    namespaces = []
    total_rooms = 0
    for name in sorted(snap.namespaces):
        if only is not None and name != only:
            continue
        ns = snap.namespaces[name]
        rooms = sorted(ns.rooms.values(), key=lambda r: (-len(r.members), r.name))
        total_rooms += len(rooms)
        namespaces.append(
            {
                "name": name,
                "members": len(ns.members),
                "total_rooms": len(rooms),
                "rooms": [{"name": r.name, "members": len(r.members)} for r in rooms[:limit]],
            }
        )
    return {"now": _iso(time.time()), "total_rooms": total_rooms, "namespaces": namespaces}


# ================================================================ stats line


class StatsReporter:
    """Logs one summary line every ``interval`` seconds (at info), on the loop."""

    def __init__(self, server, interval: float) -> None:
        self.server = server
        self.interval = interval
        self._last: dict | None = None
        self._last_at = 0.0
        self._timer = None

    def start(self) -> None:
        self._last = totals(self.server.snapshot())
        self._last_at = self.server.loop.time()
        self._timer = self.server.loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        server = self.server
        if server.shutting_down:
            return
        now = server.loop.time()
        t, last = totals(server.snapshot()), self._last
        span = max(now - self._last_at, 1e-9)

        def rate(key: str) -> float:
            return round((t[key] - last[key]) / span, 1)

        fields = {
            "connections": t["connections"],
            "accepted": t["accepted"] - last["accepted"],
            "rooms": t["rooms"],
            "frames_in_per_s": rate("frames_in"),
            "frames_out_per_s": rate("frames_out"),
            "deliveries_per_s": rate("deliveries"),
            "bytes_in_per_s": rate("bytes_in"),
            "bytes_out_per_s": rate("bytes_out"),
            "errors": t["errors"] - last["errors"],
            "slow_consumers": t["slow_consumers"] - last["slow_consumers"],
            "queued_bytes": t["queued"],
            "queued_max_bytes": t["queued_max"],
            "loop_busy": round((t["loop_seconds"] - last["loop_seconds"]) / span, 3),
        }
        log.info(
            "stats: %d connections (+%d), %d rooms; in %.0f frames/s %.0f B/s; out %.0f frames/s "
            "%.0f B/s, %.0f deliveries/s; %d errors, %d slow consumers; queued %d B (max %d B); "
            "loop busy %.0f%%",
            fields["connections"], fields["accepted"], fields["rooms"], fields["frames_in_per_s"],
            fields["bytes_in_per_s"], fields["frames_out_per_s"], fields["bytes_out_per_s"],
            fields["deliveries_per_s"], fields["errors"], fields["slow_consumers"],
            fields["queued_bytes"], fields["queued_max_bytes"], fields["loop_busy"] * 100,
            extra={"stats": fields},
        )  # fmt: skip
        self._last, self._last_at = t, now
        self._timer = server.loop.call_later(self.interval, self._tick)
