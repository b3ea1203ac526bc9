"""The monitoring port, structured logs and check-config, against real server processes.

How tests find the monitoring port: the server is started with
``--metrics-port 0`` and logs ``metrics on http://HOST:PORT/metrics`` on
stderr *before* it prints the ready line on stdout, so once ServerProcess
has seen the ready line that log line is already in the stderr pipe. This
keeps the ready line exactly one line and avoids the race of picking a
"free" port in the test and hoping nobody takes it before the server does.

Counters are compared as differences between two scrapes taken around
traffic whose effect is known (every EMIT is acknowledged before the
second scrape, and the server is one loop, so a scrape sees all of it).
Nothing here depends on timing.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime

import pytest
from conftest import RawClient, ServerProcess, reply_count
from prometheus_client.parser import text_string_to_metric_families

from muxserver import protocol as P
from muxserver.loop import TURN_BUCKETS, EventLoop
from muxserver.monitor import CLIENT_TIMEOUT, Monitor
from muxserver.server import Config, Server
from muxserver.testing import FakeClock


class StderrLines:
    """Lines of a server's stderr, read from the raw fd with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.fd = proc.stderr.fileno()
        self.buf = b""
        self.seen: list[str] = []

    def wait_for(self, predicate, timeout: float = 15.0) -> str:
        for line in self.seen:
            if predicate(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = raw.decode("utf-8", "replace")
                self.seen.append(line)
                if predicate(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no such log line; got {self.seen[-5:]}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise EOFError(f"stderr closed; got {self.seen[-5:]}")
                self.buf += chunk


class Monitored:
    """A server process with its monitoring port."""

    def __init__(self, srv: ServerProcess, token: str = "") -> None:
        self.srv = srv
        self.token = token
        self.stderr = StderrLines(srv.proc)
        line = self.stderr.wait_for(lambda s: "metrics on http://" in s)
        hostport = line.split("http://", 1)[1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        self.mhost, self.mport = host.strip("[]"), int(port)

    def get(self, path: str, token: str | None = None, method: str = "GET"):
        """(status, headers dict, body text) of one request on a new connection."""
        conn = http.client.HTTPConnection(self.mhost, self.mport, timeout=10)
        headers = {}
        token = self.token if token is None else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read().decode("utf-8")
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        finally:
            conn.close()

    def json(self, path: str):
        status, _, body = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def metrics(self) -> dict:
        """{(sample name, frozenset(labels)): value}, parsed by prometheus_client."""
        status, headers, body = self.get("/metrics")
        assert status == 200, body
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = {}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def monitored(server_factory):
    def start(*args: str, token: str = "", env=None) -> Monitored:
        extra = ("--token", token) if token else ()
        return Monitored(server_factory("--metrics-port", "0", *extra, *args, env=env), token)

    return start


# ============================================================ /metrics


def test_counters_follow_traffic(monitored):
    mon = monitored()
    members = [RawClient(mon.srv.address) for _ in range(4)]
    for i, c in enumerate(members):
        c.hello(f"m{i}")
        c.join("room")
    sender = members[0]
    before = mon.metrics()
    n, m = 25, len(members)
    # Echo on: the sender is one of the M recipients, so its echo of each
    # EMIT arrives before the REPLY.
    for i in range(n):
        sender.send(P.Emit(i + 1, P.TARGET_ROOM, "room", "ev", b"p%d" % i, P.EMIT_ECHO))
        assert isinstance(sender.recv(), P.Event)
        assert reply_count(sender.recv_type(P.Reply)) == m
    for c in members[1:]:
        for _ in range(n):
            c.recv_type(P.Event)
    after = mon.metrics()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("muxserver_deliveries_total") == n * m
    assert delta("muxserver_frames_received_total", type="EMIT") == n
    assert delta("muxserver_frames_sent_total", type="EVENT") == n * m
    assert delta("muxserver_frames_sent_total", type="REPLY") == n
    assert delta("muxserver_received_bytes_total") > 0
    assert delta("muxserver_sent_bytes_total") > 0
    assert value(after, "muxserver_connections", state="open") == m
    assert value(after, "muxserver_rooms") == 1
    assert value(after, "muxserver_namespaces") == 1
    assert value(after, "muxserver_connections_accepted_total") == m
    assert value(after, "muxserver_frames_received_total", type="HELLO") == m
    assert value(after, "muxserver_frames_received_total", type="JOIN") == m
    assert value(after, "muxserver_frames_sent_total", type="WELCOME") == m
    assert value(after, "muxserver_up") == 1
    # Closing connections must not make any counter go down.
    for c in members:
        c.close()
    sender2 = RawClient(mon.srv.address)
    sender2.hello("late")
    sender2.join("room")  # a fresh room: the old one went with its members
    final = mon.metrics()
    for name in (
        "muxserver_received_bytes_total",
        "muxserver_sent_bytes_total",
        "muxserver_deliveries_total",
    ):
        assert value(final, name) >= value(after, name)
    assert value(final, "muxserver_connections", state="open") == 1
    sender2.close()


def test_emits_of_one_read_are_each_counted(monitored):
    """A read of pipelined EMITs is handled as a run, counted once per run:
    every EMIT must still show in frames_received (plain ones, acked ones in
    the middle, and a run broken by another room)."""
    mon = monitored()
    a, b = RawClient(mon.srv.address), RawClient(mon.srv.address)
    for c, nick in ((a, "a"), (b, "b")):
        c.hello(nick)
        c.join("r1")
        c.join("r2")
    before = mon.metrics()
    frames = [P.Emit(0, P.TARGET_ROOM, "r1", "ev", b"x") for _ in range(40)]
    frames[10] = P.Emit(a.next_req(), P.TARGET_ROOM, "r1", "ev", b"acked")
    frames[20] = P.Emit(0, P.TARGET_ROOM, "r2", "ev", b"other room")
    a.send_raw(b"".join(P.encode(f) for f in frames))
    for _ in frames:
        b.recv_type(P.Event)
    a.recv_type(P.Reply)
    after = mon.metrics()
    got = value(after, "muxserver_frames_received_total", type="EMIT")
    assert got - value(before, "muxserver_frames_received_total", type="EMIT") == len(frames)


def test_errors_by_code_and_reply_errors(monitored):
    mon = monitored()
    bad = RawClient(mon.srv.address)
    bad.hello("bad")
    bad.send_raw(P.encode_frame(0x42, b""))  # unknown type: fatal
    bad.expect_error(P.UNKNOWN_TYPE)
    c = RawClient(mon.srv.address)
    c.hello("c")
    reply = c.emit_room("not-joined", "ev", b"")
    assert reply.status == P.NOT_MEMBER
    samples = mon.metrics()
    assert value(samples, "muxserver_errors_sent_total", code="UNKNOWN_TYPE") == 1
    assert value(samples, "muxserver_frames_sent_total", type="ERROR") == 1
    assert value(samples, "muxserver_reply_errors_total", code="NOT_MEMBER") == 1
    assert value(samples, "muxserver_frames_received_total", type="unknown") == 1
    c.close()


def test_slow_consumer_counted(monitored):
    mon = monitored("--max-output", "200000", "--drain-timeout", "60")
    slow = RawClient(mon.srv.address)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.hello("slow")
    slow.join("r")
    pub = RawClient(mon.srv.address)
    pub.hello("pub")
    pub.join("r")
    payload = b"x" * 65536
    # Until the kernel's buffers are full and the backlog passes the bound;
    # the slow member never reads. The cap only stops a broken server.
    for i in range(2000):
        pub.emit_room("r", "big", payload)
        if i % 16 == 15:
            samples = mon.metrics()
            if value(samples, "muxserver_slow_consumer_disconnects_total") == 1:
                break
    else:
        pytest.fail("slow consumer was never cut")
    line = mon.stderr.wait_for(lambda s: "slow consumer" in s)
    assert "from 127.0.0.1:" in line
    slow.close()
    pub.close()


def test_exposition_format(monitored):
    mon = monitored()
    c = RawClient(mon.srv.address)
    c.hello("x")
    status, _, body = mon.get("/metrics")
    assert status == 200 and body.endswith("\n")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    expected = {
        "muxserver_connections": "gauge",
        "muxserver_connections_accepted": "counter",
        "muxserver_connections_refused": "counter",
        "muxserver_rooms": "gauge",
        "muxserver_frames_received": "counter",
        "muxserver_frames_sent": "counter",
        "muxserver_received_bytes": "counter",
        "muxserver_sent_bytes": "counter",
        "muxserver_deliveries": "counter",
        "muxserver_errors_sent": "counter",
        "muxserver_slow_consumer_disconnects": "counter",
        "muxserver_output_queued_bytes": "gauge",
        "muxserver_output_queued_max_bytes": "gauge",
        "muxserver_loop_turn_duration_seconds": "histogram",
        "muxserver_uptime_seconds": "gauge",
        "process_cpu_seconds": "counter",
    }
    for name, kind in expected.items():
        assert name in families, name
        assert families[name].type == kind, name
    # Every counter sample is named ..._total (the parser strips it from the family name).
    for family in families.values():
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
    hist = families["muxserver_loop_turn_duration_seconds"]
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
    assert [s.labels["le"] for s in buckets][-1] == "+Inf"
    assert len(buckets) == len(TURN_BUCKETS) + 1
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and counts[-1] > 0
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    assert count == counts[-1]
    c.close()


# ========================================================== /healthz


def test_healthz_flips_to_503_while_draining(monitored):
    mon = monitored("--drain-timeout", "60")
    assert mon.get("/healthz")[:1] == (200,)
    # A client that holds on: the server drains until it closes.
    c = RawClient(mon.srv.address)
    c.hello("holdout")
    mon.srv.signal(signal.SIGTERM)
    c.recv_type(P.Error)  # SHUTTING_DOWN: the drain has begun
    status, _, body = mon.get("/healthz")
    assert (status, body) == (503, "draining\n")
    assert value(mon.metrics(), "muxserver_up") == 0
    c.close()
    assert mon.srv.wait() == 0


# ============================================================ /connz


def _connect_many(address, nicks, room="lobby"):
    clients = []
    for nick in nicks:
        c = RawClient(address)
        c.hello(nick)
        c.join(room)
        clients.append(c)
    return clients


def test_connz_paging(monitored):
    mon = monitored()
    clients = _connect_many(mon.srv.address, [f"n{i}" for i in range(7)])
    all_ = mon.json("/connz")
    assert all_["total"] == 7 and all_["count"] == 7 and all_["sort"] == "id"
    ids = [c["id"] for c in all_["connections"]]
    assert ids == sorted(ids)
    first = all_["connections"][0]
    assert first["nick"] == "n0" and first["namespace"] == "/" and first["rooms"] == ["lobby"]
    assert first["peer"].startswith("127.0.0.1:") and first["state"] == "open"
    assert first["frames_in"] == 2 and first["frames_out"] == 2  # HELLO, JOIN / WELCOME, REPLY
    datetime.fromisoformat(first["connected_since"].replace("Z", "+00:00"))
    paged = []
    for offset in range(0, 9, 3):
        page = mon.json(f"/connz?limit=3&offset={offset}")
        assert page["total"] == 7 and page["limit"] == 3 and page["offset"] == offset
        paged += [c["id"] for c in page["connections"]]
    assert paged == ids
    assert mon.json("/connz?offset=100")["connections"] == []
    for bad in ("limit=0", "limit=x", "offset=-1", "sort=nope"):
        status, _, body = mon.get(f"/connz?{bad}")
        assert status == 400 and "error" in json.loads(body), bad
    for c in clients:
        c.close()


def test_connz_sort_by_pending(monitored):
    mon = monitored("--max-output", str(256 * 1024 * 1024))
    others = _connect_many(mon.srv.address, ["a", "b"], room="r")
    slow = RawClient(mon.srv.address)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.hello("slow")
    slow.join("r")
    pub = others[0]
    payload = b"y" * 65536
    # Emit until the slow member's backlog shows (the kernel hides the first MiBs).
    for i in range(2000):
        pub.emit_room("r", "big", payload)
        for c in others[1:]:
            c.recv_type(P.Event)
        if i % 16 == 15:
            top = mon.json("/connz?sort=pending&limit=1")["connections"][0]
            if top["pending_bytes"] > 0:
                break
    else:
        pytest.fail("no backlog ever showed")
    assert top["nick"] == "slow"
    page = mon.json("/connz?sort=pending")["connections"]
    pending = [c["pending_bytes"] for c in page]
    assert pending == sorted(pending, reverse=True)
    samples = mon.metrics()
    assert value(samples, "muxserver_output_queued_max_bytes") >= top["pending_bytes"] > 0
    assert value(samples, "muxserver_output_queued_bytes") >= value(
        samples, "muxserver_output_queued_max_bytes"
    )
    by_frames = mon.json("/connz?sort=frames_in")["connections"]
    assert by_frames[0]["nick"] == "a"  # the publisher sent the most frames
    for c in [*others, slow]:
        c.close()


# ============================================================ /roomz


def test_roomz(monitored):
    mon = monitored()
    clients = _connect_many(mon.srv.address, ["a", "b"], room="big")
    clients += _connect_many(mon.srv.address, ["c"], room="small")
    x = RawClient(mon.srv.address)
    x.hello("a", namespace="/other")
    x.join("big")
    doc = mon.json("/roomz")
    assert doc["total_rooms"] == 3
    spaces = {ns["name"]: ns for ns in doc["namespaces"]}
    assert spaces["/"]["members"] == 3
    assert spaces["/"]["rooms"] == [{"name": "big", "members": 2}, {"name": "small", "members": 1}]
    assert spaces["/other"]["rooms"] == [{"name": "big", "members": 1}]
    only = mon.json("/roomz?namespace=/other")
    assert [ns["name"] for ns in only["namespaces"]] == ["/other"]
    for c in [*clients, x]:
        c.close()


# ============================================================== HTTP


def test_token_required_on_monitoring_port(monitored):
    mon = monitored(token="s3cret")
    for path in ("/metrics", "/healthz", "/connz", "/roomz"):
        status, headers, _ = mon.get(path, token="")
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), path
        assert mon.get(path, token="wrong")[0] == 401
        assert mon.get(path, token="s3cret")[0] == 200
    # The protocol port still takes the same token in HELLO.
    c = RawClient(mon.srv.address)
    c.hello("ok", token="s3cret")
    c.close()


def test_http_details(monitored):
    mon = monitored()
    assert mon.get("/nope")[0] == 404
    assert mon.get("/metrics", method="POST")[0] == 405
    status, headers, body = mon.get("/healthz", method="HEAD")
    assert status == 200 and body == "" and headers["content-length"] == "3"
    # Keep-alive: several requests on one connection.
    conn = http.client.HTTPConnection(mon.mhost, mon.mport, timeout=10)
    for _ in range(3):
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
    conn.close()
    # Pipelined requests are answered in order.
    with socket.create_connection((mon.mhost, mon.mport), timeout=10) as s:
        s.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2
            + b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = _read_all(s)
    assert data.count(b"HTTP/1.1 200") == 2 and data.count(b"HTTP/1.1 404") == 1
    # Thousands of them in one go: answered in a loop, not by recursion.
    with socket.create_connection((mon.mhost, mon.mport), timeout=10) as s:
        s.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3000
            + b"GET / HTTP/1.1\r\nConnection: close\r\nHost: x\r\n\r\n"
        )
        data = _read_all(s)
    assert data.count(b"HTTP/1.1 200") == 3001
    # Garbage gets 400 and a close, not a hang.
    with socket.create_connection((mon.mhost, mon.mport), timeout=10) as s:
        s.sendall(b"\x00\x01 this is not http\r\n\r\n")
        assert _read_all(s).startswith(b"HTTP/1.1 400")
    # An oversized request head gets 431, and the server is fine afterwards.
    with socket.create_connection((mon.mhost, mon.mport), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        assert _read_all(s).startswith(b"HTTP/1.1 431")
    assert mon.get("/healthz")[0] == 200


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_metrics_port_in_use_exits_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "muxserver", "--port", "0", "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr == f"muxserver: metrics port {port} is already in use\n"


# ============================================================== logs


def test_json_logs_connect_disconnect_and_error(server_factory):
    srv = server_factory("--log-format", "json", "--log-level", "debug")
    err = StderrLines(srv.proc)
    c = RawClient(srv.address)
    c.hello("jay")
    port = c.sock.getsockname()[1]
    c.send_raw(P.encode_frame(0x42, b""))
    c.expect_error(P.UNKNOWN_TYPE)
    c.close()
    d = RawClient(srv.address)
    d.hello("dee")
    d.close()

    def record(pred):
        return json.loads(err.wait_for(lambda s: s.startswith("{") and pred(json.loads(s))))

    connect = record(lambda r: r["msg"].startswith("connect") and r["peer"].endswith(f":{port}"))
    assert connect["level"] == "debug" and connect["logger"] == "muxserver" and "ts" in connect
    closing = record(lambda r: r.get("reason") == "UNKNOWN_TYPE")
    assert closing["level"] == "info" and closing["peer"] == f"127.0.0.1:{port}"
    assert closing["nick"] == "jay" and isinstance(closing["conn"], int)
    assert f"from 127.0.0.1:{port}:" in closing["msg"]
    gone = record(lambda r: r.get("reason") == "peer closed")
    assert gone["nick"] == "dee" and gone["level"] == "debug"
    # Every line on stderr is one JSON object.
    for line in err.seen:
        json.loads(line)


def test_periodic_stats_line(server_factory):
    srv = server_factory("--stats-interval", "0.2", "--log-format", "json")
    err = StderrLines(srv.proc)
    c = RawClient(srv.address)
    c.hello("s")
    line = json.loads(err.wait_for(lambda s: '"stats"' in s and '"connections": 1' in s))
    assert line["level"] == "info" and line["msg"].startswith("stats: 1 connections")
    assert {"deliveries_per_s", "bytes_in_per_s", "loop_busy", "queued_bytes"} <= set(line["stats"])
    c.close()


# ======================================================= check-config


def test_check_config_shows_sources():
    env = dict(os.environ, MUXSERVER_MAX_FRAME="4096", MUXSERVER_TOKEN="hush")
    out = subprocess.run(
        [sys.executable, "-m", "muxserver", "check-config", "--port", "9001", "--metrics-port", "9100"],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines()[1:]}
    assert rows["port"].split() == ["9001", "command", "line"]
    assert rows["metrics-port"].split() == ["9100", "command", "line"]
    assert rows["max-frame"].split() == ["4096", "env", "MUXSERVER_MAX_FRAME"]
    assert rows["host"].split() == ["127.0.0.1", "default"]
    assert "hush" not in out.stdout and "hidden" in rows["token"]
    bad = subprocess.run(
        [sys.executable, "-m", "muxserver", "check-config", "--metrics-port", "x"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "muxserver", "--version"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stdout.startswith("muxserver ")


# ==================================================== loop histogram


def test_turn_histogram_on_fake_clock():
    clock = FakeClock()
    loop = EventLoop(clock)
    try:
        loop.call_later(0, clock.advance, 0.003)  # one turn that is 3 ms busy
        loop.run_once(timeout=0)
        loop.run_once(timeout=0)  # closes the first turn's measurement
        idx = next(i for i, bound in enumerate(TURN_BUCKETS) if 0.003 <= bound)
        assert loop.turn_counts[idx] == 1
        assert sum(loop.turn_counts) == 1
        assert loop.turn_seconds == pytest.approx(0.003)
    finally:
        loop.close()


def test_http_client_deadline_on_fake_clock():
    """A client that never finishes its request is closed after CLIENT_TIMEOUT."""
    clock = FakeClock()
    loop = EventLoop(clock)
    server = Server(Config(port=0), loop=loop)
    server.start()
    mon = Monitor(server, "127.0.0.1", 0)
    address = mon.start()
    try:
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            while not mon.clients:
                loop.run_once(timeout=0.05)
            clock.advance(CLIENT_TIMEOUT / 2)
            loop.run_once(timeout=0)
            assert mon.clients  # still within its deadline
            clock.advance(CLIENT_TIMEOUT)
            loop.run_once(timeout=0)
            assert not mon.clients
            assert s.recv(100) == b""  # closed without a response
    finally:
        mon.close()
        server.close()
        loop.close()
