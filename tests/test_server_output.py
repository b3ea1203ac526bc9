"""What the ``muxserver`` command tells a person (muxserver/cli.py).

Each message a user ran into: the ready line once, environment values worded
like command-line errors, TLS files named and explained, limits stated, the
port-in-use hint; and /healthz answering 503 from SIGTERM until the process
is gone. Real server processes.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import RawClient
from test_monitoring import Monitored
from tlsutil import make_tls_files

from muxserver import protocol as P


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "muxserver", *args],
        capture_output=True, text=True, timeout=30, env=dict(os.environ, **(env or {})),
    )  # fmt: skip


def test_ready_line_appears_once(server_factory):
    srv = server_factory()
    RawClient(srv.address).hello("a")
    srv.signal(signal.SIGTERM)
    assert srv.wait() == 0
    out, err = srv.proc.stdout.read(), srv.proc.stderr.read()
    everything = srv.ready_line + out + err
    assert everything.count("listening on") == 1, everything


def test_shutdown_says_what_it_waits_for(server_factory):
    srv = server_factory("--log-level", "info", "--drain-timeout", "5")
    quiet = socket.create_connection(srv.address)  # connected, no HELLO yet
    try:
        time.sleep(0.2)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        err = srv.proc.stderr.read()
    finally:
        quiet.close()
    assert "shutting down: waiting for 1 connection (no HELLO yet) up to 5 s" in err, err


def test_waiting_for_counts_in_words():
    from muxserver.session import CLOSING, HELLO_WAIT, OPEN
    from muxserver.stats import waiting_for

    class S:
        def __init__(self, state):
            self.state = state

    assert waiting_for([]) == "no connections"
    assert waiting_for([S(OPEN)]) == "1 connection (open)"
    many = [S(OPEN), S(OPEN), S(HELLO_WAIT), S(CLOSING)]
    assert waiting_for(many) == "4 connections (2 open, 1 no HELLO yet, 1 closing)"


def test_environment_errors_read_like_command_line_errors():
    cli = run("--port", "abc")
    env = run(env={"MUXSERVER_PORT": "abc"})
    assert cli.returncode == env.returncode == 2
    assert cli.stderr == "muxserver: error: argument --port: 'abc' is not a whole number\n"
    assert (
        env.stderr == "muxserver: error: environment MUXSERVER_PORT: 'abc' is not a whole number\n"
    )
    assert "int()" not in env.stderr
    assert run(env={"MUXSERVER_PING_INTERVAL": "soon"}).stderr == (
        "muxserver: error: environment MUXSERVER_PING_INTERVAL: 'soon' is not a number\n"
    )
    assert run(env={"MUXSERVER_PORT": "70000"}).stderr == (
        "muxserver: error: environment MUXSERVER_PORT: '70000': must be 0..65535\n"
    )


def test_long_name_states_the_limit():
    out = run("--name", "n" * 300)
    assert out.returncode == 2
    assert "must be 1..255 bytes of UTF-8 (this one is 300)" in out.stderr
    assert "n" * 41 not in out.stderr  # the value is shortened; the limit is the news


def test_tls_files_are_named_and_explained(tmp_path):
    missing = run("--port", "0", "--tls-cert", "/nope.pem")
    assert (missing.returncode, missing.stderr) == (
        1,
        "muxserver: --tls-cert /nope.pem: no such file\n",
    )
    text = tmp_path / "notes.pem"
    text.write_text("just some words\n")
    notpem = run("--port", "0", "--tls-cert", str(text))
    assert notpem.returncode == 1
    assert notpem.stderr.startswith(f"muxserver: --tls-cert {text} is not a PEM file: expected")
    tls = make_tls_files(tmp_path)
    nokey = run("--port", "0", "--tls-cert", tls.ca)  # a certificate without its key
    assert nokey.returncode == 1
    assert nokey.stderr.count("\n") == 1 and f"--tls-cert {tls.ca}" in nokey.stderr
    assert "--tls-key" in nokey.stderr  # says how to give the key
    badkey = run("--port", "0", "--tls-cert", tls.ca, "--tls-key", str(text))
    assert badkey.stderr == (
        f"muxserver: --tls-key {text} is not a PEM file: expected a private key between "
        "'-----BEGIN ...-----' and '-----END ...-----' lines\n"
    )


def test_port_in_use_says_how_to_pick_another(server):
    out = run("--port", str(server.port))
    assert out.returncode == 1
    assert out.stderr == (
        f"muxserver: port {server.port} is already in use (pick another with --port, "
        f"e.g. --port {server.port + 1}, or --port 0 for any free one)\n"
    )


def _healthz(mon: Monitored) -> int | None:
    """The status of one GET /healthz, or None once the port is closed."""
    conn = http.client.HTTPConnection(mon.mhost, mon.mport, timeout=5)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def test_healthz_is_503_from_sigterm_until_exit(server_factory):
    mon = Monitored(server_factory("--metrics-port", "0", "--drain-timeout", "3"))
    holders = [RawClient(mon.srv.address) for _ in range(3)]
    for i, c in enumerate(holders):
        c.hello(f"h{i}")  # they never close: the server drains until drain_timeout
    assert _healthz(mon) == 200
    mon.srv.signal(signal.SIGTERM)
    statuses = []
    deadline = time.monotonic() + 15
    while (status := _healthz(mon)) is not None:  # from the first request after the signal
        statuses.append(status)
        assert time.monotonic() < deadline, "the server never stopped"
        time.sleep(0.05)
    assert len(statuses) >= 10, statuses  # about 3 s of draining, probed every 50 ms
    assert set(statuses) == {503}, statuses
    assert isinstance(holders[0].recv_type(P.Error), P.Error)
    assert mon.srv.wait() == 0
