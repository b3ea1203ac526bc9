"""``muxserver --workers N``: N single-threaded worker processes behind one port.

Each worker is an ordinary ``muxserver --redis`` node (a cluster node of its
own, sharing rooms and nicks through Redis) whose listening socket has
SO_REUSEPORT, so the kernel spreads new connections over the workers. This
parent only supervises: it starts the workers, prints the ready line once
when all of them listen, restarts a worker that dies (logged, with a short
backoff so a worker that cannot start does not spin), passes SIGTERM/SIGINT
on, and exits 0 once every worker has drained and exited 0.

Why a reserved socket: with ``--port 0`` the workers must agree on one port,
so the parent binds a SO_REUSEPORT socket on a free port (never listening, so
the kernel sends it no connections) and keeps it bound while it runs; a
restarted worker binds the same port again.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("muxserver")

READY_PREFIX = "muxserver listening on "
WORKER_ENV = "MUXSERVER_WORKER"  # set in a worker: its index; listen with SO_REUSEPORT
START_TIMEOUT = 20.0


def strip_workers(argv: list[str]) -> list[str]:
    """The command line without ``--workers N`` / ``--workers=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def _metrics_args(argv: list[str], index: int) -> list[str]:
    """A fixed --metrics-port P becomes P + index per worker (0 and off stay)."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--metrics-port" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--metrics-port="):
            value = arg.split("=", 1)[1]
        if value is not None and value.isdigit() and int(value):
            return ["--metrics-port", str(int(value) + index)]
    return []


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.due = 0.0  # when a dead worker may be started again


def supervise(argv: list[str], count: int, host: str, port: int) -> int:
    reserved = None
    if port == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        reserved = socket.socket(family, socket.SOCK_STREAM)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            reserved.bind((host, 0))
        except OSError as exc:
            print(f"muxserver: cannot listen on {host}:0: {exc.strerror or exc}", file=sys.stderr)
            return 1
        port = reserved.getsockname()[1]
    base = strip_workers(argv)
    stopping: list[int] = []

    def on_signal(signum, _frame) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [_Worker(i) for i in range(count)]

    def spawn(worker: _Worker) -> str:
        """Start one worker and wait for its ready line; '' or why it failed."""
        env = dict(os.environ, **{WORKER_ENV: str(worker.index), "MUXSERVER_WORKERS": "0"})
        cmd = [sys.executable, "-m", "muxserver", *base, "--port", str(port),
               *_metrics_args(base, worker.index)]  # fmt: skip
        proc = worker.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(START_TIMEOUT):
                proc.kill()
                proc.wait()
                return f"worker {worker.index} did not start within {START_TIMEOUT:g} s"
        line = proc.stdout.readline()
        if not line.startswith(READY_PREFIX):
            proc.wait()
            return f"worker {worker.index} exited with status {proc.returncode} at start"
        return ""

    for worker in workers:
        why = spawn(worker)
        if why or stopping:
            for other in workers:
                if other.proc is not None and other.proc.poll() is None:
                    other.proc.terminate()
                    other.proc.wait()
            if why:
                print(f"muxserver: {why}", file=sys.stderr)
                return 1
            return 0
    shown = f"[{host}]" if ":" in host else host
    print(f"{READY_PREFIX}{shown}:{port}", flush=True)
    log.info("supervising %d workers on %s:%d", count, shown, port)
    while not stopping:
        time.sleep(0.1)
        now = time.monotonic()
        for worker in workers:
            proc = worker.proc
            if proc is not None and proc.poll() is not None:
                log.warning("worker %d (pid %d) exited with status %d; restarting it",
                            worker.index, proc.pid, proc.returncode)  # fmt: skip
                proc.stdout.close()
                worker.proc = None
                worker.restarts += 1
                worker.due = now + min(5.0, 0.2 * 2 ** min(worker.restarts, 5))
            if worker.proc is None and now >= worker.due and not stopping:
                why = spawn(worker)
                if why:
                    log.error("%s; trying again", why)
                    worker.proc = None
                    worker.due = time.monotonic() + 5.0
    # Shutdown: every worker drains (its own --drain-timeout) and exits.
    log.info("stopping %d workers", count)
    for worker in workers:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    status = 0
    for worker in workers:
        if worker.proc is None:
            continue
        try:
            code = worker.proc.wait(60)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            code = worker.proc.wait()
        if code != 0:
            log.warning("worker %d exited with status %d", worker.index, code)
            status = 1
    if reserved is not None:
        reserved.close()
    return status
