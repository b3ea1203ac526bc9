"""Start and stop every system under test, pinned to its own core, and read its CPU time.

Fairness on a 2-core machine means one core for the server and one for the
load generator: every server (muxserver, the asyncio/uvloop peers, Redis,
NATS) is started with its CPU affinity set to the last core, and the load
generator pins itself to the others. NATS, a Go program, would otherwise
spread over both cores and take the load generator's; Go sizes GOMAXPROCS
from the affinity mask, so it runs on one core like the rest.

A system that is not installed is reported with the reason, never skipped
silently. Each server gets a fresh process per workload, so nothing from
one workload (memory, buffers, caches) carries into the next.
"""

from __future__ import annotations

import importlib.util
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from muxserver.testing import ServerProcess

READY_TIMEOUT = 15.0

# (name, load generator adapter). Order is the order of the table.
SYSTEMS = [
    ("muxserver", "mux"),
    ("asyncio-write", "mux"),
    ("asyncio-coalesce", "mux"),
    ("uvloop-write", "mux"),
    ("uvloop-coalesce", "mux"),
    ("redis", "resp"),
    ("nats", "nats"),
    # WebSocket (bench/wsload.py): muxserver's /ws, and socket.io 4 on Node.
    ("muxserver-ws", "ws"),
    ("socketio", "sio"),
]
ADAPTER_OF = dict(SYSTEMS)
# Systems that run only some workloads; the rest run every one.
WORKLOADS_OF = {name: ("1-100", "1-1", "50-50") for name in ("muxserver-ws", "socketio")}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_MODULES = os.path.join(ROOT, ".bench-node", "node_modules")  # make bench-deps


def _which(name: str) -> str | None:
    # nats-server is installed to /usr/sbin by Debian, not always on PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def unavailable(name: str) -> str | None:
    """Why ``name`` cannot run here ("not installed"), or None if it can."""
    if name.startswith("uvloop") and importlib.util.find_spec("uvloop") is None:
        return "not installed (pip install uvloop)"
    if name == "redis" and _which("redis-server") is None:
        return "not installed (apt-get install redis-server)"
    if name == "nats" and _which("nats-server") is None:
        return "not installed (apt-get install nats-server)"
    if name == "socketio":
        if _which("node") is None:
            return "not installed (no node)"
        if not os.path.isdir(os.path.join(NODE_MODULES, "socket.io")):
            return "not installed (make bench-deps: npm install socket.io)"
    return None


def version(name: str) -> str:
    """A one-line version string for the report."""
    try:
        if name == "redis":
            return _run([_which("redis-server"), "--version"]).split(" sha=")[0]
        if name == "nats":
            return _run([_which("nats-server"), "--version"])
        if name.startswith("uvloop"):
            import uvloop

            return f"uvloop {uvloop.__version__}, Python {sys.version.split()[0]}"
        if name.startswith("asyncio") or name.startswith("muxserver"):
            return f"Python {sys.version.split()[0]}"
        if name == "socketio":
            pkg = os.path.join(NODE_MODULES, "socket.io", "package.json")
            with open(pkg) as f:
                sio = __import__("json").load(f)["version"]
            return f"socket.io {sio}, Node {_run([_which('node'), '--version'])}"
    except (OSError, subprocess.SubprocessError, ImportError):
        pass
    return "?"


def _run(cmd: list) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()


def free_port() -> int:
    """A free loopback port, for servers that cannot pick one themselves."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpus() -> tuple[set[int] | None, set[int] | None]:
    """(server cores, load generator cores), or (None, None) with fewer than 2."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None, None
    if len(allowed) < 2:
        return None, None
    return {allowed[-1]}, set(allowed[:-1])


def machine_cpu() -> tuple[float, float]:
    """(user + system CPU seconds of every process on the machine, steal seconds).

    Compared with what the server and the load generator used over the same
    interval, this shows how much CPU *other* processes took: a benchmark on a
    shared machine is only as good as that number is small. Interrupt time is
    left out: most of it is our own loopback traffic.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system = fields[0], fields[1], fields[2]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system) / tick, steal / tick


def wait_quiet(max_wait: float, threshold: float, window: float = 0.2) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores.

    Called while the server and the load generator are idle, so all the CPU
    the machine uses meanwhile is someone else's. Returns the last reading.
    """
    deadline = time.monotonic() + max_wait
    while True:
        (busy0, steal0), t0 = machine_cpu(), time.monotonic()
        time.sleep(window)
        (busy1, steal1), t1 = machine_cpu(), time.monotonic()
        load = (busy1 - busy0 + steal1 - steal0) / (t1 - t0)
        if not load >= threshold or t1 + window > deadline:  # NaN counts as quiet
            return load


@dataclass
class Running:
    name: str
    proc: subprocess.Popen
    address: tuple[str, int]
    workdir: str

    @property
    def log(self) -> str:
        """The end of the server's log, for error messages."""
        return _log_tail(os.path.join(self.workdir, "server.log"))

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server so far (all its threads)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start(
    name: str, cpu: set[int] | None = None, profile: str | None = None, extra: tuple = ()
) -> Running:
    """Start system ``name`` on a free loopback port; returns once it accepts.

    ``profile``: for muxserver only, a path to write cProfile stats to (the
    server is run under ``python -m cProfile``; stats are written when it
    exits on SIGTERM).
    """
    why = unavailable(name)
    if why:
        raise RuntimeError(f"{name}: {why}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Logs go to a file, not a pipe nobody reads: a full pipe would stall a
    # server that logs (a slow-consumer warning, say) in the middle of a run.
    workdir = tempfile.mkdtemp(prefix=f"muxbench-{name}-")
    log_path = os.path.join(workdir, "server.log")
    preexec = (lambda: os.sched_setaffinity(0, cpu)) if cpu else None
    if name in ("muxserver", "muxserver-ws"):
        # The project's one launcher; no server PINGs during a run (receivers
        # only count bytes).
        with open(log_path, "wb") as log:
            try:
                sp = ServerProcess(
                    "--ping-interval", "3600", "--log-level", "warning", *extra,
                    python_args=["-m", "cProfile", "-o", profile] if profile else (),
                    stderr=log, preexec_fn=preexec, ready_timeout=READY_TIMEOUT,
                    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                )  # fmt: skip
            except RuntimeError as exc:
                shutil.rmtree(workdir, ignore_errors=True)
                raise RuntimeError(f"muxserver: {exc}") from None
        return Running(name, sp.proc, sp.address, workdir)
    if name in ("asyncio-write", "asyncio-coalesce", "uvloop-write", "uvloop-coalesce"):
        cmd, ready = [sys.executable, "-m", "bench.peers", "--impl", name, "--port", "0"], "stdout"
    elif name == "socketio":
        env["NODE_PATH"] = NODE_MODULES
        cmd, ready = [_which("node"), os.path.join(ROOT, "bench", "socketio_server.js")], "stdout"
    elif name == "redis":
        port = free_port()
        cmd = [
            _which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--tcp-backlog", "4096", "--dir", workdir, "--loglevel", "warning",
        ]  # fmt: skip
        ready = ("127.0.0.1", port)
    elif name == "nats":
        port = free_port()
        conf = os.path.join(workdir, "nats.conf")
        with open(conf, "w") as f:
            # No server PINGs during a run: receivers only count bytes.
            f.write(f'listen: "127.0.0.1:{port}"\nping_interval: "1h"\n')
        cmd, ready = [_which("nats-server"), "-c", conf], ("127.0.0.1", port)
    else:
        raise ValueError(f"unknown system {name!r}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready == "stdout" else log,
            stderr=log,
            env=env,
            preexec_fn=preexec,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    try:
        if ready == "stdout":
            address = _ready_line(proc, log_path)
        else:
            _wait_accepting(proc, ready, log_path)
            address = ready
    except BaseException:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Running(name, proc, address, workdir)


def _log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-2000:].strip()
    except OSError:
        return ""


def _ready_line(proc: subprocess.Popen, log_path: str) -> tuple[str, int]:
    """Wait for ``... listening on HOST:PORT`` on stdout, with a deadline."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(READY_TIMEOUT):
            raise RuntimeError(f"no ready line within {READY_TIMEOUT:g} s: {_log_tail(log_path)}")
    finally:
        sel.close()
    line = proc.stdout.readline().decode()
    if " listening on " not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"did not start: {line!r} {_log_tail(log_path)}")
    host, _, port = line.rsplit(" listening on ", 1)[1].strip().rpartition(":")
    return host.strip("[]"), int(port)


def _wait_accepting(proc: subprocess.Popen, address: tuple[str, int], log_path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with {proc.returncode}: {_log_tail(log_path)}"
            )
        try:
            with socket.create_connection(address, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} not accepting on {address} within {READY_TIMEOUT:g} s")
