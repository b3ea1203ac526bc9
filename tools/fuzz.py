"""Live fuzz run: hostile clients and well-behaved ones in the same rooms of one server.

``python -m tools.fuzz --seconds 30 --seed 1`` starts a server on a free
loopback port, connects the chatters (tools.load: numbered messages, checked
for loss and order), then runs fuzzing workers until the time is up. Each
worker plays cases from tools.fuzzgen one connection at a time and checks
every answer against tools.model: exactly the REPLY statuses and the ERROR
code protocol.md names, nothing after an ERROR, nothing at all awaited when
the client hung up first.

At the end: the chatters must each have every other chatter's messages in
order, the server must still answer a fresh client's HELLO and PING, its
open-fd count must come back to the count before the run, and SIGTERM must
end it with status 0. The exit status is 0 only if all of that held.

A failing case is printed with its bytes, how they were cut, and what the
model expected; ``--case W:N`` replays just that case (same seed) against a
fresh server.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import sys
import threading
import time

from muxserver import protocol as P

from . import harness
from .fuzzgen import Case, Generator
from .harness import Failures, RawClient, Server, Tally
from .load import ChatGroup, Unexpected, drain_to_eof
from .model import BYE, FATAL, OPEN, Expect, World
from .wsfuzz import Mismatch, WsCase, WsGenerator, run_ws_case

MAX_FRAME = 65536  # small, so "near max_frame" frames stay cheap
MAX_ROOMS = 8  # small, so JOIN past the limit (REPLY LIMIT) happens
DRAIN_TIMEOUT = 2.0
ANSWER_TIMEOUT = 15.0  # longer than any honest answer takes on a busy box
CHATTER_ROOMS = [["lobby", "r2"], ["lobby"], ["lobby", "r2"], ["lobby"]]


def server_args(drain_timeout: float = DRAIN_TIMEOUT) -> list[str]:
    return [
        "--max-frame", str(MAX_FRAME), "--max-rooms", str(MAX_ROOMS),
        "--drain-timeout", str(drain_timeout), "--log-level", "warning",
    ]  # fmt: skip


def world_for(group: ChatGroup | None) -> World:
    if group is None:
        return World(MAX_FRAME, MAX_ROOMS)
    rooms = {room for rooms in group.rooms_of for room in rooms}
    return World(MAX_FRAME, MAX_ROOMS, group.nicks, {r: group.members(r) for r in rooms})


# ------------------------------------------------------------ one case
def next_answer(c: RawClient, expect: Expect, tally: Tally):
    """The next frame that answers something (EVENT/PRESENCE/PING are skipped)."""
    try:
        while True:
            frame = c.recv(ANSWER_TIMEOUT)
            if isinstance(frame, P.Event | P.Presence | P.ServerPing):
                tally.add("bystander frames")
                continue
            return frame
    except TimeoutError:
        raise Mismatch(
            f"no answer in {ANSWER_TIMEOUT:g} s (hang?); expected {expect.describe()}"
        ) from None
    except EOFError:
        raise Mismatch(f"server closed; expected {expect.describe()}") from None
    except ConnectionResetError:
        raise Mismatch(f"connection reset; expected {expect.describe()}") from None
    except P.ProtocolError as exc:
        raise Mismatch(f"server sent a frame that does not decode: {exc}") from None


def check(expect: Expect, got, tally: Tally, max_frame: int) -> None:
    if isinstance(got, P.Error):
        tally.add(("ERROR", got.name))
    elif isinstance(got, P.Reply):
        tally.add(("REPLY", P.STATUS_NAMES.get(got.status, str(got.status))))
    bad = f"expected {expect.describe()}, got {got!r:.200}"
    if expect.kind == "ERROR":
        if not isinstance(got, P.Error) or got.code != expect.value:
            raise Mismatch(bad)
    elif expect.kind == "REPLY":
        if not isinstance(got, P.Reply) or got.req != expect.value:
            raise Mismatch(bad)
        if got.status not in expect.statuses:
            raise Mismatch(bad)
        if got.status == P.OK:
            problem = expect.check(got.body) if expect.check else None
            if problem:
                raise Mismatch(f"{problem} (answering {expect.note})")
        else:
            try:
                got.body.decode("utf-8")
            except UnicodeDecodeError:
                raise Mismatch(f"REPLY error message is not UTF-8: {got!r}") from None
    elif expect.kind == "PONG":
        if not isinstance(got, P.ServerPong) or got.nonce != expect.value:
            raise Mismatch(bad)
    elif expect.kind == "WELCOME":
        if not isinstance(got, P.Welcome) or got.version != 1 or got.max_frame != max_frame:
            raise Mismatch(bad)
        problem = expect.check(got) if expect.check else None
        if problem:
            raise Mismatch(problem)


def send_case(c: RawClient, case: Case) -> None:
    for pause, chunk in zip(case.pauses, case.chunks, strict=True):
        if pause:
            time.sleep(pause)
        try:
            c.sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            # Only after a fatal ERROR may the server stop reading, and even
            # then it drains; the answers read below decide whether this is
            # a failure.
            return


def run_case(address, case: Case, tally: Tally, nonce: int) -> None:
    c = RawClient(address, timeout=ANSWER_TIMEOUT)
    try:
        send_case(c, case)
        tally.add("frames sent", case.frames)
        tally.add("bytes sent", sum(map(len, case.chunks)))
        tally.add("frames the server had to decode", case.verdict.frames)
        if case.cut is not None:
            if case.rst:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tally.add("cases ending " + ("in a reset" if case.rst else "in a disconnect"))
            return
        verdict = case.verdict
        expects = list(verdict.expects)
        if verdict.end == OPEN:
            c.send(P.Ping(nonce))
            expects.append(Expect("PONG", nonce))
        for expect in expects:
            check(expect, next_answer(c, expect, tally), tally, MAX_FRAME)
        tally.add(f"cases ending {verdict.end}")
        if verdict.end == FATAL:
            try:
                c.expect_closed(ANSWER_TIMEOUT)
            except AssertionError as exc:
                raise Mismatch(f"frame after the ERROR: {exc}") from None
            except TimeoutError:
                raise Mismatch("no close after the ERROR") from None
        elif verdict.end == BYE or (verdict.end == OPEN and case.bye):
            if verdict.end == OPEN:
                c.send(P.Bye())
            try:
                drain_to_eof(c, ANSWER_TIMEOUT)
            except (Unexpected, TimeoutError, ConnectionResetError) as exc:
                raise Mismatch(f"after BYE: {exc}") from None
    finally:
        c.close()


def run_any(address, case, tally: Tally, nonce: int) -> None:
    if isinstance(case, WsCase):
        tally.add("ws cases")
        run_ws_case(
            address, case, tally, nonce, ANSWER_TIMEOUT,
            lambda expect, got, t: check(expect, got, t, MAX_FRAME),
        )  # fmt: skip
    else:
        run_case(address, case, tally, nonce)


class Cases:
    """Case N of a worker: raw TCP, or (a ``ws_share`` of them) WebSocket; same seed, same case."""

    def __init__(self, seed, worker: int, world: World, address, ws_share: float) -> None:
        self.gen = Generator(seed, worker, world)
        self.worker = worker
        self.ws = WsGenerator(self.gen, f"{address[0]}:{address[1]}")
        self.pick = random.Random(f"{seed}:{worker}:transport")
        self.ws_share = ws_share

    def case(self, index: int):
        if self.pick.random() < self.ws_share:
            return self.ws.case(index)
        return self.gen.case(index)


class FuzzWorker(threading.Thread):
    def __init__(self, address, gen: Cases, deadline: float, tally, failures, seed, pace=0.0):
        super().__init__(name=f"fuzz-{gen.worker}", daemon=True)
        self.address, self.gen, self.deadline = address, gen, deadline
        self.tally, self.failures, self.seed, self.pace = tally, failures, seed, pace
        self.stop = threading.Event()

    def run(self) -> None:
        index = 0
        nonces = random.Random(f"{self.seed}:{self.gen.worker}:nonce")
        while time.monotonic() < self.deadline and not self.stop.is_set():
            case = self.gen.case(index)
            index += 1
            try:
                run_any(self.address, case, self.tally, nonces.getrandbits(64))
            except Mismatch as exc:
                self.failures.add(
                    f"case {case.ident} (--seed {self.seed} --case {case.ident}): {exc}\n{case.describe()}"
                )
            except Exception as exc:  # harness trouble or an OSError: never a silent pass
                self.failures.add(
                    f"case {case.ident}: {type(exc).__name__}: {exc}\n{case.describe()}"
                )
            self.tally.add("cases")
            if self.pace:
                self.stop.wait(self.pace)


# ---------------------------------------------------------------- runs
def replay(seed: str, ident: str, ws_share: float) -> int:
    """Run one case, verbosely, against a fresh server with the same chatters."""
    worker, index = (int(x) for x in ident.split(":"))
    harness.raise_nofile()
    server = Server(*server_args())
    failures, tally = Failures(), Tally()
    group = ChatGroup(server.address, CHATTER_ROOMS, failures, tally, seed=seed, rate=5)
    group.start()
    gen = Cases(seed, worker, world_for(group), server.address, ws_share)
    for i in range(index + 1):
        case = gen.case(i)
    print(f"case {case.ident}, seed {seed}:\n{case.describe(limit=4096)}")
    try:
        run_any(server.address, case, tally, 12345)
        print("result: as the protocol demands")
    except Mismatch as exc:
        print(f"result: MISMATCH: {exc}")
        failures.add(str(exc))
    group.finish()
    harness.finish(server, failures, server.fds(), 5)
    print(failures.report())
    return 1 if failures else 0


def run(seconds: float, seed: str, workers: int, ws_share: float) -> int:
    harness.raise_nofile()
    failures, tally = Failures(), Tally()
    server = Server(*server_args())
    fd_base, rss_base = server.fds(), server.rss()
    print(
        f"fuzz: seed {seed}, {seconds:g} s, {workers} fuzzing clients + "
        f"{len(CHATTER_ROOMS)} chatters, server pid {server.pid} on "
        f"{server.address[0]}:{server.address[1]}",
        flush=True,
    )
    group = ChatGroup(server.address, CHATTER_ROOMS, failures, tally, seed=seed, rate=40)
    started = time.monotonic()
    group.start()
    world = world_for(group)
    deadline = time.monotonic() + seconds
    pool = [
        FuzzWorker(
            server.address, Cases(seed, w, world, server.address, ws_share), deadline, tally,
            failures, seed,
        )  # fmt: skip
        for w in range(workers)
    ]
    for w in pool:
        w.start()
    fd_peak = rss_peak = 0
    while any(w.is_alive() for w in pool):
        time.sleep(0.5)
        if not server.alive():
            failures.add(f"server died (status {server.proc.returncode}) during the run")
            for w in pool:
                w.stop.set()
            break
        fd_peak, rss_peak = max(fd_peak, server.fds()), max(rss_peak, server.rss())
    for w in pool:
        w.join(ANSWER_TIMEOUT * 4)
        if w.is_alive():
            failures.add(f"{w.name} did not finish (hang?)")
    group.finish()
    elapsed = time.monotonic() - started
    figures = harness.finish(server, failures, fd_base, DRAIN_TIMEOUT + 8)
    print(summary(tally, elapsed, fd_base, fd_peak, rss_base, rss_peak, figures))
    print(failures.report(), flush=True)
    return 1 if failures else 0


def summary(tally, elapsed, fd_base, fd_peak, rss_base, rss_peak, figures) -> str:
    t = tally.counts
    errors = sorted(
        ((k[1], v) for k, v in t.items() if isinstance(k, tuple) and k[0] == "ERROR"),
        key=lambda kv: -kv[1],
    )
    replies = sorted(
        ((k[1], v) for k, v in t.items() if isinstance(k, tuple) and k[0] == "REPLY"),
        key=lambda kv: -kv[1],
    )
    ends = {k: v for k, v in t.items() if isinstance(k, str) and k.startswith("cases ending")}
    ws_ends = {k: v for k, v in t.items() if isinstance(k, str) and k.startswith("ws cases ending")}
    closes = sorted((k[1], v) for k, v in t.items() if isinstance(k, tuple) and k[0] == "WS CLOSE")
    lines = [
        f"ran {elapsed:.1f} s: {t['cases']} cases (raw TCP and WebSocket), one connection each",
        f"frames sent: {t['frames sent']} ({t['bytes sent']} bytes); "
        f"frames the server had to decode: {t['frames the server had to decode']}",
        "case endings: "
        + ", ".join(f"{k[len('cases ending ') :]} {v}" for k, v in sorted(ends.items())),
        f"WebSocket cases: {t['ws cases']} ({t['ws frames bytes sent']} bytes of frames); endings: "
        + ", ".join(f"{k[len('ws cases ending ') :]} {v}" for k, v in sorted(ws_ends.items())),
        "WebSocket Close codes received: " + (", ".join(f"{c} {v}" for c, v in closes) or "none"),
        "ERROR frames received, by code: " + (", ".join(f"{n} {v}" for n, v in errors) or "none"),
        "REPLY statuses received: " + (", ".join(f"{n} {v}" for n, v in replies) or "none"),
        f"chatters: {t['chat messages sent']} messages sent, {t['chat deliveries checked']} "
        f"deliveries checked in order; fuzz clients saw {t['bystander frames']} bystander frames",
        f"server: fds {fd_base} before, peak {fd_peak}, {figures.get('fds_end', '?')} after; "
        f"RSS {harness.mib(rss_base)} before, peak {harness.mib(rss_peak)}; "
        f"exit status on SIGTERM {figures.get('exit_status')}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.fuzz", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to fuzz (default 30)")
    parser.add_argument("--seed", default=None, help="RNG seed (default: random, printed)")
    parser.add_argument(
        "--workers", type=int, default=6, help="fuzzing clients at once (default 6)"
    )
    parser.add_argument("--case", default=None, metavar="W:N", help="replay one case and stop")
    parser.add_argument(
        "--ws-share", type=float, default=0.4,
        help="share of the cases played over WebSocket (default 0.4; 0: raw TCP only)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else str(random.SystemRandom().getrandbits(32))
    if args.case:
        return replay(seed, args.case, args.ws_share)
    return run(args.seconds, seed, args.workers, args.ws_share)


if __name__ == "__main__":
    sys.exit(main())
