"""What every harness needs around the server process: start, watch, check, stop.

The process itself is ``muxserver.testing.ServerProcess`` (the one launcher)
and the simple blocking client is the tests' ``RawClient``
(tests/conftest.py), imported rather than copied so that harnesses and tests
cannot drift apart. Two things are added
here because long runs need them and short tests do not:

* Both pipes of the server are drained by threads. ``ServerProcess`` leaves
  them unread; a run that makes the server log thousands of lines would fill
  the pipe and freeze the server in ``write`` (it would look like a hang
  caused by the input under test). Everything logged is kept, so a traceback
  or an unexpected warning can fail the run.
* Figures are read from /proc: ``VmRSS`` for memory, the entries of
  /proc/PID/fd for open descriptors. Both are process-wide and exact, with no
  cooperation needed from the server.
"""

from __future__ import annotations

import atexit
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from conftest import RawClient, WsRawClient  # noqa: E402

from muxserver import protocol as P  # noqa: E402
from muxserver.testing import ServerProcess  # noqa: E402

__all__ = [
    "Failures", "RawClient", "Server", "Tally", "WsRawClient", "fd_count", "raise_nofile", "rss_bytes",
]  # fmt: skip


def raise_nofile() -> int:
    """Lift the soft open-file limit to the hard one; returns the new soft limit.

    Children inherit it, so calling this before starting the server raises the
    server's limit too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mib(n: float) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


class Tally:
    """A Counter that many threads may add to."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, key, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def update(self, other: Counter) -> None:
        with self._lock:
            self.counts.update(other)

    def __getitem__(self, key) -> int:
        return self.counts[key]


class Failures:
    """Invariant violations, collected from any thread; the run fails if any."""

    def __init__(self, keep: int = 20) -> None:
        self.items: list[str] = []
        self.total = 0
        self.keep = keep
        self._lock = threading.Lock()

    def add(self, message: str) -> None:
        if len(message) > 3000:  # a frame repr can carry a 64 KiB payload
            message = message[:3000] + " ..."
        with self._lock:
            self.total += 1
            if len(self.items) < self.keep:
                self.items.append(message)
        print(f"FAIL: {message}", file=sys.stderr, flush=True)

    def __bool__(self) -> bool:
        return self.total > 0

    def report(self) -> str:
        if not self.total:
            return "invariants: all held"
        lines = [f"invariants: {self.total} violation(s); first {len(self.items)}:"]
        lines += [f"  - {m}" for m in self.items]
        return "\n".join(lines)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # runs finally blocks and atexit hooks


class Server:
    """A muxserver process for a harness run (see the module docstring)."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.sp = ServerProcess(*args)
        self.proc = self.sp.proc
        self.pid = self.proc.pid
        self.address = self.sp.address
        self.log: list[str] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(pipe,), daemon=True)
            for pipe in (self.proc.stdout, self.proc.stderr)
        ]
        for t in self._threads:
            t.start()
        # A harness that dies (an exception, Ctrl-C, SIGTERM, a closed stdout)
        # must not leave its server behind.
        atexit.register(self._kill)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _drain(self, pipe) -> None:
        for line in pipe:
            self.log.append(line.rstrip("\n"))

    # ------------------------------------------------------------ figures
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def fds(self) -> int:
        return fd_count(self.pid)

    def wait_fds(self, target: int, timeout: float) -> int:
        """Poll until the fd count is at most ``target``; returns the last count."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.fds()
            if n <= target or time.monotonic() > deadline:
                return n
            time.sleep(0.1)

    def bad_log_lines(self) -> list[str]:
        """Logged lines that mean a server bug rather than a client's fault."""
        return [
            line
            for line in self.log
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
        ]

    # ------------------------------------------------------------- checks
    def check_fresh_client(self, timeout: float = 10.0, ssl_context=None) -> str | None:
        """A new client (over TLS with ``ssl_context``) can HELLO and PING; what went wrong, or None."""
        try:
            c = RawClient(self.address, timeout=timeout, ssl_context=ssl_context)
        except OSError as exc:
            return f"fresh client cannot connect: {exc}"
        try:
            c.send(P.Hello(1, "/", "", ""))
            c.recv_type(P.Welcome, timeout)
            c.send(P.Ping(0xC0FFEE))
            pong = c.recv_type(P.ServerPong, timeout)
            if pong.nonce != 0xC0FFEE:
                return f"fresh client got {pong!r}"
            c.send(P.Bye())
            c.expect_closed(timeout)
        except (OSError, EOFError, AssertionError, P.ProtocolError) as exc:
            return f"fresh client failed: {type(exc).__name__}: {exc}"
        finally:
            c.close()
        return None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait; returns the exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for t in self._threads:
            t.join(5)  # the pipes are drained before they are closed
        return self.sp.stop(0)


def finish(
    server: Server, failures: Failures, fd_baseline: int, fd_wait: float, ssl_context=None
) -> dict:
    """The end-of-run checks every harness shares; returns the figures seen.

    The server must still be alive, a fresh client must get through HELLO and
    PING, the fd count must come back to ``fd_baseline`` once the harness's
    clients are gone, SIGTERM must end it with status 0, and nothing in its
    log may be a traceback or an ERROR line.
    """
    figures: dict = {}
    if not server.alive():
        failures.add(f"server died with status {server.proc.returncode}")
    else:
        problem = server.check_fresh_client(ssl_context=ssl_context)
        if problem:
            failures.add(problem)
        figures["fds_end"] = server.wait_fds(fd_baseline, fd_wait)
        if figures["fds_end"] > fd_baseline:
            failures.add(
                f"fd leak: {figures['fds_end']} open fds {fd_wait:g} s after every "
                f"client left, baseline {fd_baseline}"
            )
        figures["rss_end"] = server.rss()
    rc = server.stop()
    figures["exit_status"] = rc
    if rc != 0:
        failures.add(f"server exit status on SIGTERM was {rc}, not 0")
    for line in server.bad_log_lines()[:10]:
        failures.add(f"server log: {line}")
    return figures
