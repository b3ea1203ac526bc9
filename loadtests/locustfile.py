"""Locust users for muxserver: deliveries per second, fan-out latency and loss.

``make loadtest`` runs this through loadtests/run.py (a server on a free
port, Locust headless, reports/). By hand, against a running server::

    locust -f loadtests/locustfile.py --host 127.0.0.1:7878 --scenario chat

docs/loadtesting.md describes the scenarios, the rows and the summary.

Locust has no client for a custom TCP protocol, so a user fires
``environment.events.request`` itself (the documented pattern). A user
connects and joins with muxserver.client (rows ``connect``, ``join``), then
one connection is driven by two greenlets: Locust's task loop writes EMITs at
``--rate`` and a receive greenlet reads everything the server sends, so
sending never waits on receiving.

Decisions worth knowing:

* EMITs are pipelined: each carries a request id, the sender does not wait
  for its REPLY (``Client.emit(..., ack=True, wait=False)``), and the
  receive greenlet gets it as an Ack (row ``emit`` = its round trip,
  ``Ack.rtt``) whose recipient count adds to the deliveries expected.
  loadtests/loadclient.py holds this two-greenlet plumbing.
* The receive greenlet's handlers count each EVENT, check its sequence
  number and time it (loadtests/tally.py), as it is parsed. Only every
  ``--deliver-sample``-th delivery becomes a Locust event; see tally.py for
  why.
* A run ends with a drain: senders stop, then Locust waits until every EMIT
  is acked and every delivery the server promised has arrived (see
  DrainWatch) before users disconnect, so "expected == received" is exact.
  In distributed mode the master runs the drain over all workers with
  custom messages and merges their tallies.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gevent
from locust import User, events, task
from locust.runners import MasterRunner, WorkerRunner

# The repository root, so ``loadtests.tally`` imports however Locust loads this file.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from loadtests import progress, recovery  # noqa: E402
from loadtests.loadclient import LoadClient  # noqa: E402
from loadtests.options import (  # noqa: E402
    DRAIN_CAP_S,
    ROOM_SIZE,
    Config,
    auto_sample,
    estimate_deliveries,
    offered_rate,
    parse_host,
)
from loadtests.tally import (  # noqa: E402
    PAYLOAD_HEAD,
    SequenceTracker,
    Tally,
    bucket,
    format_summary,
    padding,
    summary_dict,
)
from loadtests.wsclient import WsClient  # noqa: E402
from muxserver.client import Ack, Client, Event, MuxError  # noqa: E402

log = logging.getLogger("muxload")

QUIET_S = 1.0  # drain without acks: this long without a delivery means done
LAG_TICK_S = 0.05  # loop-lag probe period
_unpack_head = PAYLOAD_HEAD.unpack_from
_pack_head = PAYLOAD_HEAD.pack


def _csv_writer_outlives_its_files() -> None:
    """Locust 2.47 closes the CSV files at shutdown without stopping the greenlet
    that rewrites them; if that greenlet wakes in between, it dies on a closed
    file and prints a traceback under the summary (every --processes 2 run
    here). The rows were written; only that late rewrite is lost, so it ends
    quietly when its files are closed, and raises as before otherwise."""
    from locust.stats import StatsCSVFileWriter

    original = StatsCSVFileWriter.stats_writer
    if getattr(original, "muxload_wrapped", False):
        return

    def stats_writer(self) -> None:
        try:
            original(self)
        except ValueError:
            if not self.requests_csv_filehandle.closed:
                raise

    stats_writer.muxload_wrapped = True
    StatsCSVFileWriter.stats_writer = stats_writer


_csv_writer_outlives_its_files()


# ============================================================= node state
@dataclass
class Node:
    """What this Locust process shares between its users, reset at every test start."""

    cfg: Config = field(default_factory=Config)
    tally: Tally = field(default_factory=Tally)
    sending: bool = False
    drained: bool = False
    token: str = ""  # makes this process's nicks unique
    counter: itertools.count = field(default_factory=itertools.count)
    online: set[int] = field(default_factory=set)  # direct: local indexes connected
    talkers: list = field(default_factory=list)  # recovery: this process's recovery.Talkers
    worker_tallies: dict[str, Tally] = field(default_factory=dict)  # master only
    # master, for the progress line: worker id -> (delivered, loss) (loadtests/progress.py)
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)
    stop_reporting: bool = False  # worker: the master has what it needs
    finished: bool = False
    # Set once at init, kept across test starts:
    fire: object = None  # environment.events.request.fire
    runner: object = None


NODE = Node()


class Failure(Exception):
    """A failure whose Locust message is just its status name (one failures row per code)."""

    def __repr__(self) -> str:
        return str(self.args[0])


def _fire(name: str, ms: float, length: int = 0, error: str | None = None) -> None:
    NODE.fire(
        request_type="mux",
        name=name,
        response_time=ms,
        response_length=length,
        exception=Failure(error) if error else None,
        context={},
    )


def _fire_failures(name: str, error: str, count: int = 1) -> None:
    # Capped: the exact count is in the tally; a flood of events would only slow the run.
    for _ in range(min(count, 1000)):
        _fire(name, 0, 0, error)


def _fail(name: str, error: str) -> None:
    """A protocol error or refused request: a failure row and an error in the summary."""
    NODE.tally.error(error)
    _fire(name, 0, 0, error)


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, MuxError):
        return exc.name or "CLOSED"  # no code: the connection ended without an ERROR
    return type(exc).__name__  # e.g. ConnectionRefusedError, TimeoutError


# ================================================================== user
class MuxUser(User):
    """One muxserver connection; what it does depends on ``--scenario``."""

    def wait_time(self) -> float:
        # Constant pacing from a per-user schedule, like constant_throughput,
        # but never bursting to catch up after a stall of more than a second.
        if self.interval <= 0:
            return 0.0
        now = time.monotonic()
        self.next_at += self.interval
        if self.next_at < now - 1.0:
            self.next_at = now
        return max(0.0, self.next_at - now)

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.conn: LoadClient | None = None  # every scenario but churn
        self.client: Client | None = None  # churn: the connection of the cycle under way
        self.dead = False
        self.stopping = False
        self.interval = 1.0
        self.next_at = time.monotonic()
        self.sends = False
        self.seqs = SequenceTracker()
        self.seq = 0
        self.sender_id = int.from_bytes(os.urandom(8), "big") >> 1
        self.idx = -1
        self.talker: recovery.Talker | None = None

    # ------------------------------------------------------------ set-up
    def on_start(self) -> None:
        cfg = NODE.cfg
        self.idx = next(NODE.counter)
        # Unique across workers when users are spread evenly, which Locust does.
        gidx = self.idx * cfg.nodes + cfg.node
        NODE.tally.users += 1
        self.interval = 1.0 / cfg.rate if cfg.rate > 0 else 0.0
        self.next_at = time.monotonic() + random.random() * self.interval  # spread senders
        self.pad = padding(cfg.size)
        if cfg.scenario == "churn":
            self.room = f"churn-{gidx % cfg.rooms}"
            return
        if cfg.scenario == "recovery":
            room = f"recovery-{gidx % cfg.rooms}"
            self.talker = recovery.Talker(self, NODE, room, _fire, _fail)
            self.dead = not self.talker.start()
            return
        nick, self.room = None, None
        if cfg.scenario == "chat":
            self.room = f"chat-{gidx % cfg.rooms}"
            target = {"room": self.room}
            self.sends = True
        elif cfg.scenario == "broadcast":
            self.room = "hot"
            target = {"room": self.room}
            self.sends = gidx < cfg.publishers
        else:  # direct: local pairs, so a sender can see whether its partner is online
            nick = f"{NODE.token}-{self.idx}"
            self.partner = self.idx ^ 1
            target = {"nick": f"{NODE.token}-{self.partner}"}
            self.sends = True
        if not self.sends:
            self.interval = 1.0  # listeners: the task loop only idles
        client = self._connect(nick)
        if client is None:
            self.dead = True
            return
        if self.room is not None and not self._join(client, self.room):
            self.dead = True
            client.close()
            return
        self.conn = LoadClient(client, self, **target)
        if cfg.scenario == "direct":
            NODE.online.add(self.idx)

    def _connect(self, nick: str | None = None) -> Client | None:
        cfg = NODE.cfg
        t0 = time.perf_counter()
        try:
            # No reconnect: a load user that loses its connection is counted as
            # lost, never quietly restarted.
            cls = WsClient if cfg.transport == "ws" else Client
            client = cls.connect(
                cfg.host, cfg.port, nick=nick, namespace=cfg.namespace, reconnect=False
            )
        except (OSError, MuxError) as exc:
            _fail("connect", _error_name(exc))
            return None
        _fire("connect", (time.perf_counter() - t0) * 1000)
        return client

    def _join(self, client: Client, room: str) -> bool:
        t0 = time.perf_counter()
        try:
            client.join(room)
        except (OSError, MuxError) as exc:
            _fail("join", _error_name(exc))
            return False
        _fire("join", (time.perf_counter() - t0) * 1000)
        return True

    def on_stop(self) -> None:
        self.stopping = True
        NODE.online.discard(self.idx)
        conn, self.conn = self.conn, None
        if conn is not None:
            # Stopped mid-run (a ramp-down): the reader collects our acks first.
            conn.close(grace=2.0)
        client, self.client = self.client, None
        if client is not None:  # churn, stopped mid-cycle
            client.close()
        if self.talker is not None:
            self.talker.stop()

    # ------------------------------------------------------------ sending
    @task
    def step(self) -> None:
        if not NODE.sending or self.dead:
            return
        if NODE.cfg.scenario == "churn":
            self._churn_cycle()
        elif self.talker is not None:
            self.talker.step()
        elif self.sends:
            self._send()

    def _send(self) -> None:
        conn = self.conn
        if NODE.cfg.scenario == "direct" and self.partner not in NODE.online:
            return  # partner not connected yet (or gone): a whisper would be refused
        tally, acks = NODE.tally, NODE.cfg.acks
        payload = _pack_head(self.sender_id, self.seq, time.time()) + self.pad
        self.seq += 1
        if acks:
            tally.unacked += 1
        t0 = time.perf_counter()
        try:
            conn.send(payload, acks)
        except (OSError, MuxError) as exc:
            if acks:
                tally.unacked -= 1
            self._died(exc)
            return
        tally.sent += 1
        if not acks:  # no round trip to time: the row shows how long the write took
            _fire("emit", (time.perf_counter() - t0) * 1000, len(payload))

    def _churn_cycle(self) -> None:
        """connect (HELLO -> WELCOME), JOIN, LEAVE, BYE: one connection per cycle."""
        client = self._connect()
        if client is None:  # counted; the next cycle tries again
            return
        self.client = client
        try:
            if not self._join(client, self.room):
                return
            t0 = time.perf_counter()
            try:
                client.leave(self.room)
            except (OSError, MuxError) as exc:
                _fail("leave", _error_name(exc))
                return
            _fire("leave", (time.perf_counter() - t0) * 1000)
        finally:
            self.client = None
            t0 = time.perf_counter()
            client.close()  # BYE, then wait for the server's FIN
            _fire("bye", (time.perf_counter() - t0) * 1000)
        NODE.tally.cycles += 1

    def _died(self, exc: BaseException) -> None:
        if self.dead or self.stopping:
            return
        self.dead = True
        _fail("deliver", _error_name(exc))
        if self.conn is not None:
            # Their REPLYs will never come; any that still do are ignored (on_ack).
            NODE.tally.unacked -= self.conn.unacked

    # ------------------------------------------------------------ receiving
    # The handlers of LoadClient's receive greenlet: every frame, as it is parsed.
    def on_died(self, exc: Exception) -> None:
        """The receive greenlet ended before on_stop: the connection, or a bug."""
        if not isinstance(exc, (OSError, MuxError)):  # a bug must fail the run, not vanish
            log.error("receive greenlet failed", exc_info=exc)
        self._died(exc)

    def on_event(self, ev: Event) -> None:
        """Every delivered EVENT, in the receive greenlet: the hot path."""
        tally = NODE.tally
        payload = ev.payload
        try:
            sender, seq, sent = _unpack_head(payload)
        except Exception:  # shorter than our header: not ours
            tally.foreign += 1
            return
        us = int((time.time() - sent) * 1e6)
        hist = tally.latency
        key = us if 0 <= us < 1000 else bucket(us)
        hist[key] = hist.get(key, 0) + 1
        tally.delivered += 1
        expected = self.seqs.expected
        if expected.get(sender, seq) == seq:
            expected[sender] = seq + 1
        else:
            self._anomaly(sender, seq)
        if tally.delivered % NODE.cfg.sample == 0:
            _fire("deliver", us / 1000, len(payload))

    def _anomaly(self, sender: int, seq: int) -> None:
        what, count = self.seqs.check(sender, seq)
        tally = NODE.tally
        if what == "gap":
            tally.gaps += count
        elif what == "reordered":
            tally.gaps -= 1  # not lost after all, but late
            tally.reordered += 1
        elif what == "duplicate":
            tally.duplicates += 1
        if what != "ok":
            _fire_failures("deliver", what.upper(), count)

    def on_ack(self, ack: Ack) -> None:
        if self.dead:
            return  # already written off as unacked by _died
        tally = NODE.tally
        tally.unacked -= 1
        tally.acked += 1
        tally.expected += ack.recipients
        _fire("emit", ack.rtt * 1000, 0)

    def on_error(self, exc: MuxError) -> None:
        """A refused EMIT: ``exc.req`` is its id (0: sent without ack)."""
        if exc.req:
            if self.dead:
                return
            NODE.tally.unacked -= 1
        _fail("emit", _error_name(exc))


# ============================================================ test phases
def _resolve(environment) -> Config:
    """This process's Config from the (master's) options; fills in auto values."""
    opts = environment.parsed_options
    runner = environment.runner
    if not isinstance(runner, WorkerRunner):
        # Auto values go into an extra option, which a master ships to its workers
        # with the rest (the user's own options stay as given, for the next run).
        users = getattr(runner, "target_user_count", 0) or opts.num_users or 1
        rooms = opts.rooms if opts.rooms > 0 else math.ceil(users / ROOM_SIZE)
        if opts.scenario == "recovery" and isinstance(runner, MasterRunner):
            # Each room within one worker (users go round-robin), which judges it alone.
            workers = max(int(getattr(opts, "expect_workers", 1) or 1), 1)
            rooms = math.ceil(rooms / workers) * workers
        sample = opts.deliver_sample
        if sample <= 0:
            sample = auto_sample(estimate_deliveries(opts, users))
        opts.mux_resolved = {"rooms": rooms, "sample": sample}
    resolved = getattr(opts, "mux_resolved", None) or {"rooms": 1, "sample": 1}
    host, port = parse_host(environment.host)
    nodes = 1
    if isinstance(runner, WorkerRunner):
        nodes = max(int(getattr(opts, "expect_workers", 1) or 1), runner.worker_index + 1)
    return Config(
        scenario=opts.scenario,
        rooms=max(resolved["rooms"], 1),
        rate=opts.rate,
        size=max(opts.size, PAYLOAD_HEAD.size),
        publishers=opts.publishers,
        sample=max(resolved["sample"], 1),
        acks=not opts.no_ack,
        namespace=opts.namespace,
        transport=opts.transport,
        drain_timeout=opts.drain_timeout,
        summary_file=opts.summary_file,
        host=host,
        port=port,
        node=max(getattr(runner, "worker_index", 0), 0),
        nodes=nodes,
    )


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    NODE.fire = environment.events.request.fire
    NODE.runner = runner = environment.runner
    if getattr(environment.parsed_options, "compact", False) and not isinstance(
        runner, WorkerRunner
    ):
        # Locust's tables are over 100 columns wide and repeat what the summary says.
        logging.getLogger("locust.stats_logger").setLevel(logging.WARNING)
    if isinstance(runner, MasterRunner):
        runner.register_message("mux_tally", _on_worker_tally)
        runner.register_message("mux_progress", _on_worker_progress)
    elif isinstance(runner, WorkerRunner):
        runner.register_message("mux_drain", _on_drain_request, concurrent=True)
        runner.register_message("mux_drained", _on_drained)
        runner.register_message("mux_ramped", lambda environment, msg, **kw: _mark_ramped())


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    fire, runner = NODE.fire, NODE.runner
    NODE.__init__()
    NODE.fire, NODE.runner = fire, runner
    NODE.cfg = _resolve(environment)
    NODE.token = f"lt{os.getpid() % 10000}{random.randrange(36**4):04x}"
    NODE.tally.t_start = time.time()
    NODE.sending = True
    if not isinstance(environment.runner, MasterRunner):
        gevent.spawn(_probe_loop_lag, NODE.tally)
    if getattr(environment.parsed_options, "compact", False):
        if isinstance(environment.runner, WorkerRunner):
            gevent.spawn(progress.report, environment, NODE, NODE.tally)
        else:
            distributed = isinstance(environment.runner, MasterRunner)
            gevent.spawn(progress.show, environment, NODE, NODE.tally, distributed)
    if not isinstance(environment.runner, (MasterRunner, WorkerRunner)):
        cfg = NODE.cfg
        log.info(
            "muxload: scenario %s against %s:%d, 1 in %d deliveries sampled",
            cfg.scenario, cfg.host, cfg.port, cfg.sample,
        )  # fmt: skip


def _probe_loop_lag(tally: Tally) -> None:
    """Sample how late this process's event loop wakes a timer, until the test stops.

    A busy gevent hub runs every ready greenlet before it looks at timers, so
    the lag is the time a delivery can sit, read but not yet timed, behind
    others: when it approaches the fan-out latency, Locust is the bottleneck.
    """
    hist = tally.loop_lag
    while NODE.tally is tally and not NODE.drained:
        t0 = time.perf_counter()
        gevent.sleep(LAG_TICK_S)
        key = bucket(int((time.perf_counter() - t0 - LAG_TICK_S) * 1e6))
        hist[key] = hist.get(key, 0) + 1


def _on_worker_progress(environment, msg, **_kw) -> None:
    NODE.progress[msg.node_id] = tuple(msg.data)


def _mark_ramped() -> None:
    if NODE.sending:
        NODE.tally.mark_ramped(time.time())


@events.spawning_complete.add_listener
def _on_spawning_complete(user_count: int, **_kw) -> None:
    runner = NODE.runner
    if isinstance(runner, MasterRunner):
        # Workers do not get this event; tell them, so each can time its steady state.
        runner.send_message("mux_ramped", None)
    _mark_ramped()


def _stop_sending() -> None:
    if NODE.sending:
        NODE.sending = False
        NODE.tally.mark_stopped(time.time())


class DrainWatch:
    """When a drain is over: nothing owed, or no progress for a while, or its hard cap.

    With acks the owed deliveries are known exactly, and the drain waits for
    them as long as they keep coming (an overloaded generator may be many
    seconds behind: late is not lost). Without acks, or once a connection has
    died (its deliveries will never come), a quiet second ends it.
    """

    def __init__(self, acks: bool, stall_s: float) -> None:
        self.acks, self.stall_s = acks, stall_s
        self.start = self.changed = time.monotonic()
        self.seen: tuple = ()

    def done(self, tally: Tally) -> bool:
        if self.acks and tally.unacked <= 0 and tally.delivered >= tally.expected:
            return True
        now = time.monotonic()
        progress = (tally.delivered, tally.acked, tally.unacked)
        if progress != self.seen:
            self.seen, self.changed = progress, now
        quiet = now - self.changed
        if quiet >= QUIET_S and (not self.acks or tally.errors):
            return True
        return quiet >= self.stall_s or now - self.start >= DRAIN_CAP_S


def _drain_local() -> None:
    _stop_sending()
    if NODE.cfg.scenario == "recovery":
        recovery.settle(NODE)  # everyone back and quiet, then every tail checked
        NODE.drained = True
        return
    watch = DrainWatch(NODE.cfg.acks, NODE.cfg.drain_timeout)
    while not watch.done(NODE.tally):
        gevent.sleep(0.05)
    NODE.drained = True


@events.test_stopping.add_listener
def _on_test_stopping(environment, **_kw) -> None:
    runner = environment.runner
    if NODE.drained or NODE.finished:
        return
    if isinstance(runner, MasterRunner):
        _drain_workers(runner)
    elif isinstance(runner, WorkerRunner):
        _stop_sending()  # the master did not drain us (it lost track of us): stop anyway
    else:
        _drain_local()


# ---- distributed: the master drains all workers, then merges their tallies
def _drain_workers(runner: MasterRunner) -> None:
    workers = {c.id for c in runner.clients.all}
    NODE.worker_tallies.clear()
    runner.send_message("mux_drain", None)
    # recovery: workers report once settled; deliveries owed are not known from acks there.
    watch = DrainWatch(NODE.cfg.acks and NODE.cfg.scenario != "recovery", NODE.cfg.drain_timeout)
    deadline = time.monotonic() + DRAIN_CAP_S + NODE.cfg.drain_timeout  # workers that never answer
    while time.monotonic() < deadline:
        gevent.sleep(0.1)
        if workers <= set(NODE.worker_tallies) and watch.done(_merged()):
            break
    runner.send_message("mux_drained", None)
    NODE.drained = True
    missing = workers - set(NODE.worker_tallies)
    if missing:
        log.error("muxload: %d worker(s) sent no counters: %s", len(missing), sorted(missing))
        NODE.tally.error("NO_WORKER_REPORT", len(missing))


def _merged() -> Tally:
    total = Tally(nodes=0)
    for tally in NODE.worker_tallies.values():
        total.merge(tally)
    return total


def _on_worker_tally(environment, msg, **_kw) -> None:
    NODE.worker_tallies[msg.node_id] = Tally.from_dict(msg.data)


def _on_drain_request(environment, msg, **_kw) -> None:
    """Worker: stop sending, then report counters until the master has seen enough."""
    _stop_sending()
    if NODE.cfg.scenario == "recovery":
        recovery.settle(NODE)  # within SETTLE_CAP_S, well inside the master's patience
    runner = environment.runner
    deadline = time.monotonic() + DRAIN_CAP_S + NODE.cfg.drain_timeout + 10.0
    NODE.stop_reporting = False
    while not NODE.stop_reporting and time.monotonic() < deadline:
        runner.send_message("mux_tally", NODE.tally.to_dict())
        gevent.sleep(0.2)
    NODE.drained = True


def _on_drained(environment, msg, **_kw) -> None:
    NODE.stop_reporting = True


# ---------------------------------------------------------------- summary
@events.test_stop.add_listener
def _on_test_stop(environment, **_kw) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner) or NODE.finished:
        return
    NODE.finished = True
    cfg = NODE.cfg
    if isinstance(runner, MasterRunner):
        tally = _merged()
        tally.errors.update(NODE.tally.errors)  # e.g. NO_WORKER_REPORT
        tally.t_start = tally.t_start or NODE.tally.t_start
    else:
        _stop_sending()
        tally = NODE.tally
    acks = cfg.acks and cfg.scenario not in ("churn", "recovery")  # recovery: seqs judge
    if acks and tally.expected > tally.delivered:
        # Promised by the server, never received: loss the sequence check cannot see
        # (nothing came after it).
        count = tally.expected - tally.delivered
        _fire_failures("deliver", "MISSING", count)
    summary = summary_dict(
        tally, cfg.scenario, acks, cfg.sample,
        offered_rate(cfg, tally.users),
    )  # fmt: skip
    if not getattr(environment.parsed_options, "compact", False):
        print("\n" + format_summary(summary) + "\n", flush=True)
    if cfg.summary_file:
        path = Path(cfg.summary_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["passed"]:
        environment.process_exit_code = 1


@events.quitting.add_listener
def _on_quitting(environment, **_kw) -> None:
    # Locust rewrites its CSV files once a second and not again at exit, so the
    # last second (the drain, the final worker reports) could be missing from
    # them: give its writer one more turn, so that the CSV and the summary agree.
    opts = environment.parsed_options
    if getattr(opts, "csv_prefix", None) and not isinstance(environment.runner, WorkerRunner):
        gevent.sleep(1.2)
