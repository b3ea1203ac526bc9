"""What one idle connection costs the server, part by part (issue 15).

``python -m tools.connmem --clients 4000`` builds a real Server (not
listening) on a real epoll loop and adopts one end of a socketpair per
client (two rounds of ``--clients``: one measured by RSS, one by tracemalloc); the other end sends HELLO and JOIN of one room, the loop runs until
every client has joined, and then:

* tracemalloc's growth, per connection, grouped by the source line that
  allocated it (what the Python heap holds for an idle connection);
* sys.getsizeof of each object one connection owns (Session, transport,
  decoder, socket object, selector key, callback, strings, dict slots),
  which names the parts the tracemalloc lines point at;
* VmRSS growth per connection, the figure ``tools/conns.py`` reports end to
  end (it adds allocator overhead and rounding to what tracemalloc sees).

The client ends are kept as bare file descriptors (``detach``), so none of
their Python objects are counted. Kernel socket buffers are not in RSS.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import linecache
import os
import socket
import sys
import tracemalloc

from muxserver import protocol as P
from muxserver.config import Config
from muxserver.loop import EventLoop
from muxserver.server import Server

from . import harness


def rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def connect(server: Server, count: int, fds: list[int], version: int) -> None:
    hello = P.encode(P.Hello(version, "/", "", "")) + P.encode(P.Join(1, "all"))
    for _ in range(count):
        ours, theirs = socket.socketpair()
        server.adopt(ours, ("pair", 0))
        theirs.send(hello)
        fds.append(theirs.detach())
    for _ in range(100):
        server.loop.run_once(0)
        room = next(iter(server.hub.namespaces["/"].rooms.values()), None)
        if room is not None and len(room.members) >= len(server.sessions):
            server.flush()  # WELCOME and REPLY out of the queues, as after any turn
            return
    raise RuntimeError("clients did not all join")


def loop_callback(server: Server):
    """The shared event handler, if the server has one (then it costs no one anything)."""
    return getattr(server, "_on_event_shared", None)


def sizes(server: Server) -> list[tuple[str, int]]:
    """sys.getsizeof of what one connection owns (the last one adopted)."""
    sess = list(server.sessions.values())[-1]
    t = sess.transport
    loop = server.loop
    key = loop.selector.get_key(t.sock) if loop.selector is not None else None
    parts = [
        ("Session object", sys.getsizeof(sess)),
        ("transport object", sys.getsizeof(t)),
        ("transport.out list", sys.getsizeof(t.out)),
        (
            "FrameDecoder object (0: the shared idle one)",
            0 if type(t.decoder).__name__ == "SharedDecoder" else sys.getsizeof(t.decoder),
        ),
        ("socket object", sys.getsizeof(t.sock)),
        ("selector key (SelectorKey)", sys.getsizeof(key) if key is not None else 0),
        (
            "event callback",
            sys.getsizeof(t.callback) if t.callback is not loop_callback(server) else 0,
        ),
        ("nick str", sys.getsizeof(sess.nick)),
        ("peer", sys.getsizeof(getattr(sess, "_peer", None) or sess.peer)),
        ("sess.rooms dict", sys.getsizeof(sess.rooms)),
        (
            "EVENT prefixes",
            sum(
                sys.getsizeof(getattr(sess, name, b"")) - sys.getsizeof(b"")
                for name in (
                    "prefix_room",
                    "_prefix_direct",
                    "_prefix_bcast",
                    "prefix_direct",
                    "prefix_bcast",
                )
                if name in type(sess).__slots__
            ),
        ),  # fmt: skip
    ]
    if isinstance(sess.id, int) and sess.id > 256:
        parts.append(("conn id int", sys.getsizeof(sess.id)))
    return parts


def measure(clients: int, version: int = 1) -> dict:
    """Build the server and the clients; RSS and tracemalloc figures per connection."""
    harness.raise_nofile()
    cfg = Config(
        max_connections=2 * clients + 1000,
        ping_interval=3600,
        ping_timeout=3600,
        hello_timeout=3600,
    )
    server = Server(cfg, EventLoop())
    fds: list[int] = []
    try:
        connect(server, 200, fds, version)  # warm up: caches, the namespace, the room
        gc.collect()
        # RSS first, without tracemalloc (its own traces would be counted).
        rss_before = rss()
        connect(server, clients, fds, version)
        gc.collect()
        rss_after = rss()
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        connect(server, clients, fds, version)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        # Not the server's: this tool's own objects, and the client ends' fd ints.
        lines, first = inspect.getsourcelines(socket.socket.detach)
        detach = first + next(i for i, ln in enumerate(lines) if ln.strip().startswith("return"))
        mine = [
            tracemalloc.Filter(False, __file__),
            tracemalloc.Filter(False, socket.__file__, detach),
        ]
        stats = after.filter_traces(mine).compare_to(before.filter_traces(mine), "lineno")
        return {
            "traced": sum(s.size_diff for s in stats) / clients,
            "rss": (rss_after - rss_before) / clients,
            "lines": stats,
            "sizes": sizes(server),
        }
    finally:
        server.close()
        server.loop.close()
        for fd in fds:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.connmem", description=__doc__)
    parser.add_argument("--clients", type=int, default=4000)
    parser.add_argument("--version", type=int, default=1, help="protocol version (clients: 1)")
    parser.add_argument("--top", type=int, default=14, help="source lines to show")
    args = parser.parse_args(argv)
    n = args.clients
    m = measure(n, args.version)
    print(f"{n} idle connections (HELLO v{args.version} + JOIN of one room), one server process")
    print(
        f"tracemalloc: {m['traced']:.0f} B per connection; VmRSS: {m['rss']:.0f} B per connection"
    )
    print("\nper connection, by allocating line:")
    for s in m["lines"][: args.top]:
        frame = s.traceback[0]
        where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
        code = linecache.getline(frame.filename, frame.lineno).strip()[:60]
        if s.size_diff / n >= 1:
            print(f"  {s.size_diff / n:6.1f} B {s.count_diff / n:5.2f} blocks  {where:18} {code}")
    print("\nsys.getsizeof of one connection's objects:")
    parts = m["sizes"]
    for name, size in parts:
        print(f"  {size:5d} B  {name}")
    print(f"  {sum(size for _, size in parts):5d} B  sum (dict and set slots come on top)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
