"""Input memory bound and frame timeout (limits.py): pure budget, fake-time server, real process."""

import socket
import time

import pytest
from conftest import RawClient

from muxserver import protocol as P
from muxserver.cli import resolve
from muxserver.framing import FrameDecoder, encode_frame
from muxserver.limits import InputBudget
from muxserver.session import CLOSED, DRAINING, OPEN
from muxserver.stats import render_metrics
from muxserver.testing import MemoryPair, memory_server


# ------------------------------------------------------------ the budget
def test_budget_counts_grows_and_releases():
    b = InputBudget(100)
    assert not b.grow("a", 40, 1.0)
    assert not b.grow("b", 50, 2.0)
    assert b.grow("a", 20, 3.0)  # 110 > 100
    assert b.total == 110 and b.held == {"a": 60, "b": 50} and b.peak == 110
    assert b.largest() == "a"
    assert b.since["a"] == 1.0  # the frame started at the first grow
    assert b.release("a") == 60
    assert b.total == 50 and not b.over
    assert b.release("a") == 0 and b.total == 50


def test_budget_update_restarts_the_frame_clock_only_for_a_fresh_frame():
    b = InputBudget(1000)
    b.update("a", 10, False, 1.0)
    b.update("a", 30, False, 5.0)  # the same frame grew
    assert b.held["a"] == 30 and b.since["a"] == 1.0
    b.update("a", 7, True, 9.0)  # it completed, and a new one began
    assert b.held["a"] == 7 and b.since["a"] == 9.0 and b.total == 7
    b.update("a", 0, True, 10.0)
    assert b.total == 0 and "a" not in b.held and "a" not in b.since


def test_budget_expired():
    b = InputBudget(1000)
    b.grow("old", 1, 0.0)
    b.grow("new", 1, 20.0)
    assert b.expired(30.0, 30.0) == ["old"]


# ------------------------------------------------ the server on fake time
def client(server, nick, room="r"):
    c = MemoryPair(server)
    c.send(P.Hello(1, "/", nick, ""))
    c.send(P.Join(1, room))
    assert [type(f) for f in c.frames()] == [P.Welcome, P.Reply]
    return c


def emit(text: str, size: int = 0) -> bytes:
    return P.encode(P.Emit(0, P.TARGET_ROOM, "r", "m", text.encode() + b"x" * size))


@pytest.fixture
def srv():
    server, clock = memory_server(max_input_memory=10_000, max_frame=8192, frame_timeout=30)
    server.clock = clock
    return server


def test_largest_incomplete_frame_is_cut_and_nobody_else(srv):
    a, b, c, healthy = (client(srv, n) for n in ("a", "b", "c", "healthy"))
    fa, fb, fc = emit("a", 6000), emit("b", 7000), emit("c", 6000)
    a.send_raw(fa[:3000])
    b.send_raw(fb[:5000])
    # The budget counts the memory of each partial frame: its buffer's capacity.
    assert 3000 < a.transport.held < 3000 * 9 // 8 and 5000 < b.transport.held < 5000 * 9 // 8
    assert srv.limits.budget.total == a.transport.held + b.transport.held
    c.send_raw(fc[:2500])  # over 10,500 > 10,000: b holds the most
    [err] = b.frames()
    assert err == P.Error(P.LIMIT, "server input memory full")
    assert b.session.state == DRAINING
    assert b.transport.held == 0  # its partial frame is freed at once
    budget = srv.limits.budget
    assert budget.total == a.transport.held + c.transport.held
    assert set(budget.held) == {a.session, c.session}
    assert srv.stats["input_memory_cuts"] == 1
    # The others finish their frames and are delivered as if nothing happened.
    a.send_raw(fa[3000:])
    c.send_raw(fc[2500:])
    got = [(e.sender, len(e.payload)) for e in healthy.frames()]
    assert got == [("a", 6001), ("c", 6001)]
    assert a.session.state == c.session.state == OPEN
    assert budget.total == 0 and not budget.held


def test_memory_held_by_a_closing_connection_is_released(srv):
    a = client(srv, "a")
    a.send_raw(P.encode(P.Bye()) + emit("a", 5000)[:3000])
    assert a.transport.held == 0 and srv.limits.budget.total == 0
    b = client(srv, "b")
    b.send_raw(emit("b", 5000)[:3000])
    assert srv.limits.budget.total == b.transport.held > 3000
    b.close()
    assert b.session.state == CLOSED and srv.limits.budget.total == 0


def test_frame_timeout_on_fake_time(srv):
    a = client(srv, "a")
    frame = emit("a", 5000)
    a.send_raw(frame[:1000])
    srv.clock.advance(29)
    a.send_raw(frame[1000:2000])  # still the same frame: its clock keeps running
    srv.limits.sweep(srv.loop.time())
    assert a.frames() == []
    srv.clock.advance(1)
    srv.limits.sweep(srv.loop.time())
    [err] = a.frames()
    assert err == P.Error(P.IDLE_TIMEOUT, "frame not complete after 30 s")
    assert srv.stats["frame_timeouts"] == 1 and srv.limits.budget.total == 0


def test_a_busy_stream_that_always_ends_mid_frame_is_not_timed_out(srv):
    a, healthy = client(srv, "a"), client(srv, "healthy")
    frames = [emit(str(i), 3000) for i in range(6)]
    stream = b"".join(frames)
    step = len(frames[0])
    a.send_raw(stream[: step // 2])
    for i in range(1, 6):
        srv.clock.advance(20)  # each frame takes 20 s, the partials last 100 s
        srv.limits.sweep(srv.loop.time())
        a.send_raw(stream[step * i - step // 2 : step * i + step // 2])
        assert srv.limits.budget.held  # every read ended inside the next frame
    a.send_raw(stream[step * 6 - step // 2 :])
    assert [e.payload[:1] for e in healthy.frames()] == [str(i).encode() for i in range(6)]
    assert a.session.state == OPEN and srv.stats["frame_timeouts"] == 0


def test_metrics_show_the_budget(srv):
    a = client(srv, "a")
    a.send_raw(emit("a", 5000)[:1234])
    page = render_metrics(srv.snapshot())
    assert a.transport.held > 1234  # the buffer's capacity
    assert f"muxserver_input_held_bytes {a.transport.held}" in page
    assert "muxserver_input_held_connections 1" in page
    assert "muxserver_input_memory_limit_bytes 10000" in page
    assert "muxserver_input_memory_cuts_total 0" in page
    assert "muxserver_frame_timeouts_total 0" in page


def test_options_and_environment():
    values = resolve(["--frame-timeout", "2.5"], environ={"MUXSERVER_MAX_INPUT_MEMORY": "4096"})
    assert values["max_input_memory"] == 4096 and values["frame_timeout"] == 2.5
    defaults = resolve([], environ={})
    assert defaults["max_input_memory"] == 256 * 1024 * 1024 and defaults["frame_timeout"] == 30.0


# ------------------------------------------------------ a real process
def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _joined(address, nick: str) -> RawClient:
    c = RawClient(address)
    c.hello(nick)
    assert c.request(P.Join(c.next_req(), "r")).status == P.OK
    return c


def test_partial_frame_attack_stays_under_the_bound(server_factory):
    """100 connections each send half of a 1 MiB frame (50 MiB) against an 8 MiB bound."""
    bound = 8 << 20
    srv = server_factory("--max-input-memory", str(bound), "--log-level", "warning")
    sender, receiver = _joined(srv.address, "sender"), _joined(srv.address, "receiver")
    half = encode_frame(P.EMIT, b"\0" * ((1 << 20) - 1))[: 512 * 1024]
    hello = P.encode(P.Hello(1, "/", "", "")) + P.encode(P.Join(1, "r"))
    base = peak = _rss(srv.pid)
    attackers, sent = [], []
    try:
        for i in range(100):
            s = socket.create_connection(srv.address, timeout=10)
            attackers.append(s)
            s.sendall(hello + half)
            if i % 10 == 9:
                sent.append(f"m{i}")
                sender.send(P.Emit(0, P.TARGET_ROOM, "r", "m", sent[-1].encode()))
                time.sleep(0.05)  # let the server read what is in flight
                peak = max(peak, _rss(srv.pid))
        for _ in range(10):
            time.sleep(0.05)
            peak = max(peak, _rss(srv.pid))
        got = [receiver.recv_type(P.Event).payload.decode() for _ in sent]
        assert got == sent  # the healthy client in the same room got every message
        growth = peak - base
        assert growth < 20 << 20, f"server grew by {growth >> 20} MiB for an 8 MiB bound"
        cut = 0
        for s in attackers:
            s.settimeout(0.2)
            try:
                data = s.recv(65536)
            except (TimeoutError, OSError):
                continue  # still held: never disturbed
            frames = [P.decode(t, b) for t, b in FrameDecoder(1 << 20).feed(data)]
            if any(isinstance(f, P.Error) and f.code == P.LIMIT for f in frames):
                cut += 1
        # 8 MiB holds 16 halves; everyone past that was cut (a few more may
        # have been cut while their half was still arriving).
        assert 100 - 17 <= cut <= 100 - 12, cut
    finally:
        for s in attackers:
            s.close()


def test_slow_body_gets_idle_timeout(server_factory):
    srv = server_factory("--frame-timeout", "0.5", "--log-level", "warning")
    c = RawClient(srv.address)
    c.hello("slow")
    t0 = time.monotonic()
    c.send_raw(encode_frame(P.EMIT, b"\0" * 100)[:50])
    err = c.expect_error(P.IDLE_TIMEOUT, timeout=5)
    assert err.message == "frame not complete after 0.5 s"
    assert 0.4 < time.monotonic() - t0 < 3


# ------------------------------------------------- memory per connection
def test_an_idle_connection_costs_about_1_kib():
    """tracemalloc over 2,000 idle clients (HELLO v1 + JOIN): main before issue 15 had 1,900+."""
    from tools.connmem import measure

    m = measure(2000)
    top = ", ".join(
        f"{s.traceback[0].filename.rsplit('/', 1)[-1]}:{s.traceback[0].lineno} "
        f"{s.size_diff / 2000:.0f}"
        for s in m["lines"][:8]
    )
    assert m["traced"] < 1100, f"{m['traced']:.0f} B per connection; biggest: {top}"


def test_unfinished_websocket_messages_count_against_the_bound(server_factory):
    """The bound covers incomplete WebSocket messages too (transport.held)."""
    from conftest import WsRawClient
    from wsproto.events import Message

    srv = server_factory("--max-input-memory", "300000", "--log-level", "warning")
    small, big, receiver = (
        WsRawClient(srv.address),
        WsRawClient(srv.address),
        _joined(srv.address, "receiver"),
    )
    for c, nick in ((small, "small"), (big, "big")):
        c.hello(nick)
        assert c.request(P.Join(c.next_req(), "r")).status == P.OK
    frame = P.encode(P.Emit(0, P.TARGET_ROOM, "r", "m", b"s" * 250_000))
    small.sock.sendall(small.ws.send(Message(data=frame[:150_000], message_finished=False)))
    time.sleep(0.2)
    big.sock.sendall(big.ws.send(Message(data=b"\0" * 200_000, message_finished=False)))
    err = big.expect_error(P.LIMIT)  # 350,000 > 300,000: big holds the most
    assert err.message == "server input memory full"
    small.sock.sendall(small.ws.send(Message(data=frame[150_000:], message_finished=True)))
    event = receiver.recv_type(P.Event)
    assert (event.sender, len(event.payload)) == ("small", 250_000)
