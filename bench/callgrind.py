"""Instructions per EMIT on the hot path, counted by callgrind: an A/B that noise cannot move.

    python -m bench.callgrind [--tree DIR] MEMBERS ROUNDS [key=value ...]
    python -m bench.callgrind --server [--tree DIR] RECEIVERS MESSAGES
    python -m bench.callgrind --rooms [--tree DIR] ROOMS MESSAGES
    (--server and --rooms take --functions N: the N costliest C functions too)


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

``--server`` measures the whole server process instead, loop and kernel
calls included: ``python -m muxserver`` of ``tree`` runs under callgrind,
RECEIVERS connections join room "r", and one more sends MESSAGES EMITs of
64 bytes as fast as the socket takes them (pipelined, as bench.loadgen
does); when every receiver has every EVENT the server gets SIGTERM. A second
run with a tenth of the messages is subtracted, leaving instructions per
delivered message. The server under callgrind is far slower than the sender,
so its reads are always full and the count repeats to within a percent.

``--rooms`` is bench.rooms's shape, one message per loop turn: ROOMS rooms
of 10 members each; MESSAGES EMITs go out one at a time, round the rooms,
each sent only when every member has the one before. What it counts is the
cost of a turn that carries a single message: the poll, the read, the
session, the fan-out and ten sends, per delivery.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

BATCH = 64


def workload(members: int, rounds: int, overrides: dict[str, int]) -> None:
    """The measured run (in the child under valgrind).

    Written out here rather than imported from bench.ab_fanout: it must run
    against older checkouts (``--tree``), so it uses only what the server has
    had since before the layering (Server.adopt, _on_readable, flush).
    """
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


@contextlib.contextmanager
def counted_server(tree: Path, outfile: str = "/dev/null"):
    """``python -m muxserver`` of ``tree`` under callgrind.

    Yields ``(port, socks, result)``: the test appends its connections to
    ``socks`` (closed at the end) and reads ``result[0]`` afterwards, the
    instructions callgrind collected once the server had SIGTERM.
    """
    import signal

    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
    cmd = [
        "valgrind", "--tool=callgrind", "--compress-strings=no", "--compress-pos=no",
        f"--callgrind-out-file={outfile}",
        sys.executable, "-m", "muxserver", "--host", "127.0.0.1", "--port", "0",
        "--ping-interval", "3600", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    socks: list[socket.socket] = []
    result: list[int] = []
    try:
        line = proc.stdout.readline()
        found = re.search(r"listening on \S*?:(\d+)", line)
        if not found:
            raise SystemExit(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
        yield int(found.group(1)), socks, result
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
        found = re.search(r"Collected : (\d+)", err)
        if not found:
            raise SystemExit(f"no callgrind total:\n{err[-2000:]}")
        result.append(int(found.group(1)))
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def member(P, port: int, nick: str, room: str) -> socket.socket:
    """A connection that said HELLO and JOINed ``room``, its REPLY read."""
    s = socket.create_connection(("127.0.0.1", port), timeout=600)
    s.sendall(P.encode(P.Hello(1, "/", nick, "")) + P.encode(P.Join(1, room)))
    got = b""
    while b"\x82\x00\x00\x00\x01" not in got:  # the JOIN's REPLY (req 1)
        got += s.recv(65536)
    return s


def rooms_count(
    tree: Path, rooms: int, messages: int, outfile: str = "/dev/null", size: int = 10
) -> int:
    """Instructions of a server that carries ``messages`` single-message turns."""
    sys.path.insert(0, str(tree))
    from muxserver import protocol as P

    with counted_server(tree, outfile) as (port, socks, result):
        groups = []
        for r in range(rooms):
            group = [member(P, port, f"m{r:03d}x{i}", f"r{r}") for i in range(size)]
            socks += group
            groups.append(group)
        for i in range(messages):
            group = groups[i % rooms]
            group[i % size].sendall(
                P.encode(P.Emit(0, P.TARGET_ROOM, f"r{i % rooms}", "ev", b"x" * 64, P.EMIT_ECHO))
            )
            for s in group:  # every member, the sender too (echo), gets exactly one EVENT
                want = 4 + P.LENGTH.unpack(s.recv(4, socket.MSG_WAITALL))[0]
                s.recv(want - 4, socket.MSG_WAITALL)
    return result[0]


def serve_and_count(tree: Path, receivers: int, messages: int, outfile: str = "/dev/null") -> int:
    """Instructions of a whole server process that delivers ``messages`` to ``receivers``."""
    import selectors

    sys.path.insert(0, str(tree))
    from muxserver import protocol as P

    with counted_server(tree, outfile) as (port, socks, result):
        socks += [member(P, port, f"m{i:04d}", "r") for i in range(receivers + 1)]
        sender, members = socks[-1], socks[:-1]
        emit = P.encode(P.Emit(0, P.TARGET_ROOM, "r", "ev", b"x" * 64))
        event = P.encode(P.Event(P.TARGET_ROOM, f"m{receivers:04d}", "r", "ev", b"x" * 64))
        expected = len(event) * messages  # bytes each receiver gets
        sel = selectors.DefaultSelector()
        left = {}
        for m in members:
            m.setblocking(False)
            sel.register(m, selectors.EVENT_READ)
            left[m] = expected
        sender.setblocking(False)
        sel.register(sender, selectors.EVENT_WRITE)
        out = memoryview(emit * messages)
        while left:
            for key, _ in sel.select(timeout=600):
                sock = key.fileobj
                if sock is sender:
                    out = out[sender.send(out[: 1 << 16]) :]
                    if not out:
                        sel.unregister(sender)
                    continue
                n = len(sock.recv(1 << 20))
                left[sock] -= n
                if left[sock] <= 0:
                    sel.unregister(sock)
                    del left[sock]
    return result[0]


def functions(outfile: str) -> dict[str, int]:
    """Instructions per C function (self cost) in a callgrind output file."""
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", outfile], capture_output=True, text=True
    ).stdout
    found: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+\S*?:(\S+)", line)
        if m:
            found[m.group(2)] = found.get(m.group(2), 0) + int(m.group(1).replace(",", ""))
    return found


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
    ap.add_argument("--server", action="store_true", help="measure a whole server process")
    ap.add_argument("--rooms", action="store_true", help="single-message turns in rooms of 10")
    ap.add_argument(
        "--functions",
        type=int,
        default=0,
        metavar="N",
        help="--rooms, --server: also the N costliest C functions per message (or delivery)",
    )
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
    if args.rooms or args.server:
        # Each workload runs twice, the second with a tenth of the messages;
        # the difference is what the extra messages cost.
        if args.rooms:
            rooms, n = args.members, args.rounds
            run, unit, per_unit = (lambda m, out: rooms_count(tree, rooms, m, out)), "delivery", 10
            title = f"{rooms} rooms of 10, one message per turn"
        else:
            r, n = args.members, args.rounds
            run, unit, per_unit = (
                (lambda m, out: serve_and_count(tree, r, m, out)),
                "message sent",
                1,
            )
            title = f"server, 1 -> {r}"
        with tempfile.TemporaryDirectory() as tmp:
            outs = [f"{tmp}/long.out", f"{tmp}/short.out"] if args.functions else ["/dev/null"] * 2
            total = run(n, outs[0])
            base = run(n // 10, outs[1])
            units = (n - n // 10) * per_unit
            print(f"{tree.name}: {title}: {(total - base) / units:,.0f} instructions per {unit}")
            if args.functions:
                long, short = functions(outs[0]), functions(outs[1])
                diff = {k: (long.get(k, 0) - short.get(k, 0)) / units for k in long}
                for name, cost in sorted(diff.items(), key=lambda kv: -kv[1])[: args.functions]:
                    print(f"{cost:9,.0f}  {name}")
        return 0
    base = count(tree, args.members, 0, args.overrides)
    total = count(tree, args.members, args.rounds, args.overrides)
    per = (total - base) / (args.rounds * BATCH)
    extra = " ".join(args.overrides)
    print(f"{tree.name}: {args.members} members {extra}: {per:,.0f} instructions per EMIT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
