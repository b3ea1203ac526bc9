"""Turning bench results into what a reader decides with: ratios, targets, a chart.

Every figure is muxserver's ratio to a peer *in the same run*, never against a
number remembered from another machine or day. Tables are Markdown so that
docs/benchmarks.md can quote a run verbatim. A cell is also flagged when the
load generator, not the server, was the busy process: such a figure would
measure our tool, not the system.
"""

from __future__ import annotations

from pathlib import Path

from .loadgen import WORKLOADS, Workload

# (workload, peer, minimum muxserver / peer ratio of deliveries/s), from issue 5.
TARGETS = [
    ("1-100", "redis", 1.7),
    ("1-100", "uvloop-coalesce", 1.15),
    ("1-1", "redis", 0.5),
    ("1-1", "uvloop-coalesce", 1.3),
    ("1-1000", "redis", 2.5),
    ("50-50", "redis", 1.6),
]
# (sequenced workload, its plain twin, minimum ratio of muxserver's deliveries/s), issue 12.
SEQUENCED_TARGETS = [("1-100-seq", "1-100", 0.85)]
FIXED = "1-100"  # workload of the fixed-rate latency comparison
LATENCY_TARGET = ("redis", 0.5)  # muxserver p99 at the fixed rate <= 0.5 x redis's
LOADGEN_BOUND = 0.9  # load generator CPU share above which a figure is only a lower bound
NOISY = 0.25  # cores' worth of CPU used by other processes that makes a cell noisy


def _ok(res: dict | None) -> bool:
    return bool(res) and res.get("status") == "ok"


def ratio(results: dict, wl: str, peer: str, key: str = "deliveries_per_s") -> float | None:
    """muxserver's ``key`` (deliveries/s) over ``peer``'s in workload ``wl``."""
    mine, theirs = results.get(wl, {}).get("muxserver"), results.get(wl, {}).get(peer)
    if not (_ok(mine) and _ok(theirs)) or not mine.get(key) or not theirs.get(key):
        return None
    return mine[key] / theirs[key]


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def noisy(res: dict) -> bool:
    """Did other processes take enough CPU during a cell to distort it?"""
    return _ok(res) and res.get("noise_cpu", 0.0) > NOISY


def _bound(res: dict) -> str:
    notes = []
    if res["loadgen_cpu"] > LOADGEN_BOUND:
        # Saturated load generator: the system may have more in it.
        notes.append("load generator at its limit: a lower bound")
    if noisy(res):
        notes.append("noisy")
    return f" ({'; '.join(notes)})" if notes else ""


def progress_line(wl: Workload, name: str, res: dict, took: float) -> str:
    if not _ok(res):
        return f"{wl.title:>10}  {name:<17} {res['status']}"
    half = res["half_rate"]
    return (
        f"{wl.title:>10}  {name:<17} {res['deliveries_per_s']:>12,.0f} deliveries/s "
        f"{res['messages_per_s']:>10,.0f} msg/s  p50 {_num(half['p50_us'])} us "
        f"p99 {_num(half['p99_us'])} us  cpu server {res['server_cpu']:.0%} "
        f"loadgen {res['loadgen_cpu']:.0%} others {res['noise_cpu']:.0%}  [{took:.1f} s]{_bound(res)}"
    )


def check_targets(results: dict) -> list[dict]:
    checks = []
    for wl, peer, want in TARGETS:
        if wl not in results or peer not in results[wl]:
            continue
        got = ratio(results, wl, peer)
        checks.append(
            {
                "what": f"{WORKLOADS[wl].title}: muxserver / {peer} >= {want}x",
                "target": want,
                "got": got,
                "met": None if got is None else got >= want,
                # the same ratio per CPU-second of the server: what to trust if noisy
                "got_per_cpu_s": ratio(results, wl, peer, "deliveries_per_server_cpu_s"),
                "noisy": noisy(results[wl]["muxserver"]) or noisy(results[wl][peer]),
            }
        )
    for seq_wl, plain_wl, want in SEQUENCED_TARGETS:
        mine = results.get(seq_wl, {}).get("muxserver")
        plain = results.get(plain_wl, {}).get("muxserver")
        if mine is None or plain is None:
            continue
        got = per_cpu = None
        if _ok(mine) and _ok(plain):
            got = mine["deliveries_per_s"] / plain["deliveries_per_s"]
            a, b = mine.get("deliveries_per_server_cpu_s"), plain.get("deliveries_per_server_cpu_s")
            per_cpu = a / b if a and b else None
        checks.append(
            {
                "what": f"{WORKLOADS[seq_wl].title} / {WORKLOADS[plain_wl].title} >= {want}x",
                "target": want,
                "got": got,
                "met": None if got is None else got >= want,
                "got_per_cpu_s": per_cpu,
                "noisy": noisy(mine) or noisy(plain),
            }
        )
    peer, factor = LATENCY_TARGET
    cells = results.get(FIXED, {})
    mine, theirs = cells.get("muxserver"), cells.get(peer)
    if mine is not None and theirs is not None:
        got = None
        if _ok(mine) and _ok(theirs):
            a, b = mine["fixed_rate"]["p99_us"], theirs["fixed_rate"]["p99_us"]
            got = a / b if a is not None and b else None
        fixed_noise = [
            r["fixed_rate"].get("other_cpu", 0) + r["fixed_rate"].get("steal_cpu", 0)
            for r in (mine, theirs)
            if _ok(r)
        ]
        checks.append(
            {
                "what": f"p99 at 40,000 msg/s into 100: muxserver <= {factor} x {peer}",
                "target": factor,
                "got": got,
                "met": None if got is None else got <= factor,
                "noisy": any(n > NOISY for n in fixed_noise),
            }
        )
    return checks


def table(doc: dict) -> str:
    results, meta = doc["results"], doc["meta"]
    wls = list(results)
    peers = [n for n in next(iter(results.values()), {}) if n != "muxserver"]
    lines = [
        f"muxserver benchmark, {meta['mode']} run, {meta['date']}, commit {meta['commit'] or '?'}",
        f"{meta['cpu_model']}; server on CPU {meta['server_cpus']}, "
        f"load generator on CPU {meta['loadgen_cpus']}; 64-byte payloads",
        "",
        "Columns: server / loadgen CPU = share of one core in the best max-rate slice; "
        "others' CPU = cores' worth used by other processes during the cell's noisiest "
        f"phase (flagged noisy above {NOISY:.0%}); latency is send -> receive on one receiver.",
        "",
        "muxserver's throughput (deliveries/s) as a multiple of each peer's, same run:",
        "",
        "| workload | " + " | ".join(peers) + " |",
        "|---|" + "---:|" * len(peers),
    ]
    for wl in wls:
        cells = []
        for p in peers:
            r = ratio(results, wl, p)
            status = results[wl].get(p, {}).get("status", "")
            cells.append(
                f"{r:.2f}x"
                if r is not None
                else ("not installed" if "not installed" in status else "-")
            )
        lines.append(f"| {WORKLOADS[wl].title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cross-check that other processes cannot distort: deliveries per CPU-second of the "
        "server, muxserver as a multiple of each peer:",
        "",
        "| workload | " + " | ".join(peers) + " |",
        "|---|" + "---:|" * len(peers),
    ]
    for wl in wls:
        cells = []
        for p in peers:
            r = ratio(results, wl, p, "deliveries_per_server_cpu_s")
            cells.append("-" if r is None else f"{r:.2f}x")
        lines.append(f"| {WORKLOADS[wl].title} | " + " | ".join(cells) + " |")
    for wl in wls:
        lines += [
            "",
            f"{WORKLOADS[wl].title} ({WORKLOADS[wl].fanout} deliveries per message); "
            "latency at half of each system's own max rate:",
            "",
            "| system | deliveries/s | messages/s | p50 us | p99 us | server CPU | loadgen CPU "
            "| others' CPU | muxserver is |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, res in results[wl].items():
            if not _ok(res):
                lines.append(f"| {name} | {res['status']} | | | | | | | |")
                continue
            half = res["half_rate"]
            r = ratio(results, wl, name) if name != "muxserver" else None
            lines.append(
                f"| {name} | {res['deliveries_per_s']:,.0f} | {res['messages_per_s']:,.0f} | "
                f"{_num(half['p50_us'])} | {_num(half['p99_us'])} | {res['server_cpu']:.0%} | "
                f"{res['loadgen_cpu']:.0%} | {res['noise_cpu']:.0%}{_bound(res)} | "
                f"{'-' if r is None else f'{r:.2f}x'} |"
            )
    fixed = {n: r for n, r in results.get(FIXED, {}).items() if _ok(r) and "fixed_rate" in r}
    if fixed:
        lines += [
            "",
            "Latency at a fixed 40,000 messages/s into the 100-member room (4 M deliveries/s offered):",
            "",
            "| system | achieved msg/s | samples | p50 us | p99 us | others' CPU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, res in fixed.items():
            f = res["fixed_rate"]
            lines.append(
                f"| {name} | {f['achieved_per_s']:,.0f} | {f['samples']:,} | "
                f"{_num(f['p50_us'])} | {_num(f['p99_us'])} | "
                f"{f.get('other_cpu', 0) + f.get('steal_cpu', 0):.0%} |"
            )
    if doc.get("targets"):
        lines += ["", "Targets (issue 5):", ""]
        for t in doc["targets"]:
            mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
            got = "-" if t["got"] is None else f"{t['got']:.2f}"
            if t.get("got_per_cpu_s") is not None:
                got += f"; per server CPU-second {t['got_per_cpu_s']:.2f}"
            lines.append(f"- {mark} {t['what']} (measured {got}){' (noisy)' if t['noisy'] else ''}")
    return "\n".join(lines)


def chart(doc: dict, path: Path) -> Path | None:
    """Bar charts: deliveries/s per system for each workload, fixed-rate latency, targets."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    results = doc["results"]
    wls = list(results)
    fixed = {
        n: r["fixed_rate"]
        for n, r in results.get(FIXED, {}).items()
        if _ok(r) and "fixed_rate" in r
    }
    fig, axes = plt.subplots(2, 3, figsize=(15, 9.5))
    axes = list(axes.flat)
    for ax, wl in zip(axes, wls, strict=False):
        names = list(results[wl])
        cells = [results[wl][n] for n in names]
        values = [c["deliveries_per_s"] / 1e6 if _ok(c) else 0 for c in cells]
        bars = ax.bar(range(len(names)), values, color=[_color(n) for n in names])
        for bar, n, res in zip(bars, names, cells, strict=True):
            if not _ok(res):
                status = res["status"]
                label = "not\ninstalled" if "not installed" in status else "error"
                if status.startswith("n/a"):
                    label = "n/a"
            elif n == "muxserver":
                label = f"{res['deliveries_per_s'] / 1e6:.1f}M"
            else:
                label = f"{ratio(results, wl, n):.2f}x"
            if _ok(res) and noisy(res):
                label += "\n(noisy)"
            if _ok(res) and res["loadgen_cpu"] > LOADGEN_BOUND:
                label += "\n(lower bound)"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{WORKLOADS[wl].title}: deliveries/s (labels: muxserver / peer)", fontsize=10)
        ax.set_ylabel("million deliveries/s")
        ax.margins(y=0.18)
    for ax in axes[len(wls) : 4]:
        ax.axis("off")
    ax = axes[4]
    if fixed:
        names = list(fixed)
        p99 = [(fixed[n]["p99_us"] or 0) / 1000 for n in names]
        bars = ax.bar(range(len(names)), p99, color=[_color(n) for n in names])
        positive = [v for v in p99 if v > 0]
        ax.set_yscale("log")
        if positive:
            ax.set_ylim(min(positive) / 3, max(positive) * 4)
        for bar, n, v in zip(bars, names, p99, strict=True):
            f = fixed[n]
            short = f["achieved_per_s"] < 0.95 * f["offered_per_s"]
            label = (f"{v:.1f} ms" if v else "no\nsamples") + ("\n(overloaded)" if short else "")
            if f.get("other_cpu", 0) + f.get("steal_cpu", 0) > NOISY:
                label += "\n(noisy)"
            y = v if v else (min(positive) / 3 if positive else 1)
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title("p99 latency at 40,000 msg/s into 100 members", fontsize=10)
        ax.set_ylabel("ms (log scale; lower is better)")
    else:
        ax.axis("off")
    ax = axes[5]
    ax.axis("off")
    lines = ["Targets (issue 5)", ""]
    for t in doc.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        got = "-" if t["got"] is None else f"{t['got']:.2f}"
        if t.get("got_per_cpu_s") is not None:
            got += f"; per CPU-s {t['got_per_cpu_s']:.2f}"
        lines.append(f"{mark:>6}  {t['what']}  ({got}){' noisy' if t['noisy'] else ''}")
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=7, family="monospace",
            transform=ax.transAxes, wrap=True)  # fmt: skip
    meta = doc["meta"]
    fig.suptitle(
        f"muxserver vs peers, one run: {meta['mode']}, {meta['date'][:16]}, commit "
        f"{meta['commit'] or '?'}; server pinned to CPU {meta['server_cpus']}, "
        f"load generator to CPU {meta['loadgen_cpus']}; 64-byte payloads",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _color(name: str) -> str:
    return "#d62728" if name == "muxserver" else "#7f7f7f"
