"""The load test over WebSocket: ``make loadtest TRANSPORT=ws``.

A site's browsers reach muxserver through ``/ws`` (protocol section 11), so
the load test can take that path too. :class:`WsClient` is the blocking
:class:`muxserver.client.Client` (the one every Locust user drives) with its
socket swapped for :func:`ws_socket`: after the RFC 6455 upgrade, a socket
whose ``send`` wraps each write of whole frames in one masked binary
message and whose ``recv`` hands back the frames carried by the server's
messages. The client above sees the raw protocol, so every row and the loss
check of the report are the same as over TCP.

The socket class is made on first use, from whatever ``socket.socket`` is
then (gevent's, once Locust has monkey-patched), so its reads and writes
yield to other greenlets like any other socket's. Client frames are masked
with the all-zero key (XOR with 0: no CPU spent on it; a server cannot tell).
wsproto is not used on this path: the server's frames are unmasked, final
binary messages, and the parser below is a few lines.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

from muxserver.client import Client

_classes: dict = {}


def _client_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x82, 0x80 | n))
    elif n < 0x10000:
        head = struct.pack(">BBH", 0x82, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", 0x82, 0x80 | 127, n)
    return head + b"\x00\x00\x00\x00" + payload


def _socket_class():
    base = socket.socket
    cls = _classes.get(base)
    if cls is not None:
        return cls

    class WsSocket(base):
        """A connected socket past its upgrade: frames in, frames out (see the module)."""

        def _ws_init(self, leftover: bytes) -> None:
            self._ws_in = bytearray(leftover)  # server bytes not yet parsed
            self._ws_ready = bytearray()  # payload parsed, not yet returned
            self._ws_closed = False

        def _wire(self, data: bytes) -> None:
            # base.send, never base.sendall: gevent's sendall calls self.send,
            # which is the framing send below.
            view = memoryview(data)
            while view:
                view = view[base.send(self, view) :]

        def send(self, data, flags: int = 0, **_kw) -> int:
            self._wire(_client_frame(bytes(data)))
            return len(data)

        def sendall(self, data, flags: int = 0, **_kw) -> None:
            self.send(data, flags)

        def recv(self, bufsize: int, flags: int = 0) -> bytes:
            while not self._ws_ready and not self._ws_closed:
                self._ws_parse()
                if self._ws_ready or self._ws_closed:
                    break
                chunk = base.recv(self, 65536, flags)
                if not chunk:
                    self._ws_closed = True
                    break
                self._ws_in += chunk
            # All of it, whatever ``bufsize`` says: bytes kept here would
            # raise no readiness event for the client's poll.
            out = bytes(self._ws_ready)
            self._ws_ready.clear()
            return out

        def _ws_parse(self) -> None:
            buf = self._ws_in
            while len(buf) >= 2:
                b1 = buf[1] & 0x7F
                size = 2 if b1 < 126 else (4 if b1 == 126 else 10)
                n = (
                    b1
                    if b1 < 126
                    else int.from_bytes(buf[2:size], "big")
                    if len(buf) >= size
                    else -1
                )
                if n < 0 or len(buf) < size + n:
                    return
                opcode = buf[0] & 0x0F
                if opcode == 0x8:  # the server's Close: answer it, then end of stream
                    try:
                        self._wire(b"\x88\x82\x00\x00\x00\x00" + bytes(buf[size : size + 2]))
                    except OSError:
                        pass
                    self._ws_closed = True
                    del buf[:]
                    return
                if opcode in (0x0, 0x2):
                    self._ws_ready += buf[size : size + n]
                del buf[: size + n]

        def pending(self) -> int:
            return len(self._ws_ready)

    _classes[base] = WsSocket
    return WsSocket


def ws_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection upgraded to WebSocket at ``/ws``, ready for our frames."""
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raw.sendall(
            f"GET /ws HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: muxserver\r\n\r\n".encode()
        )
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data:
            if time.monotonic() > deadline:
                raise TimeoutError("no WebSocket upgrade answer")
            chunk = raw.recv(4096)
            if not chunk:
                raise ConnectionError("server closed during the WebSocket upgrade")
            data += chunk
        head, _, leftover = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101 "):
            status = head.split(b"\r\n", 1)[0]
            raise ConnectionError(f"WebSocket upgrade refused: {status!r}")
        cls = _socket_class()
        sock = cls(raw.family, raw.type, raw.proto, fileno=raw.detach())
        sock.settimeout(timeout)
        sock._ws_init(leftover)
        return sock
    except BaseException:
        raw.close()
        raise


class WsClient(Client):
    """muxserver.client.Client over ``/ws`` (same API, same behaviour)."""

    def _dial(self):
        return ws_socket(self.host, self.port, self.timeout)  # no TLS here
