"""Shared fixtures: a real server process on a free port, and a raw test client.

The raw client speaks the protocol with the project's own codec
(framing.FrameDecoder + protocol.encode/decode) over a blocking socket, so
integration tests see exactly the bytes the server sends. The ``connect``
fixture is parametrised by transport: every test that uses it runs over raw
TCP and over WebSocket (:class:`WsRawClient`: the same frames in binary
messages, wsproto as the client, protocol section 11).
"""

from __future__ import annotations

import socket
import time

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

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
            self.frames.extend(P.decode(t, b) for t, b in self.feed(data))
        return self.frames.pop(0)

    def feed(self, data: bytes) -> list:
        """Wire bytes from the server -> the (type, body) frames they complete."""
        return self.decoder.feed(data)

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
            self.frames.extend(P.decode(t, b) for t, b in self.feed(data))

    def expect_error(self, code: int, timeout: float = 10.0) -> P.Error:
        frame = self.recv_type(P.Error, timeout)
        assert frame.code == code, f"expected {P.STATUS_NAMES[code]}, got {frame!r}"
        self.expect_closed(timeout)
        return frame

    # --------------------------------------------------------- requests
    def hello(
        self, nick: str = "", namespace: str = "/", token: str = "", version: int = 1
    ) -> P.Welcome:
        self.send(P.Hello(version, namespace, nick, token))
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


class WsRawClient(RawClient):
    """RawClient over WebSocket: each ``send_raw`` is one binary message.

    Every server message must end on a frame boundary (section 11), checked
    on each one. The server's Close is answered and its code kept in
    ``close_code``; ``expect_error`` also checks it is 4000 + the error code.
    """

    def __init__(
        self,
        address,
        timeout: float = 10.0,
        ssl_context=None,
        *,
        path: str = "/ws",
        origin: str | None = None,
        subprotocols=("muxserver",),
    ) -> None:
        super().__init__(address, timeout, ssl_context)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.close_code: int | None = None
        self.close_reason = ""
        self.pongs: list[bytes] = []
        self.messages = 0
        self._parts: list[bytes] = []
        self._ready: list = []
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        headers = [(b"Origin", origin.encode())] if origin else []
        self.sock.sendall(
            self.ws.send(
                Request(
                    host=f"{host}:{address[1]}",
                    target=path,
                    subprotocols=list(subprotocols),
                    extra_headers=headers,
                )
            )
        )
        self.subprotocol = None
        accepted = False
        while not accepted:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed during the WebSocket handshake")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                    self.subprotocol = event.subprotocol
                elif isinstance(event, (RejectConnection, RejectData)):
                    raise AssertionError(f"upgrade refused: {event!r}")
                else:
                    self._ready += self._event(event)

    def send(self, msg) -> None:
        self.send_raw(P.encode(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(self.ws.send(Message(data=data)))

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(Message(data=text)))

    def ping(self, payload: bytes) -> None:
        self.sock.sendall(self.ws.send(Ping(payload)))

    def feed(self, data: bytes) -> list:
        frames, self._ready = self._ready, []
        self.ws.receive_data(data)
        for event in self.ws.events():
            frames += self._event(event)
        return frames

    def _event(self, event) -> list:
        if isinstance(event, BytesMessage):
            self._parts.append(bytes(event.data))
            if not event.message_finished:
                return []
            message, self._parts = b"".join(self._parts), []
            self.messages += 1
            frames = self.decoder.feed(message)
            assert self.decoder.buffered == 0, "a server message ended inside a frame"
            return frames
        if isinstance(event, TextMessage):
            raise AssertionError(f"text message from the server: {event.data!r}")
        if isinstance(event, CloseConnection):
            self.close_code, self.close_reason = event.code, event.reason
            try:
                self.sock.sendall(self.ws.send(event.response()))
            except Exception:
                pass  # already closed on our side, or the socket is gone
        elif isinstance(event, Ping):
            self.sock.sendall(self.ws.send(event.response()))
        else:  # Pong
            self.pongs.append(bytes(event.payload))
        return []

    def _take_ready(self) -> None:
        """Frames that came in the same read as the 101."""
        if self._ready:
            self.frames.extend(P.decode(t, b) for t, b in self._ready)
            self._ready = []

    def recv(self, timeout: float = 10.0):
        self._take_ready()
        return super().recv(timeout)

    def expect_closed(self, timeout: float = 10.0) -> None:
        self._take_ready()
        super().expect_closed(timeout)

    def expect_error(self, code: int, timeout: float = 10.0) -> P.Error:
        frame = super().expect_error(code, timeout)
        assert self.close_code == 4000 + code, f"close code {self.close_code}, want {4000 + code}"
        assert self.close_reason == P.STATUS_NAMES[code]
        return frame


CLIENTS = {"tcp": RawClient, "ws": WsRawClient}


@pytest.fixture(params=sorted(CLIENTS))
def transport(request) -> str:
    """Which transport ``connect`` speaks: raw TCP or WebSocket."""
    return request.param


@pytest.fixture
def connect(server, transport):
    clients: list[RawClient] = []

    def make(
        nick: str = "", namespace: str = "/", hello: bool = True, srv=None, token: str = ""
    ) -> RawClient:
        client = CLIENTS[transport]((srv or server).address)
        clients.append(client)
        if hello:
            client.hello(nick, namespace, token)
        return client

    yield make
    for c in clients:
        c.close()


def reply_count(reply: P.Reply) -> int:
    assert reply.status == P.OK, reply
    return P.parse_count(reply.body)
