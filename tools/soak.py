"""Soak: minutes of every feature at once on two servers, watching memory and descriptors.

``python -m tools.soak --minutes 10`` starts two servers, one plain (raw TCP
and WebSocket on its port) and one with TLS (raw protocol over TLS and
wss://), since one port serves TLS or not, never both. Both have the
monitoring port on and history bounded by a 30 s TTL. For the whole time:

* chat: chatters in two rooms, numbered messages checked for loss and order
  (tools.load); on the plain server every other one speaks WebSocket, on
  the TLS server every other one wss;
* bulk: three chatters trading 4-12 KB messages in room ``bulk`` (about
  1 MB/s), the traffic that a slow consumer falls behind on;
* a slow consumer in ``bulk`` that reads 4 KB every half second, so the
  server must cut it with ERROR SLOW_CONSUMER (see SlowConsumer), then
  reconnects and does it again;
* churn: clients (raw, WebSocket, TLS, wss) that connect, HELLO, JOIN,
  EMIT, WHO and leave by BYE, by closing, or by a reset, over and over;
* a sequenced room on each server: a writer with acked, numbered messages
  and resumers (raw and WebSocket) that drop their connection without BYE
  and come back with their resume token and a SEQUENCED JOIN from their
  last seq; the replay must be complete, without hole or duplicate
  (tools.soakclients);
* /metrics and /healthz of each server scraped every 3 s;
* a few fuzzing clients (tools.fuzz cases, raw and WebSocket, at a slow
  pace) on the plain server.

Every ``--interval`` seconds (30 by default) it prints each server's RSS
and open fds. Invariants: after the warm-up (the first ``--warmup``
seconds) each server's RSS stays within +-2 % of its first post-warm-up
sample; when every client has left, the fd counts come back to what they
were before the first one came; every resumer catches up with the writer's
last message; and the usual end checks (tools.harness.finish) hold.
"""

from __future__ import annotations

import argparse
import random
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from muxserver import protocol as P

from . import harness
from .fuzz import Cases, FuzzWorker, server_args, world_for
from .harness import Failures, RawClient, Server, Tally, WsRawClient
from .load import CHAT, ChatGroup, Unexpected, drain_to_eof, request
from .soakclients import Resumer, Scraper, SeqWriter

MAX_OUTPUT = 1024 * 1024  # small, so the slow consumer is cut in seconds, not minutes
# Longer than the default 5 s on purpose. After a cut the server closes once
# the ERROR is sent or drain_timeout passes, and the ERROR waits behind the
# kernel send buffer (up to 4 MiB here): a consumer that reads slower than
# that buffer / drain_timeout sees end of stream without the ERROR (protocol
# section 7 allows it; docs/security.md). Ours only catches up at the end of
# each slow spell, up to SLOW_SPELL seconds after the cut.
DRAIN_TIMEOUT = 20.0
RSS_BAND = 0.02  # issue 15: within 2 % of the post-warm-up level
# History is bounded by TTL here so that it is full (and RSS level) well
# inside the warm-up: at the defaults (64 MiB, 120 s) it would still be
# filling when RSS is first judged.
HISTORY_TTL = 30.0
HISTORY = ["--history-ttl", str(HISTORY_TTL), "--history-size", "500",
           "--history-memory", str(16 << 20), "--resume-window", "30"]  # fmt: skip
SLOW_SPELL = 12.0  # seconds the slow consumer reads 4 KB / 0.5 s before catching up
FAST_SPELL = 20.0  # ... and then reads at full speed
# Bulk bytes produced during a slow spell past which a cut is certain: the
# server's send buffer (4 MiB at most here) + our receive buffer (it barely
# grows while we read slowly) + max-output, with room to spare.
MUST_CUT = 10 * 1024 * 1024


class Cycler(threading.Thread):
    """A client thread that repeats ``one(k)`` until stopped.

    Any exception is recorded as a failure of the run (labelled by
    ``label(k)``) instead of silently killing the thread.
    """

    pause = 1.0  # seconds between cycles

    def run(self) -> None:
        k = 0
        while not self.stop.is_set():
            try:
                self.one(k)
            except Exception as exc:
                self.failures.add(f"{self.label(k)}: {type(exc).__name__}: {exc}")
            k += 1
            self.stop.wait(self.pause)


class SlowConsumer(Cycler):
    """Falls behind in ``bulk`` on purpose; the server must cut it (protocol section 7).

    One cycle: join, read 4 KB every half second for ``SLOW_SPELL`` seconds
    (far behind the bulk traffic), then read as fast as possible. The
    server's ERROR SLOW_CONSUMER waits behind whatever its socket buffers
    held when it gave up, so only the fast read finds it. What came before
    it must be in order per sender with no gap (the dropped tail is at the
    end), and nothing may follow it but end of stream.

    If the bulk chatters produced more than ``MUST_CUT`` bytes during the
    slow spell and the fast read finds no ERROR, the bound was not enforced:
    that fails the run. With less traffic (a starved harness) the cycle just
    counts as "not behind enough".
    """

    def __init__(self, address, bulk: ChatGroup, stop, tally: Tally, failures: Failures) -> None:
        super().__init__(name="slow-consumer", daemon=True)
        self.address, self.bulk, self.stop = address, bulk, stop
        self.tally, self.failures = tally, failures

    def produced(self) -> int:
        return sum(c.bytes_sent for c in self.bulk.chatters)

    def label(self, cycle: int) -> str:
        return "slow consumer"

    def one(self, cycle: int) -> None:
        c = RawClient(self.address)
        try:
            c.hello(f"slow-{cycle}")
            if request(c, P.Join(1, "bulk", 0)).status != P.OK:
                raise Unexpected("JOIN bulk refused")
            self.expected: dict[int, int] = {}
            # Frames that came in the same read as the JOIN's REPLY.
            leftovers = list(c.frames)
            c.frames.clear()
            if self.check(c, leftovers):
                return
            start = self.produced()
            spell_end = time.monotonic() + SLOW_SPELL
            while time.monotonic() < spell_end:
                if self.stop.wait(0.5):
                    return
                c.sock.settimeout(30)
                if self.take(c, c.sock.recv(4096)):
                    return
            behind = self.produced() - start
            fast_end = time.monotonic() + FAST_SPELL
            c.sock.settimeout(5)
            while time.monotonic() < fast_end and not self.stop.is_set():
                try:
                    data = c.sock.recv(262144)
                except TimeoutError:
                    continue
                if self.take(c, data):
                    return
            if behind > MUST_CUT and not self.stop.is_set():
                raise Unexpected(
                    f"not cut after falling {harness.mib(behind)} behind (max-output "
                    f"{harness.mib(MAX_OUTPUT)})"
                )
            self.tally.add("slow consumer cycles not behind enough")
        finally:
            c.close()

    def take(self, c: RawClient, data: bytes) -> bool:
        """Check what arrived; True once the ERROR and end of stream were seen."""
        if not data:
            raise Unexpected("closed without ERROR SLOW_CONSUMER")
        return self.check(c, [P.decode(t, b) for t, b in c.decoder.feed(data)])

    def check(self, c: RawClient, frames: list) -> bool:
        for i, frame in enumerate(frames):
            if isinstance(frame, P.Error):
                if frame.code != P.SLOW_CONSUMER:
                    raise Unexpected(f"expected SLOW_CONSUMER, got {frame!r}")
                if frames[i + 1 :]:
                    raise Unexpected(f"frames after the ERROR: {frames[i + 1]!r}")
                self.tally.add("slow consumers cut")
                c.expect_closed(30)
                return True
            if (
                isinstance(frame, P.Event)
                and frame.source_kind == P.TARGET_ROOM
                and frame.source == "bulk"
                and frame.sender.startswith("bulk-")
            ):
                _, sender, seq = CHAT.unpack_from(frame.payload)
                # Joined mid-stream: each sender's first number is the start.
                want = self.expected.get(sender, seq)
                if seq != want:
                    raise Unexpected(f"bulk-{sender}: got #{seq}, expected #{want} (a gap)")
                self.expected[sender] = seq + 1
                self.tally.add("slow consumer deliveries")
        return False


class Churner(Cycler):
    pause = 0.02

    def __init__(self, address, n: int, stop, tally, failures, seed, connect=None) -> None:
        super().__init__(name=f"churn-{n}", daemon=True)
        self.address, self.n, self.stop = address, n, stop
        self.connect = connect or (lambda: RawClient(address))
        self.tally, self.failures = tally, failures
        self.rng = random.Random(f"{seed}:churn:{n}")

    def label(self, k: int) -> str:
        return f"churn client {self.n}/{k}"

    def one(self, k: int) -> None:
        rng = self.rng
        c = self.connect()
        try:
            c.hello(f"churn{self.n}-{k}" if rng.random() < 0.7 else "")
            room = rng.choice(("lobby", "r2", f"churn-{self.n}"))
            if request(c, P.Join(1, room, rng.randint(0, 1))).status != P.OK:
                raise Unexpected(f"JOIN {room} refused")
            reply = request(c, P.Emit(2, P.TARGET_ROOM, room, "churn", rng.randbytes(64)))
            if reply.status != P.OK:
                raise Unexpected(f"EMIT answered {reply!r}")
            if request(c, P.Who(3, room)).status != P.OK:
                raise Unexpected("WHO refused")
            how = rng.choice(("bye", "close", "reset"))
            if how == "bye":
                c.send(P.Bye())
                drain_to_eof(c, 15)
            elif how == "reset":
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.tally.add(f"churn: left by {how}")
        finally:
            c.close()


class Rig:
    """One server and the clients soaking it; ``tls`` makes every client speak TLS."""

    def __init__(self, label: str, args: list, tls, stop, tally, failures) -> None:
        """``tls``: tests/tlsutil.TLSFiles (serve TLS with its certificate), or None."""
        self.label, self.stop, self.tally, self.failures = label, stop, tally, failures
        self.metrics_port = free_port()
        extra = ["--metrics-port", str(self.metrics_port)]
        if tls is not None:
            extra += ["--tls-cert", tls.cert]
        self.server = Server(*args, *extra)
        self.address = self.server.address
        self.ctx = ssl.create_default_context(cafile=tls.ca) if tls is not None else None
        self.fd_base, self.rss_base = self.server.fds(), self.server.rss()
        self.samples: list[tuple[float, int, int]] = []
        self.threads: list = []
        self.groups: list = []
        self.resumers: list = []
        self.writer = None

    def raw(self):
        return RawClient(self.address, ssl_context=self.ctx)

    def ws(self):
        return WsRawClient(self.address, ssl_context=self.ctx)

    def mixed(self, index: int):
        """Even chatters speak the raw protocol, odd ones WebSocket (both over TLS on a TLS rig)."""
        return self.raw() if index % 2 == 0 else self.ws()

    def sequenced(self, kinds: str, seed) -> None:
        """A writer into room ``seq`` and one resumer per letter of ``kinds`` (r: raw, w: WebSocket)."""
        self.writer = SeqWriter(self.raw, "seq", 10, self.stop, self.tally, self.failures)
        self.resumers = [
            Resumer(f"{self.label}-res{i}", self.raw if k == "r" else self.ws, "seq", self.stop,
                    self.tally, self.failures, seed)
            for i, k in enumerate(kinds)
        ]  # fmt: skip
        self.threads += [self.writer, *self.resumers]
        self.threads.append(Scraper(self.metrics_port, 3.0, self.stop, self.tally, self.failures,
                                    self.label))  # fmt: skip

    def sample(self, elapsed: float) -> str:
        rss, fds = self.server.rss(), self.server.fds()
        self.samples.append((elapsed, rss, fds))
        return f"{self.label}: RSS {harness.mib(rss)} fds {fds}"

    def finish(self) -> dict:
        """Stop the clients (resumers catch up to the writer's last seq first), check the server."""
        for g in self.groups:
            g.finish()
        if self.writer is not None:
            self.writer.done.wait(30)
        for t in self.threads:
            t.join(30)
            if t.is_alive():
                self.failures.add(f"{t.name} did not stop (hang?)")
        target = self.writer.last_seq if self.writer is not None else 0
        for r in self.resumers:
            try:
                r.cycle(30.0, final=True, target=target)
            except Exception as exc:
                self.failures.add(f"{r.nick} final catch-up: {type(exc).__name__}: {exc}")
        return harness.finish(self.server, self.failures, self.fd_base, 15, self.ctx)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(minutes: float, interval: float, warmup: float | None, seed: str) -> int:
    harness.raise_nofile()
    failures, tally = Failures(), Tally()
    stop = threading.Event()
    seconds = minutes * 60
    if warmup is None:
        # Closed connections stay referenced until their drain timer is due,
        # and history fills until its TTL drops the oldest: RSS levels off
        # after both (see HISTORY).
        warmup = max(interval, 0.25 * seconds, 2 * DRAIN_TIMEOUT, 3 * HISTORY_TTL)
    args = [*server_args(DRAIN_TIMEOUT), "--max-output", str(MAX_OUTPUT), *HISTORY]
    from tlsutil import make_tls_files  # tests/, on the path once tools.harness is imported

    tmp = tempfile.TemporaryDirectory(prefix="soak-tls-")
    plain = Rig("tcp+ws", args, None, stop, tally, failures)
    secure = Rig("tls", args, make_tls_files(Path(tmp.name)), stop, tally, failures)
    rigs = (plain, secure)
    print(
        f"soak: {minutes:g} min, seed {seed}, samples every {interval:g} s, warm-up {warmup:g} s; "
        + "; ".join(
            f"{r.label} server pid {r.server.pid}: {harness.mib(r.rss_base)} RSS, {r.fd_base} fds"
            for r in rigs
        ),
        flush=True,
    )
    chat = ChatGroup(
        plain.address, [["lobby", "r2"], ["lobby"], ["lobby", "r2"], ["lobby"], ["r2"], ["lobby"]],
        failures, tally, rate=20, seed=seed, prefix="wb", connect=plain.mixed,
    )  # fmt: skip
    bulk = ChatGroup(
        plain.address, [["bulk"]] * 3, failures, tally,
        rate=40, payload=(4000, 12000), seed=seed, prefix="bulk", presence=False,
    )  # fmt: skip
    tls_chat = ChatGroup(
        secure.address, [["lobby", "r2"], ["lobby"], ["r2", "lobby"], ["lobby"]],
        failures, tally, rate=10, seed=seed, prefix="tls", connect=secure.mixed,
    )  # fmt: skip
    plain.groups, secure.groups = [chat, bulk], [tls_chat]
    for g in (chat, bulk, tls_chat):
        g.start()
    world = world_for(chat)._replace(taken=chat.nicks | bulk.nicks)
    deadline = time.monotonic() + seconds
    plain.threads += [
        SlowConsumer(plain.address, bulk, stop, tally, failures),
        *(Churner(plain.address, n, stop, tally, failures, seed) for n in range(2)),
        Churner(plain.address, 2, stop, tally, failures, seed, connect=plain.ws),
    ]
    secure.threads += [Churner(secure.address, 0, stop, tally, failures, seed, connect=secure.raw),
                       Churner(secure.address, 1, stop, tally, failures, seed, connect=secure.ws)]  # fmt: skip
    plain.sequenced("rrw", seed)
    secure.sequenced("rw", seed)
    fuzzers = [
        FuzzWorker(
            plain.address, Cases(seed, w, world, plain.address, 0.4), deadline, tally,
            failures, seed, 0.1,
        )  # fmt: skip
        for w in range(2)
    ]
    plain.threads += fuzzers
    for r in rigs:
        for t in r.threads:
            t.start()
    started = time.monotonic()
    next_sample = started + interval
    while time.monotonic() < deadline and all(r.server.alive() for r in rigs):
        time.sleep(min(1.0, max(0.0, next_sample - time.monotonic())))
        if time.monotonic() >= next_sample:
            next_sample += interval
            elapsed = time.monotonic() - started
            t = tally.counts
            print(
                f"[{elapsed:6.0f} s] " + "  ".join(r.sample(elapsed) for r in rigs)
                + f" | chat checked {chat.received + bulk.received + tls_chat.received}, "
                f"slow consumers cut {t['slow consumers cut']}, resumes {t['resumes']}, "
                f"sequenced checked {t['sequenced deliveries checked']}, "
                f"churn {sum(v for k, v in t.items() if str(k).startswith('churn'))}, "
                f"fuzz cases {t['cases']}, scrapes {t['tcp+ws scrapes'] + t['tls scrapes']}",
                flush=True,
            )
    for r in rigs:
        if not r.server.alive():
            failures.add(f"{r.label} server died (status {r.server.proc.returncode})")
            for line in r.server.log[:200]:
                print(f"{r.label} server log: {line}", file=sys.stderr)
    stop.set()
    for f in fuzzers:
        f.stop.set()
    figures = {r.label: r.finish() for r in rigs}
    tmp.cleanup()
    for r in rigs:
        check_rss(r.label, r.samples, warmup, failures)
    t = tally.counts
    print(
        f"load: {t['chat messages sent']} chat messages sent, {t['chat deliveries checked']} "
        f"deliveries checked in order; slow consumer cut {t['slow consumers cut']} times after "
        f"{t['slow consumer deliveries']} in-order deliveries; churn "
        + ", ".join(
            f"{k[len('churn: ') :]} {v}"
            for k, v in sorted(t.items(), key=str)
            if str(k).startswith("churn")
        )
        + f"; fuzz cases {t['cases']} ({t['ws cases']} WebSocket)"
    )
    print(
        f"sequenced: {t['sequenced messages sent']} sent, {t['sequenced deliveries checked']} "
        f"EVENT_SEQ checked (no hole, no duplicate), {t['resumes']} resumes + "
        f"{t['fresh sessions']} fresh sessions, {t['replayed on resume']} replayed; resumers left by "
        + ", ".join(f"{k.split()[-1]} {v}" for k, v in sorted(t.items(), key=str)
                    if str(k).startswith("resumer left"))  # fmt: skip
        + f"; monitoring scrapes {t['tcp+ws scrapes']} + {t['tls scrapes']}"
    )
    for r in rigs:
        f = figures[r.label]
        print(
            f"{r.label} fds: {r.fd_base} before, {max((s[2] for s in r.samples), default=0)} peak, "
            f"{f.get('fds_end', '?')} after every client left; exit status {f.get('exit_status')}"
        )
    print(failures.report(), flush=True)
    return 1 if failures else 0


def check_rss(label: str, samples: list, warmup: float, failures: Failures) -> None:
    print(f"{label} RSS series (MiB): " + " ".join(f"{rss / 2**20:.1f}" for _, rss, _ in samples))
    after = [(t, rss) for t, rss, _ in samples if t >= warmup]
    if not after:
        print(f"RSS: no sample after the {warmup:g} s warm-up; nothing to compare")
        return
    ref = after[0][1]
    low, high = min(r for _, r in after), max(r for _, r in after)
    print(
        f"{label} RSS after warm-up: reference {harness.mib(ref)} at {after[0][0]:.0f} s, "
        f"range {harness.mib(low)} .. {harness.mib(high)} "
        f"({(low / ref - 1) * 100:+.1f} % .. {(high / ref - 1) * 100:+.1f} %) over {len(after)} samples"
    )
    for t, rss in after:
        if abs(rss / ref - 1) > RSS_BAND:
            failures.add(
                f"{label} RSS {harness.mib(rss)} at {t:.0f} s is outside +-{RSS_BAND:.0%} of "
                f"{harness.mib(ref)}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before RSS is judged (default 20 %% of the run, at least one interval)",
    )
    parser.add_argument("--seed", default=None, help="RNG seed (default: random, printed)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else str(random.SystemRandom().getrandbits(32))
    return run(args.minutes, args.interval, args.warmup, seed)


if __name__ == "__main__":
    sys.exit(main())
