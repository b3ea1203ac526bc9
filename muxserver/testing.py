"""Test helpers that ship with the package: fake time, fake sockets, one server launcher.

* :class:`FakeClock`: a monotonic clock that moves only when told, so
  heartbeat, idle-timeout and rate-limit rules run on fake time in
  milliseconds (trio's ``MockClock``).
* :class:`MemoryTransport` and :class:`MemoryPair`: the whole server, sessions,
  router and hub included, over an in-memory "socket" with a kernel buffer
  of a chosen size (h11's ``ConnectionPair``). It is the real
  :class:`StreamTransport` on a fake socket, so the output bookkeeping under
  test is the production code.
* :class:`ServerProcess`: a real ``python -m muxserver`` on a free port, for
  tests, tools, benchmarks and load tests where process behaviour matters
  (signals, exit codes, stdout). It is the one launcher they all share.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

from .framing import FrameDecoder
from .loop import EventLoop
from .transport.stream import StreamTransport

READY_PREFIX = "muxserver listening on "


class FakeClock:
    """A monotonic clock that only moves when told to (for tests)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSocket:
    """The kernel side of an in-memory connection: a send buffer of ``capacity`` bytes."""

    family = None  # neither AF_INET nor AF_INET6: no TCP options are set

    def __init__(self, capacity: int = 1 << 20) -> None:
        self.capacity = capacity
        self.sent = bytearray()  # what the peer has not read yet
        self.fin = False
        self.closed = False
        # What the peer sent, for a test that drives the server's own read
        # path (``recv_into``); ``peer_eof``: then end of stream.
        self.inbox = bytearray()
        self.peer_eof = False

    def fileno(self) -> int:
        return -1

    def setblocking(self, flag: bool) -> None:
        pass

    def send(self, data) -> int:
        if self.closed or self.fin:
            raise BrokenPipeError("closed")
        room = self.capacity - len(self.sent)
        if room <= 0:
            raise BlockingIOError()
        chunk = bytes(data[:room])
        self.sent += chunk
        return len(chunk)

    def sendmsg(self, buffers) -> int:
        return self.send(b"".join(bytes(b) for b in buffers))

    def shutdown(self, how) -> None:
        self.fin = True

    def close(self) -> None:
        self.closed = True

    def pending(self) -> int:
        return 0

    def recv_into(self, buf) -> int:
        n = min(len(buf), len(self.inbox))
        if not n and not self.peer_eof:
            raise BlockingIOError()
        buf[:n] = self.inbox[:n]
        del self.inbox[:n]
        return n


class MemoryTransport(StreamTransport):
    """StreamTransport over a FakeSocket; interest is recorded, not registered."""

    __slots__ = ()

    def __init__(self, max_frame: int = 1 << 20, capacity: int = 1 << 20) -> None:
        super().__init__(FakeSocket(capacity), max_frame)

    def set_interest(self, loop, events: int) -> None:
        if not self.closed:
            self.interest = events

    def close(self, loop) -> None:
        self.interest = 0
        super().close(loop)


class MemoryPair:
    """One client of a Server (built on a FakeClock loop) over a MemoryTransport.

    ``send(msg)`` feeds a message's bytes to the server as one read;
    ``frames()`` flushes the server and returns the decoded frames the client
    has received since the last call, freeing that much "kernel buffer".
    """

    def __init__(self, server, capacity: int = 1 << 20) -> None:
        from . import protocol as P

        self._P = P
        self.server = server
        self.transport = MemoryTransport(server.config.max_frame, capacity)
        self._session = server.attach(self.transport, ("memory", 0))
        self.decoder = FrameDecoder(1 << 30)

    @property
    def session(self):
        """The session that holds this connection now.

        Session resume moves connections between session objects
        (muxserver.resume): a resumed session takes this connection over, a
        parked one leaves it to a shell that closes it.
        """
        sess = self._session
        if sess.transport is not self.transport:
            for other in self.server.sessions.values():
                if other.transport is self.transport:
                    self._session = sess = other
                    break
        return sess

    @property
    def socket(self) -> FakeSocket:
        return self.transport.sock

    def send_raw(self, data: bytes) -> None:
        loop = self.server.loop
        loop.now = loop.clock()  # a read starts a loop turn, which reads the clock
        self.server.received(self.session, data)

    def send(self, *msgs) -> None:
        self.send_raw(b"".join(self._P.encode(m) for m in msgs))

    def raw(self, limit: int | None = None) -> bytes:
        """Flush the server (every before-sleep hook), then take (up to ``limit``) received bytes."""
        for hook in self.server.loop._before_sleep:
            hook()
        sock = self.transport.sock
        n = len(sock.sent) if limit is None else min(limit, len(sock.sent))
        data = bytes(sock.sent[:n])
        del sock.sent[:n]
        if n and self.transport.chunks:
            # The "kernel" has room again: let the server's write path run.
            self.server.writable(self.session)
        return data

    def frames(self, limit: int | None = None) -> list:
        P = self._P
        return [P.decode(t, b) for t, b in self.decoder.feed(self.raw(limit))]

    def close(self) -> None:
        """The client goes away (EOF)."""
        self.server.lost(self.session)


def memory_server(clock: FakeClock | None = None, **config):
    """A Server on an EventLoop with a FakeClock, never started (no sockets)."""
    from .server import Config, Server

    clock = clock or FakeClock()
    return Server(Config(**config), EventLoop(clock=clock)), clock


class ServerProcess:
    """``python -m muxserver --port 0 ARGS``; returns once it printed its ready line.

    The one launcher of the project: tests, the hardening tools, the
    benchmarks and the load tests all start their servers through it.
    ``stderr`` may be a file (a log nobody has to drain); ``python_args``
    go before ``-m muxserver`` (``["-m", "cProfile", "-o", path]``);
    ``preexec_fn`` pins CPUs for benchmarks.
    """

    def __init__(
        self,
        *args: str,
        env: dict | None = None,
        python: str = sys.executable,
        python_args: tuple | list = (),
        stderr=subprocess.PIPE,
        cwd: str | None = None,
        preexec_fn=None,
        ready_timeout: float = 20.0,
    ) -> None:
        cmd = [python, *python_args, "-m", "muxserver", "--port", "0", *args]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True,
            env=full_env, cwd=cwd, preexec_fn=preexec_fn,
        )  # fmt: skip
        line = self._ready_line(ready_timeout)
        if not line.startswith(READY_PREFIX):
            self.proc.kill()
            self.proc.wait()
            err = self.proc.stderr.read() if stderr is subprocess.PIPE else ""
            raise RuntimeError(f"server did not start: {line!r} {err}")
        hostport = line[len(READY_PREFIX) :].strip()
        host, _, port = hostport.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.ready_line = line

    def _ready_line(self, timeout: float) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return ""
        return self.proc.stdout.readline()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit status (None if killed)."""
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                killed = True
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return None if killed else self.proc.returncode


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)
