"""Fuzz cases: one connection's worth of valid, broken and mangled frames.

A case is built from frames of every client type, each either well formed
or broken in exactly one way (cut short, trailing bytes, a wrong or huge or
zero length prefix, an unknown type byte, a name that breaks a rule, a
string length that lies, a field value out of range, flipped bytes). About
one case in ten also gets bytes flipped across the whole stream. The stream
is then written in pieces cut at random byte boundaries, sometimes one byte
at a time, and sometimes the client disconnects (FIN or reset) at a random
byte.

The generator does not predict the answers: it only makes bytes. What the
server owes is decided by tools.model from the bytes actually sent, so a
mutation that happens to produce a valid frame is simply expected to work.

Everything comes from one ``random.Random`` per worker seeded with
``"{seed}:{worker}"`` and nothing read from the server feeds back into it,
so case N of worker W is the same bytes on every run with the same seed
(``python -m tools.fuzz --seed S --case W:N`` replays one).
"""

from __future__ import annotations

import random
import struct
from typing import NamedTuple

from muxserver import protocol as P

from .model import OPEN, U32, U64, Model, Verdict, World

SHARED_ROOMS = ("lobby", "r2")

# Names that break a rule for every kind, then the kind-specific ones.
BAD_NAMES = [
    b"",
    b"\xff",
    b"ab\xc0\x80",  # overlong NUL
    b"\xed\xa0\x80x",  # UTF-16 surrogate
    b"\x80cont",  # lone continuation byte
    b"cut\xe2\x82",  # truncated sequence
    b"a\x00b",
    b"\x07bell",
    "nel\u0085".encode(),  # C1 control
    b"\x1b[31m",
]
BAD_NICKS = [
    b"two words",
    b"tab\there",
    "nb\u00a0sp".encode(),
    "ideo\u3000sp".encode(),
    b"n" * 33,
    b"n" * 255,
    "\u00e9".encode() * 17,  # 34 bytes
]
BAD_NAMESPACES = [b"no-slash", b"x/", b" /"]
FRAME_KINDS = (
    "JOIN",
    "LEAVE",
    "NICK",
    "EMIT",
    "PING",
    "PONG",
    "WHO",
    "ROOMS",
    "BYE",
    "HELLO",
    "junk",
)
FRAME_WEIGHTS = (3, 1, 1.5, 5, 2, 1, 1, 1, 0.4, 0.5, 0.6)
UNKNOWN_TYPES = [0x00, *range(0x0B, 0x11), 0x7F, 0x80, *range(0x81, 0x88), 0x88, 0xFE, 0xFF]


class Field:
    """One body field; str8 fields carry a role so a fault can break its name rule."""

    __slots__ = ("kind", "value", "role", "length")

    def __init__(self, kind: str, value, role: str = "", length: int | None = None) -> None:
        self.kind, self.value, self.role, self.length = kind, value, role, length

    def encode(self) -> bytes:
        if self.kind == "u8":
            return bytes((self.value & 0xFF,))
        if self.kind == "u32":
            return U32.pack(self.value & 0xFFFFFFFF)
        if self.kind == "u64":
            return U64.pack(self.value)
        if self.kind == "str8":
            n = len(self.value) if self.length is None else self.length
            return bytes((n & 0xFF,)) + self.value
        return self.value  # "raw"


class Case(NamedTuple):
    ident: str  # "W:N"
    token: str
    chunks: list  # the bytes, as written: one send per chunk
    pauses: list  # seconds to wait before each chunk
    cut: int | None  # disconnect after this many bytes (None: send everything)
    rst: bool  # disconnect with a reset rather than FIN
    bye: bool  # end an open session with BYE (else just close)
    frames: int  # frames built and written whole
    faults: list  # what was done, for reports
    verdict: Verdict  # the model's verdict on the bytes written

    def describe(self, limit: int = 160) -> str:
        data = b"".join(self.chunks)
        cuts, pos = [], 0
        for chunk in self.chunks[:-1]:
            pos += len(chunk)
            cuts.append(pos)
        head = data[:limit].hex(" ")
        more = f" ... ({len(data)} bytes)" if len(data) > limit else ""
        return (
            f"  faults: {', '.join(self.faults) or 'none'}\n"
            f"  bytes: {head}{more}\n"
            f"  written in {len(self.chunks)} pieces, cut after {cuts[:20]}\n"
            f"  model: end={self.verdict.end}, expects "
            + "; ".join(e.describe() for e in self.verdict.expects)
        )


class Generator:
    def __init__(self, seed: int | str, worker: int, world: World) -> None:
        self.rng = random.Random(f"{seed}:{worker}")
        self.worker = worker
        self.world = world
        self.chatters = sorted(world.taken)

    # ------------------------------------------------------------ cases
    def case(self, index: int) -> Case:
        rng = self.rng
        frames = self.frames(index)
        token = self.token
        stream = b"".join(frames)
        if rng.random() < 0.08:
            stream = self.flip(stream, rng.randint(1, 3))
            self.faults.append("stream bytes flipped")
        cut = rst = None
        r = rng.random()
        if r < 0.22:
            cut = rng.randint(0, len(stream))
            rst = r < 0.1
            stream = stream[:cut]
        chunks, pauses = self.split(stream)
        ends, pos = 0, 0
        for f in frames:
            pos += len(f)
            ends += pos <= len(stream)
        verdict = Model(self.world, token).run(stream)
        bye = verdict.end == OPEN and rng.random() < 0.5
        return Case(
            f"{self.worker}:{index}", token, chunks, pauses, cut, bool(rst), bye, ends,
            self.faults, verdict,
        )  # fmt: skip

    def frames(self, index: int) -> list[bytes]:
        """One connection's protocol frames (HELLO first, mostly), some broken; sets the token."""
        rng = self.rng
        token = f"{rng.getrandbits(24):06x}{self.worker}x{index:x}"
        self.token = token
        self.faults: list[str] = []
        self.shared = True
        self.nick = ""
        self.joined = []
        frames: list[bytes] = []
        if rng.random() < 0.85:
            frames.append(self.maybe_break(self.hello(), 0.15))
            if self.shared and rng.random() < 0.7:
                frames.append(self.frame(P.JOIN, self.join_fields("lobby")))
        if rng.random() < 0.05:
            # Past max_rooms: the last JOINs must get REPLY LIMIT.
            for k in range(self.world.max_rooms + 2):
                frames.append(self.frame(P.JOIN, self.join_fields(f"hog{k}-{token}")))
        for _ in range(rng.choice((1, 1, 2, 3, 4, 6, 10))):
            frames.append(self.maybe_break(self.random_frame(), 0.3))
        return frames

    def split(self, data: bytes) -> tuple[list, list]:
        rng = self.rng
        r = rng.random()
        if r < 0.4 or len(data) < 2:
            chunks = [data]
        elif r < 0.8:
            k = rng.randint(1, min(8, len(data) - 1))
            cuts = [0, *sorted(rng.sample(range(1, len(data)), k)), len(data)]
            chunks = [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        else:
            n = min(len(data), 48)
            chunks = [data[i : i + 1] for i in range(n)] + ([data[n:]] if len(data) > n else [])
        pauses = [0.0] + [
            rng.uniform(0.0002, 0.002) if rng.random() < 0.3 else 0.0 for _ in chunks[1:]
        ]
        return chunks, pauses

    # ------------------------------------------------------------ frames
    @staticmethod
    def frame(ftype: int, fields: list) -> bytes:
        body = b"".join(f.encode() for f in fields)
        return struct.pack(">IB", len(body) + 1, ftype) + body

    def maybe_break(self, parts: tuple | bytes, p: float) -> bytes:
        """``parts`` is (type, fields) or ready bytes; with probability ``p`` break it."""
        if isinstance(parts, bytes):
            return parts
        ftype, fields = parts
        if self.rng.random() >= p:
            return self.frame(ftype, fields)
        return self.broken(ftype, fields)

    def broken(self, ftype: int, fields: list) -> bytes:
        rng = self.rng
        names = [f for f in fields if f.kind == "str8"]
        choices = ["truncate", "trailing", "length+", "length-", "huge", "zero", "type", "flip"]
        if names:
            choices += ["name", "name", "str8 length"]
        if ftype in (P.EMIT, P.ROOMS, P.PING, P.PONG, P.BYE, P.HELLO, P.JOIN):
            choices += ["value", "value"]
        how = rng.choice(choices)
        label = P.TYPE_NAMES[ftype]
        self.faults.append(f"{label}: {how}")
        if how == "name":
            f = rng.choice(names)
            f.value = self.bad_name(f.role)
        elif how == "str8 length":
            f = rng.choice(names)
            f.length = max(0, min(255, len(f.value) + rng.choice((-3, -1, 1, 2, 9, 200))))
        elif how == "value":
            self.bad_value(ftype, fields)
        body = b"".join(f.encode() for f in fields)
        if how == "truncate" and body:
            body = body[: rng.randrange(len(body))]
        elif how == "trailing":
            body += rng.randbytes(rng.randint(1, 8))
        length = len(body) + 1
        if how == "length+":
            length += rng.randint(1, 6)
        elif how == "length-":
            length = max(0, length - rng.randint(1, 6))
        elif how == "huge":
            length = rng.choice(
                (self.world.max_frame + 1, rng.randint(self.world.max_frame + 1, 0xFFFFFFFF))
            )
            body = body[: rng.randint(0, 64)]
        elif how == "zero":
            return b"\x00\x00\x00\x00"
        elif how == "type":
            ftype = rng.choice(UNKNOWN_TYPES)
        data = struct.pack(">IB", length, ftype) + body
        if how == "flip":
            data = self.flip(data, rng.randint(1, 2))
        return data

    def flip(self, data: bytes, n: int) -> bytes:
        if not data:
            return data
        b = bytearray(data)
        for _ in range(n):
            b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
        return bytes(b)

    def bad_name(self, role: str) -> bytes:
        pool = list(BAD_NAMES)
        if role == "nick":
            pool += BAD_NICKS * 2
        elif role == "namespace":
            pool += BAD_NAMESPACES * 2
        return self.rng.choice(pool)

    def bad_value(self, ftype: int, fields: list) -> None:
        rng = self.rng
        if ftype == P.EMIT:
            if rng.random() < 0.5:
                fields[2].value = rng.randint(3, 255)  # target_kind
            else:
                fields[2].value = P.TARGET_BROADCAST
                fields[3].value = fields[3].value or b"someone"
        elif ftype == P.ROOMS:
            fields[1].value = rng.randint(2, 255)  # scope
        elif ftype in (P.PING, P.PONG):
            fields[:] = [Field("raw", rng.randbytes(rng.choice((0, 1, 7, 9, 16))))]
        elif ftype == P.BYE:
            fields[:] = [Field("raw", rng.randbytes(rng.randint(1, 4)))]
        elif ftype == P.HELLO:
            fields[0].value = rng.choice((0, 3, 4, 255))  # version (1 and 2 are valid)
        elif ftype == P.JOIN:
            fields[1].value = rng.randint(2, 255)  # reserved flag bits: ignored, valid

    # ----------------------------------------------------- valid content
    def hello(self) -> tuple:
        rng = self.rng
        self.shared = rng.random() < 0.7
        ns = "/" if self.shared else f"/fz-{self.token}"
        r = rng.random()
        if r < 0.1:
            nick = ""  # the server picks guest-<id>
        elif r < 0.15 and self.shared and self.chatters:
            nick = rng.choice(self.chatters)  # held by a chatter: NICK_TAKEN
        elif r < 0.25:
            nick = ("\u00f1" + self.token + "z" * 32).encode()[:32].decode("utf-8", "ignore")
        else:
            nick = f"fz{self.token}"
        self.nick = nick if nick not in self.chatters else ""
        token = rng.choice((b"", b"", b"ignored", b"\xff\xfe"))  # no token configured
        return P.HELLO, [
            Field("u8", 1),
            Field("str8", ns.encode(), "namespace"),
            Field("str8", nick.encode(), "nick"),
            Field("raw", bytes((len(token),)) + token),
        ]

    def room(self) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.3 and self.shared:
            return rng.choice(SHARED_ROOMS)
        if r < 0.5 and self.joined:
            return rng.choice(self.joined)
        t = self.token
        names = (f"p-{t}", f"zimmer-\u00fc-{t}", f"\u623f\u95f4-{t}", f"\U0001f3b2{t}")
        return rng.choice((*names, "x" * (255 - len(t)) + t))  # the last: exactly 255 bytes

    def req(self) -> int:
        return self.rng.randint(1, 0xFFFFFFFF)

    def join_fields(self, room: str) -> list:
        self.joined.append(room)
        flags = 1 if self.rng.random() < 0.3 else 0
        return [Field("u32", self.req()), Field("u8", flags), Field("str8", room.encode(), "room")]

    def random_frame(self) -> tuple | bytes:
        rng = self.rng
        kind = rng.choices(FRAME_KINDS, weights=FRAME_WEIGHTS)[0]
        if kind == "JOIN":
            return P.JOIN, self.join_fields(self.room())
        if kind == "LEAVE":
            room = self.room()
            return P.LEAVE, [Field("u32", self.req()), Field("str8", room.encode(), "room")]
        if kind == "NICK":
            r = rng.random()
            if r < 0.15 and self.shared and self.chatters:
                nick = rng.choice(self.chatters)
            elif r < 0.25 and self.nick:
                nick = self.nick
            else:
                nick = f"r{rng.randint(0, 9)}{self.token}"
                self.nick = nick
            return P.NICK, [Field("u32", self.req()), Field("str8", nick.encode(), "nick")]
        if kind == "EMIT":
            return P.EMIT, self.emit_fields()
        if kind in ("PING", "PONG"):
            return (P.PING if kind == "PING" else P.PONG), [Field("u64", rng.getrandbits(64))]
        if kind == "WHO":
            return P.WHO, [Field("u32", self.req()), Field("str8", self.room().encode(), "room")]
        if kind == "ROOMS":
            return P.ROOMS, [Field("u32", self.req()), Field("u8", rng.randint(0, 1))]
        if kind == "BYE":
            return P.BYE, []
        if kind == "HELLO":
            shared, nick = self.shared, self.nick
            frame = self.hello()  # a second HELLO: NOT_HELLO whatever it says
            self.shared, self.nick = shared, nick
            return frame
        # Junk: a random type byte (known or not) with a random body.
        self.faults.append("junk frame")
        body = rng.randbytes(rng.choice((0, 1, 3, 8, 20, 300)))
        return struct.pack(">IB", len(body) + 1, rng.randrange(256)) + body

    def emit_fields(self) -> list:
        rng = self.rng
        r = rng.random()
        private = True
        if r < 0.7:
            kind = P.TARGET_ROOM
            target = self.room() if rng.random() < 0.8 else f"elsewhere-{self.token}"
            private = target not in SHARED_ROOMS
        elif r < 0.9:
            kind = P.TARGET_DIRECT
            t = rng.random()
            if t < 0.4 and self.shared and self.chatters:
                target, private = rng.choice(self.chatters), False
            elif t < 0.6 and self.nick:
                target = self.nick
            else:
                target = f"nobody-{self.token}"
        else:
            kind, target, private = P.TARGET_BROADCAST, "", not self.shared
        event = rng.choice(("e", "fz", "\u00ebvent", "\u4e8b\u4ef6", "chat", "x" * 255))
        size = rng.choice((0, 1, 8, 64, 200, 512))
        if private and rng.random() < 0.05:
            # Near max_frame: big bodies split across many reads; some land over it.
            size = self.world.max_frame - rng.randint(0, 300)
        flags = rng.choice((0, 0, 0, 1, 1, 0x80, 0xFE))
        req = 0 if rng.random() < 0.4 else self.req()
        return [
            Field("u32", req),
            Field("u8", flags),
            Field("u8", kind),
            Field("str8", target.encode(), "nick" if kind == P.TARGET_DIRECT else "room"),
            Field("str8", event.encode(), "event"),
            Field("raw", rng.randbytes(size)),
        ]
