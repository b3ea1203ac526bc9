"""WebSocket for the load generator: muxserver's frames in binary messages, and socket.io.

Two adapters (see bench/loadgen.py for what an adapter is):

* ``WsMuxAdapter``: the muxserver protocol over its WebSocket endpoint
  (``/ws`` on the same port): HELLO + JOIN in one binary message, batches
  of EMITs as one binary message (several whole frames per message, as
  protocol section 11 allows).
* ``SocketIoAdapter``: socket.io 4's own packets, engine.io v4 over
  WebSocket (``/socket.io/?EIO=4&transport=websocket``): the server's ``0{...}``
  open packet, our ``40`` connect, ``42["m","..."]`` events. Each event is one
  text message, as a socket.io client sends it. The Node peer
  (bench/socketio_server.js) joins every socket to one room and broadcasts.

Both send masked frames with the all-zero masking key: the mask is then a
no-op (XOR with 0), so the load generator spends no CPU on masking, and a
server cannot tell (it unmasks either way). Receivers still do not parse
frames: :class:`WsCounter` walks the 2-10 byte WebSocket headers and counts
payload bytes, so deliveries are payload bytes // delivery size, as on TCP;
for the one sampled receiver it also squeezes the headers out of the read
buffer so the latency sampler sees the plain stream of deliveries.
"""

from __future__ import annotations

import base64
import os
import struct

from muxserver import protocol as P
from muxserver.framing import FrameDecoder

from .loadgen import FILLER, PAYLOAD_SIZE, ROOM, LoadError, MuxAdapter, Workload

_ZERO_MASK = b"\x00\x00\x00\x00"


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One final, masked (all-zero key) client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 0x10000:
        head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + _ZERO_MASK + payload


def upgrade_request(target: str) -> bytes:
    """An RFC 6455 upgrade without Origin (not a browser: muxserver accepts it)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class WsCounter:
    """Payload bytes in a stream of unmasked server frames, without parsing the payloads."""

    __slots__ = ("need", "head")

    def __init__(self) -> None:
        self.need = 0  # payload bytes of the current frame still to come
        self.head = b""  # a header cut by the end of the last read

    def feed(self, buf: bytearray, n: int, compact: bool = False) -> int:
        """Payload bytes among ``buf[:n]``; with ``compact`` they are moved to ``buf[:result]``."""
        if self.head:
            buf[0:0] = self.head  # rare: a header split across reads
            n += len(self.head)
            self.head = b""
        pos = total = 0
        need = self.need
        while pos < n:
            if need:
                take = min(need, n - pos)
                if compact and total != pos:
                    buf[total : total + take] = buf[pos : pos + take]
                total += take
                pos += take
                need -= take
                continue
            b1 = buf[pos + 1] & 0x7F if n - pos >= 2 else 0
            size = 2 if b1 < 126 else (4 if b1 == 126 else 10)
            if n - pos < max(2, size):
                self.head = bytes(buf[pos:n])
                break
            if buf[pos] & 0x0F >= 0x8:
                raise LoadError(f"control frame 0x{buf[pos]:02x} from the server during a run")
            if b1 == 126:
                need = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            elif b1 == 127:
                need = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            else:
                need = b1
            pos += size
        self.need = need
        return total


def _messages(data: bytes) -> tuple[list[bytes], bytes]:
    """Whole unmasked server messages at the front of ``data``, and the rest."""
    out, pos = [], 0
    while len(data) - pos >= 2:
        b1 = data[pos + 1] & 0x7F
        size = 2 if b1 < 126 else (4 if b1 == 126 else 10)
        if len(data) - pos < size:
            break
        n = b1 if b1 < 126 else int.from_bytes(data[pos + 2 : pos + size], "big")
        if len(data) - pos < size + n:
            break
        if data[pos] & 0x0F == 0x8:
            raise LoadError(f"server closed the WebSocket: {data[pos + size : pos + size + n]!r}")
        out.append(data[pos + size : pos + size + n])
        pos += size + n
    return out, data[pos:]


class _Upgrade:
    """Set-up bytes after the request: the 101, then messages for ``on_message``."""

    def __init__(self, on_message) -> None:
        self.buf = b""
        self.upgraded = False
        self.on_message = on_message

    def __call__(self, chunk: bytes) -> bool:
        self.buf += chunk
        if not self.upgraded:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return False
            if not head.startswith(b"HTTP/1.1 101 "):
                raise LoadError(f"upgrade refused: {head[:200]!r}")
            self.upgraded, self.buf = True, rest
        messages, self.buf = _messages(self.buf)
        verdicts = [self.on_message(m) for m in messages]
        if any(v is True for v in verdicts):
            return True
        return b"".join(v for v in verdicts if isinstance(v, bytes)) or False


class WsMuxAdapter(MuxAdapter):
    """muxserver's protocol over WebSocket (frames in binary messages)."""

    name = "ws"

    def __init__(self, workload: Workload, ack: bool = False) -> None:
        super().__init__(workload, ack)
        self._counters: dict[int, WsCounter] = {}

    counter = WsCounter  # one per receiver (LoadGen)

    def handshake(self, role: str, idx: int):
        frames = P.encode(P.Hello(P.PROTOCOL_VERSION, "/", self.nick(idx), "")) + P.encode(
            P.Join(1, ROOM, 0)
        )
        data = upgrade_request("/ws") + client_frame(frames)
        decoder = FrameDecoder(1 << 20)

        def on_message(message: bytes) -> bool:
            done = False
            for ftype, body in decoder.feed(message):
                msg = P.decode(ftype, body)
                if isinstance(msg, P.Error) or (isinstance(msg, P.Reply) and msg.status):
                    raise LoadError(f"mux set-up refused: {msg!r}")
                done = done or isinstance(msg, P.Reply)
            return done

        return data, _Upgrade(on_message)

    def batch(self, n: int, ts: int) -> bytes:
        return client_frame(super().batch(n, ts))

    def on_publisher_data(self, idx: int, data: bytes) -> bytes:
        counter = self._counters.setdefault(idx, WsCounter())
        buf = bytearray(data)
        n = counter.feed(buf, len(buf), compact=True)
        return super().on_publisher_data(idx, bytes(buf[:n])) if n else b""


class SocketIoAdapter:
    """socket.io 4 (engine.io v4 over WebSocket): ``42["m","<64 chars>"]`` per message."""

    name = "sio"
    split_member = False
    settle = None
    counter = WsCounter

    PREFIX = b'42["m","'

    def __init__(self, workload: Workload, ack: bool = False) -> None:
        if ack:
            raise ValueError("socket.io broadcasts are not acknowledged with a count")
        self.echo = workload.mesh  # everyone, the sender included (io.to(room))
        self.frame_size = len(self.PREFIX) + PAYLOAD_SIZE + 2
        self.ts_offset = len(self.PREFIX)

    @staticmethod
    def ts_unpack(buf, offset: int) -> tuple[int]:
        """The send time: 16 hex digits (a socket.io string payload is text)."""
        return (int(bytes(buf[offset : offset + 16]), 16),)

    def handshake(self, role: str, idx: int):
        target = f"/socket.io/?EIO=4&transport=websocket&echo={int(self.echo)}"
        data = upgrade_request(target)

        def on_message(message: bytes):
            if message.startswith(b"44"):
                raise LoadError(f"socket.io refused the connect: {message[:200]!r}")
            if message.startswith(b"0{"):  # engine.io open: now connect to namespace "/"
                return client_frame(b"40", 0x1)
            return message.startswith(b"40")

        return data, _Upgrade(on_message)

    def batch(self, n: int, ts: int) -> bytes:
        payload = self.PREFIX + b"%016x" % ts + FILLER[: PAYLOAD_SIZE - 16] + b'"]'
        return client_frame(payload, 0x1) * n

    def on_publisher_data(self, idx: int, data: bytes) -> bytes:
        if b"\x88" in data[:1]:
            raise LoadError("socket.io closed a publisher")
        return b""
