"""The partial-frame attack of issue 15, at full size, against ``--max-input-memory``.

``python -m tools.partial --attackers 3000`` starts a server at its default
bounds (1 MiB frames, 256 MiB of input memory) and opens that many
connections that each send HELLO, JOIN ``r`` and then the first half of a
1 MiB EMIT, never the rest: 1.5 GiB offered, which pinned 1.45 GB of server
memory before the bound existed. Meanwhile healthy clients in the same room
``r`` (one sender, receivers over raw TCP and WebSocket) trade numbered
messages, each of which must reach every receiver in order.

It prints the server's RSS before, at its peak and after, the input memory
the server reports holding (``muxserver_input_held_bytes`` on /metrics,
sampled through the run), and how many attackers were cut with ERROR LIMIT.
The exit status is 0 only if the held input stayed within the bound, RSS
grew by less than the bound plus ``--slack``, every healthy message arrived
in order, and the usual end checks (tools.harness.finish) held.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
import urllib.request

from muxserver import protocol as P
from muxserver.framing import FrameDecoder, encode_frame

from . import harness
from .harness import Failures, RawClient, Server, WsRawClient
from .soak import free_port

FRAME = 1 << 20


def held_bytes(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("muxserver_input_held_bytes "):
                return int(float(line.split()[1]))
    raise RuntimeError("no muxserver_input_held_bytes on /metrics")


class Watch(threading.Thread):
    """Samples RSS and the server's own count of held input every 0.2 s."""

    def __init__(self, server: Server, port: int) -> None:
        super().__init__(daemon=True)
        self.server, self.port = server, port
        self.rss_peak = self.held_peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.rss_peak = max(self.rss_peak, self.server.rss())
            self.held_peak = max(self.held_peak, held_bytes(self.port))


def joined(client, nick: str):
    client.hello(nick)
    if client.request(P.Join(client.next_req(), "r")).status != P.OK:
        raise RuntimeError(f"{nick}: JOIN r refused")
    return client


def run(attackers: int, bound: int, slack: int) -> int:
    harness.raise_nofile()
    failures = Failures()
    port = free_port()
    server = Server("--max-input-memory", str(bound), "--metrics-port", str(port),
                    "--log-level", "warning")  # fmt: skip
    fd_base, rss_base = server.fds(), server.rss()
    print(
        f"partial-frame attack: {attackers} connections x half of a {FRAME >> 20} MiB frame "
        f"({harness.mib(attackers * FRAME // 2)} offered), --max-input-memory "
        f"{harness.mib(bound)}; server pid {server.pid}, RSS {harness.mib(rss_base)}",
        flush=True,
    )
    sender = joined(RawClient(server.address), "sender")
    receivers = [joined(RawClient(server.address), "rx-tcp"), joined(WsRawClient(server.address), "rx-ws")]
    watch = Watch(server, port)
    watch.start()
    half = encode_frame(P.EMIT, b"\0" * (FRAME - 1))[: FRAME // 2]
    hello = P.encode(P.Hello(1, "/", "", "")) + P.encode(P.Join(1, "r"))
    socks, sent = [], []
    started = time.monotonic()
    try:
        for i in range(attackers):
            s = socket.create_connection(server.address, timeout=60)
            socks.append(s)
            try:
                s.sendall(hello + half)
            except OSError:
                pass  # cut while its half was arriving: counted below
            if i % 50 == 49:
                sent.append(f"m{len(sent)}")
                sender.send(P.Emit(0, P.TARGET_ROOM, "r", "m", sent[-1].encode()))
        elapsed = time.monotonic() - started
        time.sleep(1.0)
        for rx in receivers:
            got = []
            try:
                while len(got) < len(sent):
                    got.append(rx.recv_type(P.Event, 30).payload.decode())
            except (TimeoutError, AssertionError, EOFError) as exc:
                failures.add(f"{rx.welcome.nick}: {len(got)}/{len(sent)} messages, then {exc}")
            if got != sent[: len(got)]:
                failures.add(f"{rx.welcome.nick}: messages out of order: {got[:5]}...")
        cut = 0
        for s in socks:
            # A held attacker has the room's EVENTs (it joined r) or nothing; a cut one
            # has them, then ERROR LIMIT.
            s.settimeout(0.05)
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except (TimeoutError, OSError):
                pass
            frames = [P.decode(t, b) for t, b in FrameDecoder(FRAME).feed(data)]
            cut += any(isinstance(f, P.Error) and f.code == P.LIMIT for f in frames)
        held = attackers - cut
    finally:
        for s in socks:
            s.close()
    watch.stop.set()
    watch.join(5)
    time.sleep(0.5)
    rss_after = server.rss()
    for c in (sender, *receivers):
        c.close()
    figures = harness.finish(server, failures, fd_base, 30)
    growth = watch.rss_peak - rss_base
    if watch.held_peak > bound:
        failures.add(f"held input peaked at {watch.held_peak} bytes, over the {bound} bound")
    if growth > bound + slack:
        failures.add(f"RSS grew by {harness.mib(growth)}, over the bound + {harness.mib(slack)}")
    print(
        f"sent in {elapsed:.1f} s; attackers cut with ERROR LIMIT {cut}, still held {held} "
        f"({harness.mib(held * FRAME // 2)} of half frames)\n"
        f"server input held (its own count, /metrics): peak {harness.mib(watch.held_peak)} "
        f"(bound {harness.mib(bound)})\n"
        f"server RSS: {harness.mib(rss_base)} before, peak {harness.mib(watch.rss_peak)} "
        f"(+{harness.mib(growth)}), {harness.mib(rss_after)} after the attackers left\n"
        f"healthy clients: {len(sent)} messages sent, each checked at {len(receivers)} receivers "
        f"(raw TCP, WebSocket); fds {fd_base} before, {figures.get('fds_end', '?')} after; "
        f"exit status {figures.get('exit_status')}"
    )
    print(failures.report(), flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.partial", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--attackers", type=int, default=3000, help="connections (default 3000)")
    parser.add_argument(
        "--bound", type=int, default=256 << 20, help="--max-input-memory (default 256 MiB)"
    )
    parser.add_argument(
        "--slack", type=int, default=64 << 20,
        help="RSS growth allowed past the bound (socket objects, buffers; default 64 MiB)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    return run(args.attackers, args.bound, args.slack)


if __name__ == "__main__":
    sys.exit(main())
