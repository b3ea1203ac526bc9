"""In-process A/B of the EMIT run: set-ups side by side, rounds alternating (shared noise).

    python -m bench.ab_fanout MEMBERS BATCH ROUNDS SETUP [SETUP ...]

A SETUP is ``v1``, ``v2`` or ``seq`` (version 2, every member joins
SEQUENCED), optionally with Config overrides: ``v1:history_size=0``. Each
round sends BATCH EMITs of 64 bytes from one member into a room of MEMBERS
over socketpairs and times the server's read path and flush; the best round
of each set-up is printed (bench.callgrind counts instructions the same way).
Rounds alternate between set-ups so that a busy machine slows all alike.
"""

from __future__ import annotations

import resource
import socket
import sys
import time

from muxserver import protocol as P
from muxserver.loop import EventLoop
from muxserver.server import Config, Server


def build(spec: str, members: int):
    mode, _, rest = spec.partition(":")
    extra = {k: int(v) for k, v in (a.split("=") for a in rest.split(",") if a)}
    server = Server(Config(max_output=1 << 30, **extra), EventLoop())
    conns, peers = [], []
    for i in range(members):
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        theirs.setblocking(False)
        conn = server.adopt(ours)
        join = P.Join(1, "r", P.JOIN_SEQUENCED, 0, 0, 0) if mode == "seq" else P.Join(1, "r")
        hello = P.Hello(1 if mode == "v1" else 2, "/", f"m{i:04d}", "")
        theirs.sendall(P.encode(hello) + P.encode(join))
        server._on_readable(conn)
        conns.append(conn)
        peers.append(theirs)
    server.flush()
    return server, conns, peers


def drain(peers) -> None:
    for p in peers:
        try:
            while p.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def main(argv: list[str]) -> int:
    members, batch, rounds = (int(a) for a in argv[:3])
    specs = argv[3:]
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    setups = [build(s, members) for s in specs]
    for _, _, peers in setups:
        drain(peers)
    data = P.encode(P.Emit(0, P.TARGET_ROOM, "r", "ev", b"x" * 64)) * batch
    best = [float("inf")] * len(setups)
    for _ in range(rounds):
        for k, (server, conns, peers) in enumerate(setups):
            peers[0].sendall(data)
            t0 = time.perf_counter()
            server._on_readable(conns[0])
            server.flush()
            best[k] = min(best[k], time.perf_counter() - t0)
            drain(peers)
    for spec, b in zip(specs, best, strict=True):
        rate = batch * (members - 1) / b / 1e6
        print(
            f"{spec:24s} N={members} batch={batch}: best {b * 1e6:.0f} us/round, {rate:.1f} M deliveries/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
