"""Server time to replay 1,000 missed messages to a resuming client (protocol sections 9, 10).

One muxserver process (pinned like every bench server, ``--history-size``
large enough to hold the messages). Each round:

1. a member joins room ``bench`` SEQUENCED and its connection is dropped
   without BYE (the session parks);
2. a publisher sends ``missed`` messages of 64 bytes, the last one acked, so
   they are all in the history;
3. the member resumes with its token and re-sends its SEQUENCED JOIN with
   its position; the clock runs from that send until the last replayed
   EVENT_SEQ has been read, and the server's CPU time over the same span
   is taken from /proc.

That wall time includes the loopback and this reader; /proc CPU times tick
at 10 ms, too coarse for a few milliseconds. So the server's own time is
measured apart, in this process (:func:`server_time`): a real Server over
socketpairs, the same steps, and ``perf_counter`` around exactly the server's
calls (handling the JOIN, planning, every replay page, the sends), not the
reading. Best and median of the rounds are kept (interference only ever
slows a round down).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time

from muxserver import protocol as P
from muxserver.framing import FrameDecoder
from muxserver.loop import EventLoop
from muxserver.server import Config, Server

from . import systems

MISSED = 1000
PAYLOAD = bytes(64)


class _Conn:
    """A blocking client on the project's codec, enough for this measurement."""

    def __init__(self, address) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(1 << 24)
        self.frames: list = []

    def send(self, *msgs) -> None:
        self.sock.sendall(b"".join(P.encode(m) for m in msgs))

    def recv(self):
        while not self.frames:
            data = self.sock.recv(1 << 20)
            if not data:
                raise RuntimeError("server closed the connection")
            self.frames.extend(P.decode(t, b) for t, b in self.decoder.feed(data))
        return self.frames.pop(0)

    def expect(self, cls):
        frame = self.recv()
        if not isinstance(frame, cls):
            raise RuntimeError(f"expected {cls.__name__}, got {frame!r}")
        return frame

    def close(self) -> None:
        self.sock.close()


def _round(address, server: systems.Running, missed: int, n: int) -> dict:
    pub = _Conn(address)
    pub.send(P.Hello(2, "/", f"pub{n}", ""), P.Join(1, "bench"))
    pub.expect(P.Welcome)
    pub.expect(P.Reply)
    member = _Conn(address)
    member.send(P.Hello(2, "/", f"member{n}", ""), P.Join(1, "bench", P.JOIN_SEQUENCED, 0, 0, 0))
    token = member.expect(P.Welcome).resume_token
    recovery, epoch, _, last = P.parse_join_reply(member.expect(P.Reply).body)
    member.close()  # no BYE: parked
    emits = [P.Emit(0, P.TARGET_ROOM, "bench", "m", PAYLOAD) for _ in range(missed - 1)]
    pub.send(*emits, P.Emit(2, P.TARGET_ROOM, "bench", "m", PAYLOAD))
    pub.expect(P.Reply)
    back = _Conn(address)
    back.send(P.Hello(2, "/", "", "", token))
    if back.expect(P.Welcome).resumed != 1:
        raise RuntimeError("the resume was refused")
    t0 = time.perf_counter()
    back.send(P.Join(2, "bench", P.JOIN_SEQUENCED, epoch, last, P.REPLAY_ALL))
    reply = P.parse_join_reply(back.expect(P.Reply).body)
    got = 0
    while got < missed:
        frame = back.recv()
        if isinstance(frame, P.EventSeq):
            got += 1
    wall = time.perf_counter() - t0
    if reply[0] != P.COMPLETE or reply[3] - reply[2] + 1 != missed:
        raise RuntimeError(f"unexpected replay plan {reply!r}")
    for conn in (back, pub):
        conn.send(P.Bye())
        conn.close()
    return {"wall_ms": wall * 1000}


def _in_process_round(missed: int) -> float:
    """Seconds the server itself spends replaying ``missed`` messages (see the module doc)."""
    server = Server(Config(history_size=missed * 2, max_output=8 << 20), EventLoop())
    peers = []

    def connect():
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        theirs.setblocking(False)
        peers.append(theirs)
        return server.adopt(ours), theirs

    def before_sleep() -> None:
        for hook in server.loop._before_sleep:  # the flush, then replay pages
            hook()

    def talk(conn, peer, *msgs) -> list:
        peer.sendall(b"".join(P.encode(m) for m in msgs))
        server._on_readable(conn)
        before_sleep()
        return read(peer)

    decoder = FrameDecoder(1 << 24)

    def read(peer) -> list:
        data = b""
        try:
            while chunk := peer.recv(1 << 20):
                data += chunk
        except BlockingIOError:
            pass
        return [P.decode(t, b) for t, b in decoder.feed(data)]

    try:
        pub, pub_peer = connect()
        talk(pub, pub_peer, P.Hello(2, "/", "pub", ""), P.Join(1, "bench"))
        member, member_peer = connect()
        welcome, reply = talk(
            member, member_peer, P.Hello(2, "/", "m", ""), P.Join(1, "bench", P.JOIN_SEQUENCED)
        )
        _, epoch, _, last = P.parse_join_reply(reply.body)
        member_peer.close()
        server._on_readable(member)  # end of stream: parked
        talk(pub, pub_peer, *(P.Emit(0, 0, "bench", "m", PAYLOAD) for _ in range(missed)))
        back, back_peer = connect()
        decoder = FrameDecoder(1 << 24)
        (resumed,) = talk(back, back_peer, P.Hello(2, "/", "", "", welcome.resume_token))
        if resumed.resumed != 1:
            raise RuntimeError("the resume was refused")
        back = server.sessions[resumed.conn_id]
        back_peer.sendall(P.encode(P.Join(2, "bench", P.JOIN_SEQUENCED, epoch, last, 0xFFFF)))
        spent, got = 0.0, 0
        t0 = time.perf_counter()
        server._on_readable(back)
        before_sleep()
        spent += time.perf_counter() - t0
        for _ in range(missed + 100):  # each pass moves a page, or the replay is stuck
            got += sum(isinstance(f, P.EventSeq) for f in read(back_peer))
            if got >= missed:
                break
            t0 = time.perf_counter()
            server._on_writable(back)
            before_sleep()
            spent += time.perf_counter() - t0
        else:
            raise RuntimeError(f"the replay stalled after {got} of {missed} messages")
        return spent
    finally:
        server.close()
        server.loop.close()
        for peer in peers:
            peer.close()


def server_time(rounds: int = 15, missed: int = MISSED) -> dict:
    values = [_in_process_round(missed) * 1000 for _ in range(rounds)]
    return {"best": min(values), "median": statistics.median(values)}


def measure(cpu=None, rounds: int = 15, missed: int = MISSED) -> dict:
    """Replay ``missed`` messages ``rounds`` times; best and median of each figure."""
    server = systems.start("muxserver", cpu=cpu, extra=("--history-size", str(missed * 2)))
    try:
        results = [_round(server.address, server, missed, n) for n in range(rounds)]
    finally:
        server.stop()
    out: dict = {"messages": missed, "rounds": rounds, "payload_bytes": len(PAYLOAD)}
    values = [r["wall_ms"] for r in results]
    out["wall_ms"] = {"best": min(values), "median": statistics.median(values)}
    out["server_ms"] = server_time(rounds, missed)
    return out


def line(res: dict) -> str:
    return (
        f"replay of {res['messages']:,} missed messages to a resuming client: "
        f"{res['wall_ms']['median']:.1f} ms wall (best {res['wall_ms']['best']:.1f}), "
        f"server time {res['server_ms']['median']:.2f} ms (best {res['server_ms']['best']:.2f}); "
        f"{res['rounds']} rounds"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replay", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)
    cpu = None if args.no_pin else systems.cpus()[0]
    print(line(measure(cpu, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
