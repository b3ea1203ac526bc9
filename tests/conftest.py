"""Shared fixtures: a real server process on a free port, and a raw test client.

The raw client speaks the protocol with the project's own codec
(framing.FrameDecoder + protocol.encode/decode) over a blocking socket, so
integration tests see exactly the bytes the server sends.
"""

from __future__ import annotations

import socket
import time

import pytest

from muxserver import protocol as P
from muxserver.framing import FrameDecoder
from muxserver.testing import READY_PREFIX, ServerProcess  # noqa: F401  (used by tests)


@pytest.fixture
def server_factory():
    servers: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        srv = ServerProcess(*args, env=env)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def restart_on_same_port(server_factory, srv: ServerProcess, *args: str) -> ServerProcess:
    """Stop ``srv`` and start a new server on its port (for reconnect tests)."""
    srv.stop()
    deadline = time.monotonic() + 15
    while True:
        try:
            # argparse keeps the last --port, so this overrides the "--port 0".
            return server_factory("--port", str(srv.port), *args)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def server(server_factory) -> ServerProcess:
    return server_factory()


class RawClient:
    """A blocking protocol client for tests; every read has a timeout."""

    def __init__(self, address, timeout: float = 10.0, ssl_context=None) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(self.sock, server_hostname=address[0])
        self.decoder = FrameDecoder(16 * 1024 * 1024)
        self.frames: list = []
        self._req = 0
        self.welcome: P.Welcome | None = None

    # ---------------------------------------------------------- sending
    def send(self, msg) -> None:
        self.sock.sendall(P.encode(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_req(self) -> int:
        self._req += 1
        return self._req

    # -------------------------------------------------------- receiving
    def recv(self, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while not self.frames:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from server")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.frames.extend(P.decode(t, b) for t, b in self.decoder.feed(data))
        return self.frames.pop(0)

    def recv_type(self, cls, timeout: float = 10.0):
        """Next frame of type ``cls``; fails on anything else (except PINGs)."""
        while True:
            frame = self.recv(timeout)
            if isinstance(frame, P.ServerPing):
                continue
            assert isinstance(frame, cls), f"expected {cls.__name__}, got {frame!r}"
            return frame

    def expect_closed(self, timeout: float = 10.0) -> None:
        """Reads until EOF; fails if a frame arrives first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.frames:
                raise AssertionError(f"unexpected frame {self.frames[0]!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("server did not close")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                # Protocol section 6: the server sends what it queued, then
                # FIN, then drains. A reset can destroy the ERROR before the
                # client reads it, so it is a failure, never a clean close.
                raise AssertionError(
                    "connection reset instead of FIN (protocol section 6)"
                ) from None
            if not data:
                return
            self.frames.extend(P.decode(t, b) for t, b in self.decoder.feed(data))

    def expect_error(self, code: int, timeout: float = 10.0) -> P.Error:
        frame = self.recv_type(P.Error, timeout)
        assert frame.code == code, f"expected {P.STATUS_NAMES[code]}, got {frame!r}"
        self.expect_closed(timeout)
        return frame

    # --------------------------------------------------------- requests
    def hello(self, nick: str = "", namespace: str = "/", token: str = "") -> P.Welcome:
        self.send(P.Hello(1, namespace, nick, token))
        self.welcome = self.recv_type(P.Welcome)
        return self.welcome

    def request(self, msg) -> P.Reply:
        self.send(msg)
        reply = self.recv_type(P.Reply)
        assert reply.req == msg.req, f"reply {reply!r} to {msg!r}"
        return reply

    def join(self, room: str, presence: bool = False) -> P.Reply:
        return self.request(P.Join(self.next_req(), room, 1 if presence else 0))

    def emit_room(self, room: str, event: str, payload: bytes, echo=False, ack=True):
        req = self.next_req() if ack else 0
        msg = P.Emit(req, P.TARGET_ROOM, room, event, payload, 1 if echo else 0)
        if ack:
            return self.request(msg)
        self.send(msg)
        return None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def connect(server):
    clients: list[RawClient] = []

    def make(nick: str = "", namespace: str = "/", hello: bool = True, srv=None) -> RawClient:
        client = RawClient((srv or server).address)
        clients.append(client)
        if hello:
            client.hello(nick, namespace)
        return client

    yield make
    for c in clients:
        c.close()


def reply_count(reply: P.Reply) -> int:
    assert reply.status == P.OK, reply
    return P.parse_count(reply.body)
