"""Well-behaved clients for the harnesses: they check that nothing is lost or reordered.

A ``Chatter`` is the client the hostile ones are mixed with. It stays
connected for the whole run, emits numbered messages into its rooms at a
steady rate and checks, for every other chatter and every shared room, that
the numbers arrive exactly in sequence (protocol section 4: frames from one
sender reach each receiver in the order they were sent, and nothing is lost
silently). Every tenth EMIT asks for an ack, and acks must come back in
request order with status OK and at least the other chatters counted.

At the end each chatter sends a ``fin`` carrying how many messages it sent
to that room, then keeps reading until it has seen every peer's fin with the
matching count: that is the "lost nothing" check, and it also catches a
server that has stopped delivering (the run fails instead of waiting).

Each chatter is a thread with a blocking ``RawClient``: the server is
another process, so the GIL only limits how hard the harness can push, and a
thread per client keeps the checking code straight-line.
"""

from __future__ import annotations

import random
import struct
import threading
import time
from collections import deque

from muxserver import protocol as P

from .harness import Failures, RawClient, Tally

CHAT = struct.Struct(">2sHI")  # magic, chatter index, sequence number (or fin total)
MAGIC = b"\xc4\xa7"


class Unexpected(Exception):
    """The server sent something a well-behaved client must never get."""


def recv_skipping(c: RawClient, timeout: float, tally: Tally | None = None):
    """Next frame that is not an EVENT, PRESENCE or server PING (those are answered)."""
    while True:
        frame = c.recv(timeout)
        if isinstance(frame, P.ServerPing):
            c.send(P.Pong(frame.nonce))
        elif isinstance(frame, P.Event | P.Presence):
            if tally is not None:
                tally.add("bystander frames")
        else:
            return frame


def drain_to_eof(c: RawClient, timeout: float) -> None:
    """After BYE: read until EOF. EVENT/PRESENCE/PING may still come; nothing else."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("server did not close after BYE")
        try:
            frame = c.recv(left)
        except EOFError:
            return
        if not isinstance(frame, P.Event | P.Presence | P.ServerPing):
            raise Unexpected(f"after BYE got {frame!r}")


def request(c: RawClient, msg, timeout: float = 10.0) -> P.Reply:
    """Send a request, return its REPLY, skipping bystander frames."""
    c.send(msg)
    reply = recv_skipping(c, timeout)
    if not isinstance(reply, P.Reply) or reply.req != msg.req:
        raise Unexpected(f"expected REPLY to {msg!r}, got {reply!r}")
    return reply


class ChatGroup:
    """Chatters that share rooms and check each other's sequences."""

    def __init__(
        self,
        address,
        rooms_of: list[list[str]],
        failures: Failures,
        tally: Tally,
        *,
        rate: float = 50.0,
        payload: tuple[int, int] = (0, 200),
        seed: int | str = 0,
        presence: bool = True,
        prefix: str = "wb",
        connect=None,
    ) -> None:
        self.address = address
        # connect(index) -> a new client (RawClient, over TLS, or WsRawClient); default raw TCP.
        self.connect = connect or (lambda index: RawClient(address))
        self.prefix = prefix
        self.failures = failures
        self.tally = tally
        self.stop = threading.Event()
        self.ready = threading.Barrier(len(rooms_of) + 1)
        self.rooms_of = rooms_of
        self.chatters = [
            Chatter(self, i, rooms, rate, payload, random.Random(f"{seed}:{prefix}:{i}"), presence)
            for i, rooms in enumerate(rooms_of)
        ]

    def nick(self, index: int) -> str:
        return f"{self.prefix}-{index}"

    @property
    def nicks(self) -> frozenset:
        return frozenset(self.nick(i) for i in range(len(self.chatters)))

    @property
    def received(self) -> int:
        return sum(c.received for c in self.chatters)

    def members(self, room: str) -> int:
        return sum(room in rooms for rooms in self.rooms_of)

    def peers(self, index: int, room: str) -> list[int]:
        return [i for i, rooms in enumerate(self.rooms_of) if i != index and room in rooms]

    def start(self, timeout: float = 30.0) -> None:
        """Connect and join everyone; returns when all are in their rooms."""
        for c in self.chatters:
            c.start()
        try:
            self.ready.wait(timeout)
        except threading.BrokenBarrierError:
            self.failures.add(f"{self.prefix} chatters could not all join within {timeout:g} s")

    def finish(self, timeout: float = 60.0) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for c in self.chatters:
            c.join(max(0.1, deadline - time.monotonic()))
            if c.is_alive():
                self.failures.add(f"{c.nick} still running {timeout:g} s after stop (hang?)")


class Chatter(threading.Thread):
    def __init__(self, group, index, rooms, rate, payload, rng, presence) -> None:
        super().__init__(name=group.nick(index), daemon=True)
        self.group = group
        self.index = index
        self.nick = group.nick(index)
        self.rooms = rooms
        self.period = 1.0 / rate
        self.payload = payload
        self.rng = rng
        self.presence = presence and index % 2 == 0  # half of them watch PRESENCE
        self.sent = dict.fromkeys(rooms, 0)
        self.expected: dict[tuple[int, str], int] = {}
        self.fins: dict[tuple[int, str], int] = {}
        self.acks: deque = deque()  # (req, room) in request order
        self.req = 0
        self.received = 0
        self.bytes_sent = 0  # payload bytes emitted, read racily by the soak's slow consumer

    def run(self) -> None:
        g = self.group
        c = None
        try:
            c = g.connect(self.index)
            c.hello(self.nick)
            for room in self.rooms:
                self.req += 1
                reply = request(c, P.Join(self.req, room, 1 if self.presence else 0))
                if reply.status != P.OK:
                    raise Unexpected(f"JOIN {room} got {reply!r}")
            g.ready.wait(30)
            self.chat(c)
            self.finish(c)
            c.send(P.Bye())
            drain_to_eof(c, 15)
        except threading.BrokenBarrierError:
            g.failures.add(f"{self.nick}: the chatters never all joined")
        except Exception as exc:  # any escape is a failed run, not a silently dead thread
            g.failures.add(f"{self.nick}: {type(exc).__name__}: {exc}")
        finally:
            if c is not None:
                c.close()
            g.tally.add("chat messages sent", sum(self.sent.values()))
            g.tally.add("chat deliveries checked", self.received)

    def chat(self, c: RawClient) -> None:
        rng = self.rng
        next_send = time.monotonic()
        while not self.group.stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                self.emit(c, rng.choice(self.rooms), "chat", self.sent_next)
                next_send = max(next_send + self.period, now - 1.0)
            self.read(c, max(0.001, next_send - time.monotonic()))

    def sent_next(self, room: str) -> int:
        seq = self.sent[room]
        self.sent[room] = seq + 1
        return seq

    def emit(self, c: RawClient, room: str, event: str, number, ack: bool | None = None) -> None:
        value = number(room) if callable(number) else number
        lo, hi = self.payload
        filler = self.rng.randbytes(self.rng.randint(lo, hi)) if hi else b""
        self.bytes_sent += len(filler)
        if ack is None:
            ack = self.rng.random() < 0.1
        req = 0
        if ack:
            self.req += 1
            req = self.req
            self.acks.append((req, room))
        c.send(
            P.Emit(req, P.TARGET_ROOM, room, event, CHAT.pack(MAGIC, self.index, value) + filler)
        )

    def read(self, c: RawClient, timeout: float) -> bool:
        """Handle one frame if one comes within ``timeout``; False if none did."""
        try:
            frame = c.recv(timeout)
        except TimeoutError:
            return False
        if isinstance(frame, P.Event):
            self.on_event(frame)
        elif isinstance(frame, P.Reply):
            self.on_reply(frame)
        elif isinstance(frame, P.ServerPing):
            c.send(P.Pong(frame.nonce))
        elif not isinstance(frame, P.Presence):
            raise Unexpected(f"got {frame!r}")
        return True

    def on_event(self, ev: P.Event) -> None:
        if ev.event not in ("chat", "fin") or len(ev.payload) < CHAT.size:
            return
        magic, sender, value = CHAT.unpack_from(ev.payload)
        if magic != MAGIC or ev.sender != self.group.nick(sender):
            return  # a fuzzing client's event, not a chatter's
        if ev.source_kind != P.TARGET_ROOM or ev.source not in self.rooms:
            raise Unexpected(
                f"chat EVENT from {ev.sender} for {ev.source!r} (kind {ev.source_kind})"
            )
        key = (sender, ev.source)
        want = self.expected.get(key, 0)
        if ev.event == "fin":
            self.fins[key] = value
            if value != want:
                self.group.failures.add(
                    f"{self.nick}: {ev.sender} sent {value} messages to {ev.source}, "
                    f"{want} arrived in order (lost or reordered)"
                )
            return
        self.received += 1
        if value != want:
            what = "lost" if value > want else "duplicated or reordered"
            self.group.failures.add(
                f"{self.nick}: from {ev.sender} in {ev.source}: expected #{want}, got #{value} ({what})"
            )
        self.expected[key] = value + 1

    def on_reply(self, reply: P.Reply) -> None:
        if not self.acks:
            raise Unexpected(f"REPLY nobody asked for: {reply!r}")
        req, room = self.acks.popleft()
        if reply.req != req:
            raise Unexpected(f"REPLY for req {reply.req}, expected {req} (out of order)")
        if reply.status != P.OK:
            raise Unexpected(f"EMIT to {room} answered {P.STATUS_NAMES.get(reply.status)}")
        count = P.parse_count(reply.body)
        if count < len(self.group.peers(self.index, room)):
            raise Unexpected(f"EMIT to {room} reached {count}, fewer than the other chatters")

    def finish(self, c: RawClient, timeout: float = 30.0) -> None:
        for room in self.rooms:
            self.emit(c, room, "fin", self.sent[room], ack=True)
        waiting = {(p, room) for room in self.rooms for p in self.group.peers(self.index, room)}
        deadline = time.monotonic() + timeout
        while self.acks or not waiting <= self.fins.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(waiting - self.fins.keys())
                raise Unexpected(
                    f"no fin from {missing} and {len(self.acks)} acks missing after {timeout:g} s"
                )
            self.read(c, left)
