"""Instructions per EMIT on the hot path, counted by callgrind: an A/B that noise cannot move.

    python -m bench.callgrind [--tree DIR] MEMBERS ROUNDS [key=value ...]

Timings on this shared 2-core machine drift by 20 % between runs, which
hides the few percent a change costs. ``valgrind --tool=callgrind`` counts
instructions instead: the same code and inputs give the same count whatever
else the machine does. The workload runs in one process over socketpairs
(the method of bench.ab_fanout): MEMBERS connections say HELLO and JOIN "r",
then each of ROUNDS rounds sends 64 EMITs of 64 bytes from the first member,
runs the server's read path and flush, and drains the peers. Run once with
ROUNDS and once with 0; the difference over ROUNDS x 64 is what one EMIT
costs. ``--tree`` is a checkout of muxserver to measure (default: this one),
so two commits compare in one command each; ``key=value`` are Config fields
(``history_size=0``), plus ``version=2``. Needs valgrind (Debian's package);
a round under callgrind is about 50x slower than without it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

BATCH = 64


def workload(members: int, rounds: int, overrides: dict[str, int]) -> None:
    """The measured run (in the child under valgrind)."""
    from muxserver import protocol as P
    from muxserver.loop import EventLoop
    from muxserver.server import Config, Server

    version = overrides.pop("version", 1)
    server = Server(Config(**overrides), EventLoop())
    conns, peers = [], []
    for i in range(members):
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        conn = server.adopt(ours)
        hello = P.encode(P.Hello(version, "/", f"m{i:04d}", ""))
        theirs.sendall(hello + P.encode(P.Join(1, "r")))
        server._on_readable(conn)
        conns.append(conn)
        peers.append(theirs)

    def drain() -> None:
        for p in peers:
            try:
                while p.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass

    server.flush()
    drain()
    data = P.encode(P.Emit(0, P.TARGET_ROOM, "r", "ev", b"x" * 64)) * BATCH
    for _ in range(rounds):
        peers[0].sendall(data)
        server._on_readable(conns[0])
        server.flush()
        drain()


def count(tree: Path, members: int, rounds: int, overrides: list[str]) -> int:
    """Instructions callgrind collected for one run of the workload in ``tree``."""
    # The child runs this file as a script, so that ``muxserver`` comes from
    # ``tree`` (an older checkout may have no bench.callgrind of its own).
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(tree))
    cmd = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--child", str(members), str(rounds), *overrides,
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=1800)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode or not found:
        raise SystemExit(f"callgrind run failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.callgrind", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("members", type=int)
    ap.add_argument("rounds", type=int)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            ap.error(f"expected key=integer, got {item!r}")
        overrides[key] = int(value)
    if args.child:
        workload(args.members, args.rounds, overrides)
        return 0
    if shutil.which("valgrind") is None:
        print("bench.callgrind needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 1
    tree = args.tree.resolve()
    base = count(tree, args.members, 0, args.overrides)
    total = count(tree, args.members, args.rounds, args.overrides)
    per = (total - base) / (args.rounds * BATCH)
    extra = " ".join(args.overrides)
    print(f"{tree.name}: {args.members} members {extra}: {per:,.0f} instructions per EMIT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
