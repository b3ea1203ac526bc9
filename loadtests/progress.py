"""The progress line ``make loadtest`` prints every few seconds (``--compact``).

Why a module of its own: the locustfile is long enough, and this is display
only: nothing here feeds the summary or the pass/fail verdict.

In a single Locust process the counters are at hand. In distributed mode the
master has none of its own: each worker sends ``mux_progress`` with two
numbers (deliveries, loss so far) every period, and the master adds up the
latest report of each; a separate message from the drain's ``mux_tally`` so
the drain never mistakes a progress report for a drained worker's counters.
"""

from __future__ import annotations

import time

import gevent

from loadtests.tally import Tally, format_progress

DEFAULT_EVERY_S = 5.0


def every(environment) -> float:
    """Seconds between progress lines (``--progress-every``)."""
    value = getattr(environment.parsed_options, "progress_every", DEFAULT_EVERY_S)
    return max(0.1, float(value))


def loss(tally: Tally) -> int:
    """Messages known lost so far: sequence gaps (net of late arrivals) and duplicates."""
    return max(tally.gaps, 0) + tally.duplicates


def report(environment, node, tally: Tally) -> None:
    """Worker: send the master this process's counts every period, until drained."""
    runner = environment.runner
    while node.tally is tally and not node.drained:
        gevent.sleep(every(environment))
        runner.send_message("mux_progress", [tally.delivered, loss(tally)])


def show(environment, node, tally: Tally, distributed: bool) -> None:
    """Master (``distributed``) or single process: one line every period until the summary.

    ``node.progress`` holds the workers' latest (delivered, loss) reports.
    """
    total = float(getattr(environment.parsed_options, "run_time", 0) or 0)
    last, t_last = 0, time.monotonic()
    while node.tally is tally and not node.finished:
        gevent.sleep(every(environment))
        if node.tally is not tally or node.finished:
            return
        if distributed:
            delivered = sum(d for d, _ in node.progress.values())
            lost = sum(n for _, n in node.progress.values())
        else:
            delivered, lost = tally.delivered, loss(tally)
        now = time.monotonic()
        rate = (delivered - last) / max(now - t_last, 1e-9)
        last, t_last = delivered, now
        line = format_progress(
            time.time() - tally.t_start, total, environment.runner.user_count, rate, lost,
            draining=not node.sending,
        )  # fmt: skip
        print(line, flush=True)
