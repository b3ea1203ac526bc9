"""WebSocket on the server's own port (protocol section 11), with real sockets.

The raw-protocol integration tests of test_server.py already run over
WebSocket too (the ``connect`` fixture); this module covers what only a
WebSocket has: the sniff (raw, HTTP and TLS on one port), each HTTP status,
the Origin rule, whole frames per message, text messages, oversized
messages, close codes, pings, an independent client library (``websockets``)
and the transport's output bookkeeping over an in-memory socket.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import sys
import time
from pathlib import Path

import pytest
from conftest import RawClient, WsRawClient, reply_count
from tlsutil import make_tls_files
from websockets.sync.client import connect as ws_connect

from muxserver import protocol as P
from muxserver.framing import FrameDecoder
from muxserver.testing import FakeSocket
from muxserver.transport.websocket import (
    MAX_MESSAGE_OUT,
    WebSocketTransport,
    binary_header,
    split_frames,
)


def http(address, request: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send raw request bytes; (status, headers, body) of the answer, read to EOF."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        if not data.startswith(b"HTTP/1.1 101 "):  # a 101 keeps the connection open
            while chunk := sock.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def get(address, path: str, extra: str = "", method: str = "GET"):
    host = f"{address[0]}:{address[1]}"
    return http(address, f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())


def upgrade_request(address, origin: str | None = None, version: str = "13") -> bytes:
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: {address[0]}:{address[1]}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        f"Sec-WebSocket-Version: {version}",
    ]
    if origin:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ------------------------------------------------------------ the sniff


def test_raw_http_and_websocket_on_one_port(server):
    raw = RawClient(server.address)
    raw.hello("tcp")
    raw.join("r")
    ws = WsRawClient(server.address)
    assert ws.subprotocol == "muxserver"
    ws.hello("browser")
    ws.join("r")
    status, headers, body = get(server.address, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<html" in body.lower()
    assert reply_count(raw.emit_room("r", "m", b"from tcp")) == 1
    assert ws.recv_type(P.Event) == P.Event(0, "tcp", "r", "m", b"from tcp")
    assert reply_count(ws.emit_room("r", "m", b"from ws")) == 1
    assert raw.recv_type(P.Event) == P.Event(0, "browser", "r", "m", b"from ws")
    raw.close()
    ws.close()


def test_sniff_survives_one_byte_reads(server):
    sock = socket.create_connection(server.address, timeout=10)
    for byte in upgrade_request(server.address):
        sock.send(bytes((byte,)))
    assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
    sock.close()
    raw = socket.create_connection(server.address, timeout=10)
    hello = P.encode(P.Hello(1, "/", "slow", ""))
    for i in range(len(hello)):
        raw.send(hello[i : i + 1])
        time.sleep(0.002)
    dec = FrameDecoder()
    frames = []
    while not frames:
        frames = dec.feed(raw.recv(65536))
    assert P.decode(*frames[0]).nick == "slow"
    raw.close()


def test_tls_serves_raw_http_and_wss_on_one_port(server_factory, tmp_path):
    files = make_tls_files(tmp_path)
    srv = server_factory(*files.server_args)
    ctx = ssl.create_default_context(cafile=files.ca)
    raw = RawClient(srv.address, ssl_context=ctx)
    raw.hello("tcp")
    raw.join("r")
    wss = WsRawClient(srv.address, ssl_context=ctx, origin=f"https://127.0.0.1:{srv.port}")
    wss.hello("browser")
    wss.join("r")
    with socket.create_connection(srv.address, timeout=10) as plain:
        tls = ctx.wrap_socket(plain, server_hostname="127.0.0.1")
        tls.sendall(f"GET /muxclient.js HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and b"export" in data
    assert reply_count(wss.emit_room("r", "m", b"over wss")) == 1
    assert raw.recv_type(P.Event).payload == b"over wss"
    # The own origin over TLS is https://, not http://.
    with pytest.raises(AssertionError, match="upgrade refused"):
        WsRawClient(srv.address, ssl_context=ctx, origin=f"http://127.0.0.1:{srv.port}")
    raw.close()
    wss.close()


# ------------------------------------------------------------ HTTP statuses


def test_static_files(server):
    for path, kind in [
        ("/", "text/html"),
        ("/index.html", "text/html"),
        ("/muxclient.js", "text/javascript"),
        ("/muxcodec.js", "text/javascript"),
        ("/chat.js", "text/javascript"),
        ("/chat.css", "text/css"),
    ]:
        status, headers, body = get(server.address, path)
        assert status == 200, path
        assert headers["content-type"].startswith(kind)
        assert int(headers["content-length"]) == len(body) > 100
        assert headers["connection"] == "close"
    _, headers, _ = get(server.address, "/")
    assert "default-src 'self'" in headers["content-security-policy"]


@pytest.mark.parametrize(
    "request_bytes,status",
    [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (b"DELETE /ws HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", 400),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # no Upgrade header
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", 431),
    ],
)
def test_http_errors(server, request_bytes, status):
    got, headers, body = http(server.address, request_bytes)
    assert got == status
    assert headers["content-type"].startswith("text/plain") and body.strip()
    if status == 405:
        assert headers["allow"] == "GET"


def test_head_over_16k_sent_in_pieces_is_431(server):
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(40):
                sock.sendall(b"X-Filler: " + b"b" * 500 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the rest was sent
        data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 431 ")


def test_unsupported_websocket_version_is_426(server):
    status, headers, _ = http(server.address, upgrade_request(server.address, version="8"))
    assert status == 426 and headers["sec-websocket-version"] == "13"


def test_no_web_serves_no_page_but_upgrades(server_factory):
    srv = server_factory("--no-web")
    assert get(srv.address, "/")[0] == 404
    assert get(srv.address, "/muxclient.js")[0] == 404
    ws = WsRawClient(srv.address)
    assert ws.hello("still").nick == "still"
    ws.close()


def test_over_max_connections_plain_http_gets_503(server_factory):
    srv = server_factory("--max-connections", "1")
    holder = RawClient(srv.address)
    holder.hello("holder")
    assert get(srv.address, "/")[0] == 503
    ws = WsRawClient(srv.address)  # the upgrade itself succeeds...
    ws.expect_error(P.LIMIT)  # ...then ERROR LIMIT and Close 4011
    assert ws.close_code == 4011
    holder.close()


def test_unfinished_request_times_out_with_408(server_factory):
    srv = server_factory("--hello-timeout", "0.3")
    with socket.create_connection(srv.address, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 408 ")


def test_permessage_deflate_is_never_negotiated(server):
    request = upgrade_request(server.address).replace(
        b"\r\n\r\n",
        b"\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    )
    status, headers, _ = http(server.address, request)
    assert status == 101 and "sec-websocket-extensions" not in headers


def test_options_from_the_environment(server_factory):
    srv = server_factory(
        env={"MUXSERVER_NO_WEB": "1", "MUXSERVER_ALLOWED_ORIGINS": "http://app.example"}
    )
    assert get(srv.address, "/")[0] == 404
    assert http(srv.address, upgrade_request(srv.address, "http://app.example"))[0] == 101
    assert http(srv.address, upgrade_request(srv.address, "http://other.example"))[0] == 403


# ------------------------------------------------------------ Origin rule


@pytest.mark.parametrize(
    "origin,allowed",
    [
        (None, True),  # not a browser
        ("OWN", True),
        ("http://localhost:1", False),  # another port is another origin
        ("https://OWN-HOSTPORT", False),  # the server is plain http
        ("http://evil.example", False),
        ("http://app.example", True),  # listed
        ("HTTP://APP.EXAMPLE:80", True),  # same origin, spelled differently
        ("null", False),
    ],
)
def test_origin_rule(server_factory, origin, allowed):
    srv = server_factory("--allowed-origins", "http://app.example, https://other.example")
    hostport = f"127.0.0.1:{srv.port}"
    if origin == "OWN":
        origin = f"http://{hostport}"
    elif origin:
        origin = origin.replace("OWN-HOSTPORT", hostport)
    status, _, body = http(srv.address, upgrade_request(srv.address, origin))
    if allowed:
        assert status == 101
    else:
        assert status == 403 and b"origin not allowed" in body


def test_any_origin_with_star(server_factory):
    srv = server_factory("--allowed-origins", "*")
    status, _, _ = http(srv.address, upgrade_request(srv.address, "http://anywhere.example"))
    assert status == 101


# ------------------------------------------------------------ messages


def test_several_frames_in_one_message_both_ways(connect_ws):
    a, b = connect_ws("a"), connect_ws("b")
    a.join("r")
    b.join("r")
    before = a.messages
    a.send_raw(b"".join(P.encode(P.Emit(i, 0, "r", "e", b"%d" % i)) for i in range(1, 4)))
    replies = [a.recv_type(P.Reply) for _ in range(3)]
    assert [r.req for r in replies] == [1, 2, 3]
    assert [b.recv_type(P.Event).payload for _ in range(3)] == [b"1", b"2", b"3"]
    assert a.messages - before == 1  # one turn's replies packed in one message


def test_frame_split_across_two_messages_is_bad_frame(connect_ws):
    a, b = connect_ws("a"), connect_ws("b")
    a.join("r")
    b.join("r")
    frame = P.encode(P.Emit(0, 0, "r", "e", b"split me"))
    a.send_raw(P.encode(P.Emit(0, 0, "r", "e", b"whole")) + frame[:7])
    a.send_raw(frame[7:])
    assert b.recv_type(P.Event).payload == b"whole"  # what came before is handled
    a.expect_error(P.BAD_FRAME)
    assert a.close_code == 4001 and a.close_reason == "BAD_FRAME"


def test_text_message_closes_with_1003(connect_ws):
    a = connect_ws("a")
    a.send_text("hello")
    a.expect_closed()
    assert a.close_code == 1003
    assert not any(isinstance(f, P.Error) for f in a.frames)


def test_oversized_message_is_too_large_before_buffering(server_factory, connect_ws):
    srv = server_factory("--max-frame", "1000")
    a = connect_ws("a", srv=srv)
    # One frame of 1000 bytes fits (max_frame + 4 on the wire)...
    a.send_raw(struct.pack(">IB", 1000, P.PING) + b"\x00" * 999)
    a.expect_error(P.BAD_FRAME)  # (a PING body must be 8 bytes, but it got through)
    b = connect_ws("b", srv=srv)
    # ...a message of 1005 bytes does not, whatever it holds.
    b.send_raw(b"\x00" * 1005)
    b.expect_error(P.TOO_LARGE)
    assert b.close_code == 4006


def test_frame_over_max_frame_is_too_large_from_its_prefix(server_factory, connect_ws):
    srv = server_factory("--max-frame", "1000")
    a = connect_ws("a", srv=srv)
    a.send_raw(struct.pack(">I", 1001) + b"\x01")
    a.expect_error(P.TOO_LARGE)


def test_bye_closes_with_1000(connect_ws):
    a = connect_ws("a")
    a.send(P.Ping(5))
    a.send(P.Bye())
    assert a.recv() == P.ServerPong(5)
    a.expect_closed()
    assert (a.close_code, a.close_reason) == (1000, "BYE")


def test_server_closes_tcp_once_the_close_handshake_is_done(server_factory, connect_ws):
    srv = server_factory("--drain-timeout", "30")
    a = connect_ws("a", srv=srv)
    started = time.monotonic()
    a.send(P.Bye())
    a.expect_closed()  # our client answers the server's Close at once
    assert a.close_code == 1000
    assert time.monotonic() - started < 5  # not the 30 s drain timeout


def test_server_close_then_fin_even_if_the_client_never_answers(server_factory):
    srv = server_factory("--drain-timeout", "0.5")
    c = WsRawClient(srv.address)
    c.hello("mute")
    c.send(P.Bye())
    c.sock.settimeout(10)
    started = time.monotonic()
    data = b""
    while chunk := c.sock.recv(65536):  # read raw: never answer the Close
        data += chunk
    assert data.startswith(b"\x88")  # the server's Close came first, then EOF
    assert time.monotonic() - started < 5
    c.close()


def test_client_close_ends_the_session_like_eof(connect_ws):
    a, b = connect_ws("a"), connect_ws("b")
    a.join("r", presence=True)
    b.join("r")
    assert a.recv_type(P.Presence).nick == "b"
    from wsproto.events import CloseConnection

    b.sock.sendall(b.ws.send(CloseConnection(code=1000, reason="bye now")))
    b.expect_closed()
    assert b.close_code == 1000  # the server echoed our code
    assert a.recv_type(P.Presence) == P.Presence(2, "r", "b", "")


def test_websocket_ping_is_answered_and_counts_as_liveness(server_factory, connect_ws):
    srv = server_factory("--ping-interval", "0.4", "--ping-timeout", "0.4")
    a = connect_ws("a", srv=srv)
    deadline = time.monotonic() + 1.6  # twice the idle limit
    while time.monotonic() < deadline:
        a.ping(b"are you there")
        a.sock.settimeout(1)
        a.frames.extend(P.decode(t, b) for t, b in a.feed(a.sock.recv(65536)))
        time.sleep(0.1)
    assert a.pongs and set(a.pongs) == {b"are you there"}
    assert not any(isinstance(f, (P.Error, P.ServerPing)) for f in a.frames)
    a.send(P.Ping(1))
    assert a.recv_type(P.ServerPong).nonce == 1  # still connected


def test_v2_hello_over_websocket(connect_ws):
    a = connect_ws(hello=False)
    w = a.hello("two", version=2)
    assert (w.version, w.resume_window_ms) == (2, 120000) and w.resume_token  # section 10


# ------------------------------------------------------------ interop


def test_websockets_library_speaks_our_frames(server):
    """An independent client (the ``websockets`` package) against the server."""
    url = f"ws://127.0.0.1:{server.port}/ws"
    with (
        ws_connect(url, subprotocols=["muxserver"], compression=None) as a,
        ws_connect(url, subprotocols=["muxserver"], compression=None) as b,
    ):
        assert a.subprotocol == "muxserver"

        def frames(ws, want: int) -> list:
            dec, got = FrameDecoder(), []
            while len(got) < want:
                message = ws.recv(timeout=10)
                assert isinstance(message, bytes)
                got += [P.decode(t, body) for t, body in dec.feed(message)]
                assert dec.buffered == 0
            return got

        a.send(P.encode(P.Hello(2, "/", "alice", "")))
        b.send(P.encode(P.Hello(2, "/", "bob", "")))
        assert frames(a, 1)[0].nick == "alice" and frames(b, 1)[0].nick == "bob"
        a.send(P.encode(P.Join(1, "r")) + P.encode(P.Join(2, "r", 0)))
        b.send(P.encode(P.Join(1, "r")))
        frames(a, 2)
        frames(b, 1)
        payload = json.dumps({"text": "hi", "n": 1}).encode()
        a.send(P.encode(P.Emit(3, 0, "r", "chat", payload, P.emit_flags(payload_type=2))))
        event = frames(b, 1)[0]
        assert (event.sender, event.event, json.loads(event.payload)) == (
            "alice",
            "chat",
            {"text": "hi", "n": 1},
        )
        assert event.source_kind >> P.EVENT_TYPE_SHIFT == P.PAYLOAD_JSON
        assert frames(a, 1)[0].status == P.OK
        b.send(P.encode(P.Bye()))
        with pytest.raises(Exception) as closed:
            b.recv(timeout=10)
        assert closed.value.rcvd.code == 1000


# ------------------------------------------------------------ output bookkeeping


class MemoryWs(WebSocketTransport):
    """A WebSocketTransport past its upgrade, over a FakeSocket."""

    __slots__ = ()

    def __init__(self, capacity: int) -> None:
        super().__init__(FakeSocket(), 1 << 20)
        key = b"dGhlIHNhbXBsZSBub25jZQ=="
        self.receive(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.flush(None)
        self.sock.sent.clear()
        self.sock.capacity = capacity

    def set_interest(self, loop, events: int) -> None:
        self.interest = events


def messages(wire: bytes) -> list[bytes]:
    """Split unmasked server frames (all final binary here) into their payloads."""
    out, pos = [], 0
    while pos < len(wire):
        assert wire[pos] == 0x82, wire[pos : pos + 2]
        n = wire[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            (n,) = struct.unpack_from(">H", wire, pos)
            pos += 2
        elif n == 127:
            (n,) = struct.unpack_from(">Q", wire, pos)
            pos += 8
        out.append(wire[pos : pos + n])
        pos += n
    assert pos == len(wire)
    return out


def frame(n: int) -> bytes:
    return P.encode(P.Emit(0, 0, "r", "e", b"x" * n))


def test_server_messages_are_at_most_1_mib_unless_one_frame_is_larger():
    frames = [frame(300_000) for _ in range(7)] + [frame(1_500_000)] + [frame(10)]
    data = b"".join(frames)
    parts = [bytes(p) for p in split_frames(data)]
    assert b"".join(parts) == data
    assert all(len(p) <= MAX_MESSAGE_OUT or p == frames[7] for p in parts)
    # 3 + 3 frames; the 7th alone (with the big one it would pass the bound); the big one; the tail.
    assert [len(p) for p in parts] == [3 * len(frames[0])] * 2 + [len(frames[0])] + [
        len(frames[7]),
        len(frames[8]),
    ]
    t = MemoryWs(1 << 26)
    t.out.extend(frames)
    assert t.flush(None) == 0
    got = messages(bytes(t.sock.sent))
    assert b"".join(got) == data and got == parts


@pytest.mark.parametrize("size", [10, 200, 70_000])  # 7-bit, 16-bit and 64-bit lengths
def test_shared_bytes_go_out_unchanged_behind_a_header(size):
    t = MemoryWs(1 << 20)
    parts = [frame(size) for _ in range(3)]
    data = b"".join(parts)
    t.out.extend(parts)
    assert t.flush(None, data) == 0
    assert bytes(t.sock.sent) == binary_header(len(data)) + data
    assert messages(bytes(t.sock.sent)) == [data]


def test_backlog_counts_headers_and_discard_keeps_the_message_whole():
    t = MemoryWs(1000)
    big = frame(5000)
    t.out.append(big)
    left = t.flush(None)
    assert left == len(binary_header(len(big))) + len(big) - 1000  # header bytes count
    t.out.append(frame(50))
    assert t.flush(None) == left + 2 + len(frame(50))
    dropped = t.discard_unsent()
    assert dropped == 2 + len(frame(50))  # the next message, its header included
    t.sock.capacity = 1 << 20
    assert t.on_writable(None) == 0
    assert messages(bytes(t.sock.sent)) == [big]  # the one in flight was finished


def test_discard_before_anything_was_sent_drops_everything():
    t = MemoryWs(0)
    t.out.append(frame(10))
    t.flush(None)
    assert t.discard_unsent() == 2 + len(frame(10))
    t.sock.capacity = 1 << 20
    assert t.on_writable(None) == 0 and t.sock.sent == b""


# ------------------------------------------------------------ fixture


@pytest.fixture
def connect_ws(server):
    clients: list[WsRawClient] = []

    def make(nick: str = "", hello: bool = True, srv=None) -> WsRawClient:
        client = WsRawClient((srv or server).address)
        clients.append(client)
        if hello:
            client.hello(nick)
        return client

    yield make
    for c in clients:
        c.close()


def test_load_test_client_over_websocket(server):
    """loadtests/wsclient.py: the blocking Client, unchanged above a WebSocket socket."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from loadtests.wsclient import WsClient

    a = WsClient.connect(*server.address, nick="alice")
    b = WsClient.connect(*server.address, nick="bob")
    try:
        assert hasattr(a.sock, "_ws_in")  # the upgraded socket, not a raw one
        a.join("r")
        b.join("r")
        assert a.emit("m", b"over ws", room="r", ack=True) == 1
        event = b.recv(timeout=10)
        assert (event.sender, event.payload) == ("alice", b"over ws")
        assert sorted(b.who("r")) == ["alice", "bob"]
    finally:
        a.close()
        b.close()


# ------------------------------ one write: the session's end, then the WebSocket layer's
def _one_write(address, frames: bytes):
    """Upgrade and send ``frames`` in the same write; the server's (protocol frames, Close)."""
    from tools.wsfuzz import WsWire

    sock = socket.create_connection(address, timeout=10)
    try:
        sock.sendall(upgrade_request(address) + frames)
        wire = WsWire(sock)
        deadline = time.monotonic() + 10
        wire.upgrade(deadline)
        wire.until(lambda: wire.close is not None, deadline)  # raises on any frame after it
        return wire.frames, wire.close
    finally:
        sock.close()


def _msg(*frames) -> bytes:
    from tools.wsfuzz import ws_frame

    return ws_frame(0x2, b"".join(P.encode(f) for f in frames), key=b"\x01\x02\x03\x04")


def test_answers_come_before_the_echo_of_a_close_in_the_same_read(server):
    from tools.wsfuzz import ws_frame

    close = ws_frame(0x8, struct.pack(">H", 3000) + b"done", key=b"\x09\x09\x09\x09")
    frames, (code, _) = _one_write(server.address, _msg(P.Hello(1, "/", "early", "")) + close)
    assert [type(f) for f in frames] == [P.Welcome]  # the WELCOME, then the echo, nothing after
    assert code == 3000


def test_an_error_before_a_websocket_violation_closes_with_4000_plus_its_code(server):
    from tools.wsfuzz import ws_frame

    bad = ws_frame(0x2, b"x", rsv=4, key=b"\x00\x00\x00\x00")  # RSV3: 1002 on its own
    frames, (code, reason) = _one_write(server.address, _msg(P.Ping(1)) + bad)
    assert frames[0].code == P.NOT_HELLO
    assert (code, reason) == (4000 + P.NOT_HELLO, "NOT_HELLO")


def test_bye_before_a_websocket_violation_closes_with_1000(server):
    from tools.wsfuzz import ws_frame

    bad = ws_frame(0xB, b"", key=b"\x00\x00\x00\x00")  # unknown opcode: 1002 on its own
    frames, (code, _) = _one_write(server.address, _msg(P.Hello(1, "/", "", ""), P.Bye()) + bad)
    assert [type(f) for f in frames] == [P.Welcome]
    assert code == 1000


def test_a_violation_alone_still_closes_with_1002(server):
    from tools.wsfuzz import ws_frame

    frames, (code, _) = _one_write(server.address, ws_frame(0x2, b"x", mask=False))
    assert frames == [] and code == 1002
