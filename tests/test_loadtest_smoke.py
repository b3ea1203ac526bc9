"""Smoke test of the Locust load test (loadtests/): can its counts be trusted?

Importing Locust monkey-patches the importing process with gevent, so nothing
here imports the locustfile: each scenario runs as ``loadtests/run.py`` (the
script behind ``make loadtest``) in a subprocess, which starts its own real
server, runs Locust headless for a few seconds with a few dozen users, and
leaves CSV files and a JSON summary. All runs start at once, so the whole
module costs about one run's wall time.

The assertions are about correctness, never speed (the machine is shared):
zero failures, zero loss, and a non-zero count in the CSV. The pure counting
code (loadtests/tally.py) is tested directly at the end.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests.recoverycheck import RoomCheck  # noqa: E402
from loadtests.tally import (  # noqa: E402
    MIN_PAYLOAD,
    PAYLOAD_HEAD,
    SequenceTracker,
    Tally,
    bucket,
    format_progress,
    format_summary,
    make_payload,
    percentile,
    summary_dict,
)

USERS = 24
COMMON = [
    "--users", str(USERS), "--spawn-rate", "100", "--duration", "4s", "--rate", "5",
    "--progress-every", "0.5",  # 8 due in 4 s; 2 asked: a loaded machine starves greenlets
]  # fmt: skip
RUNS = {
    "chat": ["--scenario", "chat"],
    "broadcast": ["--scenario", "broadcast", "--publishers", "4"],
    "direct": ["--scenario", "direct"],
    "churn": ["--scenario", "churn"],
    # Workers report their counters to the master: the summary must still add up.
    "chat-distributed": ["--scenario", "chat", "--processes", "2"],
    # make loadtest TRANSPORT=ws: the same users and rows over WebSocket (/ws).
    "chat-ws": ["--scenario", "chat", "--transport", "ws"],
}
# make loadtest SCENARIO=recovery, in a second batch (after the first: two cores).
RECOVERY_RUNS = {
    # Users cut their sockets (no BYE) about every 1.5 s and resume half a second later.
    "recovery": ["--scenario", "recovery", "--cut-every", "1.5", "--duration", "6s"],
    # The same with a history of 3 messages (so re-joins find gaps, announced) and 2 %
    # of deliveries ignored by the users: the run must report exactly those as loss.
    "recovery-drop": [
        "--scenario",
        "recovery",
        "--duration",
        "6s",
        "--cut-every",
        "1.5",
        "--offline",
        "1.5",
        "--drop-for-test",
        "0.02",
        "--server-args",
        "--history-size 3",
    ],
}
TIMEOUT = 180  # far beyond a healthy run (~10 s); only a hang gets here


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return run_all(tmp_path_factory.mktemp("loadtest"), RUNS)


@pytest.fixture(scope="module")
def recovery_runs(tmp_path_factory) -> dict:
    return run_all(tmp_path_factory.mktemp("loadtest-recovery"), RECOVERY_RUNS)


def run_all(base: Path, batch: dict[str, list[str]]) -> dict:
    """Start every run of ``batch`` at once; (status, output, reports dir, scenario) by name."""
    procs = {}
    for name, args in batch.items():
        out = base / name
        cmd = [sys.executable, str(ROOT / "loadtests" / "run.py"), *COMMON, *args]
        cmd += ["--reports", str(out)]
        procs[name] = (
            subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            ),
            out,
            args[1],
        )
    results = {}
    for name, (proc, out, scenario) in procs.items():
        try:
            output, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            output += f"\n[killed after {TIMEOUT} s]"
        results[name] = (proc.returncode, output, out, scenario)
    return results


def read_stats(out: Path, scenario: str) -> dict[str, dict]:
    with open(out / f"loadtest-{scenario}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("name", list(RUNS))
def test_scenario_runs_without_failures_or_loss(runs, name):
    rc, output, out, scenario = runs[name]
    assert rc == 0, f"loadtests/run.py failed:\n{output[-6000:]}"
    summary = json.loads((out / f"loadtest-{scenario}-summary.json").read_text())
    assert summary["passed"], summary["problems"]
    assert summary["errors"] == {}
    assert summary["gaps"] == summary["duplicates"] == summary["reordered"] == 0
    assert summary["users"] == USERS
    assert (out / f"loadtest-{scenario}.html").stat().st_size > 0

    stats = read_stats(out, scenario)
    assert all(row["Failure Count"] == "0" for row in stats.values()), stats
    if scenario == "churn":
        assert int(stats["connect"]["Request Count"]) > 0
        assert summary["cycles"] > 0
    else:
        assert int(stats["deliver"]["Request Count"]) > 0
        assert int(stats["emit"]["Request Count"]) > 0
        # Acked EMITs: the server's recipient counts are the deliveries expected,
        # and every one of them arrived.
        assert summary["delivered"] == summary["expected"] > 0
        assert summary["missing"] == 0 and summary["unacked"] == 0
        # Sample of 1 (small runs): Locust's row counts every delivery.
        assert summary["deliver_sample"] == 1
        assert int(stats["deliver"]["Request Count"]) == summary["delivered"]
    if name.endswith("distributed"):
        assert summary["processes"] == 2

    # What a person reads: progress while it runs, the summary once, 100 columns,
    # the server's log (at info) listed with the reports.
    progress = [line for line in output.splitlines() if re.match(r"loadtest +\d+ s", line)]
    assert len(progress) >= 2, output
    assert all("users" in line and "deliveries/s" in line for line in progress)
    assert "loss so far 0" in progress[-1]
    assert output.count("muxserver load test:") == 1, output
    # (The report paths are as long as the directory the caller chose.)
    wide = [line for line in output.splitlines() if len(line) > 100 and str(out) not in line]
    assert not wide, wide
    server_log = out / f"loadtest-{scenario}-server.log"
    assert f"loadtest-{scenario}-server.log (the server's log, at info)" in output
    assert " INFO " in server_log.read_text()


def test_recovery_users_cut_resume_and_lose_nothing(recovery_runs):
    rc, output, out, scenario = recovery_runs["recovery"]
    assert rc == 0, f"loadtests/run.py failed:\n{output[-6000:]}"
    summary = json.loads((out / "loadtest-recovery-summary.json").read_text())
    assert summary["passed"], summary["problems"]
    assert summary["errors"] == {}
    assert summary["gaps"] == summary["duplicates"] == summary["reordered"] == 0
    rec = summary["recovery"]
    assert rec["joins"] == summary["users"] == USERS
    # Every cut came back as the same session, re-joined with its position,
    # and what it missed meanwhile was replayed.
    assert rec["cuts"] > 0 and rec["resumed"] == rec["cuts"]
    assert rec["rejoin_complete"] > 0 and rec["replayed"] > 0
    assert rec.get("rejoin_complete", 0) + rec.get("gap_notices", 0) >= rec["cuts"]
    assert summary["acked"] + rec.get("unconfirmed", 0) == summary["sent"] > 0
    stats = read_stats(out, scenario)
    assert all(row["Failure Count"] == "0" for row in stats.values()), stats
    assert int(stats["resume"]["Request Count"]) == rec["cuts"]
    assert int(stats["deliver"]["Request Count"]) > 0
    assert "unannounced loss      gaps 0 (tail 0)  duplicates 0  reordered 0" in output
    wide = [line for line in output.splitlines() if len(line) > 100 and str(out) not in line]
    assert not wide, wide


def test_recovery_run_reports_unannounced_loss_apart_from_announced_gaps(recovery_runs):
    rc, output, out, _ = recovery_runs["recovery-drop"]
    assert rc == 1, output[-6000:]
    assert "loadtest FAILED" in output
    summary = json.loads((out / "loadtest-recovery-summary.json").read_text())
    rec = summary["recovery"]
    assert not summary["passed"]
    # The history is too short for a second away: the server announced what it had lost,
    # and that is no failure; the deliveries the users ignored are, each one of them.
    assert rec["announced"] > 0 and rec["gap_notices"] > 0
    assert rec["dropped_for_test"] > 0
    assert summary["gaps"] == rec["dropped_for_test"]
    assert summary["duplicates"] == summary["reordered"] == 0
    assert summary["errors"] == {}
    assert summary["problems"] == [f"{summary['gaps']} sequence gaps (lost)"]


# ------------------------------------------------------- the counting, directly
def test_payload_carries_sender_sequence_and_time():
    payload = make_payload(7, 42, 1234.5, 64)
    assert len(payload) == 64
    assert PAYLOAD_HEAD.unpack_from(payload) == (7, 42, 1234.5)
    assert len(make_payload(7, 42, 1.0, 0)) == MIN_PAYLOAD
    assert len(make_payload(7, 42, 1.0, 200_000)) == 200_000


def test_sequence_tracker_tells_gaps_reordering_and_duplicates():
    seqs = SequenceTracker()
    assert seqs.check(1, 10) == ("ok", 0)  # first sight: joined late, no loss
    assert seqs.check(1, 11) == ("ok", 0)
    assert seqs.check(2, 0) == ("ok", 0)  # senders are independent
    assert seqs.check(1, 14) == ("gap", 2)  # 12 and 13 missing
    assert seqs.check(1, 12) == ("reordered", 1)  # late, not lost
    assert seqs.check(1, 12) == ("duplicate", 1)
    assert seqs.check(1, 11) == ("duplicate", 1)
    assert seqs.check(1, 15) == ("ok", 0)


def test_histogram_buckets_and_percentiles():
    assert [bucket(u) for u in (-5, 0, 999, 1234, 56_789, 123_456, 9_876_543)] == [
        0, 0, 999, 1230, 56_700, 123_000, 9_870_000,
    ]  # fmt: skip
    hist = {100: 50, 200: 45, 5000: 5}
    assert percentile(hist, 0.5) == 100
    assert percentile(hist, 0.95) == 200
    assert percentile(hist, 0.99) == 5000
    assert percentile({}, 0.5) is None


def test_tallies_merge_across_processes_through_plain_data():
    a, b = Tally(t_start=10.0), Tally(t_start=9.0)
    a.sent, a.expected, a.delivered, a.latency = 3, 6, 6, {100: 6}
    b.sent, b.expected, b.delivered, b.latency = 2, 4, 4, {100: 1, 300: 3}
    b.error("SLOW_CONSUMER")
    b.mark_ramped(9.5)
    b.delivered += 4
    b.mark_stopped(11.5)
    merged = Tally(nodes=0)
    for t in (a, b):
        merged.merge(Tally.from_dict(t.to_dict()))  # what a worker ships to the master
    assert (merged.sent, merged.expected, merged.delivered) == (5, 10, 14)
    assert merged.latency == {100: 7, 300: 3}
    assert merged.errors == {"SLOW_CONSUMER": 1}
    assert merged.nodes == 2 and merged.t_start == 9.0
    assert merged.steady["delivered"] == pytest.approx(2.0)  # 4 deliveries in 2 s

    summary = summary_dict(merged, "chat", acks=True, sample=1, offered=5.0)
    assert not summary["passed"]  # an error, and 14 received against 10 expected
    assert "SLOW_CONSUMER" in format_summary(summary)


def test_progress_line_and_summary_fit_100_columns():
    line = format_progress(10.2, 30, 200, 1234.4, 0)
    assert line == "loadtest   10 s of 30 s   200 users   1,234 deliveries/s   loss so far 0"
    draining = format_progress(31, 30, 2000, 0, 7, draining=True)
    assert draining == "loadtest   31 s, draining   2,000 users   0 deliveries/s   loss so far 7"
    huge = format_progress(1e9, 1e9, 10**9, 1e12, 10**12)
    assert len(huge) <= 100
    t = Tally(t_start=1.0)
    for i in range(40):
        t.error(f"SOME_VERY_LONG_ERROR_NAME_{i}", 1000 + i)
    summary = summary_dict(t, "chat", acks=True, sample=1, offered=5.0)
    text = format_summary(summary)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "SOME_VERY_LONG_ERROR_NAME_39 x1039" in text.replace("\n" + " " * 24, " ")


# ------------------------------------------- the recovery scenario's loss check
def test_room_check_accepts_a_clean_stream_and_a_complete_resume():
    room = RoomCheck()
    assert room.recovery("fresh", 77, 11, None) == ("ok", 0)  # joined when the room was at 10
    assert room.event(11, 1, 0) == []
    assert room.event(12, 2, 0) == []
    assert room.event(13, 1, 5) == []  # a sender's n may skip (lost in its own cut), not loss
    # Cut, resumed, re-joined: the replay starts right after what we saw.
    assert room.recovery("complete", 77, 14, None) == ("ok", 0)
    assert room.event(14, 2, 1) == []
    assert room.tail(14) == 0


def test_room_check_counts_unannounced_gaps_duplicates_and_reordering():
    room = RoomCheck()
    room.recovery("fresh", 5, 1, None)
    assert room.event(1, 1, 0) == []
    assert room.event(4, 1, 1) == [("gap", 2)]  # 2 and 3 never announced
    assert room.event(2, 2, 0) == [("reordered", 1)]  # late, not lost after all
    assert room.event(2, 2, 0) == [("duplicate", 1)]  # the same seq twice
    assert room.event(4, 1, 1) == [("duplicate", 1)]
    # A resent message: a new seq, but its (sender, n) again; and sender order.
    assert room.event(5, 1, 1) == [("duplicate", 1)]
    assert room.event(6, 1, 0) == [("reordered", 1)]
    # A gap and an out-of-order sender at once: both are reported.
    assert room.event(9, 1, 0) == [("gap", 2), ("reordered", 1)]
    # The tail: the room reached 12, this receiver never got 10..12.
    assert room.tail(12) == 3


def test_room_check_lets_announced_gaps_through_and_only_those():
    room = RoomCheck()
    room.recovery("fresh", 5, 1, None)
    for seq in (1, 2, 3):
        assert room.event(seq, 1, seq) == []
    # Re-join after 3: 4..10 evicted, the replay starts at 11.
    assert room.recovery("gap", 5, 11, (4, 10)) == ("announced", 7)
    assert room.event(11, 1, 11) == []
    # A GAP frame in the middle of a replay: 12..13 gone; but 14 was never announced.
    assert room.gap(12, 13) == ("announced", 2)
    assert room.event(15, 1, 15) == [("gap", 1)]
    # An announced range does not cover the seqs before it.
    room.recovery("complete", 5, 16, None)
    assert room.recovery("gap", 5, 21, (18, 20)) == ("announced", 3)
    assert room.event(21, 1, 21) == [("gap", 2)]  # 16 and 17: neither replayed nor announced
    assert room.tail(21) == 0


def test_room_check_restarts_on_an_announced_reset_only():
    room = RoomCheck()
    room.recovery("fresh", 5, 1, None)
    room.event(1, 1, 1)
    assert room.recovery("reset", 6, 3, None) == ("reset", 1)  # new epoch: replay from 3
    assert room.event(3, 1, 2) == []
    assert room.recovery("complete", 9, 4, None) == ("epoch", 1)  # epoch changed, no reset
    assert room.event(4, 1, 3) == []


def test_recovery_summary_reports_announced_gaps_apart_and_fails_on_loss():
    t = Tally(t_start=1.0, t_stop=3.0, sent=10, acked=10, delivered=30)
    t.recovery.update(cuts=3, resumed=3, rejoin_complete=2, gap_notices=1, announced=7)
    summary = summary_dict(t, "recovery", acks=False, sample=1)
    assert summary["passed"], summary["problems"]
    text = format_summary(summary)
    assert "7 messages gone, as the server said (1 notices" in text and "3 resumed" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    t.duplicates = 1
    assert not summary_dict(t, "recovery", acks=False, sample=1)["passed"]
    # A run without a single cut tested nothing.
    quiet = Tally(t_start=1.0, t_stop=3.0)
    assert "no connection was cut" in summary_dict(quiet, "recovery", False, 1)["problems"][0]
