"""Autobahn|Testsuite conformance of the WebSocket codec (protocol.md section 11).

kosoku drives Autobahn's own case files (every case outside 12.* and 13.*,
which test permessage-deflate, never negotiated here) against
tests/ws_echo.py: an echo server on muxserver's loop built from HttpFront,
WsInbound and the hand-built outbound headers, in a process of its own on
127.0.0.1. Every case must end OK, NON-STRICT or INFORMATIONAL, for the
message exchange and for the closing handshake alike.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kosoku import FailureError, run_fuzzingclient

from tests.ws_echo import READY

ROOT = Path(__file__).resolve().parent.parent
ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
# The whole selection is 301 cases with kosoku 0.1; fewer means cases went missing.
MIN_CASES = 300


@pytest.fixture()
def echo_server():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ws_echo", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY), f"echo server did not start: {line!r} {proc.stderr.read()}"
        yield line[len(READY) :].strip()
    finally:
        proc.kill()
        proc.wait(10)


def test_autobahn_cases(echo_server: str) -> None:
    started = time.monotonic()

    async def run():
        try:
            return await asyncio.wait_for(
                run_fuzzingclient(f"ws://{echo_server}/ws", None, ["12.*", "13.*"], concurrency=2),
                timeout=110,
            )
        except FailureError as failure:
            return failure.results

    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    counts = collections.Counter((r.behavior.value, r.behavior_close.value) for r in results)
    bad = [
        f"{r.case_id}: {r.behavior.value}/{r.behavior_close.value}: {r.result} {r.result_close}"
        for r in results
        if r.behavior.value not in ACCEPTED or r.behavior_close.value not in ACCEPTED
    ]
    informational = [r.case_id for r in results if r.behavior.value == "INFORMATIONAL"]
    print(
        f"kosoku: {len(results)} cases in {elapsed:.1f}s: "
        + ", ".join(f"{b}/{c}={n}" for (b, c), n in sorted(counts.items()))
        + f"; informational: {' '.join(informational)}"
    )
    assert not bad, "\n".join(bad)
    assert len(results) >= MIN_CASES
    assert not any(r.case_id.split(".")[0] in ("12", "13") for r in results)
