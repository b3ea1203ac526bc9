"""Connection scale: N clients past HELLO in one room of one server, and one broadcast to all.

``python -m tools.conns --clients 19000`` answers three questions of issue 6:
does one server process hold that many clients, how much memory does each
idle one cost it (growth of the server's VmRSS / clients), and how long does
one room broadcast take from the send to the last delivery.

Why several processes: the open-file limit here is 20,000 per process, and
the server needs one descriptor per client. The client side therefore runs in
worker processes (``multiprocessing``, spawn), each holding at most
``--per-worker`` non-blocking sockets on one epoll selector; both the server
and the workers lift their soft RLIMIT_NOFILE to the hard limit (the server
inherits it from this process).

Timing: every worker stamps each delivery with ``time.monotonic()``, which
on Linux is one clock for all processes of the machine, so "last delivery"
is the latest stamp of any worker minus the stamp taken right before the
sender's ``send``. It includes the time the workers take to read 19,000
sockets; on a 2-core box they share the CPU with the server, so this is an
upper bound of the server's part.
"""

from __future__ import annotations

import argparse
import errno
import math
import multiprocessing as mp
import selectors
import socket
import sys
import time
import traceback

from muxserver import protocol as P
from muxserver.framing import FrameDecoder

from . import harness
from .harness import Failures, RawClient, Server

ROOM = "all"
IN_FLIGHT = 200  # connections per worker between connect() and JOIN's REPLY
TARGET_PER_CONN = 2048  # issue 6: <= 2 KiB per idle connection on the server


# ------------------------------------------------------------ the workers
class _Client:
    __slots__ = ("sock", "decoder", "phase", "seen")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(1 << 20)
        self.phase = 0  # 0 connecting, 1 HELLO+JOIN sent, 2 joined
        self.seen = -1  # last broadcast number received


class Worker:
    """One process's share of the clients (runs in the child)."""

    def __init__(self, address, count: int) -> None:
        self.address = address
        self.count = count
        self.sel = selectors.DefaultSelector()
        self.clients: list[_Client] = []
        self.joined = 0
        self.problems: list[str] = []
        self.lost = 0
        self.hello = P.encode(P.Hello(1, "/", "", "")) + P.encode(P.Join(1, ROOM, 0))

    def problem(self, text: str) -> None:
        if len(self.problems) < 10:
            self.problems.append(text)

    def connect_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        started = in_flight = 0
        while started < self.count or in_flight:
            while started < self.count and in_flight < IN_FLIGHT:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex(self.address)
                if err not in (0, errno.EINPROGRESS):
                    sock.close()
                    self.problem(f"connect: {errno.errorcode.get(err, err)}")
                    started += 1
                    continue
                c = _Client(sock)
                self.clients.append(c)
                self.sel.register(sock, selectors.EVENT_WRITE, c)
                started += 1
                in_flight += 1
            if time.monotonic() > deadline:
                self.problem(f"set-up not done after {timeout:g} s ({self.joined} joined)")
                return
            for key, _mask in self.sel.select(1.0):
                c = key.data
                if c.phase == 0:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self.problem(f"connect: {errno.errorcode.get(err, err)}")
                        self.drop(c)
                        in_flight -= 1
                        continue
                    c.sock.send(self.hello)  # 24 bytes into an empty buffer: all of it
                    c.phase = 1
                    self.sel.modify(c.sock, selectors.EVENT_READ, c)
                elif c.phase == 1 and (not self.read(c, -1) or c.phase == 2):
                    in_flight -= 1  # joined, or lost on the way
                else:
                    self.read(c, -1)

    def drop(self, c: _Client) -> None:
        self.sel.unregister(c.sock)
        c.sock.close()
        c.phase = -1

    def read(self, c: _Client, bcast: int) -> bool:
        """Read and handle what ``c`` got; False if it was lost."""
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            data, why = b"", str(exc)
        else:
            why = "server closed the connection"
        if not data:
            self.problem(why)
            self.lost += c.phase == 2
            self.drop(c)
            return False
        for ftype, body in c.decoder.feed(data):
            if ftype == P.WELCOME:
                continue
            if ftype == P.REPLY and c.phase == 1:
                reply = P.decode(ftype, body)
                if reply.status != P.OK:
                    self.problem(f"JOIN answered {P.STATUS_NAMES.get(reply.status)}")
                    self.drop(c)
                    return False
                c.phase = 2
                self.joined += 1
            elif ftype == P.EVENT:
                ev = P.decode(ftype, body)
                if ev.event == f"b{bcast}":
                    c.seen = bcast
            elif ftype == P.SERVER_PING:
                c.sock.send(P.encode_frame(P.PONG, body))
            elif ftype == P.ERROR:
                self.problem(f"got {P.decode(ftype, body)!r}")
        return True

    def await_broadcast(self, k: int, timeout: float) -> tuple[int, float, float]:
        """Wait until every joined client has broadcast ``k``; (received, first, last)."""
        live = [c for c in self.clients if c.phase == 2]
        need = len(live)
        got = sum(c.seen == k for c in live)
        first = last = 0.0
        deadline = time.monotonic() + timeout
        while got < need and time.monotonic() < deadline:
            for key, _mask in self.sel.select(0.5):
                c = key.data
                before = c.seen
                if not self.read(c, k):
                    need -= 1
                elif c.seen == k and before != k:
                    now = time.monotonic()
                    first = first or now
                    last = now
                    got += 1
        if got < need:
            self.problem(f"broadcast {k}: {need - got} clients did not get it in {timeout:g} s")
        return got, first, last

    def close_all(self) -> None:
        for c in self.clients:
            if c.phase != -1:
                self.sel.unregister(c.sock)
                c.sock.close()
        self.sel.close()


def worker_main(pipe, address, count: int, broadcasts: int, timeout: float) -> None:
    try:
        harness.raise_nofile()
        w = Worker(tuple(address), count)
        t0 = time.monotonic()
        w.connect_all(timeout)
        pipe.send(("ready", w.joined, time.monotonic() - t0, list(w.problems)))
        for k in range(broadcasts):
            if pipe.recv() != ("go", k):
                return
            got, first, last = w.await_broadcast(k, timeout)
            pipe.send(("got", got, first, last, w.lost, list(w.problems)))
        pipe.recv()  # "close"
        w.close_all()
        pipe.send(("closed",))
    except Exception:
        pipe.send(("crash", traceback.format_exc()))


# ------------------------------------------------------------- the parent
def run(clients: int, broadcasts: int, per_worker: int, timeout: float) -> int:
    harness.raise_nofile()
    failures = Failures()
    server = Server(
        "--max-connections", str(clients + 64),
        # Idle on purpose: no heartbeat traffic while the clients sit there.
        "--ping-interval", "3600", "--ping-timeout", "3600",
        "--hello-timeout", str(timeout), "--log-level", "warning",
    )  # fmt: skip
    fd_base, rss_base = server.fds(), server.rss()
    nworkers = max(2, math.ceil(clients / per_worker))
    shares = [clients // nworkers + (i < clients % nworkers) for i in range(nworkers)]
    print(
        f"conns: {clients} clients in {nworkers} worker processes ({', '.join(map(str, shares))}), "
        f"server pid {server.pid}; server before: {harness.mib(rss_base)} RSS, {fd_base} fds",
        flush=True,
    )
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    t0 = time.monotonic()
    for share in shares:
        ours, theirs = ctx.Pipe()
        p = ctx.Process(
            target=worker_main, args=(theirs, server.address, share, broadcasts, timeout)
        )
        p.start()
        pipes.append(ours)
        procs.append(p)
    held = 0
    for pipe in pipes:
        msg = receive(pipe, timeout + 30, failures)
        if msg and msg[0] == "ready":
            held += msg[1]
            for text in msg[3]:
                failures.add(f"set-up: {text}")
    setup = time.monotonic() - t0
    time.sleep(0.5)  # let the last accepted sockets' first turn finish
    rss_held, fd_held = server.rss(), server.fds()
    per_conn = (rss_held - rss_base) / max(held, 1)
    verdict = "meets" if per_conn <= TARGET_PER_CONN else "is above"
    print(
        f"held: {held}/{clients} connections past HELLO and in room {ROOM!r} "
        f"(set-up {setup:.1f} s, {held / setup:.0f}/s)\n"
        f"server: {harness.mib(rss_held)} RSS, {fd_held} fds; "
        f"memory per connection {per_conn:.0f} bytes ({per_conn / 1024:.2f} KiB), "
        f"which {verdict} the 2 KiB target",
        flush=True,
    )
    if held != clients:
        failures.add(f"only {held} of {clients} clients got through HELLO and JOIN")
    times = broadcast(server, pipes, held, broadcasts, timeout, failures)
    for pipe in pipes:
        pipe.send("close")
    for pipe in pipes:
        receive(pipe, 60, failures)
    for p in procs:
        p.join(30)
    figures = harness.finish(server, failures, fd_base, 30)
    if times:
        print(
            f"broadcast to {held}: send -> last delivery "
            + ", ".join(f"{t * 1000:.0f} ms" for t in times)
            + f" (best {min(times) * 1000:.0f} ms)"
        )
    print(
        f"after the clients left: {figures.get('fds_end', '?')} fds (baseline {fd_base}); "
        f"exit status on SIGTERM {figures.get('exit_status')}"
    )
    print(failures.report(), flush=True)
    return 1 if failures else 0


def broadcast(server, pipes, held, count, timeout, failures) -> list[float]:
    """Send ``count`` broadcasts one after the other; returns send -> last delivery times."""
    sender = RawClient(server.address, timeout=timeout)
    sender.hello("announcer")
    sender.join(ROOM)
    times = []
    for k in range(count):
        for pipe in pipes:
            pipe.send(("go", k))
        time.sleep(0.2)  # the workers are in select() before the broadcast starts
        payload = b"x" * 64
        t_send = time.monotonic()
        sender.send(P.Emit(k + 1, P.TARGET_ROOM, ROOM, f"b{k}", payload))
        reply = sender.recv_type(P.Reply, timeout)
        t_ack = time.monotonic()
        count_acked = P.parse_count(reply.body) if reply.status == P.OK else -1
        if count_acked != held:
            failures.add(
                f"broadcast {k}: server says {count_acked} recipients, {held} are in the room"
            )
        got, last, first = 0, 0.0, math.inf
        for pipe in pipes:
            msg = receive(pipe, timeout + 30, failures)
            if msg and msg[0] == "got":
                got += msg[1]
                if msg[1]:
                    first, last = min(first, msg[2]), max(last, msg[3])
                for text in msg[5]:
                    failures.add(f"worker: {text}")
        if got != held:
            failures.add(f"broadcast {k}: {got} of {held} clients received it")
        if got:
            times.append(last - t_send)
            print(
                f"broadcast {k + 1}: {got}/{held} received; send -> first delivery "
                f"{(first - t_send) * 1000:.0f} ms, -> last {(last - t_send) * 1000:.0f} ms "
                f"(server's ack after {(t_ack - t_send) * 1000:.0f} ms)",
                flush=True,
            )
    sender.send(P.Bye())
    sender.close()
    return times


def receive(pipe, timeout: float, failures: Failures):
    if not pipe.poll(timeout):
        failures.add(f"a worker said nothing for {timeout:g} s")
        return None
    try:
        msg = pipe.recv()
    except EOFError:
        failures.add("a worker process died")
        return None
    if msg[0] == "crash":
        failures.add(f"a worker crashed:\n{msg[1]}")
        return None
    return msg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.conns", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--clients", type=int, default=19000, help="clients to hold (default 19000)"
    )
    parser.add_argument("--broadcasts", type=int, default=3, help="broadcasts to time (default 3)")
    parser.add_argument("--per-worker", type=int, default=5000, help="sockets per worker process")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on each step, seconds")
    args = parser.parse_args(argv)
    return run(args.clients, args.broadcasts, args.per_worker, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
