"""Quick, bounded throughput figures for the Redis link (not a test, not a benchmark suite).

``python -m tools.redislink_rate [--seconds 2]`` starts its own redis-server
on a free loopback port and measures, each for ``--seconds``:

* SET round trips/s with one call in flight (latency bound);
* pipelined SET replies/s with ``--window`` calls in flight (each reply sends
  the next call, so the pipeline stays full);
* sequenced room publishes/s (the Lua script of scripts.py), pipelined;
* pub/sub messages/s received: Redis publishes them itself (a Lua loop of
  1000 PUBLISH per EVAL), so what is measured is our receive path.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time

from muxserver.backplane import RedisLink, Script
from muxserver.backplane.scripts import room_base, room_run
from muxserver.loop import EventLoop

BURST = Script("for i = 1, 1000 do redis.call('PUBLISH', KEYS[1], ARGV[1]) end return 1000")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--size", type=int, default=100, help="value / message bytes")
    opts = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="redislink-")
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.3)
        loop = EventLoop()
        link = RedisLink(loop, f"redis://127.0.0.1:{port}")
        link.start()
        deadline = time.monotonic() + 5
        while not link.up and time.monotonic() < deadline:
            loop.run_once(0.05)
        if not link.up:
            raise SystemExit(f"link did not come up: {link.last_error}")
        value = b"x" * opts.size
        print(f"loopback, {opts.size}-byte values, {opts.seconds:g} s each")
        print(f"SET, 1 in flight      {rate(loop, link, opts, 1, value):>10,.0f} round trips/s")
        print(
            f"SET, {opts.window} in flight   {rate(loop, link, opts, opts.window, value):>10,.0f} replies/s"
        )
        print(f"room publish script   {publish_rate(loop, link, opts):>10,.0f} messages/s")
        print(f"pub/sub received      {pubsub_rate(loop, link, opts, value):>10,.0f} messages/s")
        link.close()
    finally:
        proc.kill()
        proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


def keep_full(loop: EventLoop, seconds: float, window: int, send) -> float:
    """Replies/s with ``window`` calls in flight; ``send(callback)`` issues one call."""
    issued = [0]
    done = [0]
    end = time.monotonic() + seconds

    def on_reply(reply) -> None:
        if isinstance(reply, Exception):
            raise SystemExit(f"error reply: {reply}")
        done[0] += 1
        if loop.now < end:
            issued[0] += 1
            send(on_reply)

    start = time.monotonic()
    for _ in range(window):
        issued[0] += 1
        send(on_reply)
    while done[0] < issued[0]:
        loop.run_once(0.05)
    return done[0] / (time.monotonic() - start)


def rate(loop: EventLoop, link: RedisLink, opts, window: int, value: bytes) -> float:
    return keep_full(
        loop, opts.seconds, window, lambda cb: link.call(b"SET", b"k", value, callback=cb)
    )


def publish_rate(loop: EventLoop, link: RedisLink, opts) -> float:
    base = room_base("/bench", "room")
    msg = b"m" * opts.size
    return keep_full(
        loop,
        opts.seconds,
        200,
        lambda cb: room_run(
            link, base, b"\x05bench", msg, 1, None, 1, False, maxlen=100, ttl=60, callback=cb
        ),
    )


def pubsub_rate(loop: EventLoop, link: RedisLink, opts, value: bytes) -> float:
    got = [0]
    ready = []
    link.subscribe(
        b"bench", lambda ch, data: got.__setitem__(0, got[0] + 1), lambda: ready.append(1)
    )
    while not ready:
        loop.run_once(0.05)
    end = time.monotonic() + opts.seconds

    def on_reply(reply) -> None:
        if loop.now < end:
            link.eval_script(BURST, [b"bench"], [value], callback=on_reply)

    # One burst in flight: Redis's publishing outruns one Python reader, and
    # past client-output-buffer-limit (pubsub 32 MB) Redis drops the connection.
    start = time.monotonic()
    link.eval_script(BURST, [b"bench"], [value], callback=on_reply)
    while time.monotonic() < end:
        loop.run_once(0.05)
    elapsed = time.monotonic() - start
    if link.reconnects:
        print(f"  (the link went down: {link.last_error})")
    return got[0] / elapsed


if __name__ == "__main__":
    main()
