"""``make loadtest``: a muxserver on a free loopback port, Locust headless against it, reports.

Starts ``python -m muxserver --port 0`` and waits for its ready line, runs
``locust -f loadtests/locustfile.py --headless`` as a subprocess (with
``--processes`` for distributed runs), writes reports/loadtest-<scenario>_*.csv,
reports/loadtest-<scenario>.html and reports/loadtest-<scenario>-summary.json,
stops the server, prints the summary and exits non-zero if anything failed:
Locust failures, loss, a server that died or did not stop cleanly.

Bounded by construction: Locust gets ``--run-time``, and a watchdog kills
Locust's whole process group if it overruns that by more than the ramp-up,
the drain and a minute of slack. Everything listens on and connects to
127.0.0.1 only.

Usage: python loadtests/run.py [--scenario chat] [--users 200] [--duration 30s]
       [--processes 1] [--rate 1] [...] [-- extra locust options]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
SCENARIOS = ("chat", "broadcast", "direct", "churn", "recovery")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests.tally import format_summary  # noqa: E402
from muxserver.testing import ServerProcess  # noqa: E402


def seconds(timespan: str) -> float:
    """Locust's --run-time syntax (``30``, ``30s``, ``2m``, ``1h2m3s``) in seconds."""
    text = timespan.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise argparse.ArgumentTypeError(f"bad duration {timespan!r} (try 30s, 2m, 1h)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="loadtests/run.py",
        description="Run the muxserver Locust load test against a fresh local server.",
        epilog="Options after -- go to Locust unchanged.",
    )
    p.add_argument("--scenario", choices=SCENARIOS, default="chat")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--spawn-rate", type=float, default=0, help="users/s (default: users/5)")
    p.add_argument("--duration", default="30s", help="Locust --run-time (default 30s)")
    p.add_argument("--processes", type=int, default=1, help="Locust worker processes (1: none)")
    p.add_argument("--rate", type=float, default=None, help="messages/s per sending user")
    p.add_argument("--rooms", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="payload bytes")
    p.add_argument("--publishers", type=int, default=None)
    p.add_argument("--deliver-sample", type=int, default=None)
    p.add_argument(
        "--cut-every", type=float, default=None,
        help="recovery: mean seconds between a user's cuts (default 10)",
    )  # fmt: skip
    p.add_argument(
        "--offline", type=float, default=None,
        help="recovery: seconds a cut user stays away before resuming (default 0.5)",
    )  # fmt: skip
    p.add_argument(
        "--drop-for-test", type=float, default=None,
        help="recovery: fraction of deliveries each user ignores, to see the loss check fail",
    )  # fmt: skip
    p.add_argument("--no-ack", action="store_true")
    p.add_argument(
        "--transport", choices=("tcp", "ws"), default="tcp",
        help="ws: the Locust users speak WebSocket (/ws), the path browsers use",
    )  # fmt: skip
    p.add_argument(
        "--drain-timeout", type=float, default=10.0,
        help="at stop, seconds without progress before giving up on outstanding deliveries",
    )  # fmt: skip
    p.add_argument("--reports", default=str(ROOT / "reports"), help="output directory")
    p.add_argument(
        "--server-args", default="", help='extra muxserver options, e.g. "--max-output 65536"'
    )
    p.add_argument("--verbose", action="store_true", help="Locust's periodic stats tables too")
    p.add_argument(
        "--progress-every", type=float, default=5.0, help="seconds between progress lines"
    )
    args = p.parse_args(argv)
    args.run_seconds = seconds(args.duration)
    if args.users < 1 or args.processes < 1:
        p.error("--users and --processes must be at least 1")
    return args, extra


def raise_fd_limit(need: int) -> None:
    """Server and Locust each hold one socket per user: lift the soft limit toward the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Server:
    """A muxserver child on 127.0.0.1 and a free port; its stderr goes to a log file."""

    def __init__(self, users: int, log_path: Path, extra: list[str]) -> None:
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        args = [
            "--max-connections", str(max(10_000, 2 * users + 100)), "--log-level", "info",
            *extra, "--host", "127.0.0.1",  # last: loopback whatever extra says
        ]  # fmt: skip
        try:
            self.sp = ServerProcess(*args, stderr=self.log, cwd=ROOT)  # the one launcher
        except RuntimeError as exc:
            self.log.close()
            raise RuntimeError(f"muxserver did not start ({exc}); see {log_path}") from None
        self.proc = self.sp.proc
        self.port = self.sp.port

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 20 s; returns the exit status (None: had to kill)."""
        rc = self.sp.stop(20)
        self.log.close()
        return rc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def locust_command(args, port: int, prefix: Path, extra: list[str]) -> list[str]:
    spawn = args.spawn_rate or max(10.0, args.users / 5)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(args.users), "-r", f"{spawn:g}", "-t", args.duration,
        "--host", f"127.0.0.1:{port}", "--stop-timeout", "0",
        "--csv", str(prefix), "--html", f"{prefix}.html",
        "--scenario", args.scenario, "--drain-timeout", f"{args.drain_timeout:g}",
        "--summary-file", f"{prefix}-summary.json", "--exit-code-on-error", "1",
    ]  # fmt: skip
    if not args.verbose:
        # A progress line every 5 s; the summary is printed once, by main().
        cmd += ["--only-summary", "--compact", "--progress-every", f"{args.progress_every:g}"]
        # Locust's info lines (start, ramp, workers) are 100+ columns of timestamps
        # and say what the progress lines already do.
        cmd += ["--loglevel", "WARNING"]
    if args.processes > 1:
        # Master and workers meet on a free port, not Locust's fixed 5557: on a
        # shared machine another run's workers would otherwise join this master.
        port = free_port()
        cmd += ["--processes", str(args.processes)]
        cmd += ["--master-bind-host", "127.0.0.1", "--master-bind-port", str(port)]
        cmd += ["--master-host", "127.0.0.1", "--master-port", str(port)]
    floats = ("rate", "cut_every", "offline", "drop_for_test")
    for name in ("rate", "rooms", "size", "publishers", "deliver_sample", *floats[1:]):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", f"{value:g}" if name in floats else str(value)]
    if args.no_ack:
        cmd.append("--no-ack")
    if args.transport != "tcp":
        cmd += ["--transport", args.transport]
    return cmd + extra


def run_locust(cmd: list[str], limit: float) -> int:
    """Run Locust in its own process group; kill the group if it overruns ``limit`` s."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        return proc.wait(limit)
    except subprocess.TimeoutExpired:
        print(f"loadtest: Locust still running after {limit:.0f} s, killing it", file=sys.stderr)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGTERM: Locust still writes its reports
            try:
                os.killpg(proc.pid, sig)
                proc.wait(10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        return 124
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)  # Locust stops cleanly on the first Ctrl-C
        proc.wait(30)
        raise


def format_reports(prefix: Path, summary_path: Path, server_log: Path) -> str:
    """Where the reports went, one per line (paths relative to the current directory)."""

    def rel(path) -> str:
        try:
            short = os.path.relpath(path)
        except ValueError:  # another drive (Windows)
            return str(path)
        return str(path) if short.startswith("..") else short

    return "\n".join([
        "\nreports:",
        f"  {rel(f'{prefix}_stats.csv')} (and _failures, _stats_history, _exceptions)",
        f"  {rel(f'{prefix}.html')}",
        f"  {rel(summary_path)}",
        f"  {rel(server_log)} (the server's log, at info)",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    reports = Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)
    prefix = reports / f"loadtest-{args.scenario}"
    summary_path = Path(f"{prefix}-summary.json")
    summary_path.unlink(missing_ok=True)  # a stale summary must not pass for this run
    raise_fd_limit(4 * args.users + 1024)

    server_log = reports / f"loadtest-{args.scenario}-server.log"
    server = Server(args.users, server_log, shlex.split(args.server_args))
    print(f"loadtest: muxserver on 127.0.0.1:{server.port}, scenario {args.scenario}, "
          f"{args.users} users, {args.duration}, {args.processes} Locust process(es)\n"
          f"loadtest: a progress line every {args.progress_every:g} s", flush=True)  # fmt: skip
    spawn_s = args.users / (args.spawn_rate or max(10.0, args.users / 5))
    # The locustfile caps a drain at DRAIN_CAP_S (120 s); the rest is start-up and exit.
    limit = args.run_seconds + spawn_s + 120 + args.drain_timeout + 60 + 5 * args.processes
    try:
        rc = run_locust(locust_command(args, server.port, prefix, extra), limit)
    finally:
        crashed = server.proc.poll() is not None  # the server died during the run
        server_rc = server.stop()

    problems = []
    if rc != 0:
        problems.append(f"Locust exited with status {rc}")
    if crashed:
        problems.append(f"muxserver died during the run (status {server.proc.returncode})")
    elif server_rc != 0:
        problems.append(f"muxserver did not stop cleanly (status {server_rc})")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        summary = None
        problems.append(f"no summary in {summary_path}")
    print()
    if summary is not None:
        print(format_summary(summary))
        if not summary["passed"]:
            problems.append("the load test reported failures")
    print(format_reports(prefix, summary_path, server_log))
    if problems:
        print("loadtest FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("loadtest passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
