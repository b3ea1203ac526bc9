"""Many small rooms (issue 15): server CPU per delivery at one fixed offered rate.

2,000 members in 200 rooms of 10; every member publishes to its own room,
one message per ``send``, and receives everything of its room, its own
messages included (as in 50 <-> 50: Redis and NATS pub/sub have no "everyone
but the sender"). All systems get the same offered rate, well below what any
of them can do, so what differs is what each spends per delivery: the
server's CPU time from ``/proc/<pid>/stat`` over the phase and the drain
after it, divided by the deliveries of the messages published in the phase
(every one checked to have arrived, byte for byte). CPU per delivery is
immune to other processes taking the server's core; p99 latency is not, and
is reported with the noise the runner measured.

``python -m bench.rooms`` runs it alone; ``make bench`` runs it after the
other workloads (``--workloads rooms`` in bench.run).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import systems
from .loadgen import ADAPTERS, ROOMS_WORKLOAD, LoadError, LoadGen

SYSTEMS = ("muxserver", "redis", "nats")
RATE = 5000  # messages/s offered: 50,000 deliveries/s


def measure(name: str, cpu, rate: float, warm: float, seconds: float) -> dict:
    """One system at ``rate`` messages/s; the result record."""
    wl = ROOMS_WORKLOAD
    why = systems.unavailable(name)
    if why:
        return {"status": why}
    try:
        server = systems.start(name, cpu=cpu)
    except (RuntimeError, OSError) as exc:
        return {"status": f"error: {exc}"}
    gen = LoadGen(ADAPTERS[systems.ADAPTER_OF[name]](wl), server.address, wl, timeout=60.0)
    try:
        gen.setup()
        gen.run(warm, rate=rate)
        if not gen.drain(20.0):
            raise LoadError("receivers did not catch up after the warm-up")
        pub0, cpu0 = gen.published, server.cpu_seconds()
        machine0, _ = systems.machine_cpu()
        phase = gen.run(seconds, rate=rate, sample=True)
        if not gen.drain(20.0):
            raise LoadError("receivers did not get every message of the phase")
        used = server.cpu_seconds() - cpu0
        machine, _ = systems.machine_cpu()
        deliveries = (gen.published - pub0) * wl.fanout
        return {
            "status": "ok",
            "offered_per_s": rate,
            "achieved_per_s": phase.published / phase.seconds,
            "deliveries": deliveries,
            "server_cpu_s": used,
            "cpu_us_per_delivery": used / deliveries * 1e6 if deliveries else None,
            "p50_us": phase.percentile(50),
            "p99_us": phase.percentile(99),
            "samples": len(phase.latencies_ns),
            "loadgen_cpu": phase.cpu / phase.seconds,
            # Cores' worth of CPU other processes used: noise on the latency.
            "other_cpu": max(0.0, (machine - machine0 - used - phase.cpu) / phase.seconds),
        }
    except (LoadError, OSError) as exc:
        return {"status": f"error: {exc}", "log": server.log}
    finally:
        gen.close()
        server.stop()


def run_all(names, cpu, quick: bool = False, rate: float = RATE) -> dict:
    warm, seconds = (0.3, 1.0) if quick else (0.5, 3.0)
    results = {}
    for name in names:
        if name in SYSTEMS:
            results[name] = res = measure(name, cpu, rate, warm, seconds)
            print(f"  rooms / {name}: {_line(res)}", flush=True)
    return results


def _line(res: dict) -> str:
    if res.get("status") != "ok":
        return res.get("status", "?")
    return (
        f"{res['cpu_us_per_delivery']:.2f} us CPU per delivery, p99 {res['p99_us']:.0f} us, "
        f"{res['achieved_per_s']:,.0f} msg/s"
    )


def table(results: dict) -> str:
    """Markdown: one row per system, muxserver's CPU per delivery against each."""
    wl = ROOMS_WORKLOAD
    mux = results.get("muxserver", {})
    lines = [
        f"{wl.title} ({wl.fanout} deliveries per message, one message per send), "
        "fixed offered rate; server CPU from /proc over the phase and its drain:",
        "",
        "| system | offered msg/s | achieved msg/s | CPU us per delivery | p50 us | p99 us "
        "| others' CPU | muxserver's CPU per delivery is |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        if res.get("status") != "ok":
            lines.append(f"| {name} | {res.get('status')} | | | | | | |")
            continue
        ratio = "-"
        if name != "muxserver" and mux.get("status") == "ok":
            ratio = f"{mux['cpu_us_per_delivery'] / res['cpu_us_per_delivery']:.2f}x"
        lines.append(
            f"| {name} | {res['offered_per_s']:,.0f} | {res['achieved_per_s']:,.0f} "
            f"| {res['cpu_us_per_delivery']:.2f} | {res['p50_us']:.0f} | {res['p99_us']:.0f} "
            f"| {res['other_cpu']:.0%} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rooms", description=__doc__)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--rate", type=float, default=RATE, help="messages/s offered")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)
    cpu_server, cpu_loadgen = (None, None) if args.no_pin else systems.cpus()
    if cpu_loadgen:
        os.sched_setaffinity(0, cpu_loadgen)
    results = run_all(args.systems.split(","), cpu_server, args.quick, args.rate)
    print()
    print(table(results))
    return 0 if all(r.get("status") == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
