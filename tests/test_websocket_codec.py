"""muxserver.transport.websocket: the HTTP front door, inbound messages, outbound headers.

Every decision of section 11 is checked on bytes alone; the peer's side is
a real wsproto client (for the upgrade and for decoding what we build) and
h11 (for reading plain HTTP answers), so a response "looks right" only if
independent parsers accept it.
"""

from __future__ import annotations

import tracemalloc

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol, Opcode

from muxserver.transport.websocket import (
    MAX_HEAD,
    Binary,
    Closed,
    Fail,
    HttpFront,
    Respond,
    Send,
    Text,
    Upgraded,
    WsInbound,
    binary_header,
    close_frame,
    looks_like_http,
)

HOST = "chat.example:8000"


# ------------------------------------------------------------- helpers
def upgrade_request(
    host: str = HOST,
    origin: str | None = None,
    subprotocols: tuple[str, ...] = ("muxserver",),
    target: str = "/ws",
) -> tuple[WSConnection, bytes]:
    client = WSConnection(ConnectionType.CLIENT)
    extra = [(b"Origin", origin.encode())] if origin is not None else []
    data = client.send(
        Request(host=host, target=target, subprotocols=list(subprotocols), extra_headers=extra)
    )
    return client, data


def http_answer(decision) -> tuple[h11.Response, bytes]:
    """Parse a Respond with a real HTTP client parser: (response, body)."""
    assert isinstance(decision, Respond), decision
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(decision.data)
    resp = conn.next_event()
    assert isinstance(resp, h11.Response)
    body = b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Data):
            body += ev.data
        else:
            assert isinstance(ev, h11.EndOfMessage)
            break
    headers = {k.lower(): v for k, v in resp.headers}
    assert headers[b"connection"] == b"close"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert resp.status_code == decision.status
    return resp, body


def status_of(decision) -> int:
    return http_answer(decision)[0].status_code


def get(path: str, method: str = "GET", **front_args) -> Respond:
    front = HttpFront(**front_args)
    return front.feed(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())


def upgraded(origin: str | None = None, **front_args):
    """A wsproto client and the server's decision for its upgrade."""
    client, req = upgrade_request(origin=origin)
    decision = HttpFront(**front_args).feed(req)
    return client, decision


def open_pair(max_message: int = 1 << 20, text: bool = False) -> tuple[WSConnection, WsInbound]:
    client, decision = upgraded()
    assert isinstance(decision, Upgraded)
    client.receive_data(decision.data)
    assert isinstance(next(client.events()), AcceptConnection)
    inbound = WsInbound(max_message, text=text)
    assert inbound.feed(decision.leftover) == []
    return client, inbound


def client_frames(data: bytes) -> list:
    """Decode server->client bytes with wsproto's own parser."""
    client, _ = open_pair()
    client.receive_data(data)
    return list(client.events())


def masked(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    """One client frame (masked) built by wsproto's frame layer."""
    proto = FrameProtocol(client=True, extensions=[])
    return bytes(proto._serialize_frame(opcode, payload, fin=fin))


# ------------------------------------------------------------- sniffing
@pytest.mark.parametrize("first", [b"GET ", b"POST", b"HEAD", b"PUT ", b"A   ", b"OPTI"])
def test_sniff_http(first: bytes) -> None:
    assert looks_like_http(first)


@pytest.mark.parametrize(
    "first", [b"\x00\x00\x00\x10", b"get ", b" GET", b"G\x00\x00\x00", b"GE", b"G1T ", b"GeT "]
)
def test_sniff_not_http(first: bytes) -> None:
    assert not looks_like_http(first)


# ------------------------------------------------------------- upgrade
def test_upgrade_101_with_subprotocol_and_leftover() -> None:
    client, req = upgrade_request()
    frame = masked(Opcode.BINARY, b"\x00\x00\x00\x01\x0a")
    decision = HttpFront().feed(req + frame)
    assert isinstance(decision, Upgraded)
    assert decision.data.startswith(b"HTTP/1.1 101 ")
    assert decision.subprotocol == "muxserver"
    assert decision.leftover == frame
    client.receive_data(decision.data)
    (accept,) = list(client.events())
    assert isinstance(accept, AcceptConnection) and accept.subprotocol == "muxserver"
    assert WsInbound(1024).feed(decision.leftover) == [Binary(b"\x00\x00\x00\x01\x0a")]


def test_upgrade_without_subprotocol_selects_none() -> None:
    client, req = upgrade_request(subprotocols=())
    decision = HttpFront().feed(req)
    assert isinstance(decision, Upgraded) and decision.subprotocol is None
    assert b"sec-websocket-protocol" not in decision.data.lower()
    client.receive_data(decision.data)
    assert isinstance(next(client.events()), AcceptConnection)


def test_upgrade_fed_one_byte_at_a_time() -> None:
    client, req = upgrade_request()
    front = HttpFront()
    decisions = [front.feed(req[i : i + 1]) for i in range(len(req))]
    assert all(d is None for d in decisions[:-1])
    assert isinstance(decisions[-1], Upgraded) and decisions[-1].leftover == b""
    assert front.feed(b"more") is None  # decided once


def test_upgrade_when_full_is_still_accepted() -> None:
    _, decision = upgraded(full=True)
    assert isinstance(decision, Upgraded)


def test_upgrade_with_web_off_is_still_accepted() -> None:
    _, decision = upgraded(web=False)
    assert isinstance(decision, Upgraded)


def test_bad_version_is_426() -> None:
    req = (
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
    )
    resp, _ = http_answer(HttpFront().feed(req))
    assert resp.status_code == 426
    assert (b"sec-websocket-version", b"13") in [(k.lower(), v) for k, v in resp.headers]


@pytest.mark.parametrize(
    "req",
    [
        # no Sec-WebSocket-Key
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
        # no Connection: Upgrade
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        # plain GET of the WebSocket path
        b"GET /ws HTTP/1.1\r\nHost: h\r\n\r\n",
        # an upgrade with a body
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Content-Length: 1000000\r\n\r\n",
    ],
)
def test_broken_upgrade_is_400(req: bytes) -> None:
    assert status_of(HttpFront().feed(req)) == 400


# --------------------------------------------------------------- origin
@pytest.mark.parametrize(
    "origin, tls, allowed, ok",
    [
        (None, False, (), True),  # not a browser
        (f"http://{HOST}", False, (), True),  # own origin
        ("HTTP://Chat.Example:8000", False, (), True),  # case-insensitive
        (f"https://{HOST}", True, (), True),  # own origin over TLS
        (f"https://{HOST}", False, (), False),  # scheme differs
        (f"http://{HOST}", True, (), False),
        ("http://chat.example:8001", False, (), False),  # port differs
        ("http://evil.example:8000", False, (), False),  # foreign
        ("null", False, (), False),
        ("http://app.example", False, ("http://app.example",), True),  # listed
        ("http://app.example:80", False, ("http://app.example",), True),  # default port
        ("http://app.example", False, ("https://app.example",), False),
        ("http://evil.example", False, ("*",), True),  # any
        ("null", False, ("*",), True),
    ],
)
def test_origin_rule(origin, tls: bool, allowed, ok: bool) -> None:
    _, decision = upgraded(origin=origin, tls=tls, allowed_origins=allowed)
    if ok:
        assert isinstance(decision, Upgraded)
    else:
        resp, body = http_answer(decision)
        assert resp.status_code == 403 and b"origin" in body


def test_own_origin_with_default_port() -> None:
    client, req = upgrade_request(host="chat.example", origin="http://chat.example:80")
    assert isinstance(HttpFront().feed(req), Upgraded)
    client, req = upgrade_request(host="chat.example:443", origin="https://chat.example")
    assert isinstance(HttpFront(tls=True).feed(req), Upgraded)


# ---------------------------------------------------------- plain HTTP
@pytest.mark.parametrize(
    "path, name, ctype",
    [
        ("/", "index.html", b"text/html"),
        ("/muxclient.js", "muxclient.js", b"text/javascript"),
        ("/muxcodec.js", "muxcodec.js", b"text/javascript"),
        ("/chat.js", "chat.js", b"text/javascript"),
        ("/chat.css", "chat.css", b"text/css"),
    ],
)
def test_static_files(path: str, name: str, ctype: bytes) -> None:
    from importlib import resources

    resp, body = http_answer(get(path))
    assert resp.status_code == 200
    headers = {k.lower(): v for k, v in resp.headers}
    assert headers[b"content-type"].startswith(ctype)
    assert body == resources.files("muxserver.web").joinpath(name).read_bytes()
    assert len(body) > 100  # the real page, not a placeholder
    # web off: the page is gone (the upgrade stays, tested above)
    assert status_of(get(path, web=False)) == 404


@pytest.mark.parametrize("path", ["/nope", "/ws/x", "/../etc/passwd", "/muxclient.js.map"])
def test_other_paths_404(path: str) -> None:
    resp, body = http_answer(get(path))
    assert resp.status_code == 404 and body.startswith(b"not found")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD", "OPTIONS"])
def test_other_methods_405(method: str) -> None:
    resp, _ = http_answer(get("/", method=method))
    assert resp.status_code == 405
    assert (b"allow", b"GET") in [(k.lower(), v) for k, v in resp.headers]


def test_full_server_answers_plain_http_503() -> None:
    assert status_of(get("/", full=True)) == 503
    assert status_of(get("/nope", full=True)) == 503


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
    ],
)
def test_malformed_400(raw: bytes) -> None:
    resp, body = http_answer(HttpFront().feed(raw))
    assert resp.status_code == 400 and body.startswith(b"bad request")


def test_head_over_16k_incomplete_in_pieces_is_431() -> None:
    front = HttpFront()
    assert front.feed(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    decision = None
    sent = 0
    while decision is None:
        decision = front.feed(line)
        sent += len(line)
        assert sent < MAX_HEAD + 2 * len(line)
    assert status_of(decision) == 431


def test_head_over_16k_complete_in_one_read_is_431() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    assert status_of(HttpFront().feed(raw)) == 431


def test_head_just_under_16k_is_served() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: \r\n\r\n"
    raw = head.replace(b"X-Big: ", b"X-Big: " + b"a" * (MAX_HEAD - len(head)))
    assert len(raw) == MAX_HEAD
    assert status_of(HttpFront().feed(raw)) == 200


def test_eof() -> None:
    assert HttpFront().feed(b"") == Respond(b"", 0)
    front = HttpFront()
    assert front.feed(b"GET / HT") is None
    assert status_of(front.feed(b"")) == 400


# ------------------------------------------------------------- inbound
def test_inbound_whole_bytewise_and_trailing() -> None:
    client, inbound = open_pair()
    stream = (
        client.send(Message(data=b"one"))
        + client.send(Message(data=b"two" * 100))
        + client.send(Message(data=b"three" * 30000))
    )
    expected = [Binary(b"one"), Binary(b"two" * 100), Binary(b"three" * 30000)]
    assert inbound.feed(stream) == expected

    _, inbound = open_pair()
    got = []
    for i in range(len(stream)):
        got += inbound.feed(stream[i : i + 1])
    assert got == expected

    # trailing bytes: two messages and the start of a third in one read
    _, inbound = open_pair()
    cut = len(stream) - 1000
    assert inbound.feed(stream[:cut]) == expected[:2]
    assert inbound.buffered > 0
    assert inbound.feed(stream[cut:]) == expected[2:]
    assert inbound.buffered == 0


def test_fragments_with_control_frames_between() -> None:
    _, inbound = open_pair()
    data = (
        masked(Opcode.BINARY, b"ab", fin=False)
        + masked(Opcode.PING, b"p1")
        + masked(Opcode.CONTINUATION, b"cd", fin=False)
        + masked(Opcode.PONG, b"unsolicited")
        + masked(Opcode.CONTINUATION, b"ef", fin=True)
    )
    events = inbound.feed(data)
    assert len(events) == 2
    assert isinstance(events[0], Send)
    assert client_frames(events[0].data) == [Pong(payload=b"p1")]
    assert events[1] == Binary(b"abcdef")


def test_ping_gets_pong() -> None:
    client, inbound = open_pair()
    (send,) = inbound.feed(client.send(Ping(payload=b"nonce")))
    client.receive_data(send.data)
    assert list(client.events()) == [Pong(payload=b"nonce")]


def test_text_is_1003_unless_allowed() -> None:
    client, inbound = open_pair()
    assert inbound.feed(client.send(TextMessage(data="hi"))) == [
        Fail(1003, "text messages are not supported")
    ]
    assert inbound.feed(client.send(Message(data=b"x"))) == []  # over
    client, inbound = open_pair(text=True)
    assert inbound.feed(client.send(TextMessage(data="héllo"))) == [Text("héllo")]


def test_oversized_message_refused_early_with_bounded_memory() -> None:
    cap = 1 << 20
    client, inbound = open_pair(max_message=cap)
    declared = 10 * 1024 * 1024
    header = masked(Opcode.BINARY, b"\x00" * declared)  # a real 10 MiB frame
    chunk = 64 * 1024
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fed = 0
        events: list = []
        while not events:
            events = inbound.feed(header[fed : fed + chunk])
            fed += chunk
            assert inbound.buffered <= cap
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert events == [Fail(4006, "TOO_LARGE", 6)]
    assert fed <= cap + 2 * chunk  # decided once the cap was passed, not at the end
    assert peak < 4 * cap
    assert inbound.feed(header[fed : fed + chunk]) == []


def test_oversized_across_fragments() -> None:
    _, inbound = open_pair(max_message=100)
    data = masked(Opcode.BINARY, b"a" * 60, fin=False) + masked(
        Opcode.CONTINUATION, b"b" * 60, fin=True
    )
    assert inbound.feed(data) == [Fail(4006, "TOO_LARGE", 6)]
    _, inbound = open_pair(max_message=100)
    assert inbound.feed(masked(Opcode.BINARY, b"a" * 100)) == [Binary(b"a" * 100)]


def test_close_handshake_peer_first() -> None:
    client, inbound = open_pair()
    events = inbound.feed(client.send(CloseConnection(code=1000, reason="bye")))
    assert events[1] == Closed(1000, "bye")
    client.receive_data(events[0].data)
    (reply,) = list(client.events())
    assert isinstance(reply, CloseConnection) and reply.code == 1000
    assert inbound.feed(masked(Opcode.BINARY, b"late")) == []


def test_close_without_code_is_answered_without_code() -> None:
    _, inbound = open_pair()
    events = inbound.feed(masked(Opcode.CLOSE, b""))
    assert events == [Send(b"\x88\x00"), Closed(1005, "")]


def test_close_handshake_server_first() -> None:
    client, inbound = open_pair()
    ours = inbound.close(4013, "SLOW_CONSUMER")
    client.receive_data(ours)
    (ev,) = list(client.events())
    assert (ev.code, ev.reason) == (4013, "SLOW_CONSUMER")
    # data after our Close is discarded; the peer's Close is reported, not answered
    assert inbound.feed(masked(Opcode.BINARY, b"late")) == []
    assert inbound.feed(client.send(ev.response())) == [Closed(4013, "SLOW_CONSUMER")]


def test_bad_close_payloads() -> None:
    _, inbound = open_pair()
    (fail,) = inbound.feed(masked(Opcode.CLOSE, b"\x03\xe8\xff\xfe"))  # 1000 + bad UTF-8
    assert isinstance(fail, Fail) and fail.close_code == 1007
    _, inbound = open_pair()
    (fail,) = inbound.feed(masked(Opcode.CLOSE, b"\x03\xe7"))  # code 999
    assert isinstance(fail, Fail) and fail.close_code == 1002
    _, inbound = open_pair()
    (fail,) = inbound.feed(masked(Opcode.CLOSE, b"\x03"))  # one byte
    assert isinstance(fail, Fail) and fail.close_code == 1002


def test_unmasked_client_frame_fails() -> None:
    _, inbound = open_pair()
    (fail,) = inbound.feed(binary_header(3) + b"abc")
    assert isinstance(fail, Fail) and fail.close_code == 1002


# ------------------------------------------------------------ outbound
@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_binary_header_decodes(n: int) -> None:
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    events = client_frames(binary_header(n) + payload + binary_header(2) + b"ok")
    assert [e.data for e in events if isinstance(e, BytesMessage)] == [payload, b"ok"]
    assert all(e.message_finished for e in events)


def test_close_frame_decodes_and_truncates_on_a_character() -> None:
    (ev,) = client_frames(close_frame(4011, "LIMIT"))
    assert (ev.code, ev.reason) == (4011, "LIMIT")
    frame = close_frame(1000, "é" * 100)  # 200 bytes of reason: cut to fit 125
    assert len(frame) <= 127
    (ev,) = client_frames(frame)
    assert ev.code == 1000 and ev.reason == "é" * 61


# ------------------------------------------------------------ property
EVENT_TYPES = (Binary, Send, Closed, Fail)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_random_bytes_give_only_handled_events(data: bytes, step: int) -> None:
    _, inbound = open_pair(max_message=200)
    for i in range(0, len(data), step):
        for ev in inbound.feed(data[i : i + step]):
            assert isinstance(ev, EVENT_TYPES)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_random_http_gives_a_decision_or_waits(chunks: list[bytes]) -> None:
    front = HttpFront()
    for chunk in [b"GET /ws HTTP/1.1\r\n", *chunks, b""]:
        decision = front.feed(chunk)
        assert decision is None or isinstance(decision, (Respond, Upgraded))
        if decision is not None:
            break


def test_rejectconnection_is_never_needed_by_clients() -> None:
    # A refused upgrade is a plain HTTP answer the wsproto client can read.
    client, req = upgrade_request(origin="http://evil.example")
    decision = HttpFront().feed(req)
    client.receive_data(decision.data)
    ev = next(client.events())
    assert isinstance(ev, RejectConnection) and ev.status_code == 403
