"""loop timers and the server's heartbeat logic on a fake clock.

These run in milliseconds: nothing waits for real time to pass.
"""

import signal
import socket

from muxserver import protocol as P
from muxserver.framing import FrameDecoder
from muxserver.loop import EVENT_READ, EventLoop
from muxserver.server import Config, Server
from muxserver.session import ALIVE, CLOSED, SEND_PING, TIMED_OUT, liveness
from muxserver.testing import FakeClock


def test_timers_fire_in_order_on_fake_time():
    clock = FakeClock()
    loop = EventLoop(clock)
    fired = []
    loop.call_later(2, fired.append, "b")
    loop.call_later(1, fired.append, "a")
    t = loop.call_later(1.5, fired.append, "cancelled")
    t.cancel()
    assert loop.run_timers() == 0
    clock.advance(1)
    loop.run_timers()
    assert fired == ["a"]
    assert loop.next_timeout() == 1.0
    clock.advance(5)
    loop.run_timers()
    assert fired == ["a", "b"]
    assert loop.next_timeout() is None
    loop.close()


def test_before_sleep_hook_runs_each_turn():
    loop = EventLoop(FakeClock())
    turns = []
    loop.add_before_sleep(lambda: turns.append(1))
    loop.run_once(timeout=0)
    loop.run_once(timeout=0)
    assert len(turns) == 2
    loop.close()


def test_signal_wakes_the_loop_and_reaches_handler():
    loop = EventLoop()
    seen = []
    loop.handle_signals([signal.SIGUSR1], seen.append)
    signal.raise_signal(signal.SIGUSR1)
    loop.run_once(timeout=5)  # returns at once: the wake-up fd is readable
    assert seen == [signal.SIGUSR1]
    loop.close()
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_liveness_rule():
    # interval 25, timeout 20
    assert liveness(10, 0, 0, 25, 20) == ALIVE
    assert liveness(25, 0, 0, 25, 20) == SEND_PING
    assert liveness(30, 0, 25, 25, 20) == ALIVE  # already pinged
    assert liveness(45, 0, 25, 25, 20) == TIMED_OUT
    assert liveness(60, 40, 25, 25, 20) == ALIVE  # answered


def read_frames(sock, decoder):
    sock.setblocking(False)
    frames = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return frames
        if not data:
            frames.append("EOF")
            return frames
        frames += [P.decode(t, b) for t, b in decoder.feed(data)]


def make_server(**cfg):
    clock = FakeClock()
    server = Server(Config(port=0, **cfg), EventLoop(clock))
    server.start()
    return server, clock


def fake_client(server, nick):
    ours, theirs = socket.socketpair()
    conn = server.adopt(theirs)
    ours.sendall(P.encode(P.Hello(1, "/", nick, "")))
    server.loop.run_once(timeout=0)
    server.loop.run_once(timeout=0)
    dec = FrameDecoder()
    [welcome] = read_frames(ours, dec)
    assert isinstance(welcome, P.Welcome)
    return ours, dec, conn


def test_heartbeat_ping_then_idle_timeout_on_fake_time():
    server, clock = make_server(ping_interval=25, ping_timeout=20)
    sock, dec, conn = fake_client(server, "sleepy")
    clock.advance(24)
    server.loop.run_once(timeout=0)
    assert read_frames(sock, dec) == []
    clock.advance(1.5)
    server.loop.run_once(timeout=0)
    server.loop.run_once(timeout=0)
    [ping] = read_frames(sock, dec)
    assert isinstance(ping, P.ServerPing)
    clock.advance(20)
    server.loop.run_once(timeout=0)
    server.loop.run_once(timeout=0)
    frames = read_frames(sock, dec)
    assert frames[0] == P.Error(P.IDLE_TIMEOUT, frames[0].message)
    assert frames[-1] == "EOF"  # half-closed after the error
    sock.close()
    server.close()


def test_answering_keeps_the_connection_alive():
    server, clock = make_server(ping_interval=25, ping_timeout=20)
    sock, dec, conn = fake_client(server, "awake")
    for _ in range(10):
        clock.advance(26)
        server.loop.run_once(timeout=0)
        server.loop.run_once(timeout=0)
        frames = read_frames(sock, dec)
        assert all(isinstance(f, P.ServerPing) for f in frames) and frames
        sock.sendall(P.encode(P.Pong(frames[-1].nonce)))
        server.loop.run_once(timeout=0)
    assert conn.state != CLOSED
    sock.close()
    server.close()


def test_hello_timeout_on_fake_time():
    server, clock = make_server(hello_timeout=10)
    ours, theirs = socket.socketpair()
    server.adopt(theirs)
    ours.sendall(b"\x00\x00")  # a trickle, never a whole HELLO
    server.loop.run_once(timeout=0)
    clock.advance(10.5)
    server.loop.run_once(timeout=0)
    server.loop.run_once(timeout=0)
    frames = read_frames(ours, FrameDecoder())
    assert frames[0].code == P.IDLE_TIMEOUT and frames[-1] == "EOF"
    ours.close()
    server.close()


def test_fd_callbacks_and_an_fd_reused_after_a_close_without_unregister():
    loop = EventLoop()
    seen = []
    a, b = socket.socketpair()
    loop.register(a, EVENT_READ, lambda mask: seen.append(("a", mask)))
    b.send(b"x")
    loop.run_once(timeout=1)
    assert seen == [("a", EVENT_READ)] and loop.watched == 1
    fd = a.fileno()
    a.close()  # the kernel drops it from epoll; our table still has it
    c, d = socket.socketpair()
    assert fd in (c.fileno(), d.fileno())
    reused = c if c.fileno() == fd else d
    other = d if reused is c else c
    loop.register(reused, EVENT_READ, lambda mask: seen.append(("reused", mask)))
    assert loop.watched == 1
    other.send(b"y")
    loop.run_once(timeout=1)
    assert seen[-1] == ("reused", EVENT_READ)
    loop.unregister(reused)
    assert loop.watched == 0
    loop.close()
    for s in (b, c, d):
        s.close()
