"""Authentication (token, token file) and the per-connection rate limit."""

import subprocess
import sys

from conftest import RawClient, reply_count

from muxserver import protocol as P


def test_token_file(server_factory, tmp_path):
    path = tmp_path / "token"
    path.write_text("from-a-file\n")
    srv = server_factory("--token-file", str(path))
    bad = RawClient(srv.address)
    bad.send(P.Hello(1, "/", "a", "from-a-fil"))  # a prefix is not the token
    bad.expect_error(P.AUTH_FAILED)
    assert RawClient(srv.address).hello("a", token="from-a-file").nick == "a"


def test_token_from_environment(server_factory):
    srv = server_factory(env={"MUXSERVER_TOKEN": "env-secret"})
    c = RawClient(srv.address)
    c.send(P.Hello(1, "/", "a", ""))
    c.expect_error(P.AUTH_FAILED)
    assert RawClient(srv.address).hello("b", token="env-secret").nick == "b"


def test_token_never_logged(server_factory):
    srv = server_factory("--token", "do-not-print-me", "--log-level", "debug")
    c = RawClient(srv.address)
    c.send(P.Hello(1, "/", "a", "wrong-guess"))
    c.expect_error(P.AUTH_FAILED)
    c.close()
    srv.signal(15)
    assert srv.wait() == 0
    logs = srv.proc.stderr.read()
    assert "AUTH_FAILED" in logs  # the failure is logged...
    assert "do-not-print-me" not in logs and "wrong-guess" not in logs  # ...the secrets not


def test_missing_token_file_exits_1(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "muxserver", "--port", "0", "--token-file", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1 and "cannot read token file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rate_limit_replies_rate_limited_and_does_not_deliver(server_factory):
    srv = server_factory("--rate-limit", "5", "--rate-burst", "3")
    a, b = RawClient(srv.address), RawClient(srv.address)
    a.hello("a")
    b.hello("b")
    a.join("r")
    b.join("r")
    for i in range(10):
        a.send(P.Emit(i + 1, 0, "r", "e", str(i).encode()))
    replies = [a.recv_type(P.Reply) for _ in range(10)]
    ok = [r for r in replies if r.status == P.OK]
    limited = [r for r in replies if r.status == P.RATE_LIMITED]
    # The burst of 3 passes at once; at 5/s the 10 sends (a few ms apart)
    # can earn at most a couple more, never all.
    assert 3 <= len(ok) <= 5 and len(ok) + len(limited) == 10
    assert all(reply_count(r) == 1 for r in ok)
    delivered = [b.recv_type(P.Event).payload for _ in ok]
    assert delivered == [str(r.req - 1).encode() for r in ok]
    b.send(P.Ping(1))
    assert b.recv() == P.ServerPong(1)  # nothing else was delivered
    # req = 0 is refused out loud too.
    a.send(P.Emit(0, 0, "r", "e", b"x"))
    while True:
        r = a.recv_type(P.Reply)
        if r.req == 0:
            break
    assert r.status in (P.RATE_LIMITED, P.OK)


def test_rate_limit_refills(server_factory):
    import time

    srv = server_factory("--rate-limit", "20", "--rate-burst", "1")
    a = RawClient(srv.address)
    a.hello("a")
    a.join("r")
    assert a.emit_room("r", "e", b"1").status == P.OK
    time.sleep(0.2)  # earns ~4 tokens, capped at the burst of 1
    assert a.emit_room("r", "e", b"2").status == P.OK
