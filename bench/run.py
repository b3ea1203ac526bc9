"""``make bench``: every system, every workload, one run, one load generator.

For each workload, each system gets a fresh server process pinned to its own
core (see bench.systems) and goes through the same steps:

1. set-up: connect, HELLO/JOIN (or SUBSCRIBE, SUB), wait for every answer;
2. warm-up at full speed, then the *max* phase: publish as fast as the window
   allows, in a few back-to-back slices; deliveries/s counted by the
   receivers in the best slice is the headline figure. Interference from
   other processes only ever slows a slice down, so the best slice is the
   closest to what the system can do (timeit's reasoning); every slice is
   kept in the JSON;
3. drain, then the *latency* phase at half of that system's own maximum
   (messages/s), sampling one receiver's send-to-receive latency;
4. for the 1 -> 100 workload, one more latency phase at a fixed 40,000
   messages/s, the same offered load for every system.

The order is workload-major (every system runs workload A, then every system
runs workload B), so slow drift of the machine is spread over all systems.

Shared machines are noisy, so the runner measures the noise too: the CPU
that *other* processes used during each phase. Before a cell starts it waits
(briefly) for the machine to be quiet, and a cell that was noisy anyway is
run again while the time budget allows, keeping the quietest attempt. The
budget keeps ``make bench`` under 5 minutes and ``bench-quick`` near one.

Results: a table on stdout (and as Markdown in reports/bench.md) with
muxserver's ratio to every peer, reports/bench.json, and a bar chart
reports/bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import subprocess
import sys
import time
from pathlib import Path

from . import report, systems
from .loadgen import ADAPTERS, WORKLOADS, LoadError, LoadGen
from .wsload import SocketIoAdapter, WsMuxAdapter

ADAPTERS = {**ADAPTERS, "ws": WsMuxAdapter, "sio": SocketIoAdapter}

FIXED_RATE = 40_000  # messages/s into the 100-member room, for every system
FIXED_RATE_WORKLOAD = "1-100"
MAX_ATTEMPTS = 3  # per cell, when the machine was noisy
QUIET_WAIT = 3.0  # longest wait for a quiet machine before a cell

# Seconds of each step, how many slices the max phase has, and the time
# budget of the whole end-to-end run.
TIMINGS = {
    "full": {
        "warmup": 0.4, "slice": 0.5, "slices": 4, "latency_warmup": 0.2, "latency": 1.2,
        "budget": 240.0,
    },
    "quick": {
        "warmup": 0.15, "slice": 0.35, "slices": 2, "latency_warmup": 0.1, "latency": 0.4,
        "budget": 60.0,
    },
}  # fmt: skip


class Budget:
    """Spare time, after what the remaining cells will need, for waits and retries."""

    def __init__(self, seconds: float, cells: int) -> None:
        self.end = time.monotonic() + seconds
        self.cells_left = cells
        self.durations: list[float] = []

    def spent(self, seconds: float) -> None:
        self.durations.append(seconds)

    def cell_done(self) -> None:
        self.cells_left -= 1

    def estimate_left(self, cells_after: int) -> float | None:
        """Seconds the cells after the current one should take, by the average so far."""
        if not self.durations:
            return None
        return cells_after * sum(self.durations) / len(self.durations)

    def slack(self) -> float:
        per_cell = sum(self.durations) / len(self.durations) if self.durations else 8.0
        return self.end - time.monotonic() - self.cells_left * per_cell


def measure(name: str, wl_key: str, timings: dict, cpu, profile_dir, quiet_wait: float) -> dict:
    """Run one workload against one system; returns the result record."""
    wl = WORKLOADS[wl_key]
    why = systems.unavailable(name)
    if why:
        return {"status": why}
    only = systems.WORKLOADS_OF.get(name)
    if only and wl_key not in only:
        return {"status": "n/a (not a WebSocket workload)"}
    profile = None
    if profile_dir is not None and name == "muxserver":
        profile = str(profile_dir / f"profile-{wl_key}.pstats")
    try:
        server = systems.start(name, cpu=cpu, profile=profile)
    except (RuntimeError, OSError) as exc:
        return {"status": f"error: {exc}"}
    gen = LoadGen(ADAPTERS[systems.ADAPTER_OF[name]](wl), server.address, wl)
    try:
        gen.setup()
        quiet = systems.wait_quiet(quiet_wait, report.NOISY) if quiet_wait > 0 else None
        gen.run(timings["warmup"])
        slices = [_slice(gen, server, timings["slice"]) for _ in range(timings["slices"])]
        best = max(slices, key=lambda r: r["deliveries_per_s"])
        result = {"status": "ok", **best, "messages_per_s": best["deliveries_per_s"] / wl.fanout}
        result["slices"] = slices
        result["before_cpu"] = quiet
        lat = timings["latency_warmup"], timings["latency"]
        result["half_rate"] = _latency(gen, server, result["messages_per_s"] / 2, *lat)
        if wl_key == FIXED_RATE_WORKLOAD:
            result["fixed_rate"] = _latency(gen, server, FIXED_RATE, *lat)
        phases = [best, result["half_rate"], result.get("fixed_rate", {})]
        result["noise_cpu"] = max(p.get("other_cpu", 0) + p.get("steal_cpu", 0) for p in phases)
        return result
    except (LoadError, OSError) as exc:
        return {"status": f"error: {exc}", "log": server.log}
    finally:
        gen.close()
        server.stop()
        if profile:
            _write_profile(profile)


class _Usage:
    """CPU used by the server, the load generator and everyone else over a phase."""

    def __init__(self, server: systems.Running) -> None:
        self.server = server
        self.server0 = server.cpu_seconds()
        self.machine0, self.steal0 = systems.machine_cpu()

    def finish(self, seconds: float, loadgen_cpu: float) -> dict:
        used = self.server.cpu_seconds() - self.server0
        machine, steal = systems.machine_cpu()
        return {
            "server_cpu": used / seconds,
            "loadgen_cpu": loadgen_cpu / seconds,
            # Cores' worth of CPU that other processes took: noise on the figure.
            "other_cpu": max(0.0, (machine - self.machine0 - used - loadgen_cpu) / seconds),
            "steal_cpu": (steal - self.steal0) / seconds,
        }


def _slice(gen: LoadGen, server: systems.Running, seconds: float) -> dict:
    """One full-speed slice."""
    usage = _Usage(server)
    phase = gen.run(seconds)
    cpu = usage.finish(phase.seconds, phase.cpu)
    return {
        "deliveries_per_s": phase.deliveries_per_s,
        # Work per CPU-second of the server: unmoved when another process takes
        # the server's core for a while, which deliveries/s is not.
        "deliveries_per_server_cpu_s": (
            phase.deliveries_per_s / cpu["server_cpu"] if cpu["server_cpu"] > 0 else None
        ),
        **cpu,
        "seconds": phase.seconds,
    }


def _latency(gen: LoadGen, server, rate: float, warm: float, seconds: float) -> dict:
    """Latency percentiles at an offered ``rate`` messages/s."""
    if not gen.drain(10.0):
        raise LoadError("receivers did not catch up before the latency phase")
    gen.run(warm, rate=rate)
    usage = _Usage(server)
    phase = gen.run(seconds, rate=rate, sample=True)
    return {
        "offered_per_s": rate,
        "achieved_per_s": phase.published / phase.seconds,
        "samples": len(phase.latencies_ns),
        "p50_us": phase.percentile(50),
        "p99_us": phase.percentile(99),
        **usage.finish(phase.seconds, phase.cpu),
    }


def _write_profile(path: str) -> None:
    """Top functions by own time, next to the binary stats."""
    if not os.path.exists(path):
        return
    with open(path.replace(".pstats", ".txt"), "w") as out:
        stats = pstats.Stats(path, stream=out)
        stats.sort_stats("tottime").print_stats(25)


def _meta(args, cpu_server, cpu_loadgen, names) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        if commit and dirty:
            commit += "+changes"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith("model name")]
        model = lines[0].split(":", 1)[1].strip() if lines else ""
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "commit": commit,
        "mode": args.mode,
        "timings_s": TIMINGS[args.mode],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "server_cpus": sorted(cpu_server) if cpu_server else None,
        "loadgen_cpus": sorted(cpu_loadgen) if cpu_loadgen else None,
        "payload_bytes": 64,
        "fixed_rate": {"workload": FIXED_RATE_WORKLOAD, "messages_per_s": FIXED_RATE},
        "versions": {n: systems.version(n) for n in names if not systems.unavailable(n)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", dest="mode", action="store_const", const="quick", default="full")
    parser.add_argument("--systems", default=",".join(n for n, _ in systems.SYSTEMS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--out", default="reports", help="directory for bench.json / bench.png")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin server and load generator"
    )
    parser.add_argument("--no-retry", action="store_true", help="one attempt per cell, no waiting")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run muxserver under cProfile; stats in OUT/profile-WORKLOAD.{pstats,txt} "
        "(profiled figures are slower: do not compare them)",
    )
    args = parser.parse_args(argv)
    names = [n for n in args.systems.split(",") if n]
    wl_keys = [w for w in args.workloads.split(",") if w]
    for n in names:
        if n not in systems.ADAPTER_OF:
            parser.error(f"unknown system {n!r}; choose from {', '.join(systems.ADAPTER_OF)}")
    for w in wl_keys:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cpu_server, cpu_loadgen = (None, None) if args.no_pin else systems.cpus()
    if cpu_loadgen:
        os.sched_setaffinity(0, cpu_loadgen)
    timings = TIMINGS[args.mode]
    started = time.monotonic()
    budget = Budget(timings["budget"], len(wl_keys) * len(names))
    profile_dir = out if args.profile else None
    results: dict[str, dict[str, dict]] = {}
    cells = len(wl_keys) * len(names)
    cell = 0
    for w in wl_keys:
        results[w] = {}
        for n in names:
            cell += 1
            attempts: list[dict] = []
            while True:
                t = time.monotonic()
                wait = 0.0 if args.no_retry else min(QUIET_WAIT, max(0.0, budget.slack()))
                res = measure(n, w, timings, cpu_server, profile_dir, wait)
                took = time.monotonic() - t
                budget.spent(took)
                attempts.append(res)
                left = budget.estimate_left(cells - cell)
                line = report.progress_line(WORKLOADS[w], n, res, took, cell, cells, left)
                print(line, flush=True)
                retry = (
                    not args.no_retry
                    and report.noisy(res)
                    and len(attempts) < MAX_ATTEMPTS
                    and budget.slack() > 0
                )
                if not retry:
                    break
                print(
                    report.retry_line(cell, cells, res, len(attempts) + 1, MAX_ATTEMPTS),
                    flush=True,
                )
            best = min(attempts, key=lambda r: r.get("noise_cpu", 0.0))
            best["attempts"] = len(attempts)
            results[w][n] = best
            budget.cell_done()

    doc = {
        "meta": _meta(args, cpu_server, cpu_loadgen, names),
        "workloads": {
            w: {"title": WORKLOADS[w].title, "fanout": WORKLOADS[w].fanout} for w in wl_keys
        },
        "results": results,
    }
    doc["targets"] = report.check_targets(results)
    doc["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = report.table(doc)
    (out / "bench.md").write_text(text + "\n")  # for quoting in docs/benchmarks.md
    print()
    print(report.console_summary(doc, str(out / "bench.md")))
    chart = report.chart(doc, out / "bench.png")
    where = f", {chart}" if chart else " (no chart: matplotlib is not installed)"
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
