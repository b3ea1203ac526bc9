"""Turning bench results into what a reader decides with: ratios, targets, a chart.

Every figure is muxserver's ratio to a peer *in the same run*, never against a
number remembered from another machine or day. Tables are Markdown so that
docs/benchmarks.md can quote a run verbatim. A cell is also flagged when the
load generator, not the server, was the busy process: such a figure would
measure our tool, not the system.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from .loadgen import WORKLOADS, Workload

WIDTH = 100  # every line printed on the terminal fits this many columns
# (workload, peer, minimum muxserver / peer ratio of deliveries/s): the project's targets.
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
# WebSocket (issue 11): (workload, system, peer, minimum system / peer ratio), same run.
WS_TARGETS = [
    ("1-100", "muxserver-ws", "socketio", 30.0),
    ("1-100", "muxserver-ws", "muxserver", 0.7),
]
FIXED = "1-100"  # workload of the fixed-rate latency comparison
LATENCY_TARGET = ("redis", 0.5)  # muxserver p99 at the fixed rate <= 0.5 x redis's
LOADGEN_BOUND = 0.9  # load generator CPU share above which a figure is only a lower bound
NOISY = 0.25  # cores' worth of CPU used by other processes that makes a cell noisy


def _ok(res: dict | None) -> bool:
    return bool(res) and res.get("status") == "ok"


def ratio(
    results: dict, wl: str, peer: str, key: str = "deliveries_per_s", mine: str = "muxserver"
) -> float | None:
    """``mine``'s (muxserver's) ``key`` (deliveries/s) over ``peer``'s in workload ``wl``."""
    mine, theirs = results.get(wl, {}).get(mine), results.get(wl, {}).get(peer)
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


def _fit(text: str, indent: int = 4) -> str:
    """``text`` wrapped at WIDTH columns, continuation lines indented."""
    return "\n".join(
        textwrap.wrap(text, WIDTH, subsequent_indent=" " * indent, break_on_hyphens=False)
    )


def time_left(seconds: float | None) -> str:
    """``about 50 s left`` / ``about 3 min left`` / ``almost done``."""
    if seconds is None:
        return "time left unknown"
    if seconds < 1:
        return "almost done"
    if seconds < 90:
        return f"about {seconds:.0f} s left"
    return f"about {seconds / 60:.0f} min left"


def progress_line(
    wl: Workload, name: str, res: dict, took: float, cell: int = 0, cells: int = 0,
    left: float | None = None,
) -> str:  # fmt: skip
    """What ``make bench`` prints after each cell: two short lines, each within WIDTH.

    ``cell 7 of 28, about 50 s left: 1 -> 100, muxserver: 4,123,456 deliveries/s ...``
    """
    where = f"cell {cell} of {cells}, {time_left(left)}: " if cells else ""
    head = f"{where}{wl.title}, {name}"
    if not _ok(res):
        return _fit(f"{head}: {res['status']} [{took:.1f} s]")
    half = res["half_rate"]
    first = (
        f"{head}: {res['deliveries_per_s']:,.0f} deliveries/s ({res['messages_per_s']:,.0f} msg/s)"
    )
    second = (
        f"    {took:.1f} s; p50 {_num(half['p50_us'])} us, p99 {_num(half['p99_us'])} us at "
        f"half that rate; CPU server {res['server_cpu']:.0%}, load generator "
        f"{res['loadgen_cpu']:.0%}, others {res['noise_cpu']:.0%}{_bound(res)}"
    )
    return _fit(first) + "\n" + _fit(second, indent=8)


def retry_line(cell: int, cells: int, res: dict, attempt: int, attempts: int) -> str:
    """Why a cell runs again: other processes' CPU during it, in words."""
    return _fit(
        f"cell {cell} of {cells} runs again (attempt {attempt} of {attempts}): other "
        f"processes used {res.get('noise_cpu', 0.0):.0%} of a core during it, more than the "
        f"{NOISY:.0%} that makes a figure noisy; the quietest attempt is kept"
    )


def check_targets(results: dict) -> list[dict]:
    checks = []
    for wl, peer, want in TARGETS:
        if wl not in results or peer not in results[wl]:
            continue
        got = ratio(results, wl, peer)
        mine, theirs = results[wl].get("muxserver", {}), results[wl][peer]
        checks.append(
            {
                "what": f"{WORKLOADS[wl].title}: muxserver / {peer} >= {want}x",
                "kind": "throughput",
                "workload": wl,
                "peer": peer,
                "mine": mine.get("deliveries_per_s") if _ok(mine) else None,
                "theirs": theirs.get("deliveries_per_s") if _ok(theirs) else None,
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
    for wl, system, peer, want in WS_TARGETS:
        cells = results.get(wl, {})
        if system not in cells or peer not in cells:
            continue
        got = ratio(results, wl, peer, mine=system)
        checks.append(
            {
                "what": f"{WORKLOADS[wl].title}: {system} / {peer} >= {want}x",
                "target": want,
                "got": got,
                "met": None if got is None else got >= want,
                "got_per_cpu_s": ratio(
                    results, wl, peer, "deliveries_per_server_cpu_s", mine=system
                ),
                "noisy": noisy(cells[system]) or noisy(cells[peer]),
            }
        )
    peer, factor = LATENCY_TARGET
    cells = results.get(FIXED, {})
    mine, theirs = cells.get("muxserver"), cells.get(peer)
    if mine is not None and theirs is not None:
        got = a = b = None
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
                "kind": "latency",
                "workload": FIXED,
                "rate": FIXED_RATE_MSGS,
                "peer": peer,
                "mine": a,
                "theirs": b,
                "target": factor,
                "got": got,
                "met": None if got is None else got <= factor,
                "noisy": any(n > NOISY for n in fixed_noise),
            }
        )
    return checks


DISPLAY = {"redis": "Redis", "nats": "NATS"}


def _display(name: str) -> str:
    return DISPLAY.get(name, name)


def _rate(per_s: float) -> str:
    return f"{per_s / 1e6:.1f}M" if per_s >= 1e6 else f"{per_s / 1e3:.0f}k"


def _ms(us: float) -> str:
    ms = us / 1000
    return f"{ms:.2f} ms" if ms < 1 else f"{ms:.1f} ms" if ms < 100 else f"{ms:,.0f} ms"


def _share(factor: float) -> str:
    return "half" if factor == 0.5 else f"{factor:g}x"


def explain_target(t: dict) -> str:
    """One target in words, e.g. ``p99 latency at 40k msg/s: muxserver 0.19 ms, Redis 1.0 ms;
    target at most half of Redis's: PASS``."""
    peer = _display(t.get("peer", "?"))
    verdict = {True: "PASS", False: "FAIL", None: "not measured"}[t["met"]]
    noisy_note = " (noisy: other processes were busy)" if t.get("noisy") else ""
    mine, theirs = t.get("mine"), t.get("theirs")
    if t.get("kind") == "latency":
        rate = _rate(t.get("rate", FIXED_RATE_MSGS))
        measured = (
            f"muxserver {_ms(mine)}, {peer} {_ms(theirs)}"
            if mine is not None and theirs is not None
            else "no figures"
        )
        return (
            f"p99 latency at {rate} msg/s: {measured}; target at most "
            f"{_share(t['target'])} of {peer}'s: {verdict}{noisy_note}"
        )
    if t.get("kind") == "throughput":
        title = WORKLOADS[t["workload"]].title
        measured = (
            f"muxserver {_rate(mine)}, {peer} {_rate(theirs)} ({t['got']:.2f}x)"
            if mine and theirs and t.get("got") is not None
            else "no figures"
        )
        return (
            f"{title} deliveries/s: {measured}; target at least {t['target']:g}x "
            f"{peer}'s: {verdict}{noisy_note}"
        )
    return f"{t['what']}: {verdict}{noisy_note}"  # a record from an older bench.json


FIXED_RATE_MSGS = 40_000  # bench.run.FIXED_RATE, repeated to keep this module free of it


def console_summary(doc: dict, md_path: str = "reports/bench.md") -> str:
    """What ``make bench`` prints at the end: within WIDTH columns, targets in words.

    The full Markdown tables (wider than a terminal) go to ``md_path``.
    """
    results = doc["results"]
    wls = list(results)
    peers = [n for n in next(iter(results.values()), {}) if n != "muxserver"]
    meta = doc["meta"]
    lines = [
        _fit(
            f"muxserver benchmark, {meta['mode']} run, {meta['date']}, commit {meta['commit'] or '?'}"
        ),
        "",
        "muxserver's deliveries/s as a multiple of each peer's, same run:",
        "",
        f"{'peer':<18}" + "".join(f"{WORKLOADS[w].title:>12}" for w in wls),
    ]
    for p in peers:
        cells = []
        for w in wls:
            r = ratio(results, w, p)
            status = results[w].get(p, {}).get("status", "")
            cells.append(
                f"{r:.2f}x" if r is not None else "absent" if "not installed" in status else "-"
            )
        lines.append(f"{p:<18}" + "".join(f"{c:>12}" for c in cells))
    if doc.get("targets"):
        lines += ["", "Targets:"]
        lines += [_fit(f"  {explain_target(t)}", indent=4) for t in doc["targets"]]
    lines += ["", f"Full tables (latency, CPU, noise): {md_path}"]
    return "\n".join(lines)


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
        lines += ["", "Targets:", ""]
        for t in doc["targets"]:
            per_cpu = ""
            if t.get("got_per_cpu_s") is not None:
                per_cpu = f" (per server CPU-second: {t['got_per_cpu_s']:.2f}x)"
            lines.append(f"- {explain_target(t)}{per_cpu}")
    return "\n".join(lines)


def targets_panel(doc: dict, width: int = 70) -> str:
    """The chart's text panel: each target in words, wrapped to ``width``."""
    lines = ["Targets", ""]
    for t in doc.get("targets", []):
        lines += textwrap.wrap(explain_target(t), width, subsequent_indent="  ")
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
    # One panel per workload, then the latency panel and the targets' text:
    # as many columns as two rows need (the sequenced cell made it five).
    cols = max(3, -(-(len(wls) + 2) // 2))
    fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 9.5))
    axes = list(axes.flat)
    lat_ax, text_ax = axes[len(wls)], axes[len(wls) + 1]
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
    for ax in axes[len(wls) + 2 :]:
        ax.axis("off")
    ax = lat_ax
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
    ax = text_ax
    ax.axis("off")
    ax.text(0, 1, targets_panel(doc), va="top", ha="left", fontsize=7, family="monospace",
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
