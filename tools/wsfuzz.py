"""WebSocket fuzz cases: hostile WebSocket framing around valid and broken protocol frames.

A case upgrades one connection (``GET /ws``, sometimes with frames in the
same write as the request) and then sends WebSocket frames: the protocol
frames of a tools.fuzzgen case packed into binary messages (several frames
per message, messages fragmented at random bytes, messages that end inside
a frame), Pings and Pongs between the fragments, and one fault in a few
frames: a reserved bit, an unknown opcode, no mask, a wrong mask key, a
control frame over 125 bytes or fragmented, a length in a longer form than
needed or with its top bit set, a huge declared length, a continuation with
nothing open, a text message (valid or not UTF-8), a Close with a bad code,
a bad reason or one byte, a message over max_frame + 4, a truncated header.
The stream is written in random pieces, and sometimes cut (FIN or reset).

tools.wsmodel decides what the server owes for the bytes actually sent, and
:func:`run_ws_case` checks it: the protocol answers, the Pongs, the Close
code (4000 + the ERROR's code, 1000 after BYE, the echo of the client's
Close, 1002/1003/1007 for a violation), then end of stream after our Close
(FIN, never a reset: protocol section 6).
"""

from __future__ import annotations

import base64
import random
import socket
import struct
import time
from typing import NamedTuple

from muxserver import protocol as P
from muxserver.framing import FrameDecoder

from .fuzzgen import Generator
from .model import BYE, FATAL, OPEN, Expect
from .wsmodel import PEER_CLOSE, WS_FAIL, WsVerdict, unmask, verdict

CLOSE_CODES = (1000, 1001, 1003, 1011, 1012, 1014, 3000, 4999, 0, 999, 1004, 1005, 1006, 1015, 2000, 5000)
BAD_UTF8 = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"ok\xe2\x82", b"\x80")


def ws_frame(opcode: int, payload: bytes, *, fin=True, rsv=0, key=None, mask=True, form=None,
             length=None, mask_with=None) -> bytes:  # fmt: skip
    """One client frame. ``form`` forces the length encoding (7, 16 or 64 bits),
    ``length`` the declared length, ``mask_with`` the key the payload is really masked with."""
    n = len(payload) if length is None else length
    if form is None:
        form = 7 if n < 126 else 16 if n < 0x10000 else 64
    b1 = 0x80 if mask else 0
    if form == 7:
        head = bytes((b1 | n,))
    elif form == 16:
        head = bytes((b1 | 126,)) + struct.pack(">H", n & 0xFFFF)
    else:
        head = bytes((b1 | 127,)) + struct.pack(">Q", n)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if not mask:
        return bytes((first,)) + head + payload
    key = key if key is not None else b"\x00\x00\x00\x00"
    return bytes((first,)) + head + key + unmask(payload, mask_with or key)


class WsCase(NamedTuple):
    ident: str
    token: str
    request: bytes  # the upgrade request
    chunks: list  # the bytes after the request, as written; chunks[0] may ride with the request
    pauses: list
    with_request: bool  # chunks[0] is written in the same send as the request
    cut: int | None
    rst: bool
    ending: str  # for an OPEN verdict: "bye", "close" (our Close 1000) or "hangup"
    frames: int
    faults: list
    verdict: WsVerdict

    def describe(self, limit: int = 160) -> str:
        data = b"".join(self.chunks)
        more = f" ... ({len(data)} bytes)" if len(data) > limit else ""
        return (
            f"  WebSocket case; faults: {', '.join(self.faults) or 'none'}\n"
            f"  bytes after the upgrade: {data[:limit].hex(' ')}{more}\n"
            f"  written in {len(self.chunks)} pieces (first with the request: {self.with_request})\n"
            f"  model: {self.verdict.describe()}"
        )


class WsGenerator:
    """WebSocket cases built around a tools.fuzzgen Generator's protocol frames."""

    def __init__(self, gen: Generator, host: str) -> None:
        self.gen = gen
        self.rng = random.Random(f"{gen.rng.random()}:ws")
        self.host = host

    def request(self) -> bytes:
        rng = self.rng
        key = base64.b64encode(rng.randbytes(16)).decode()
        lines = [
            "GET /ws HTTP/1.1", f"Host: {self.host}", "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
        ]  # fmt: skip
        if rng.random() < 0.5:
            lines.append("Sec-WebSocket-Protocol: muxserver")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def key(self) -> bytes:
        return b"\0\0\0\0" if self.rng.random() < 0.1 else self.rng.randbytes(4)

    def case(self, index: int) -> WsCase:
        rng, gen = self.rng, self.gen
        frames = gen.frames(index)
        faults = gen.faults
        out: list[bytes] = []
        k = 0
        while k < len(frames):
            take = rng.choice((1, 1, 1, 2, 3, len(frames)))
            data = b"".join(frames[k : k + take])
            k += take
            if rng.random() < 0.06 and len(data) > 1:
                cut = rng.randrange(1, len(data))
                out += self.message(data[:cut])  # ends inside a frame: BAD_FRAME
                faults.append("message cut inside a frame")
                data = data[cut:]
            out += self.message(data)
            if rng.random() < 0.12:
                out.append(self.control())
        if rng.random() < 0.25:
            self.fault(out, faults)
        if rng.random() < 0.08:
            out.append(self.close_frame(faults))
        stream = b"".join(out)
        if rng.random() < 0.06:
            keep = rng.randrange(len(stream)) if stream else 0
            stream = stream[:keep]
            faults.append("stream truncated (the connection stays open)")
        cut = rst = None
        r = rng.random()
        if r < 0.12:
            cut = rng.randint(0, len(stream))
            rst = r < 0.05
            stream = stream[:cut]
        chunks, pauses = gen.split(stream)
        v = verdict(stream, gen.world, gen.token)
        ending = rng.choice(("bye", "close", "hangup"))
        return WsCase(
            f"{gen.worker}:{index}", gen.token, self.request(), chunks, pauses,
            rng.random() < 0.3, cut, bool(rst), ending, len(frames), faults, v,
        )  # fmt: skip

    def message(self, data: bytes) -> list[bytes]:
        """One binary message, sometimes fragmented, with control frames between fragments."""
        rng = self.rng
        if len(data) < 2 or rng.random() < 0.6:
            return [ws_frame(0x2, data, key=self.key())]
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 4))))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        out = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            out.append(ws_frame(0x2 if i == 0 else 0x0, part, fin=last, key=self.key()))
            if not last and rng.random() < 0.3:
                out.append(self.control())
        return out

    def control(self) -> bytes:
        rng = self.rng
        payload = rng.randbytes(rng.choice((0, 1, 8, 125)))
        return ws_frame(rng.choice((0x9, 0x9, 0xA)), payload, key=self.key())

    def close_frame(self, faults: list) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.15:
            payload = b""
        elif r < 0.25:
            payload = b"\x03"
        else:
            reason = rng.choice((b"", b"bye", "\u00e9t\u00e9".encode(), rng.choice(BAD_UTF8)))
            payload = struct.pack(">H", rng.choice(CLOSE_CODES)) + reason
        faults.append(f"Close {payload[:8].hex()}")
        return ws_frame(0x8, payload, key=self.key())

    def fault(self, out: list, faults: list) -> None:
        rng = self.rng
        how = rng.choice((
            "rsv", "opcode", "unmasked", "mask key", "control long", "control fragmented",
            "form16", "form64", "msb", "huge", "continuation", "interleaved", "text",
            "text bad", "oversize", "truncated header",
        ))  # fmt: skip
        faults.append(f"ws: {how}")
        key = self.key()
        body = P.encode(P.Ping(rng.getrandbits(64)))
        if how == "rsv":
            frame = ws_frame(0x2, body, rsv=rng.randint(1, 7), key=key)
        elif how == "opcode":
            frame = ws_frame(rng.choice((3, 4, 5, 6, 7, 0xB, 0xC, 0xF)), body, key=key)
        elif how == "unmasked":
            frame = ws_frame(0x2, body, mask=False)
        elif how == "mask key":
            frame = ws_frame(0x2, body, key=key, mask_with=bytes(b ^ 0x5A for b in key))
        elif how == "control long":
            frame = ws_frame(0x9, rng.randbytes(rng.choice((126, 200, 300))), key=key)
        elif how == "control fragmented":
            frame = ws_frame(rng.choice((0x8, 0x9, 0xA)), b"x", fin=False, key=key)
        elif how == "form16":
            frame = ws_frame(0x2, body, form=16, key=key)
        elif how == "form64":
            frame = ws_frame(0x2, body, form=64, key=key)
        elif how == "msb":
            frame = ws_frame(0x2, body, form=64, length=(1 << 63) | 0x10000, key=key)
        elif how == "huge":
            n = rng.choice((1 << 20, 1 << 31, (1 << 62) + 5))
            frame = ws_frame(0x2, rng.randbytes(rng.choice((0, 10, 1000))), length=n, form=64, key=key)
        elif how == "continuation":
            frame = ws_frame(0x0, body, key=key)
        elif how == "interleaved":
            frame = ws_frame(0x2, body[:3], fin=False, key=key) + ws_frame(0x2, body[3:], key=key)
        elif how in ("text", "text bad"):
            text = "h\u00e9llo".encode() if how == "text" else rng.choice(BAD_UTF8)
            frame = ws_frame(0x1, text, key=key)
        elif how == "oversize":
            size = self.gen.world.max_frame + rng.randint(5, 4000)
            data = P.encode(P.Ping(1)) * (size // 13 + 1)
            half = len(data) // 2
            frame = ws_frame(0x2, data[:half], fin=False, key=key) + ws_frame(0x0, data[half:], key=key)
        else:  # truncated header: the last frame of the stream stops after 1 to 5 bytes
            frame = ws_frame(0x2, body, key=key)[: rng.randint(1, 5)]
        out.insert(rng.randint(0, len(out)) if how != "truncated header" else len(out), frame)


# ------------------------------------------------------------ the client side
class Mismatch(Exception):
    """The server's answer is not what RFC 6455 and protocol.md demand."""


class WsWire:
    """Reads a server's 101 and then its WebSocket frames; every read has a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.head_done = False
        self.decoder = FrameDecoder(16 * 1024 * 1024)
        self.frames: list = []  # protocol frames, decoded
        self.pongs: list = []
        self.close: tuple | None = None  # (code or None, reason)

    def _more(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            raise Mismatch("connection reset (protocol section 6: FIN, never a reset)") from None
        if not data:
            raise EOFError
        self.buf += data

    def upgrade(self, deadline: float) -> None:
        while b"\r\n\r\n" not in self.buf:
            self._more(deadline)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise Mismatch(f"upgrade answered {head[:80]!r}")
        self.head_done = True
        self._parse()

    def _parse(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            if b1 & 0x80 or b0 & 0x70 or not b0 & 0x80:
                raise Mismatch(f"server frame header {buf[:2].hex()}: masked, RSV or not final")
            n, at = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                (n,) = struct.unpack_from(">H", buf, 2)
                at = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                (n,) = struct.unpack_from(">Q", buf, 2)
                at = 10
            if len(buf) < at + n:
                break
            payload, buf = buf[at : at + n], buf[at + n :]
            self._frame(b0 & 0x0F, payload)
        self.buf = buf

    def _frame(self, opcode: int, payload: bytes) -> None:
        if self.close is not None:
            raise Mismatch(f"frame (opcode {opcode}) after the server's Close")
        if opcode == 0x2:
            try:
                frames = self.decoder.feed(payload)
                self.frames += [P.decode(t, b) for t, b in frames]
            except (P.ProtocolError, Exception) as exc:
                raise Mismatch(f"server message does not decode: {exc}") from None
            if self.decoder.buffered:
                raise Mismatch("a server message ended inside a frame (section 11)")
        elif opcode == 0xA:
            self.pongs.append(payload)
        elif opcode == 0x8:
            code = struct.unpack_from(">H", payload)[0] if len(payload) >= 2 else None
            self.close = (code, payload[2:].decode("utf-8", "replace"))
        elif opcode != 0x9:
            raise Mismatch(f"server sent opcode {opcode}")

    def until(self, ready, deadline: float) -> None:
        while not ready():
            self._more(deadline)
            self._parse()


def _send(sock: socket.socket, case: WsCase) -> None:
    for i, (pause, chunk) in enumerate(zip(case.pauses, case.chunks, strict=True)):
        if i == 0 and case.with_request:
            continue
        if pause:
            time.sleep(pause)
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return  # the answers read next decide whether that was allowed


def next_ws_answer(wire: WsWire, expect: Expect, deadline: float, tally):
    """The next protocol frame that answers something (EVENT/PRESENCE/PING are skipped)."""
    while True:
        while wire.frames:
            frame = wire.frames.pop(0)
            if isinstance(frame, P.Event | P.Presence | P.ServerPing):
                tally.add("bystander frames")
                continue
            return frame
        if wire.close is not None:
            raise Mismatch(f"Close {wire.close} before {expect.describe()}")
        try:
            wire.until(lambda: wire.frames or wire.close is not None, deadline)
        except TimeoutError:
            raise Mismatch(f"no answer in time (hang?); expected {expect.describe()}") from None
        except EOFError:
            raise Mismatch(f"server closed; expected {expect.describe()}") from None


def run_ws_case(address, case: WsCase, tally, nonce: int, timeout: float, check) -> None:
    """Play one case; raises Mismatch. ``check(expect, got, tally)`` is tools.fuzz's answer check."""
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    wire = WsWire(sock)
    v = case.verdict
    try:
        first = case.chunks[0] if case.with_request else b""
        sock.sendall(case.request + first)
        deadline = time.monotonic() + timeout
        try:
            wire.upgrade(deadline)
        except (TimeoutError, EOFError) as exc:
            raise Mismatch(f"no 101 ({type(exc).__name__})") from None
        _send(sock, case)
        tally.add("ws frames bytes sent", sum(map(len, case.chunks)))
        tally.add("frames the server had to decode", v.frames)
        if case.cut is not None:
            if case.rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tally.add("ws cases ending " + ("in a reset" if case.rst else "in a disconnect"))
            return
        expects, end, codes, owed = list(v.expects), v.end, v.close_codes, list(v.pongs)
        if end == OPEN:
            # The probe: a Ping and a protocol PING (before HELLO: NOT_HELLO).
            probe = nonce.to_bytes(8, "big")
            data = P.encode(P.Ping(nonce))
            sock.sendall(ws_frame(0x9, probe, key=b"\1\2\3\4") + ws_frame(0x2, data, key=b"\5\6\7\x08"))
            owed.append(probe)
            if v.hello:
                expects.append(Expect("PONG", nonce))
            else:
                expects.append(Expect("ERROR", P.NOT_HELLO, note="PING before HELLO"))
                end, codes = FATAL, frozenset({4000 + P.NOT_HELLO})
        for expect in expects:
            check(expect, next_ws_answer(wire, expect, deadline, tally), tally)
        tally.add(f"ws cases ending {end}")
        if end == OPEN:
            wire.until(lambda: probe in wire.pongs, deadline)
            if wire.pongs != owed:
                raise Mismatch(f"Pongs {len(wire.pongs)} {wire.pongs[:4]}, expected {len(owed)}")
            if case.ending == "hangup":
                return
            if case.ending == "bye":
                sock.sendall(ws_frame(0x2, P.encode(P.Bye()), key=b"\1\1\1\1"))
            else:
                sock.sendall(ws_frame(0x8, struct.pack(">H", 1000), key=b"\1\1\1\1"))
            codes = frozenset({1000})
        elif end not in (FATAL, BYE, WS_FAIL, PEER_CLOSE):
            return  # partial: the server waits for the rest; nothing more is owed
        try:
            wire.until(lambda: wire.close is not None, deadline)
        except TimeoutError:
            raise Mismatch(f"no Close in {timeout:g} s; expected {sorted(codes)}") from None
        except EOFError:
            raise Mismatch(f"end of stream without a Close; expected {sorted(codes)}") from None
        code, reason = wire.close
        got = 1005 if code is None else code
        if got not in codes:
            raise Mismatch(f"Close {got} {reason!r}, expected {sorted(codes)} ({v.note})")
        if 4000 <= got < 5000 and end == FATAL and reason != P.STATUS_NAMES.get(got - 4000):
            raise Mismatch(f"Close {got} with reason {reason!r}")
        tally.add(("WS CLOSE", got))
        if end != OPEN:
            allowed = owed + v.later_pings
            if wire.pongs[: len(owed)] != owed or wire.pongs != allowed[: len(wire.pongs)]:
                raise Mismatch(f"{len(wire.pongs)} Pongs, {len(owed)} owed ({v.note})")
        if end not in (OPEN, PEER_CLOSE) and not v.client_closed:
            try:
                sock.sendall(ws_frame(0x8, struct.pack(">H", got if got != 1005 else 1000), key=b"\0\0\0\0"))
            except (BrokenPipeError, ConnectionResetError):
                pass  # it may close as soon as it has read our earlier bytes
        try:
            wire.until(lambda: False, deadline)
        except EOFError:
            return
        except TimeoutError:
            raise Mismatch("no end of stream after the Close handshake") from None
    finally:
        sock.close()
