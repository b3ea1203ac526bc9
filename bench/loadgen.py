"""The load generator: hundreds of connections from one process, never the bottleneck.

One epoll loop (selectors where there is no epoll) drives every connection
of a workload. Two things make a single Python process keep up with the
servers it measures:

* Receivers do not parse. Every delivered message has the same size (fixed
  payload, fixed-length nicks, one room), so a receiver is one ``recv_into`` a
  shared buffer and one integer addition; messages = bytes // frame size.
  Only the one sampled receiver of a latency phase looks inside frames, to
  read the send timestamp in the first 8 bytes of each payload.
* Publishers send batches (one ``send`` per batch; one message per send in
  the mesh workload) and stay within ``window`` messages of
  the *slowest* receiver, so a figure is a rate the server sustained, not the
  speed at which kernel buffers and server queues filled up.

Each protocol is an adapter: ``MuxAdapter`` builds its frames with the
project's own codec (muxserver.protocol / muxserver.framing) and drives both
muxserver and the asyncio peers; ``RespAdapter`` speaks Redis SUBSCRIBE /
PUBLISH and ``NatsAdapter`` NATS SUB / PUB. An adapter only knows bytes:
what to send to set a connection up, when that set-up is done, what one
publish looks like and how big one delivery is.
"""

from __future__ import annotations

import argparse
import math
import select
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from muxserver import protocol as P
from muxserver.framing import FrameDecoder

PAYLOAD_SIZE = 64
TS = struct.Struct(">Q")  # send time (clock_ns), first bytes of every payload
# Latency is measured on CLOCK_REALTIME because that is the clock of the
# kernel's receive timestamps (SO_TIMESTAMPNS): the sampled receiver learns
# when its bytes *arrived*, not when this loop got round to reading them, so
# the load generator's own loop (up to 1,000 other sockets per wake-up) is
# not added to every system's latency. Sender and receiver are this process.
clock_ns = time.time_ns
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35) if sys.platform == "linux" else None
TIMESPEC = struct.Struct("@qq")
FILLER = b"x" * (PAYLOAD_SIZE - TS.size)
ROOM = "bench"  # room / channel / subject
EVENT = "m"
RECV_CHUNK = 256 * 1024
SETUP_CHUNK = 64  # connections set up at once: keeps every accept backlog short


class LoadError(Exception):
    """The system under test misbehaved (closed, refused, sent an error)."""


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    publishers: int
    subscribers: int  # receive-only connections (fan-out workloads)
    mesh: bool = False  # every member publishes and receives everything
    window: int = 1024  # messages in flight past the slowest receiver
    batch: int = 64  # messages per send
    rooms: int = 1  # mesh members are spread over this many rooms, member i in i % rooms
    sequenced: bool = False  # muxserver only: protocol v2, every member joins SEQUENCED

    @property
    def receivers(self) -> int:
        return self.publishers if self.mesh else self.subscribers

    @property
    def fanout(self) -> int:
        """Deliveries per published message."""
        return self.receivers // self.rooms

    def room_name(self, r: int) -> str:
        """Room r's name; every name of a workload has the same length (fixed frame sizes)."""
        return ROOM if self.rooms == 1 else f"{ROOM}{r:03d}"

    def room_of(self, idx: int) -> int:
        return idx % self.rooms if self.mesh else 0


# Windows and batches were sized by measurement (docs/benchmarks.md): at
# these sizes every system is on its plateau, i.e. a larger window does not
# raise its rate, so no server waits for the load generator; and every queue
# in the path stays far below its limits (muxserver's 8 MiB per connection,
# Redis's 8 MiB pub/sub soft limit): at most window x 100 bytes per receiver.
WORKLOADS = {
    w.key: w
    for w in (
        Workload("1-100", "1 -> 100", 1, 100, window=1024, batch=64),
        # The same with every member SEQUENCED (protocol section 9): EVENT_SEQ
        # frames, each message numbered and kept in the room's history.
        Workload("1-100-seq", "1 -> 100 sequenced", 1, 100, window=1024, batch=64, sequenced=True),
        Workload("1-1", "1 -> 1", 1, 1, window=4096, batch=128),
        Workload("1-1000", "1 -> 1000", 1, 1000, window=512, batch=64),
        # Every member is in the room and gets every message, its own
        # included: Redis and NATS pub/sub have no "everyone but the sender",
        # so muxserver and the peers use the EMIT echo flag to do equal work.
        Workload("50-50", "50 <-> 50", 50, 0, mesh=True, window=2000, batch=1),
    )
}
# Many small rooms (issue 15): 2,000 members in 200 rooms of 10, every member
# publishes to its room one message per send and gets everything of its room
# (its own included, as in 50 <-> 50). Run at a fixed offered rate by
# bench/rooms.py, which reports the server's CPU per delivery.
ROOMS_WORKLOAD = Workload(
    "rooms", "2,000 in 200 rooms", 2000, 0, mesh=True, window=4000, batch=1, rooms=200
)


# ================================================================ adapters
class MuxAdapter:
    """muxserver protocol: HELLO + JOIN, EMIT to a room, EVENTs delivered.

    Frames come from the project's codec; the batch fast path only splices a
    timestamp into a template frame encoded by ``protocol.encode``.
    """

    name = "mux"
    split_member = False  # one connection both publishes and receives
    settle = None  # nothing to wait for after set-up

    def __init__(self, workload: Workload, ack: bool = False) -> None:
        if ack and workload.mesh:
            raise ValueError("acks are counted on publisher-only connections")
        self.ack = ack
        self.sequenced = workload.sequenced
        self.flags = P.EMIT_ECHO if workload.mesh else 0
        self.workload = workload
        names = [workload.room_name(r) for r in range(workload.rooms)]
        self._heads = [
            P.encode(P.Emit(0, P.TARGET_ROOM, name, EVENT, bytes(PAYLOAD_SIZE), self.flags))[
                :-PAYLOAD_SIZE
            ]
            for name in names
        ]
        self._head = self._heads[0]
        event = P.Event(P.TARGET_ROOM, self.nick(0), names[0], EVENT, bytes(PAYLOAD_SIZE))
        if self.sequenced:  # seqs are u64 fixed-width: every EVENT_SEQ has one size
            event = P.EventSeq(1, *event)
        self.frame_size = len(P.encode(event))
        self.ts_offset = self.frame_size - PAYLOAD_SIZE
        self._req = 0
        self._decoders: dict[int, FrameDecoder] = {}
        self.acks = 0  # REPLYs to EMIT received
        self.acked = 0  # sum of their recipient counts

    @staticmethod
    def nick(idx: int) -> str:
        return f"lg{idx:06d}"  # fixed length: every EVENT has the same size

    def handshake(self, role: str, idx: int):
        room = self.workload.room_name(self.workload.room_of(idx))
        if self.sequenced:
            hello = P.Hello(2, "/", self.nick(idx), "")
            join = P.Join(1, room, P.JOIN_SEQUENCED, 0, 0, 0)
        else:
            hello, join = P.Hello(P.PROTOCOL_VERSION, "/", self.nick(idx), ""), P.Join(1, room, 0)
        data = P.encode(hello) + P.encode(join)
        decoder = FrameDecoder(1 << 20)
        seen: list = []

        def done(chunk: bytes) -> bool:
            for ftype, body in decoder.feed(chunk):
                msg = P.decode(ftype, body)
                if isinstance(msg, P.Error) or (isinstance(msg, P.Reply) and msg.status):
                    raise LoadError(f"mux set-up refused: {msg!r}")
                seen.append(msg)
            return any(isinstance(m, P.Reply) for m in seen)

        return data, done

    def batch(self, n: int, ts: int, room: int = 0) -> bytes:
        if self.ack:
            out = []
            name = self.workload.room_name(room)
            for _ in range(n):
                self._req = self._req % 0xFFFFFFFF + 1  # never 0: 0 means "no ack"
                payload = TS.pack(ts) + FILLER
                out.append(P.encode(P.Emit(self._req, P.TARGET_ROOM, name, EVENT, payload)))
            return b"".join(out)
        return (self._heads[room] + TS.pack(ts) + FILLER) * n

    def on_publisher_data(self, idx: int, data: bytes) -> bytes:
        decoder = self._decoders.setdefault(idx, FrameDecoder(1 << 20))
        for ftype, body in decoder.feed(data):
            msg = P.decode(ftype, body)
            if not (self.ack and isinstance(msg, P.Reply) and msg.status == P.OK):
                raise LoadError(f"unexpected frame to a publisher: {msg!r}")
            self.acks += 1
            self.acked += P.parse_count(msg.body)
        return b""


def resp_command(*args: bytes) -> bytes:
    """One RESP array of bulk strings, the form every Redis command takes."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RespAdapter:
    """Redis pub/sub. A subscribed connection may not PUBLISH, so a mesh
    member is two connections: one subscriber, one publisher."""

    name = "resp"
    split_member = True
    settle = None

    def __init__(self, workload: Workload, ack: bool = False) -> None:
        self.workload = workload
        rooms = [workload.room_name(r).encode() for r in range(workload.rooms)]
        room = rooms[0]
        self._heads = [resp_command(b"PUBLISH", r, bytes(PAYLOAD_SIZE))[: -PAYLOAD_SIZE - 2]
                       for r in rooms]  # fmt: skip
        self._head, self._tail = self._heads[0], b"\r\n"
        msg = b"*3\r\n" + b"".join(
            b"$%d\r\n%s\r\n" % (len(a), a) for a in (b"message", room, bytes(PAYLOAD_SIZE))
        )
        self.frame_size = len(msg)
        self.ts_offset = self.frame_size - PAYLOAD_SIZE - 2
        self._subscribed = [
            b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(r), r) for r in rooms
        ]
        self._subscribe = [resp_command(b"SUBSCRIBE", r) for r in rooms]

    def handshake(self, role: str, idx: int):
        r = self.workload.room_of(idx)
        expect = self._subscribed[r] if role == "sub" else b"+PONG\r\n"
        got = bytearray()

        def done(chunk: bytes) -> bool:
            got.extend(chunk)
            if got.startswith(b"-"):
                raise LoadError(f"redis refused: {bytes(got)!r}")
            return len(got) >= len(expect)

        return (self._subscribe[r] if role == "sub" else resp_command(b"PING")), done

    def batch(self, n: int, ts: int, room: int = 0) -> bytes:
        return (self._heads[room] + TS.pack(ts) + FILLER + self._tail) * n

    def on_publisher_data(self, idx: int, data: bytes) -> bytes:
        # ":<receivers>\r\n" per PUBLISH; only an error is worth a look.
        if b"-" in data:
            raise LoadError(f"redis error to a publisher: {data[:200]!r}")
        return b""


class NatsAdapter:
    """NATS core pub/sub. ``verbose: false`` means no +OK per PUB.

    nats-server PINGs every connection about 2 s after it connects, to
    measure its round trip, whatever ``ping_interval`` says; after that it
    PINGs every ``ping_interval``, which the runner sets longer than any run.
    Receivers only count bytes, so set-up waits for that first PING on every
    connection and answers PONG before the first message is published
    (``settle``); a later PING to a publisher is still answered.
    """

    name = "nats"
    split_member = False
    settle = b"PING\r\n", b"PONG\r\n"  # (wait for this, then answer that)

    CONNECT = b'CONNECT {"verbose":false,"pedantic":false,"name":"muxbench"}\r\n'

    def __init__(self, workload: Workload, ack: bool = False) -> None:
        self.workload = workload
        subjects = [workload.room_name(r).encode() for r in range(workload.rooms)]
        subj = subjects[0]
        self._heads = [b"PUB %s %d\r\n" % (s, PAYLOAD_SIZE) for s in subjects]
        self._head = self._heads[0]
        self.frame_size = len(b"MSG %s 1 %d\r\n" % (subj, PAYLOAD_SIZE)) + PAYLOAD_SIZE + 2
        self.ts_offset = self.frame_size - PAYLOAD_SIZE - 2
        self._subs = [b"SUB %s 1\r\n" % s for s in subjects]

    def handshake(self, role: str, idx: int):
        sub = self._subs[self.workload.room_of(idx)]
        data = self.CONNECT + (b"" if role == "pub" else sub) + b"PING\r\n"
        got = bytearray()

        def done(chunk: bytes) -> bool:
            got.extend(chunk)
            if b"-ERR" in got:
                raise LoadError(f"nats refused: {bytes(got)!r}")
            return b"PONG\r\n" in got

        return data, done

    def batch(self, n: int, ts: int, room: int = 0) -> bytes:
        return (self._heads[room] + TS.pack(ts) + FILLER + b"\r\n") * n

    def on_publisher_data(self, idx: int, data: bytes) -> bytes:
        if b"-ERR" in data:
            raise LoadError(f"nats error to a publisher: {data[:200]!r}")
        return b"PONG\r\n" * data.count(b"PING\r\n")


ADAPTERS = {"mux": MuxAdapter, "resp": RespAdapter, "nats": NatsAdapter}


# ============================================================ load generator
@dataclass
class Phase:
    """What one timed phase measured."""

    seconds: float
    published: int  # messages handed to the kernel by publishers
    deliveries: int  # messages counted by receivers during the phase
    cpu: float  # load generator CPU seconds during the phase
    latencies_ns: list[int] = field(default_factory=list)

    @property
    def deliveries_per_s(self) -> float:
        return self.deliveries / self.seconds

    def percentile(self, q: float) -> float | None:
        """Latency percentile in microseconds (nearest rank), None if unsampled."""
        if not self.latencies_ns:
            return None
        ordered = sorted(self.latencies_ns)
        rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
        return ordered[rank - 1] / 1000


class LoadGen:
    """Connections of one workload against one server, and the timed phases."""

    def __init__(self, adapter, address, workload: Workload, timeout=20.0):
        """``address``: (host, port), or a list of them: connections take turns (a cluster)."""
        self.adapter = adapter
        self.address = address
        self._addresses = address if isinstance(address, list) else [address]
        self.workload = workload
        self.timeout = timeout
        self.fs = adapter.frame_size
        self.poller = _Poller()
        self.rsocks: list[socket.socket] = []  # receiving connections
        self.rx: list[int] = []  # bytes counted per receiver
        self.psocks: list[socket.socket] = []  # publishing connections
        self.backlog: list[bytes] = []  # per publisher: bytes the kernel refused
        self.published = 0
        self._rr = 0  # round-robin start among publishers
        self._buf = bytearray(RECV_CHUNK)
        self._all: list[socket.socket] = []
        self._stamped = False  # the sampled receiver gets kernel receive timestamps
        # Many rooms: messages published per room; receiver i and publisher j
        # are member i / j, in room i % rooms (Workload.room_of).
        self.pub_room = [0] * workload.rooms
        # WebSocket adapters: per receiver, a counter of payload bytes (wsload.py).
        self._counters = None

    # ------------------------------------------------------------- set-up
    def setup(self) -> None:
        wl = self.workload
        plan: list[tuple[str, int]] = []
        if wl.mesh:
            plan = [("member", i) for i in range(wl.publishers)]
        else:
            plan = [("pub", i) for i in range(wl.publishers)]
            plan += [("sub", wl.publishers + i) for i in range(wl.subscribers)]
        for start in range(0, len(plan), SETUP_CHUNK):
            self._setup_chunk(plan[start : start + SETUP_CHUNK])
        if self.adapter.settle:
            self._settle(*self.adapter.settle)
        for j, sock in enumerate(self.psocks):
            if sock not in self.rsocks:
                self.poller.register(sock, -1 - j)
        for i, sock in enumerate(self.rsocks):
            self.poller.register(sock, i)
        for sock in self._all:
            sock.setblocking(False)
        if getattr(self.adapter, "counter", None) is not None:
            self._counters = [self.adapter.counter() for _ in self.rsocks]
        if SO_TIMESTAMPNS is not None and self.rsocks:
            try:
                self.rsocks[-1].setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self._stamped = True
            except OSError:
                pass

    def _setup_chunk(self, chunk: list[tuple[str, int]]) -> None:
        pending = []
        for role, idx in chunk:
            roles = ("pub", "sub") if role == "member" and self.adapter.split_member else (role,)
            for r in roles:
                address = self._addresses[len(self._all) % len(self._addresses)]
                sock = socket.create_connection(address, timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._all.append(sock)
                data, done = self.adapter.handshake("pub" if r == "pub" else "sub", idx)
                sock.sendall(data)
                pending.append((sock, done))
                if r in ("pub", "member"):
                    self.psocks.append(sock)
                    self.backlog.append(b"")
                if r in ("sub", "member"):
                    self.rsocks.append(sock)
                    self.rx.append(0)
        deadline = time.monotonic() + self.timeout
        for sock, done in pending:
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk_data = sock.recv(65536)
                except TimeoutError:
                    raise LoadError("set-up timed out") from None
                if not chunk_data:
                    raise LoadError("server closed a connection during set-up")
                verdict = done(chunk_data)
                if isinstance(verdict, bytes):  # an answer, and not done yet (socket.io's 40)
                    sock.sendall(verdict)
                elif verdict:
                    break

    def _settle(self, wait_for: bytes, answer: bytes) -> None:
        """Read ``wait_for`` from every connection and answer it (see NatsAdapter)."""
        deadline = time.monotonic() + self.timeout
        for sock in self._all:
            got = b""
            while not got.endswith(wait_for):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = sock.recv(len(wait_for) - len(got))
                except TimeoutError:
                    raise LoadError(f"no {wait_for!r} from the server during set-up") from None
                if not data:
                    raise LoadError("server closed a connection during set-up")
                got += data
            sock.sendall(answer)

    # ------------------------------------------------------------ phases
    def run(self, seconds: float, rate: float | None = None, sample: bool = False) -> Phase:
        """Publish for ``seconds``: as fast as the window allows, or at ``rate``
        messages/s. With ``sample``, one receiver records latencies of messages
        sent during this phase."""
        rx, fs = self.rx, self.fs
        window, batch = self.workload.window, self.workload.batch
        poll = self.poller.poll
        buf = self._buf
        recvs = [s.recv_into for s in self.rsocks]
        sample_i = len(rx) - 1 if sample else -1
        lat: list[int] = []
        counters = self._counters
        if sample:
            unpack = getattr(self.adapter, "ts_unpack", None)
            self._sampler = _Sampler(self.fs, self.adapter.ts_offset, rx[sample_i], unpack)
        pub0 = self.published
        pub_at, lag = self.published, self._lag()  # lag: published, not yet read by the slowest
        rx0 = sum(rx)
        cpu0, t0 = time.process_time(), time.perf_counter()
        t0_ns = clock_ns()
        deadline = t0 + seconds
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            room = window - (lag + self.published - pub_at)
            if room < batch:
                pub_at, lag = self.published, self._lag()  # O(receivers): only when spent
                room = window - lag
            limited_by_rate = False
            if rate is not None:
                due = int(rate * (now - t0)) + 1 - (self.published - pub0)
                if due < room:
                    room, limited_by_rate = due, True
            if room > 0:
                room -= self._publish(room, batch)
            if room > 0 or any(self.backlog):
                timeout = 0.0
            elif limited_by_rate:
                timeout = max(0.0, t0 + (self.published - pub0 + 1) / rate - time.perf_counter())
            else:
                timeout = 0.05  # window spent: sleep until a receiver reads
            for i in poll(min(timeout, deadline - now)):
                if i >= 0:
                    try:
                        if i == sample_i:
                            n, arrived = self._recv_stamped(buf)
                        else:
                            n = recvs[i](buf)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not n:
                        raise LoadError(f"server closed receiver {i}")
                    if counters is not None:  # WebSocket: payload bytes only
                        n = counters[i].feed(buf, n, i == sample_i)
                    rx[i] += n
                    if i == sample_i:
                        self._sampler.feed(buf, n, t0_ns, lat, arrived)
                else:
                    self._on_publisher_readable(-1 - i)
        elapsed = time.perf_counter() - t0
        return Phase(
            seconds=elapsed,
            published=self.published - pub0,
            deliveries=(sum(rx) - rx0) // fs,
            cpu=time.process_time() - cpu0,
            latencies_ns=lat,
        )

    def _lag(self) -> int:
        """Messages published and not yet counted by the slowest receiver (of its room)."""
        fs = self.fs
        if self.workload.rooms == 1:
            return self.published - min(self.rx) // fs
        room_of, pub_room = self.workload.room_of, self.pub_room
        return max(pub_room[room_of(i)] - n // fs for i, n in enumerate(self.rx))

    def _expected(self, i: int) -> int:
        """Bytes receiver ``i`` should hold: every message published to its room."""
        if self.workload.rooms == 1:
            return self.published * self.fs
        return self.pub_room[self.workload.room_of(i)] * self.fs

    def _recv_stamped(self, buf: bytearray) -> tuple[int, int]:
        """recv on the sampled receiver: (bytes, when the last of them arrived)."""
        sock = self.rsocks[-1]
        if not self._stamped:
            return sock.recv_into(buf), clock_ns()
        n, ancillary, _, _ = sock.recvmsg_into([buf], socket.CMSG_SPACE(TIMESPEC.size))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = TIMESPEC.unpack_from(data)
                return n, sec * 1_000_000_000 + nsec
        return n, clock_ns()

    def _publish(self, room: int, batch: int) -> int:
        """Send up to ``room`` messages, one batch per publisher; returns how many."""
        psocks, backlog = self.psocks, self.backlog
        count = len(psocks)
        ts = clock_ns()
        sent_msgs = 0
        start = self._rr
        self._rr = (start + 1) % count
        built_n, data = 0, b""
        rooms = self.workload.rooms
        for k in range(count):
            j = (start + k) % count
            if backlog[j]:
                self._send(j, backlog[j])
                if backlog[j]:
                    continue
            n = min(room - sent_msgs, batch)
            if n <= 0:
                break
            if rooms > 1:
                r = j % rooms
                data = self.adapter.batch(n, ts, r)
                self.pub_room[r] += n
            elif n != built_n:  # publishers of one turn share the bytes (the mesh's 50)
                built_n, data = n, self.adapter.batch(n, ts)
            self._send(j, data)
            sent_msgs += n
        self.published += sent_msgs
        return sent_msgs

    def _send(self, j: int, data: bytes) -> None:
        try:
            sent = self.psocks[j].send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise LoadError(f"publisher {j}: {exc}") from None
        # Whatever the kernel refused waits here; it was counted as published
        # already, so the window still bounds it.
        self.backlog[j] = data[sent:] if sent < len(data) else b""

    def _on_publisher_readable(self, j: int) -> None:
        try:
            data = self.psocks[j].recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            raise LoadError(f"server closed publisher {j}")
        answer = self.adapter.on_publisher_data(j, data)
        if answer:
            self.psocks[j].sendall(answer)

    def drain(self, timeout: float = 10.0) -> bool:
        """Read until every receiver has every message published; False on timeout.

        Raises LoadError if a receiver got bytes that are not whole deliveries.
        """
        expected = self._expected
        if not self.pump(lambda: all(n >= expected(i) for i, n in enumerate(self.rx)), timeout):
            return False
        odd = [i for i, n in enumerate(self.rx) if n != expected(i)]
        if odd:
            # More bytes than messages, or a partial message: something other
            # than deliveries reached a receiver, so the counts would lie.
            raise LoadError(
                f"receiver {odd[0]} got {self.rx[odd[0]]} bytes, expected {expected(odd[0])}: "
                "the server sent something other than the published messages"
            )
        return True

    def pump(self, done, timeout: float = 10.0) -> bool:
        """Send backlogs and read everything, without publishing, until ``done()``."""
        deadline = time.monotonic() + timeout
        recvs = [s.recv_into for s in self.rsocks]
        while time.monotonic() < deadline:
            if done() and not any(self.backlog):
                return True
            for j, data in enumerate(self.backlog):
                if data:
                    self._send(j, data)
            for i in self.poller.poll(0.05):
                if i >= 0:
                    try:
                        n = recvs[i](self._buf)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not n:
                        raise LoadError(f"server closed receiver {i}")
                    if self._counters is not None:
                        n = self._counters[i].feed(self._buf, n)
                    self.rx[i] += n
                else:
                    self._on_publisher_readable(-1 - i)
        return False

    @property
    def delivered(self) -> int:
        """Messages counted by all receivers so far."""
        return sum(self.rx) // self.fs

    def close(self) -> None:
        self.poller.close()
        for sock in self._all:
            sock.close()
        self._all.clear()


class _Poller:
    """Readiness of many sockets as a list of integer tokens.

    epoll where there is one: one C call per wake-up and no per-event key
    objects, which is most of what ``selectors`` costs on top of it at a few
    hundred thousand wake-ups per second. ``selectors`` elsewhere.
    """

    def __init__(self) -> None:
        self._ep = select.epoll() if hasattr(select, "epoll") else None
        self._sel = None if self._ep else selectors.DefaultSelector()
        self._tokens: dict[int, int] = {}  # fd -> token

    def register(self, sock: socket.socket, token: int) -> None:
        self._tokens[sock.fileno()] = token
        if self._ep is not None:
            self._ep.register(sock.fileno(), select.EPOLLIN)
        else:
            self._sel.register(sock, selectors.EVENT_READ, token)

    def poll(self, timeout: float) -> list[int]:
        if self._ep is not None:
            tokens = self._tokens
            return [tokens[fd] for fd, _ in self._ep.poll(timeout, len(tokens) + 1)]
        return [key.data for key, _ in self._sel.select(timeout)]

    def close(self) -> None:
        (self._ep or self._sel).close()


class _Sampler:
    """Reads send timestamps out of one receiver's byte stream.

    Frames are fixed-size and the stream started on a frame boundary, so the
    frames start at multiples of the frame size; a partial frame at the end of
    a read is carried to the next one.
    """

    def __init__(self, frame_size: int, ts_offset: int, stream_pos: int, unpack=None) -> None:
        self.fs = frame_size
        self.ts_offset = ts_offset
        self.unpack = unpack or TS.unpack_from  # socket.io's time is text
        self.skip = (-stream_pos) % frame_size  # bytes until the next frame start
        self.carry = bytearray()

    def feed(self, buf: bytearray, n: int, since_ns: int, out: list[int], now: int) -> None:
        """Latencies (``now`` - send time) of the frames completed by ``buf[:n]``."""
        data = memoryview(buf)[:n]
        if self.skip:
            cut = min(self.skip, n)
            self.skip -= cut
            data = data[cut:]
        carry = self.carry
        carry += data
        fs, off, unpack = self.fs, self.ts_offset, self.unpack
        pos, end = 0, len(carry) - fs
        while pos <= end:
            (ts,) = unpack(carry, pos + off)
            if ts >= since_ns:  # in-flight messages of an earlier phase are not ours
                out.append(now - ts)
            pos += fs
        del carry[:pos]


# ====================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    """Drive one already-running server by hand: handy when tuning."""
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=main.__doc__)
    parser.add_argument("--proto", choices=sorted(ADAPTERS), default="mux")
    parser.add_argument("--address", default="127.0.0.1:7878", help="HOST:PORT of the server")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="1-100")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=None, help="messages/s (default: max)")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    wl = WORKLOADS[args.workload]
    gen = LoadGen(ADAPTERS[args.proto](wl), (host, int(port)), wl)
    try:
        gen.setup()
        phase = gen.run(args.seconds, rate=args.rate, sample=True)
    finally:
        gen.close()
    print(
        f"{wl.title}: {phase.deliveries_per_s:,.0f} deliveries/s, "
        f"{phase.deliveries_per_s / wl.fanout:,.0f} messages/s, "
        f"p50 {phase.percentile(50)} us, p99 {phase.percentile(99)} us, "
        f"load generator CPU {phase.cpu / phase.seconds:.0%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
