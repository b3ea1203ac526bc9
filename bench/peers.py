"""The asyncio servers muxserver is compared with: the same protocol subset, two ways.

What a user would otherwise write is an asyncio (or uvloop) server. These
peers speak HELLO, JOIN and EMIT-to-a-room of the muxserver protocol, with the
project's own codec, so the load generator drives them exactly as it drives
muxserver and the only differences left are the loop and the write strategy:

* ``write``: ``transport.write(frame)`` for every recipient of every message,
  the way most asyncio code is written. Each call tries a ``send`` at once.
* ``coalesce``: frames are appended to a per-connection list and every
  connection with output gets one ``transport.write`` of the joined list per
  loop turn (a ``call_soon`` callback scheduled by the first append of the
  turn), the same batching muxserver does in its before-sleep hook.

Both parse EMIT the way muxserver's hot path does (``parse_emit_head``, name
caches, forwarding the EMIT tail behind a per-sender prefix), so the
comparison is about I/O, not about parsing.

Run: ``python -m bench.peers --impl uvloop-coalesce --port 0``; it prints
``peer IMPL listening on HOST:PORT`` when ready and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from muxserver import protocol as P
from muxserver.framing import FrameDecoder, FrameError

IMPLS = ("asyncio-write", "asyncio-coalesce", "uvloop-write", "uvloop-coalesce")


class PeerServer:
    """Rooms and the write strategy shared by every connection of one peer."""

    def __init__(self, coalesce: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.coalesce = coalesce
        self.loop = loop
        self.rooms: dict[str, dict] = {}
        self.pending: set[PeerConnection] = set()
        self.scheduled = False
        self.next_id = 0
        self.room_names = P.NameCache("room")
        self.event_names = P.NameCache("event")

    def queue(self, conn: PeerConnection, frame: bytes) -> None:
        """Send one frame to one connection, by this peer's strategy."""
        if self.coalesce:
            conn.out.append(frame)
            self.pending.add(conn)
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self.flush)
        else:
            conn.transport.write(frame)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, set()
        for conn in pending:
            if conn.out and not conn.closed:
                data = conn.out[0] if len(conn.out) == 1 else b"".join(conn.out)
                conn.out.clear()
                conn.transport.write(data)


class PeerConnection(asyncio.Protocol):
    def __init__(self, server: PeerServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.out: list[bytes] = []
        self.nick = ""
        self.prefix = b""
        self.rooms: dict[str, dict] = {}
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        for name, members in self.rooms.items():
            members.pop(self, None)
            if not members:
                self.server.rooms.pop(name, None)
        self.rooms.clear()

    def data_received(self, data: bytes) -> None:
        try:
            for ftype, body in self.decoder.feed(data):
                if ftype == P.EMIT:
                    self.on_emit(body)
                elif ftype == P.HELLO and not self.nick:
                    self.on_hello(body)
                elif ftype == P.JOIN and self.nick:
                    self.on_join(body)
                else:
                    raise P.ProtocolError(P.UNKNOWN_TYPE, f"peer does not handle 0x{ftype:02x}")
        except FrameError as exc:
            self.server.queue(self, P.error_frame(exc.code, exc.message))
            self.transport.close()

    def on_hello(self, body: bytes) -> None:
        hello = P.decode(P.HELLO, body)
        self.server.next_id += 1
        self.nick = hello.nick or f"guest-{self.server.next_id}"
        self.prefix = P.event_prefix(P.TARGET_ROOM, self.nick.encode())
        welcome = P.Welcome(P.PROTOCOL_VERSION, self.server.next_id, self.nick, 1 << 20, 0, "peer")
        self.server.queue(self, P.encode(welcome))

    def on_join(self, body: bytes) -> None:
        join = P.decode(P.JOIN, body)
        members = self.server.rooms.setdefault(join.room, {})
        members[self] = None
        self.rooms[join.room] = members
        self.server.queue(self, P.reply_ok(join.req))

    def on_emit(self, body: bytes) -> None:
        server = self.server
        req, flags, kind, rtarget, revent, _ = P.parse_emit_head(body)
        room = server.room_names.get(rtarget) if kind == P.TARGET_ROOM else None
        members = self.rooms.get(room) if room is not None else None
        if members is None or server.event_names.get(revent) is None:
            server.queue(self, P.reply_error(req, P.NOT_MEMBER, "peer: rooms you joined only"))
            return
        frame = P.event_frame(self.prefix, body[6:])
        queue = server.queue
        echo = flags & P.EMIT_ECHO
        count = 0
        for member in members:
            if member is not self or echo:
                queue(member, frame)
                count += 1
        if req:
            queue(self, P.reply_count(req, count))


async def serve(impl: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = PeerServer(impl.endswith("coalesce"), loop)
    listener = await loop.create_server(
        lambda: PeerConnection(server), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = listener.sockets[0].getsockname()
    print(f"peer {impl} listening on {bound[0]}:{bound[1]}", flush=True)
    await stop.wait()
    listener.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.impl.startswith("uvloop"):
        import uvloop  # only this peer needs it: part of the bench extra

        runner = uvloop.run
    else:
        runner = asyncio.run
    runner(serve(args.impl, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
