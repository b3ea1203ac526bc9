"""The Redis link (muxserver/backplane) against a real redis-server on 127.0.0.1.

Each test starts its own redis-server on a free port (no persistence) and
drives a real EventLoop until a condition holds, bounded by a deadline: a hang
is a failure, never a stuck run. A missing redis-server fails the tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
import trustme

from muxserver import protocol as P
from muxserver.backplane import RedisError, RedisLink, Script, parse_url
from muxserver.backplane.keys import SEQ_EVENTS, split_origin
from muxserver.backplane.redis import CLOSED, DOWN, UP
from muxserver.backplane.scripts import (
    parse_run,
    room_base,
    room_join,
    room_range,
    room_run,
    split_frames,
)
from muxserver.listener import listening_socket
from muxserver.loop import EVENT_READ, EventLoop

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, tmp_path, *extra: str) -> None:
        if not os.access(REDIS_SERVER, os.X_OK):
            pytest.fail(
                f"redis-server not found at {REDIS_SERVER}: apt-get install -y redis-server"
            )
        self.port = free_port()
        self.dir = tmp_path
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"redis-server on port {self.port} did not start"
                    ) from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    if server.proc.poll() is None:
        server.signal(signal.SIGCONT)  # in case a test left it stopped
    server.kill()


_LINKS: list[RedisLink] = []


def new_link(loop: EventLoop, url: str, **kwargs) -> RedisLink:
    """A RedisLink that the ``loop`` fixture closes after the test."""
    link = RedisLink(loop, url, **kwargs)
    _LINKS.append(link)
    return link


@pytest.fixture
def loop():
    loop = EventLoop()
    yield loop
    while _LINKS:
        _LINKS.pop().close()
    loop.close()


def run_until(loop: EventLoop, cond, timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        loop.run_once(0.02)


def up_link(loop, url, **kwargs) -> RedisLink:
    link = new_link(loop, url, **kwargs)
    link.start()
    run_until(loop, lambda: link.up, what="link up")
    return link


def wait_replies(loop, link, *commands, timeout: float = 3.0) -> list:
    out: list = []
    for cmd in commands:
        link.call(*cmd, callback=out.append)
    run_until(loop, lambda: len(out) == len(commands), timeout, what="replies")
    return out


# ------------------------------------------------------------ commands
def test_pipelined_calls_reply_in_order(redis, loop):
    link = up_link(loop, redis.url)
    got: list = []
    n = 500
    for i in range(n):
        link.call("INCR", "counter", callback=lambda r, i=i: got.append((i, r)))
    blob = bytes(range(256)) * 4 + b"\r\n$-1\r\n"
    link.call("SET", b"bin\x00key", blob, callback=lambda r: got.append(("set", r)))
    link.call("GET", b"bin\x00key", callback=lambda r: got.append(("get", r)))
    # All of it went out in one flush: one turn queued it all.
    run_until(loop, lambda: len(got) == n + 2, what="all replies")
    assert got[:n] == [(i, i + 1) for i in range(n)]
    assert got[n:] == [("set", b"OK"), ("get", blob)]
    stats = link.stats()
    assert stats["state"] == UP
    assert stats["replies"] >= n + 2 and stats["commands_sent"] >= n + 2
    assert stats["bytes_out"] > len(blob) and stats["bytes_in"] > len(blob)
    link.close()
    assert link.state == CLOSED


def test_error_replies_are_redis_errors_and_the_link_goes_on(redis, loop):
    link = up_link(loop, redis.url)
    out = wait_replies(
        loop, link, ("SET", "s", "x"), ("LPUSH", "s", "y"), ("NOSUCHCOMMAND",), ("GET", "s")
    )
    assert out[0] == b"OK"
    assert isinstance(out[1], RedisError) and str(out[1]).startswith("WRONGTYPE")
    assert isinstance(out[2], RedisError) and "unknown command" in str(out[2])
    assert out[3] == b"x"
    assert link.up
    with pytest.raises(TypeError):
        link.call("SET", "k", object())
    # Commands that would desynchronise reply matching are refused up front.
    for bad in [(), ("SUBSCRIBE", "c"), (b"select", 1), ("monitor",), ("HELLO", 3)]:
        with pytest.raises(ValueError):
            link.call(*bad)
    assert wait_replies(loop, link, ("GET", "s")) == [b"x"]


# ------------------------------------------------------------- pub/sub
def test_pubsub_binary_safe_with_confirmation(redis, loop):
    link = up_link(loop, redis.url)
    channel = b"ch\x00\xff\r\n*1"
    received: list = []
    confirmed: list = []
    link.subscribe(
        channel, lambda ch, data: received.append((ch, data)), lambda: confirmed.append(1)
    )
    assert confirmed == []  # only Redis's reply confirms
    run_until(loop, lambda: confirmed == [1], what="confirmation")
    payloads = [bytes([i]) * (i % 7) + b"\r\n" for i in range(256)] + [b""]
    out = wait_replies(loop, link, *[("PUBLISH", channel, p) for p in payloads])
    assert out == [1] * len(payloads)  # one subscriber each time: our pub/sub connection
    run_until(loop, lambda: len(received) == len(payloads), what="messages")
    assert received == [(channel, p) for p in payloads]
    assert link.stats()["messages_received"] == len(payloads)

    # Already confirmed: a second on_confirmed fires from the loop, not inline.
    link.subscribe(
        channel, lambda ch, data: received.append(("new", data)), lambda: confirmed.append(2)
    )
    assert confirmed == [1]
    run_until(loop, lambda: confirmed == [1, 2], what="second confirmation")

    link.unsubscribe(channel)
    # Same command order on both connections is not a promise across them: wait for Redis.
    run_until(
        loop,
        lambda: wait_replies(loop, link, ("PUBSUB", "NUMSUB", channel)) == [[channel, 0]],
        what="unsubscribed",
    )
    assert wait_replies(loop, link, ("PUBLISH", channel, b"x")) == [0]
    for _ in range(5):
        loop.run_once(0.01)
    assert not any(item[0] == "new" for item in received)


def test_resubscribe_in_one_turn_waits_for_its_own_confirmation(redis, loop):
    link = up_link(loop, redis.url)
    order: list = []
    link.subscribe("c", lambda ch, d: None, lambda: order.append("first"))
    link.unsubscribe("c")
    link.subscribe("c", lambda ch, d: order.append(d), lambda: order.append("second"))
    run_until(loop, lambda: "second" in order, what="confirmation")
    # The first subscription's waiter went with it; the second is live now.
    assert order == ["second"]
    assert wait_replies(loop, link, ("PUBLISH", "c", b"hi")) == [1]
    run_until(loop, lambda: order[-1] == b"hi", what="message")


def test_psubscribe_gets_the_real_channel(redis, loop):
    link = up_link(loop, redis.url)
    got: list = []
    confirmed: list = []
    link.psubscribe(b"room.*", lambda ch, d: got.append((ch, d)), lambda: confirmed.append(1))
    run_until(loop, lambda: confirmed, what="pattern confirmation")
    wait_replies(loop, link, ("PUBLISH", "room.a", b"1"), ("PUBLISH", "other", b"2"))
    wait_replies(loop, link, ("PUBLISH", "room.b", b"3"))
    run_until(loop, lambda: len(got) == 2, what="pattern messages")
    assert got == [(b"room.a", b"1"), (b"room.b", b"3")]


# ----------------------------------------------------------- lifecycle
def test_server_killed_mid_traffic_then_restarted(redis, loop):
    ups: list = []
    downs: list = []
    link = new_link(
        loop, redis.url, on_up=lambda: ups.append(1), on_down=downs.append,
        backoff_min=0.05, backoff_max=0.2, connect_timeout=0.5,
    )  # fmt: skip
    link.start()
    run_until(loop, lambda: ups == [1], what="first up")
    got: list = []
    link.subscribe("room", lambda ch, d: got.append(d), lambda: got.append("confirmed"))
    run_until(loop, lambda: got == ["confirmed"], what="subscription")

    # BLPOP blocks this connection in Redis, so everything behind it is pending.
    calls: dict[int, list] = {i: [] for i in range(50)}
    link.call("BLPOP", "never", 0, callback=lambda r: calls[0].append(r))
    for i in range(1, 50):
        link.call("SET", f"k{i}", "v", callback=calls[i].append)
    for _ in range(5):
        loop.run_once(0.02)
    assert all(not v for v in calls.values())
    redis.kill()
    run_until(loop, lambda: downs, what="on_down")
    for _ in range(5):
        loop.run_once(0.02)
    assert len(downs) == 1
    for i, replies in calls.items():
        assert len(replies) == 1, (i, replies)
        assert isinstance(replies[0], RedisError) and str(replies[0]) == "connection lost"
    # While down (backing off or retrying), a call gets an error, not silence.
    late: list = []
    link.call("GET", "k1", callback=late.append)
    run_until(loop, lambda: late, timeout=2, what="late call answer")
    assert isinstance(late[0], RedisError)
    assert str(late[0]) in ("not connected", "connection lost")

    time.sleep(0.3)  # a few failed attempts against the closed port
    redis.start()
    run_until(loop, lambda: len(ups) == 2, timeout=4, what="second up")
    assert link.stats()["reconnects"] >= 1
    # The subscription came back before on_up, and its waiter did not re-fire.
    out = wait_replies(loop, link, ("PUBLISH", "room", b"after"))
    assert out == [1]
    run_until(loop, lambda: got[-1] == b"after", what="message after restart")
    assert got.count("confirmed") == 1
    assert len(downs) == 1


def test_health_check_notices_a_stopped_server(redis, loop):
    ups: list = []
    downs: list = []
    link = new_link(
        loop, redis.url, on_up=lambda: ups.append(1), on_down=downs.append,
        ping_interval=0.1, ping_timeout=0.2, backoff_min=0.05, backoff_max=0.1,
        connect_timeout=0.3,
    )  # fmt: skip
    link.start()
    run_until(loop, lambda: ups, what="up")
    redis.signal(signal.SIGSTOP)
    try:
        run_until(loop, lambda: downs, timeout=2, what="health check failure")
        assert "no PING reply" in downs[0]
        loop_deadline = time.monotonic() + 0.5
        while time.monotonic() < loop_deadline:
            loop.run_once(0.02)
        # Connections accepted by the kernel get no PING reply: connect timeout.
        assert link.state != UP
        assert "timeout" in link.last_error
    finally:
        redis.signal(signal.SIGCONT)
    run_until(loop, lambda: len(ups) == 2, timeout=4, what="up after SIGCONT")


def test_connect_timeout_against_a_silent_listener(loop):
    lsock = listening_socket("127.0.0.1", 0, 16)  # accepts in the kernel, never answers
    try:
        port = lsock.getsockname()[1]
        link = new_link(loop, f"redis://127.0.0.1:{port}", connect_timeout=0.2)
        link.start()
        run_until(loop, lambda: link.last_error, timeout=2, what="connect timeout")
        assert link.last_error == "connect timeout (0.2 s)"
        assert link.state == DOWN
        link.close()
    finally:
        lsock.close()


def test_refused_connection_retries_and_calls_fail(loop):
    port = free_port()  # nothing listens there
    link = new_link(loop, f"redis://127.0.0.1:{port}", backoff_min=0.05)
    link.start()
    out: list = []
    link.call("PING", callback=out.append)  # queued on the attempt, fails with it
    run_until(loop, lambda: out, timeout=2, what="refused")
    assert str(out[0]) == "connection lost"
    assert "ECONNREFUSED" in link.last_error
    run_until(loop, lambda: link.reconnects >= 2, timeout=3, what="retries")
    link.close()
    closed: list = []
    assert link.call("PING", callback=closed.append) is False
    run_until(loop, lambda: closed, what="closed answer")
    assert str(closed[0]) == "link closed"


def test_backlog_cap_rejects_at_once(redis, loop):
    link = new_link(loop, redis.url, max_backlog=64 * 1024)
    link.start()  # connecting: calls queue behind the handshake
    value = b"v" * 10_000
    results: dict[int, list] = {}
    accepted = []
    for i in range(10):
        results[i] = []
        accepted.append(link.call("SET", f"k{i}", value, callback=results[i].append))
    assert accepted == [True] * 6 + [False] * 4
    assert link.stats()["backlog_bytes"] <= 64 * 1024
    run_until(loop, lambda: all(results.values()), what="all answers")
    assert [results[i] for i in range(6)] == [[b"OK"]] * 6
    for i in range(6, 10):
        assert len(results[i]) == 1 and str(results[i][0]) == "backlog full"
    assert link.stats()["rejected"] == 4
    # Once flushed, the room is back.
    assert wait_replies(loop, link, ("SET", "k6", value)) == [b"OK"]


def test_tls_rediss_url(tmp_path, loop):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    tls_port = free_port()
    server = RedisServer(
        tmp_path, "--tls-port", str(tls_port), "--tls-cert-file", str(paths["cert"]),
        "--tls-key-file", str(paths["key"]), "--tls-ca-cert-file", str(paths["ca"]),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    try:
        ctx = ssl.create_default_context(cafile=str(paths["ca"]))
        link = up_link(loop, f"rediss://127.0.0.1:{tls_port}/1", ssl_context=ctx)
        got: list = []
        link.subscribe("t", lambda ch, d: got.append(d), lambda: got.append("ok"))
        run_until(loop, lambda: got == ["ok"], what="TLS subscription")
        big = os.urandom(300_000)  # several TLS records and reads
        out = wait_replies(loop, link, ("SET", "b", big), ("GET", "b"), ("PUBLISH", "t", big))
        assert out == [b"OK", big, 1]
        run_until(loop, lambda: len(got) == 2, what="TLS message")
        assert got[1] == big
        # A CA that did not sign the certificate: the handshake fails, the link stays down.
        bad = new_link(loop, f"rediss://127.0.0.1:{tls_port}", backoff_min=1)
        bad.start()
        run_until(loop, lambda: bad.last_error, what="verification failure")
        assert "CERTIFICATE_VERIFY_FAILED" in bad.last_error and not bad.up
    finally:
        server.kill()


def test_slow_server_blocks_writes_and_caps_the_backlog(redis, loop):
    link = up_link(loop, redis.url, max_backlog=2 * 1024 * 1024, ping_interval=60)
    value = os.urandom(256 * 1024)
    answer_lists: list[list] = []
    redis.signal(signal.SIGSTOP)  # Redis reads nothing: the kernel buffers fill, then ours
    try:
        accepted = 0
        deadline = time.monotonic() + 5
        while True:
            assert time.monotonic() < deadline, "the backlog never filled"
            answer: list = []
            if not link.call("SET", "big", value, callback=answer.append):
                rejected = answer
                break
            accepted += 1
            answer_lists.append(answer)
            loop.run_once(0)
        assert link.stats()["backlog_bytes"] <= 2 * 1024 * 1024
        assert link._cmd.blocked  # a partial send: waiting for EVENT_WRITE
        assert accepted > 8  # the kernel took some, then our queue up to the cap
        run_until(loop, lambda: len(rejected) == 1, what="rejection")
        assert str(rejected[0]) == "backlog full"
        assert not any(answer_lists)
    finally:
        redis.signal(signal.SIGCONT)
    run_until(loop, lambda: all(answer_lists), timeout=5, what="replies after SIGCONT")
    assert answer_lists == [[b"OK"]] * accepted
    assert wait_replies(loop, link, ("STRLEN", "big")) == [len(value)]
    assert link.stats()["backlog_bytes"] == 0 and link.up


def test_auth_and_select_from_the_url(tmp_path, loop):
    server = RedisServer(tmp_path, "--requirepass", "s3cret")
    try:
        link = up_link(loop, f"redis://:s3cret@127.0.0.1:{server.port}/3")
        assert wait_replies(loop, link, ("SET", "in3", "yes"), ("CLIENT", "INFO"))[0] == b"OK"
        other = up_link(loop, f"redis://default:s3cret@127.0.0.1:{server.port}/0")
        assert wait_replies(loop, other, ("GET", "in3"), ("MOVE", "none", 3)) == [None, 0]
        third = up_link(loop, f"redis://default:s3cret@127.0.0.1:{server.port}/3")
        assert wait_replies(loop, third, ("GET", "in3")) == [b"yes"]
        bad = new_link(loop, f"redis://:wrong@127.0.0.1:{server.port}", backoff_min=1)
        bad.start()
        run_until(loop, lambda: bad.last_error, what="auth failure")
        assert "handshake" in bad.last_error and "WRONGPASS" in bad.last_error
        assert not bad.up
    finally:
        server.kill()


# ------------------------------------------------------------- scripts
def command_calls(loop, link, name: str) -> int:
    info = wait_replies(loop, link, ("INFO", "commandstats"))[0].decode()
    for line in info.splitlines():
        if line.startswith(f"cmdstat_{name}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def test_first_calls_of_a_new_script_run_in_order(redis, loop):
    # Calls sent over several turns, the first before Redis has seen the
    # script: none may be re-sent behind a later one (the sequenced rooms'
    # runs depend on it).
    link = up_link(loop, redis.url)
    script = Script("return redis.call('RPUSH', KEYS[1], ARGV[1])")
    out: list = []
    for n in range(200):
        link.eval_script(script, [b"order"], [n], callback=out.append)
        if n % 5 == 4:
            loop.run_once(0.001)
    run_until(loop, lambda: len(out) == 200, what="200 script calls")
    got = wait_replies(loop, link, ("LRANGE", "order", 0, -1))[0]
    assert got == [b"%d" % n for n in range(200)]
    assert out == list(range(1, 201))


def test_evalsha_reloads_after_script_flush(redis, loop):
    link = up_link(loop, redis.url)
    script = Script("return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}")
    out: list = []
    link.eval_script(script, [b"k\x00"], [b"a\xff"], callback=out.append)
    run_until(loop, lambda: out, what="first eval")
    assert out == [[b"k\x00", b"a\xff", 1]]
    assert command_calls(loop, link, "eval") == 1  # a first call is EVAL: it loads it
    assert command_calls(loop, link, "evalsha") == 0
    link.eval_script(script, [b"k\x00"], [b"b"], callback=out.append)
    run_until(loop, lambda: len(out) == 2, what="evalsha")
    assert out[1] == [b"k\x00", b"b", 2]
    assert command_calls(loop, link, "eval") == 1
    assert wait_replies(loop, link, ("SCRIPT", "FLUSH")) == [b"OK"]
    link.eval_script(script, [b"k\x00"], [b"c"], callback=out.append)
    run_until(loop, lambda: len(out) == 3, what="eval after flush")
    assert out[2] == [b"k\x00", b"c", 3]
    assert command_calls(loop, link, "eval") == 2
    assert command_calls(loop, link, "evalsha") == 2  # the second call, the failed third
    assert wait_replies(loop, link, ("SCRIPT", "EXISTS", script.sha)) == [[1]]
    # A script error is a RedisError for that call only.
    bad = Script("return redis.call('NOSUCH')")
    link.eval_script(bad, [], [], callback=out.append)
    run_until(loop, lambda: len(out) == 4, what="script error")
    assert isinstance(out[3], RedisError) and link.up


def _frame(payload: bytes) -> bytes:
    """A version-2 EVENT frame (room, JSON payload type) around ``payload``."""
    return P.event_frame(P.typed_prefix(P.event_prefix(P.TARGET_ROOM, b"s"), P.PAYLOAD_JSON),
                         P.str8(b"lobby") + P.str8(b"m") + payload)  # fmt: skip


def test_sequenced_room_scripts(redis, loop):
    link = up_link(loop, redis.url)
    base = room_base("/chat", "lobby")
    assert base == b"mux:{/chat|lobby}"
    assert room_base("/a|b", "c") != room_base("/a", "b|c")
    published: list = []
    channel = base + b":ev"
    link.subscribe(channel, lambda ch, data: published.append(data), lambda: published.append("ok"))
    run_until(loop, lambda: published == ["ok"], what="subscription")
    published.clear()
    results: list = []
    frames = [_frame(b"msg\x00%d\r\n" % i) for i in range(12)]
    # Runs of 1, 4 and 7 messages: one script call each, one range of seqs each.
    for run in (frames[:1], frames[1:5], frames[5:]):
        room_run(link, base, b"\x02n1", b"".join(run), len(run), b"legacy!", 9, False, maxlen=5, ttl=60,
                 callback=results.append)  # fmt: skip
    run_until(loop, lambda: len(results) == 3, what="run results")
    epoch = results[0][0]
    assert 0 < epoch < 2**64
    assert results == [(epoch, 1), (epoch, 2), (epoch, 6)]
    run_until(loop, lambda: len(published) == 3, what="published runs")
    parsed = []
    for msg in published:
        kind, origin, at = split_origin(msg)
        assert (kind, origin) == (SEQ_EVENTS, b"n1")
        parsed.append(parse_run(msg, at))
    assert parsed == [
        (1, epoch, 9, 0, 1, frames[0], b"legacy!"),
        (2, epoch, 9, 0, 4, b"".join(frames[1:5]), b"legacy!"),
        (6, epoch, 9, 0, 7, b"".join(frames[5:]), b"legacy!"),
    ]
    assert split_frames(parsed[2][5]) == frames[5:]
    with pytest.raises(ValueError):
        split_frames(frames[0][:-1])

    xlen, ttl_meta, ttl_hist = wait_replies(
        loop, link, ("XLEN", base + b":hist"), ("TTL", base + b":meta"), ("TTL", base + b":hist")
    )
    # One entry per run; the runs holding nothing of the latest 5 are gone.
    assert xlen == 1 and 0 < ttl_meta <= 60 and 0 < ttl_hist <= 60

    who = b"\x02n1" + (9).to_bytes(4, "big") + b"\x00"
    got: list = []
    room_range(link, base, 0, 0, got.append)  # trimmed: the run of 6..12 remains
    room_range(link, base, 9, 100, got.append)
    room_range(link, base, 7, 2, got.append)
    room_range(link, base, 12, 100, got.append)
    room_range(link, room_base("/chat", "empty"), 0, 10, got.append)
    run_until(loop, lambda: len(got) == 5, what="ranges")
    assert got[0] == (epoch, 12, [(s, frames[s - 1], who) for s in range(6, 13)])
    assert got[1] == (epoch, 12, [(s, frames[s - 1], who) for s in (10, 11, 12)])
    assert got[2] == (epoch, 12, [(8, frames[7], who), (9, frames[8], who)])
    assert got[3] == (epoch, 12, [])
    assert got[4] == (0, 0, [])

    # The recovery plan of a SEQUENCED JOIN (section 9), from the Redis history.
    plans: list = []
    room_join(link, base, 0, 0, 2, 5, 60, plans.append)  # fresh: the latest 2
    room_join(link, base, epoch, 9, P.REPLAY_ALL, 5, 60, plans.append)  # complete
    room_join(link, base, epoch, 3, P.REPLAY_ALL, 5, 60, plans.append)  # gap: 4..7 trimmed
    room_join(link, base, epoch, 9, 1, 5, 60, plans.append)  # gap: capped by replay_max
    room_join(link, base, epoch ^ 1, 3, P.REPLAY_ALL, 5, 60, plans.append)  # reset
    room_join(link, base, epoch, 20, 5, 5, 60, plans.append)  # beyond last: reset
    room_join(link, base, epoch, 12, 5, 5, 60, plans.append)  # nothing missed
    run_until(loop, lambda: len(plans) == 7, what="join plans")
    entries = {s: (s, frames[s - 1], who) for s in range(8, 13)}
    assert plans[0] == (P.FRESH, epoch, 11, 12, [entries[11], entries[12]])
    assert plans[1] == (P.COMPLETE, epoch, 10, 12, [entries[s] for s in (10, 11, 12)])
    assert plans[2] == (P.GAP_RECOVERY, epoch, 8, 12, [entries[s] for s in range(8, 13)])
    assert plans[3] == (P.GAP_RECOVERY, epoch, 12, 12, [entries[12]])
    assert plans[4] == (P.RESET, epoch, 8, 12, [entries[s] for s in range(8, 13)])
    assert plans[5] == (P.RESET, epoch, 8, 12, [entries[s] for s in range(8, 13)])
    assert plans[6] == (P.COMPLETE, epoch, 13, 12, [])
    fresh: list = []
    room_join(link, room_base("/chat", "new"), 0, 0, 10, 5, 0, fresh.append)  # starts an epoch
    run_until(loop, lambda: len(fresh) == 1, what="new room plan")
    assert fresh[0][0] == P.FRESH and fresh[0][1] != 0 and fresh[0][2:] == (1, 0, [])

    # The meta hash gone (TTL ran out): a new epoch, numbering from 1, old history dropped.
    wait_replies(loop, link, ("DEL", base + b":meta"))
    again: list = []
    room_run(link, base, b"\x02n2", frames[0], 1, None, 3, True, maxlen=5, ttl=0,
             callback=again.append)  # fmt: skip
    room_range(link, base, 0, 10, again.append)
    run_until(loop, lambda: len(again) == 2, what="new epoch")
    new_epoch, seq = again[0]
    assert seq == 1 and new_epoch not in (0, epoch)
    assert again[1] == (
        new_epoch,
        1,
        [(1, frames[0], b"\x02n2" + (3).to_bytes(4, "big") + b"\x01")],
    )
    assert wait_replies(loop, link, ("TTL", base + b":meta")) == [-1]  # ttl=0: no expiry

    with pytest.raises(ValueError):
        room_run(link, base, b"\x01n", b"x", 1, None, 1, False, maxlen=0, ttl=1,
                 callback=again.append)  # fmt: skip
    with pytest.raises(ValueError):
        room_run(
            link, base, b"\x01n", b"", 0, None, 1, False, maxlen=5, ttl=1, callback=again.append
        )
    with pytest.raises(ValueError):
        parse_run(b"short", 0)


# ---------------------------------------------------------------- URLs
@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://127.0.0.1:6380/2", ("127.0.0.1", 6380, 2, None, None, False)),
        ("redis://localhost", ("localhost", 6379, 0, None, None, False)),
        ("rediss://:p%40ss@h:1/0", ("h", 1, 0, None, "p@ss", True)),
        ("redis://user:pw@[::1]:7000/15", ("::1", 7000, 15, "user", "pw", False)),
    ],
)
def test_parse_url(url, expected):
    u = parse_url(url)
    assert (u.host, u.port, u.db, u.username, u.password, u.tls) == expected


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "empty"),
        ("http://h:1", "scheme"),
        ("127.0.0.1:6379", "scheme"),
        ("redis://", "no host"),
        ("redis://h:notaport", "Port"),
        ("redis://h:99999", "out of range"),
        ("redis://h:0", "port 0"),
        ("redis://h:1/db", "database must be a number"),
        ("redis://h:1/0?x=1", "query"),
        ("redis://user@h:1", "needs a password"),
    ],
)
def test_bad_url_is_a_clear_error(url, message, loop):
    with pytest.raises(ValueError, match=message):
        parse_url(url)
    with pytest.raises(ValueError, match=message):
        RedisLink(loop, url)


def test_bad_link_settings(loop):
    for kwargs in ({"max_backlog": 0}, {"ping_timeout": -1}, {"backoff_max": 0.01}):
        with pytest.raises(ValueError):
            RedisLink(loop, "redis://127.0.0.1:1", **kwargs)


def test_missing_hiredis_names_the_extra(monkeypatch, loop):
    monkeypatch.setitem(sys.modules, "hiredis", None)  # import hiredis -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'muxserver\[cluster\]'"):
        RedisLink(loop, "redis://127.0.0.1:1")
    # Importing (server, backplane, scripts) needs no hiredis: only building a link does.
    code = (
        "import sys; sys.modules['hiredis'] = None\n"
        "import muxserver.server, muxserver.backplane.scripts\n"
        "from muxserver.backplane import parse_url; print(parse_url('redis://h:1/2').db)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout.strip()) == (0, "2"), out.stderr


def test_garbage_from_the_server_takes_the_link_down(loop):
    lsock = listening_socket("127.0.0.1", 0, 16)
    peers: list = []

    def on_accept(_mask: int) -> None:
        peer, _ = lsock.accept()
        peer.sendall(b"hello, I am not Redis\r\n")
        peers.append(peer)

    loop.register(lsock, EVENT_READ, on_accept)
    try:
        link = new_link(loop, f"redis://127.0.0.1:{lsock.getsockname()[1]}", backoff_min=1)
        link.start()
        out: list = []
        link.call("PING", callback=out.append)
        run_until(loop, lambda: out, what="protocol failure")
        assert str(out[0]) == "connection lost"
        assert "Protocol error" in link.last_error and not link.up
        link.close()
    finally:
        loop.unregister(lsock)
        lsock.close()
        for peer in peers:
            peer.close()
