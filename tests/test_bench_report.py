"""bench/run.py and bench/report.py output, on made-up numbers (no benchmark runs).

What ``make bench`` prints must fit 100 columns, say which cell of how many
it is and about how long is left, say why a noisy cell runs again, explain
each target in words, and never name an issue or another internal reference.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import report  # noqa: E402
from bench.loadgen import WORKLOADS  # noqa: E402
from bench.run import Budget  # noqa: E402

INTERNAL = re.compile(r"\bissues?\b|#\d+", re.IGNORECASE)


def cell(dps: float, fanout: int, p99_fixed: float | None = None, noise: float = 0.0) -> dict:
    half = {"p50_us": 120.0, "p99_us": 480.0}
    res = {
        "status": "ok", "deliveries_per_s": dps, "messages_per_s": dps / fanout,
        "deliveries_per_server_cpu_s": dps, "server_cpu": 1.0, "loadgen_cpu": 0.45,
        "noise_cpu": noise, "half_rate": half,
    }  # fmt: skip
    if p99_fixed is not None:
        res["fixed_rate"] = {
            "offered_per_s": 40_000, "achieved_per_s": 39_990, "samples": 48_000,
            "p50_us": p99_fixed / 2, "p99_us": p99_fixed, "other_cpu": noise, "steal_cpu": 0.0,
        }  # fmt: skip
    return res


def made_up_doc() -> dict:
    results = {
        "1-100": {
            "muxserver": cell(4_100_000, 100, p99_fixed=190),
            "uvloop-coalesce": cell(2_000_000, 100, p99_fixed=900),
            "redis": cell(2_200_000, 100, p99_fixed=1000),
            "nats": {"status": "not installed (nats-server)"},
        },
        "1-1": {
            "muxserver": cell(300_000, 1),
            "uvloop-coalesce": cell(200_000, 1),
            "redis": cell(330_000, 1, noise=0.6),
            "nats": {"status": "not installed (nats-server)"},
        },
    }
    doc = {
        "meta": {
            "mode": "quick",
            "date": "2026-12-01 20:00:00 +0000",
            "commit": "abc1234",
            "cpu_model": "Some CPU",
            "server_cpus": [0],
            "loadgen_cpus": [1],
        },  # fmt: skip
        "results": results,
    }
    doc["targets"] = report.check_targets(results)
    return doc


def test_targets_are_explained_in_words():
    lines = [report.explain_target(t) for t in made_up_doc()["targets"]]
    assert (
        "p99 latency at 40k msg/s: muxserver 0.19 ms, Redis 1.0 ms; "
        "target at most half of Redis's: PASS"
    ) in lines
    assert (
        "1 -> 100 deliveries/s: muxserver 4.1M, Redis 2.2M (1.86x); "
        "target at least 1.7x Redis's: PASS"
    ) in lines
    assert any(
        line.startswith("1 -> 1 deliveries/s: muxserver 300k, Redis 330k (0.91x); ")
        and "target at least 0.5x Redis's: PASS (noisy" in line
        for line in lines
    ), lines
    missed = [ln for ln in lines if ln.startswith("1 -> 1 deliveries/s") and "uvloop" in ln]
    assert missed == [
        "1 -> 1 deliveries/s: muxserver 300k, uvloop-coalesce 200k (1.50x); "
        "target at least 1.3x uvloop-coalesce's: PASS"
    ]


def test_failed_and_unmeasured_targets():
    doc = made_up_doc()
    doc["results"]["1-100"]["muxserver"]["fixed_rate"]["p99_us"] = 700
    doc["results"]["1-1"]["redis"] = {"status": "error: it crashed"}
    text = "\n".join(report.explain_target(t) for t in report.check_targets(doc["results"]))
    assert "muxserver 0.70 ms, Redis 1.0 ms; target at most half of Redis's: FAIL" in text
    assert "1 -> 1 deliveries/s: no figures; target at least 0.5x Redis's: not measured" in text


def test_console_output_fits_and_names_no_issue():
    doc = made_up_doc()
    out = report.console_summary(doc, "reports/bench.md")
    md = report.table(doc)
    panel = report.targets_panel(doc)
    for text in (out, md, panel):
        assert not INTERNAL.search(text), INTERNAL.search(text)
    assert max(map(len, out.splitlines())) <= 100, out
    assert max(map(len, panel.splitlines())) <= 70
    assert "Targets:" in out and "Full tables (latency, CPU, noise): reports/bench.md" in out
    assert re.search(r"^redis +1\.86x +0\.91x$", out, re.MULTILINE), out
    assert re.search(r"^nats +absent +absent$", out, re.MULTILINE), out


def test_progress_line_says_which_cell_and_time_left():
    res = cell(4_123_456, 100, p99_fixed=190)
    text = report.progress_line(WORKLOADS["1-100"], "uvloop-coalesce", res, 3.2, 7, 28, 50.4)
    first, second = text.splitlines()
    assert first == (
        "cell 7 of 28, about 50 s left: 1 -> 100, uvloop-coalesce: "
        "4,123,456 deliveries/s (41,235 msg/s)"
    )
    assert second == (
        "    3.2 s; p50 120 us, p99 480 us at half that rate; CPU server 100%, "
        "load generator 45%, others 0%"
    )
    lowered = dict(res, loadgen_cpu=0.95, noise_cpu=0.4)
    long = report.progress_line(WORKLOADS["50-50"], "asyncio-coalesce", lowered, 12.0, 27, 28, 4)
    assert all(len(line) <= 100 for line in long.splitlines()), long
    assert "lower bound" in long and "noisy" in long
    failed = report.progress_line(WORKLOADS["1-1"], "nats", {"status": "not installed"}, 0, 3, 28)
    assert failed == "cell 3 of 28, time left unknown: 1 -> 1, nats: not installed [0.0 s]"
    assert report.time_left(0.4) == "almost done"
    assert report.time_left(200) == "about 3 min left"


def test_rerun_of_a_noisy_cell_says_why():
    line = report.retry_line(7, 28, {"noise_cpu": 0.4}, 2, 3)
    assert line.splitlines()[0].startswith("cell 7 of 28 runs again (attempt 2 of 3): other")
    assert "40% of a core" in line and "25% that makes a figure noisy" in line
    assert all(len(ln) <= 100 for ln in line.splitlines())


def test_budget_estimates_time_left():
    budget = Budget(60, cells=4)
    assert budget.estimate_left(3) is None  # nothing measured yet
    budget.spent(10)
    budget.spent(20)
    assert budget.estimate_left(2) == 30
