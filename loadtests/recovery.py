"""The ``recovery`` load-test scenario: users cut their own connections and resume.

Every user talks in a sequenced room (protocol section 9) like a chat user,
and now and then closes its socket without BYE, so the server parks its
session (section 10). The client (muxserver.client, ``reconnect=True``)
notices, waits out its backoff (``--offline`` seconds), resumes with its
token and re-joins with its position; the server replays what the user
missed, or announces what is gone. Meanwhile the other users keep talking.

Decisions worth knowing:

* The cut is ``shutdown(SHUT_RDWR)`` of ``client.sock``, the way the client
  itself wakes a reader (client._shutdown): the receive greenlet reads EOF,
  the client schedules its reconnect. No BYE ever goes out, so for the
  server it is a lost connection, which parks the session.
* The loss check (loadtests/recoverycheck.py) uses only what the handlers
  saw, never the client's positions: EMITs go with ``echo``, so every member
  gets every seq of its room and the seqs it sees must be exactly 1, 2,
  3... except across ranges the server announced gone. Unannounced gaps,
  duplicates and reordering go to the tally's ``gaps``, ``duplicates`` and
  ``reordered`` (so the verdict and the progress line treat them as in the
  other scenarios); announced gaps, resets, cuts, resumes and replays go to
  ``Tally.recovery``, reported apart.
* The end: at the drain, cuts stop with the senders, then :func:`settle`
  waits until every user is back and the deliveries have stopped, and
  checks every receiver's last seq against the highest seq anyone in its
  room saw (a tail that never came is unannounced loss). The whole of a
  room is in one Locust process (rooms are a multiple of the processes), so
  each process can judge its rooms alone.
* An EMIT in flight when its sender cut may never have reached the server
  (at-most-once): its ack is counted ``unconfirmed``, not lost; whatever
  the server did accept has a seq, and the seq check covers it.
"""

from __future__ import annotations

import random
import socket
import time

import gevent
from locust import events

from loadtests.loadclient import LoadClient
from loadtests.recoverycheck import RoomCheck
from loadtests.tally import PAYLOAD_HEAD, Tally, bucket, padding
from loadtests.wsclient import WsClient
from muxserver.client import Ack, Backoff, Client, MuxError

QUIET_S = 1.0  # settle: this long without a delivery, with everyone back, means done
SETTLE_CAP_S = 60.0  # settle never takes longer
_unpack_head = PAYLOAD_HEAD.unpack_from
_pack_head = PAYLOAD_HEAD.pack


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument(
        "--cut-every", type=float, default=10.0,
        help="recovery: mean seconds between a user's cuts (exponential; 0: never cut)",
    )  # fmt: skip
    parser.add_argument(
        "--offline", type=float, default=0.5,
        help="recovery: seconds a cut user waits before it reconnects (its backoff, +/- 50 %%)",
    )  # fmt: skip
    parser.add_argument(
        "--drop-for-test", type=float, default=0.0,
        help="recovery, to check the check: each user ignores this fraction of its "
        "deliveries as if they never came, which the run must report as loss",
    )  # fmt: skip


def counts(tally: Tally, name: str, count: int = 1) -> None:
    tally.recovery[name] = tally.recovery.get(name, 0) + count


class Talker:
    """A recovery user: one reconnecting client in one sequenced room, and its loss check.

    ``user`` is the Locust user (loadtests/locustfile.py MuxUser), whose
    ``node`` (the process's shared state), ``fire`` and ``fail`` this reuses.
    """

    def __init__(self, user, node, room: str, fire, fail) -> None:
        self.user, self.node, self.room = user, node, room
        self.fire, self.fail = fire, fail
        opts = user.environment.parsed_options
        self.cut_every = max(0.0, float(getattr(opts, "cut_every", 10.0)))
        self.offline = max(0.0, float(getattr(opts, "offline", 0.5)))
        self.drop = max(0.0, float(getattr(opts, "drop_for_test", 0.0)))
        self.check = RoomCheck()
        self.n = 0
        self.pad = padding(node.cfg.size)
        self.conn: LoadClient | None = None
        self.cut_at: float | None = None  # our own cut, until the client is back
        self.next_cut = self._draw_cut(time.monotonic())
        self.dead = False
        node.talkers.append(self)

    def _draw_cut(self, now: float) -> float:
        return now + random.expovariate(1 / self.cut_every) if self.cut_every else float("inf")

    # -------------------------------------------------------------- set-up
    def start(self) -> bool:
        cfg = self.node.cfg
        # Backoff: the delay of every reconnect, the "offline" time of a cut.
        backoff = Backoff(initial=self.offline, maximum=max(self.offline, 1.0) * 4, jitter=0.5)
        cls = WsClient if cfg.transport == "ws" else Client  # a WsClient's sock is its TCP socket
        client = cls(cfg.host, cfg.port, namespace=cfg.namespace, reconnect=True, backoff=backoff)
        client.on("recovery", self.on_recovery)
        client.on_disconnect(self.on_disconnect)
        client.on_reconnect(self.on_reconnect)
        t0 = time.perf_counter()
        try:
            client.open()
        except (OSError, MuxError) as exc:
            self.fail("connect", type(exc).__name__ if isinstance(exc, OSError) else exc.name)
            return False
        self.fire("connect", (time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        try:
            rec = client.join(self.room, sequenced=True, history=0)
        except (OSError, MuxError) as exc:
            self.fail("join", type(exc).__name__ if isinstance(exc, OSError) else exc.name)
            client.close()
            return False
        self.fire("join", (time.perf_counter() - t0) * 1000)
        if rec is None or rec.outcome != "fresh":  # a first join of a sequenced room
            self.fail("join", "NOT_FRESH")
        # on_recovery gets ``rec`` too, from the receive greenlet, before any
        # message of the room: it sets the starting position.
        self.conn = LoadClient(client, self, room=self.room)
        return True

    def stop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close(grace=2.0)

    @property
    def back(self) -> bool:
        """Connected, and not in the middle of a cut of its own."""
        conn = self.conn
        return self.dead or (conn is not None and conn.client.connected and self.cut_at is None)

    # ------------------------------------------------------------ the task
    def step(self) -> None:
        conn = self.conn
        if conn is None or self.dead or self.cut_at is not None:
            return  # down: the receive greenlet is reconnecting
        if time.monotonic() >= self.next_cut:
            self._cut(conn.client)
        else:
            self._send(conn)

    def _cut(self, client: Client) -> None:
        sock = client.sock
        if sock is None:
            return
        self.cut_at = time.monotonic()
        counts(self.node.tally, "cuts")
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # no BYE: the server parks us
        except OSError:
            pass  # already gone: the reader reports it all the same

    def _send(self, conn: LoadClient) -> None:
        tally = self.node.tally
        payload = _pack_head(self.user.sender_id, self.n, time.time()) + self.pad
        tally.unacked += 1
        try:
            conn.client.emit("load", payload, room=self.room, echo=True, ack=True, wait=False)
        except MuxError:  # the connection went between our check and the write
            tally.unacked -= 1
            return
        except OSError as exc:
            tally.unacked -= 1
            self.fail("emit", type(exc).__name__)
            return
        self.n += 1
        tally.sent += 1

    # ----------------------------------------------------------- receiving
    def on_event(self, ev) -> None:
        tally = self.node.tally
        try:
            sender, n, sent = _unpack_head(ev.payload)
        except Exception:
            tally.foreign += 1
            return
        if self.drop and random.random() < self.drop:
            counts(tally, "dropped_for_test")  # after the handler: the client counts it handled
            return
        tally.delivered += 1
        if ev.replayed:
            counts(tally, "replayed")
        else:  # a replay's age is how long the user was away, not fan-out latency
            us = int((time.time() - sent) * 1e6)
            key = us if 0 <= us < 1000 else bucket(us)
            tally.latency[key] = tally.latency.get(key, 0) + 1
            if tally.delivered % self.node.cfg.sample == 0:
                self.fire("deliver", us / 1000, len(ev.payload))
        check, seq = self.check, ev.seq
        if seq is None:
            self.fail("deliver", "NOT_SEQUENCED")
            return
        if seq == check.last + 1 and n > check.senders.get(sender, -1):
            check.last = seq  # the hot path: RoomCheck.event's "nothing found"
            check.senders[sender] = n
            return
        for what, count in check.event(seq, sender, n):
            self._found(what, count)

    def _found(self, what: str, count: int) -> None:
        tally = self.node.tally
        if what == "gap":
            tally.gaps += count
        elif what == "duplicate":
            tally.duplicates += count
        elif what == "reordered":
            tally.reordered += count
        elif what == "announced":
            counts(tally, "announced", count)
            return
        elif what == "reset":
            return  # announced (counted as rejoin_reset): positions restart, nothing judged
        elif what == "epoch":
            tally.error("EPOCH_CHANGED")
        for _ in range(min(count, 1000)):
            self.fire("deliver", 0, 0, what.upper())

    def on_recovery(self, rec) -> None:
        if rec.room != self.room:
            return
        name = {"gap": "gap_notices", "fresh": "joins"}.get(rec.outcome, f"rejoin_{rec.outcome}")
        counts(self.node.tally, name)
        what, count = self.check.recovery(rec.outcome, rec.epoch, rec.first, rec.missing)
        if what != "ok":
            self._found(what, count)

    def on_ack(self, ack: Ack) -> None:
        tally = self.node.tally
        tally.unacked -= 1
        tally.acked += 1
        tally.expected += ack.recipients
        self.fire("emit", ack.rtt * 1000, 0)

    def on_error(self, exc: MuxError) -> None:
        if exc.req:
            self.node.tally.unacked -= 1
        self.fail("emit", exc.name or "CLOSED")

    def on_disconnect(self, exc: MuxError) -> None:
        """The connection is gone (the client reconnects by itself): ours, or the server's."""
        tally = self.node.tally
        lost = len(self.conn.client.pending_acks) if self.conn is not None else 0
        tally.unacked -= lost
        counts(tally, "unconfirmed", lost)  # written into the cut: maybe never received
        if self.cut_at is None and not self.user.stopping:
            # Not our cut: the server ended it (SLOW_CONSUMER, IDLE_TIMEOUT...).
            self.fail("deliver", exc.name or "CLOSED")
            self.cut_at = time.monotonic()

    def on_reconnect(self) -> None:
        """Back: a new connection, rooms re-joined (their Recoveries come next)."""
        client = self.conn.client if self.conn is not None else None
        if client is None:
            return
        tally = self.node.tally
        if client.resumed:
            counts(tally, "resumed")
        else:  # a fresh session: the server had not parked ours (or lost it)
            self.fail("resume", "NOT_RESUMED")
        if self.cut_at is not None:
            self.fire("resume", (time.monotonic() - self.cut_at) * 1000)
        self.cut_at = None
        self.next_cut = self._draw_cut(time.monotonic())

    def on_died(self, exc: Exception) -> None:
        """The receive greenlet ended: the client gave up reconnecting, or a bug."""
        if self.user.stopping:
            return
        self.dead = True
        self.fail("deliver", exc.name if isinstance(exc, MuxError) and exc.name else "DIED")


# ------------------------------------------------------------------ the end
def settle(node) -> None:
    """At the drain: wait for every user to be back and quiet, then check every tail.

    Senders and cuts have stopped (``node.sending`` is False). Bounded by
    SETTLE_CAP_S; whoever is still away then is reported (``NOT_BACK``).
    """
    tally = node.tally
    start = changed = time.monotonic()
    seen = None
    while time.monotonic() - start < SETTLE_CAP_S:
        gevent.sleep(0.1)
        now = time.monotonic()
        progress = (tally.delivered, tally.acked, tally.unacked)
        if progress != seen:
            seen, changed = progress, now
        everyone = all(t.back for t in node.talkers)
        if everyone and tally.unacked <= 0 and now - changed >= QUIET_S:
            break
    away = [t for t in node.talkers if not t.back]
    if away:
        tally.error("NOT_BACK", len(away))
    tails(node)


def tails(node) -> None:
    """Every live receiver must have reached the highest seq its room's members saw."""
    tally = node.tally
    top: dict[tuple[str, int], int] = {}
    live = [t for t in node.talkers if not t.dead and t.check.epoch is not None]
    for t in live:
        key = (t.room, t.check.epoch)
        top[key] = max(top.get(key, 0), t.check.last)
    for t in live:
        lost = t.check.tail(top[(t.room, t.check.epoch)])
        if lost:
            tally.gaps += lost
            counts(tally, "tail_missing", lost)
            for _ in range(min(lost, 1000)):
                t.fire("deliver", 0, 0, "MISSING")
