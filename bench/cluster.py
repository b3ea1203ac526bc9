"""Cluster cells: muxserver nodes sharing one redis-server, against one plain node.

``python -m bench.cluster`` (``make bench-cluster``) runs, with the same load
generator and workloads as bench.run:

* ``1 -> 100`` and ``50 <-> 50`` on one node without Redis (the baseline),
  then on two ``--redis`` nodes with the connections alternating between
  them (the publisher on node 1; 50 + 50 receivers; 25 + 25 mesh members),
  in three variants: ``--history-size 0`` (a run is one bare PUBLISH), the
  default history with plain members (a run is one ROOM_RUN script call that
  numbers and keeps it), and every member SEQUENCED (the same script, and
  EVENT_SEQ frames built on each node); the sequenced workloads also get
  their own one-node baseline;
* interest routing: four nodes, the ``1 -> 100`` room entirely on node 1, and
  the same with three extra Redis connections subscribed to the room's
  channel, which is what the "every node gets everything" design costs (the
  other three nodes would each hold that subscription).

Reported per cell: deliveries/s (best slice), the ratio to one node, the
bytes Redis received and sent and the Redis CPU time per published message
(INFO stats and cpu deltas over the measured slices). Every process shares this machine's cores, so the
cluster figures are a floor, not what N machines would do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import threading

from . import systems
from .loadgen import ADAPTERS, WORKLOADS, LoadGen

WARMUP, SLICE, SLICES = 0.4, 0.6, 3
# The mesh with every member SEQUENCED: here only (bench.run's set stays as it is).
CELLS = {
    **WORKLOADS,
    "50-50-seq": dataclasses.replace(
        WORKLOADS["50-50"], key="50-50-seq", title="50 <-> 50 sequenced", sequenced=True
    ),
}


def redis_info(port: int, section: bytes = b"stats") -> dict[str, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*2\r\n$4\r\nINFO\r\n$%d\r\n%s\r\n" % (len(section), section))
        data = b""
        while True:
            data += s.recv(65536)
            head, _, rest = data.partition(b"\r\n")
            if head.startswith(b"$") and len(rest) >= int(head[1:]):
                break
    out = {}
    for line in rest.decode().splitlines():
        key, _, value = line.partition(":")
        try:
            out[key] = int(value) if value.isdigit() else float(value)
        except ValueError:
            continue
    return out


def redis_cpu(port: int) -> float:
    """CPU seconds the redis-server process has used (user + system)."""
    info = redis_info(port, b"cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


class _Listener(threading.Thread):
    """A Redis connection SUBSCRIBEd to one channel that reads and drops everything."""

    def __init__(self, port: int, channel: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        cmd = b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(channel), channel)
        self.sock.sendall(cmd)
        self.sock.recv(4096)  # the confirmation
        self.start()

    def run(self) -> None:
        try:
            while self.sock.recv(1 << 20):
                pass
        except OSError:
            pass


def cell(wl_key: str, nodes: int, redis_port: int | None, listeners: int = 0,
         all_on_first: bool = False, args: tuple = ()) -> dict:  # fmt: skip
    wl = CELLS[wl_key]
    extra = ("--redis", f"redis://127.0.0.1:{redis_port}") if redis_port else ()
    extra += args
    running = [systems.start("muxserver", extra=extra) for _ in range(nodes)]
    subs = []
    addresses = [r.address for r in running]
    gen = LoadGen(ADAPTERS["mux"](wl), addresses[:1] if all_on_first else addresses, wl)
    try:
        gen.setup()
        if listeners:
            from muxserver.backplane.scripts import room_base

            from .loadgen import ROOM

            channel = room_base("/", ROOM) + b":ev"
            subs = [_Listener(redis_port, channel) for _ in range(listeners)]
        gen.run(WARMUP)
        info0 = redis_info(redis_port) if redis_port else {}
        cpu0 = redis_cpu(redis_port) if redis_port else 0.0
        phases = [gen.run(SLICE) for _ in range(SLICES)]
        info1 = redis_info(redis_port) if redis_port else {}
        cpu1 = redis_cpu(redis_port) if redis_port else 0.0
        best = max(phases, key=lambda p: p.deliveries_per_s)
        published = sum(p.published for p in phases)
        result = {
            "workload": wl.title, "nodes": nodes, "redis": bool(redis_port),
            "variant": " ".join(args) or ("sequenced" if wl.sequenced else "history on"),
            "extra_subscribers": listeners, "deliveries_per_s": best.deliveries_per_s,
            "messages_published": published,
        }  # fmt: skip
        if redis_port and published:
            for key, name in (("total_net_input_bytes", "redis_in_bytes_per_message"),
                              ("total_net_output_bytes", "redis_out_bytes_per_message")):  # fmt: skip
                result[name] = (info1[key] - info0[key]) / published
            result["redis_cpu_us_per_message"] = (cpu1 - cpu0) * 1e6 / published
        return result
    finally:
        gen.close()
        for r in running:
            r.stop()
        for s in subs:
            s.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    why = systems.unavailable("redis")
    if why:
        print(f"redis-server: {why}")
        return 1
    results = []
    for wl_key in ("1-100", "50-50"):
        for key, variants in ((wl_key, (("--history-size", "0"), ())), (wl_key + "-seq", ((),))):
            base = cell(key, 1, None)
            results.append(base)
            for variant in variants:
                redis = systems.start("redis")
                try:
                    two = cell(key, 2, redis.address[1], args=variant)
                finally:
                    redis.stop()
                two["ratio_to_one_node"] = two["deliveries_per_s"] / base["deliveries_per_s"]
                results.append(two)
    for listeners in (0, 3):
        redis = systems.start("redis")
        try:
            results.append(cell("1-100", 4, redis.address[1], listeners, all_on_first=True))
        finally:
            redis.stop()
    print(f"{'workload':<20} {'variant':<17} {'nodes':>5} {'extra subs':>10} "
          f"{'deliveries/s':>13} {'ratio':>6} {'Redis in B/msg':>15} {'Redis out B/msg':>16} "
          f"{'Redis CPU us/msg':>17}")  # fmt: skip
    for r in results:
        ratio = f"{r['ratio_to_one_node']:.2f}" if "ratio_to_one_node" in r else "-"
        rin = f"{r['redis_in_bytes_per_message']:.0f}" if r["redis"] else "-"
        rout = f"{r['redis_out_bytes_per_message']:.0f}" if r["redis"] else "-"
        variant = r["variant"] if r["redis"] else "-"
        rcpu = f"{r['redis_cpu_us_per_message']:.2f}" if "redis_cpu_us_per_message" in r else "-"
        print(f"{r['workload']:<20} {variant:<17} {r['nodes']:>5} {r['extra_subscribers']:>10} "
              f"{r['deliveries_per_s']:>13,.0f} {ratio:>6} {rin:>15} {rout:>16} {rcpu:>17}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
