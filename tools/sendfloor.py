"""The floor under a big broadcast: N bare ``send`` calls over loopback, no server at all.

``python -m tools.sendfloor --sockets 19000`` answers one question of issue 15
("one broadcast to 19,000 connections in <= 100 ms"): how long does the
kernel alone take to send one small message to that many loopback TCP
sockets on this machine, with readers as tools.conns has them (worker
processes, each on one epoll selector)? No muxserver runs: one process
accepts N connections from the workers and sends 80 bytes to each in a plain
loop (``--threads 2`` splits the loop over threads, since ``send`` releases
the GIL). The time from the first send to the last delivery any worker saw
is the lower bound for any single server process doing one send per member;
compare it with the broadcast line of ``python -m tools.conns``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import selectors
import socket
import sys
import threading
import time

PAYLOAD = b"x" * 80  # about one EVENT frame of tools.conns


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _reader(port: int, count: int, pipe) -> None:
    """One worker: ``count`` connections; reports the time of its last delivery."""
    _raise_nofile()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    sel = selectors.EpollSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    pipe.send("ready")
    left, last = count, 0.0
    deadline = time.monotonic() + 60
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            if key.fileobj.recv(4096):
                left -= 1
                last = time.monotonic()
                sel.unregister(key.fileobj)
    pipe.send(last if not left else None)
    for s in socks:
        s.close()


def run(sockets: int, workers: int, threads: int) -> int:
    _raise_nofile()
    per = sockets // workers
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = listener.getsockname()[1]
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    for _ in range(workers):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_reader, args=(port, per, theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    listener.settimeout(60)
    conns = []
    while len(conns) < per * workers:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        conns.append(conn)
    for p in pipes:
        p.recv()
    time.sleep(0.5)  # every worker is in select() before the first send

    def send_all(part: list) -> None:
        for c in part:
            c.send(PAYLOAD)

    parts = [conns[i::threads] for i in range(threads)]
    t0 = time.monotonic()
    if threads == 1:
        send_all(conns)
    else:
        pool = [threading.Thread(target=send_all, args=(part,)) for part in parts]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    t1 = time.monotonic()
    lasts = [p.recv() for p in pipes]
    for proc in procs:
        proc.join(10)
    for c in conns:
        c.close()
    if any(last is None for last in lasts):
        print("sendfloor: some sockets got nothing within 60 s", file=sys.stderr)
        return 1
    n = len(conns)
    print(
        f"sendfloor: {n} sockets, {threads} sending thread(s), {workers} reader processes: "
        f"send loop {1000 * (t1 - t0):.0f} ms ({(t1 - t0) / n * 1e6:.1f} us per send), "
        f"last delivery after {1000 * (max(lasts) - t0):.0f} ms"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.sendfloor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sockets", type=int, default=19000)
    parser.add_argument("--workers", type=int, default=4, help="reader processes (as tools.conns)")
    parser.add_argument("--threads", type=int, default=1, help="sending threads")
    args = parser.parse_args(argv)
    if args.sockets < args.workers or args.workers < 1 or args.threads < 1:
        parser.error("need --sockets >= --workers >= 1 and --threads >= 1")
    return run(args.sockets, args.workers, args.threads)


if __name__ == "__main__":
    sys.exit(main())
