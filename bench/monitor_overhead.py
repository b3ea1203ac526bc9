"""Does the monitoring port cost throughput? muxserver with and without --metrics-port.

Issue 7 asks that fan-out throughput with the monitoring port on stay within
3 % of off. Run on/off *alternately* (so slow drift of a noisy machine lands on
both), several repeats each, and compare medians. With the port on, a
separate scraper process GETs /metrics once a second during the measured
phase (Prometheus' default is every 15 s, so that is a pessimistic load).

Uses the bench harness's own load generator and core pinning (server on one
core, load generator and scraper on the other). Two figures per run:
deliveries/s, and deliveries per CPU-second of the server process. The
second is what to trust on a shared machine: it does not move when another
process steals the server's core for a while, which throughput does. Each
round runs every variant once, and the per-round ratio to "off" is reported
too (a paired comparison, so drift between rounds cancels).

    .venv/bin/python -m bench.monitor_overhead [--repeats 5] [--seconds 3] [--workload 1-100]

An extra ``--server-python PATH:DIR`` runs the server from another source
tree (e.g. a copy without the counters) to measure the counters themselves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from . import systems
from .loadgen import ADAPTERS, WORKLOADS, LoadGen

SCRAPER = r"""
import sys, time, urllib.request
url = sys.argv[1]
while True:
    with urllib.request.urlopen(url, timeout=5) as r:
        r.read()
    time.sleep(1.0)
"""


def _start(metrics: bool, cpu, source_dir: str | None):
    """A muxserver process; returns (proc, address, metrics port or None, log path)."""
    workdir = tempfile.mkdtemp(prefix="muxmon-")
    log_path = os.path.join(workdir, "server.log")
    args = [
        sys.executable,
        "-m",
        "muxserver",
        "--port",
        "0",
        "--ping-interval",
        "3600",
        "--log-level",
        "warning",
    ]
    mport = None
    if metrics:
        mport = systems.free_port()  # fine for a benchmark; tests use --metrics-port 0
        args += ["--metrics-port", str(mport)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if source_dir:
        env["PYTHONPATH"] = source_dir
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=source_dir or None,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpu)) if cpu else None,
        )
    address = systems._ready_line(proc, log_path)
    return proc, address, mport


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    metrics: bool, wl_key: str, seconds: float, cpu, source_dir: str | None
) -> tuple[float, float]:
    """(deliveries/s, deliveries per server CPU-second) of one fresh server."""
    wl = WORKLOADS[wl_key]
    proc, address, mport = _start(metrics, cpu, source_dir)
    scraper = None
    gen = LoadGen(ADAPTERS["mux"](wl), address, wl)
    try:
        gen.setup()
        gen.run(0.5)
        if mport:
            scraper = subprocess.Popen(
                [sys.executable, "-c", SCRAPER, f"http://127.0.0.1:{mport}/metrics"],
                stdout=subprocess.DEVNULL,
            )
        cpu0 = _cpu_seconds(proc.pid)
        phase = gen.run(seconds)
        cpu_used = _cpu_seconds(proc.pid) - cpu0
        delivered = phase.deliveries_per_s * phase.seconds
        return phase.deliveries_per_s, delivered / max(cpu_used, 1e-9)
    finally:
        if scraper is not None:
            scraper.kill()
            scraper.wait()
        gen.close()
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.monitor_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="1-100")
    parser.add_argument(
        "--baseline-dir", default=None,
        help="also measure a server run from this source tree (metrics off), e.g. one without the counters",
    )  # fmt: skip
    args = parser.parse_args(argv)
    cpu_server, cpu_loadgen = systems.cpus()
    if cpu_loadgen:
        os.sched_setaffinity(0, cpu_loadgen)
    variants = [("off", False, None), ("on", True, None)]
    if args.baseline_dir:
        variants.insert(0, ("baseline", False, args.baseline_dir))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    per_cpu: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for rep in range(args.repeats):
        # Alternate the order each round too, so neither always runs first.
        order = variants if rep % 2 == 0 else variants[::-1]
        for name, metrics, source in order:
            rate, eff = measure(metrics, args.workload, args.seconds, cpu_server, source)
            rates[name].append(rate)
            per_cpu[name].append(eff)
            print(
                f"round {rep + 1} {name:>8}: {rate:>12,.0f} deliveries/s "
                f"{eff:>12,.0f} deliveries/CPU-s",
                flush=True,
            )
            time.sleep(0.2)
    print(f"\nworkload {args.workload}, {args.repeats} rounds of {args.seconds:g} s; medians:")
    for name in rates:
        ratio_rate = [a / b for a, b in zip(rates[name], rates["off"], strict=True)]
        ratio_cpu = [a / b for a, b in zip(per_cpu[name], per_cpu["off"], strict=True)]
        print(
            f"{name:>8}: {statistics.median(rates[name]):>12,.0f} deliveries/s "
            f"(paired vs off {statistics.median(ratio_rate) - 1:+.1%}), "
            f"{statistics.median(per_cpu[name]):>12,.0f} deliveries/CPU-s "
            f"(paired vs off {statistics.median(ratio_cpu) - 1:+.1%})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
