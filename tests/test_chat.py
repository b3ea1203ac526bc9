"""``muxchat`` as a person uses it: real processes on pseudo-terminals (pexpect).

Two chats against a real server: join, talk, whisper, nick change, presence
lines, quit. Also: errors are one readable line (never a traceback), colour
only on a terminal, reconnects are shown (what came back, what was lost), a join
shows the room's latest messages, TLS (``--ca``), and start-up
failures exit 1 with one line.
Patterns never match the terminal's echo of what was typed: they include the
``<nick>`` or ``* `` that only muxchat prints.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pexpect  # in the test extra: missing fails, never skips
import pytest
from conftest import restart_on_same_port
from tlsutil import make_tls_files

from muxserver.chat import Chat as ChatSession
from muxserver.client import Backoff, Client

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def muxchat_argv() -> list[str]:
    """The installed ``muxchat`` script next to this Python, else ``python -m``."""
    script = Path(sys.executable).with_name("muxchat")
    return [str(script)] if script.exists() else [sys.executable, "-m", "muxserver.chat"]


def chat_env(colour: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    if colour:
        env["TERM"] = "xterm"
    else:
        env.update(NO_COLOR="1", TERM="dumb")
    return env


class Chat:
    """A muxchat on a pty (colourless unless ``colour``); ``log`` keeps all it printed."""

    def __init__(self, server, *args: str, colour: bool = False) -> None:
        argv = muxchat_argv()
        self.child = pexpect.spawn(
            argv[0], [*argv[1:], "--port", str(server.port), *args],
            env=chat_env(colour), encoding="utf-8", timeout=15, dimensions=(50, 250),
        )  # fmt: skip
        self.log = io.StringIO()
        self.child.logfile_read = self.log

    def expect(self, pattern: str) -> None:
        self.child.expect(pattern)

    def say(self, line: str) -> None:
        self.child.sendline(line)

    def finish(self) -> int:
        self.child.expect(pexpect.EOF)
        self.child.close()
        assert "Traceback" not in self.log.getvalue(), self.log.getvalue()
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def chats():
    started: list[Chat] = []

    def start(server, *args: str, colour: bool = False) -> Chat:
        chat = Chat(server, *args, colour=colour)
        started.append(chat)
        return chat

    yield start
    for chat in started:
        chat.close()


def test_two_people(server, chats):
    alice = chats(server, "--nick", "alice", "--room", "games")
    alice.expect(r"\* connected to 127\.0\.0\.1:\d+ as alice")
    alice.expect(r"\* you joined #games \(1 member\)")
    bob = chats(server, "--nick", "bob", "--room", "games")
    bob.expect(r"\* you joined #games \(2 members\)")
    alice.expect(r"\d\d:\d\d:\d\d \* bob joined #games")

    alice.say("hi bob, welcome")
    bob.expect(r"\d\d:\d\d:\d\d #games <alice> hi bob, welcome")
    bob.say("/msg alice psst: cake in the kitchen")
    bob.expect(r"whisper -> <alice> psst: cake in the kitchen")
    alice.expect(r"\d\d:\d\d:\d\d whisper <bob> psst: cake in the kitchen")

    alice.say("/nick alicia")
    alice.expect(r"\* you are now known as alicia")
    bob.expect(r"\* alice is now known as alicia")
    bob.say("/who")
    bob.expect(r"\* #games: alicia, bob \(2 members\)")

    bob.say("/join lobby")
    bob.expect(r"\* you joined #lobby")
    bob.say("/rooms")
    bob.expect(r"\* your rooms: #games \(2\), #lobby \(1\)")
    bob.say("/switch games")
    bob.expect(r"\* now talking in #games")
    bob.say("//slash is not a command")
    alice.expect(r"#games <bob> /slash is not a command")
    alice.say("/all good night, everyone")
    bob.expect(r"all <alicia> good night, everyone")

    bob.say("/quit")
    bob.expect(r"\* bye")
    assert bob.finish() == 0
    alice.expect(r"\* bob left #games")
    alice.say("/leave")
    alice.expect(r"\* you left #games")
    alice.child.sendeof()  # end of input quits too
    assert alice.finish() == 0


def test_errors_are_one_line(server, chats):
    chat = chats(server, "--nick", "carol")
    chat.expect(r"\* connected")
    chat.say("talking to nobody")
    chat.expect(r"! you are in no room: /join ROOM first")
    chat.say("/msg nobody hello")
    chat.expect(r"! NO_SUCH_TARGET: no one is called 'nobody' here")
    chat.say("/switch nowhere")
    chat.expect(r"! you are not in #nowhere")
    chat.say("/frobnicate")
    chat.expect(r"! unknown command /frobnicate \(try /help\)")
    chat.say("/join " + "x" * 300)
    chat.expect(r"! INVALID_NAME: ")
    chat.say("/nick")
    chat.expect(r"! usage: /nick NEW")
    chat.say("/help")
    chat.expect(r"/msg NICK TEXT")
    chat.say("/quit")
    assert chat.finish() == 0


def test_colour_only_on_a_terminal(server, chats):
    # --plain: the line mode on a terminal (the interactive one is test_chatui.py's).
    tty = chats(server, "--nick", "painted", "--room", "r", "--plain", colour=True)
    tty.expect(r"you joined")
    tty.say("/quit")
    tty.finish()
    painted = tty.log.getvalue()
    assert "\x1b[" in painted
    assert "* you joined #r (1 member)" in ANSI.sub("", painted)

    out = subprocess.run(
        [*muxchat_argv(), "--port", str(server.port), "--nick", "plain", "--room", "r"],
        input="hello from a pipe\n/who\n/quit\n", capture_output=True, text=True,
        env=chat_env(colour=True), timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout
    assert re.search(r"\d\d:\d\d:\d\d #r <plain> hello from a pipe\n", out.stdout)
    assert "* #r: plain (1 member)" in out.stdout


def test_reconnect_is_shown(server_factory, chats):
    srv = server_factory("--drain-timeout", "1")
    alice = chats(srv, "--nick", "alice", "--room", "games")
    alice.expect(r"you joined #games")
    srv.signal(signal.SIGTERM)
    alice.expect(r"! connection lost \(SHUTTING_DOWN: server is shutting down\); reconnecting")
    alice.say("anyone?")
    alice.expect(r"! not connected .*; not sent")
    srv2 = restart_on_same_port(server_factory, srv)
    alice.expect(r"\* reconnected as alice \(#games\)")
    # A new server: the room's history (and alice's position in it) started over.
    alice.expect(r"! #games was restarted on the server: what was sent there while you were away")
    bob = chats(srv2, "--nick", "bob", "--room", "games")
    bob.expect(r"you joined #games \(2 members\)")
    bob.say("you are back")
    alice.expect(r"#games <bob> you are back")
    alice.say("/quit")
    assert alice.finish() == 0


def test_joining_shows_the_latest_20_messages_as_earlier(server, chats):
    with Client.connect(server.host, server.port, nick="bob") as bob:
        bob.join("games")
        for i in range(1, 26):
            bob.emit("msg", f"old {i}", room="games", ack=True)
        alice = chats(server, "--nick", "alice", "--room", "games")
        alice.expect(r"\* you joined #games \(2 members\)")
        alice.expect(r"\* --- earlier messages in #games ---")
        before = alice.child.before
        alice.expect(r"\* --- end of earlier messages in #games ---")
        shown = re.findall(r"#games <bob> (old \d+)", alice.child.before)
        assert shown == [f"old {i}" for i in range(6, 26)]
        assert "old 5" not in before + alice.child.before
        bob.emit("msg", "live one", room="games", ack=True)
        alice.expect(r"#games <bob> live one")
    alice.say("/quit")
    assert alice.finish() == 0


def _missed_while_cut(srv, missed: int) -> str:
    """A Chat in #games whose connection is cut while bob sends ``missed`` lines; its output."""
    out = io.StringIO()
    fast = Backoff(initial=0.05, maximum=0.2, jitter=0)
    with Client.connect(srv.host, srv.port, nick="alice", backoff=fast) as alice, \
            Client.connect(srv.host, srv.port, nick="bob") as bob:  # fmt: skip
        chat = ChatSession(alice, out, colour=False)
        chat.handle("/join games")
        bob.join("games")
        bob.emit("msg", "seen", room="games", ack=True)
        deadline = time.monotonic() + 10
        while "<bob> seen" not in out.getvalue():
            assert time.monotonic() < deadline, out.getvalue()
            alice.poll(0.05)
        alice.sock.shutdown(socket.SHUT_RDWR)  # the network drops alice
        for i in range(missed):
            bob.emit("msg", f"while away {i}", room="games", ack=True)
        while f"while away {missed - 1}" not in out.getvalue():
            assert time.monotonic() < deadline + 10, out.getvalue()
            alice.poll(0.05)
        alice.poll(0.2)
    return out.getvalue()


def test_reconnect_says_what_came_back(server):
    out = _missed_while_cut(server, 12)
    assert "* recovered 12 missed messages in #games\n" in out
    assert "were lost" not in out
    lines = re.findall(r"#games <bob> (while away \d+)", out)
    assert lines == [f"while away {i}" for i in range(12)]  # once each, in order


def test_reconnect_says_what_was_lost(server_factory):
    out = _missed_while_cut(server_factory("--history-size", "5"), 12)
    # seq 1 was seen; 2..13 were sent while away, and the history kept 9..13.
    assert "! messages 2..8 in #games were lost\n" in out
    assert "* recovered 5 missed messages in #games\n" in out
    lines = re.findall(r"#games <bob> (while away \d+)", out)
    assert lines == [f"while away {i}" for i in range(7, 12)]


def test_startup_failures_exit_1(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [*muxchat_argv(), "--port", str(port)],
        capture_output=True, text=True, env=chat_env(), timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr == f"muxchat: cannot connect to 127.0.0.1:{port}: Connection refused\n"

    bad = subprocess.run(
        [*muxchat_argv(), "--port", str(server.port), "--nick", "two words"],
        capture_output=True, text=True, env=chat_env(), timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "INVALID_NAME" in bad.stderr


def test_tls(server_factory, tmp_path, chats):
    tls = make_tls_files(tmp_path)
    srv = server_factory(*tls.server_args)
    chat = chats(srv, "--ca", tls.ca, "--nick", "sec", "--room", "r")
    chat.expect(r"\* connected to 127\.0\.0\.1:\d+ over TLS as sec")
    chat.expect(r"\* you joined #r")
    with Client.connect(srv.host, srv.port, nick="lib", ca=tls.ca) as lib:
        lib.join("r")
        chat.expect(r"\* lib joined #r")  # woken by TLS bytes on the socket it selects on
        lib.emit("msg", "hello over tls", room="r")
        chat.expect(r"#r <lib> hello over tls")
        chat.say("hi lib")
        assert lib.recv(10).text == "hi lib"
    chat.say("/quit")
    assert chat.finish() == 0

    untrusted = subprocess.run(
        [*muxchat_argv(), "--port", str(srv.port), "--tls"],
        capture_output=True, text=True, env=chat_env(), timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert untrusted.returncode == 1
    assert untrusted.stderr == (
        f"muxchat: TLS with 127.0.0.1:{srv.port} failed: certificate verify failed: "
        "unable to get local issuer certificate (trust its CA with --ca PATH)\n"
    )


def test_what_really_happened(server, chats):
    """Leaving a room one is not in, an empty room, most-recent switching, aliases."""
    chat = chats(server, "--nick", "dora", "--room", "one")
    chat.expect(r"\* you joined #one")
    chat.say("/leave nowhere")
    chat.expect(r"! you are not in #nowhere; nothing to leave")
    chat.say("/who nowhere")
    chat.expect(r"\* #nowhere does not exist: nobody is in it")
    chat.say("/j two")
    chat.expect(r"\* you joined #two")
    chat.say("/j three")
    chat.expect(r"\* you joined #three")
    chat.say("/switch one")
    chat.expect(r"\* now talking in #one")
    chat.say("/switch three")
    chat.expect(r"\* now talking in #three")
    chat.say("/leave")
    chat.expect(r"\* you left #three")
    chat.expect(r"\* now talking in #one")  # the one used last, not the oldest (#two)
    chat.say("/w")
    chat.expect(r"\* #one: dora \(1 member\)")
    chat.say("/m nobody hi")
    chat.expect(r"! NO_SUCH_TARGET")
    chat.say("/leave one")
    chat.expect(r"\* now talking in #two")
    chat.say("/leave")
    chat.expect(r"\* you are in no room now: /join ROOM to talk")
    chat.say("/q")
    assert chat.finish() == 0


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*muxchat_argv(), *args], capture_output=True, text=True, env=env or chat_env(),
        timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_bad_options_are_errors(server):
    for bad in ("99999", "-1", "http"):
        out = _run("--port", bad)
        assert out.returncode == 2, out
        assert "--port" in out.stderr and ("0..65535" in out.stderr or "not a port" in out.stderr)
    empty = _run("--port", str(server.port), "--room", "")
    assert empty.returncode == 2
    assert "--room: a room name cannot be empty" in empty.stderr


def test_token_needed_says_how(server_factory):
    srv = server_factory("--token", "sesame")
    env = {k: v for k, v in chat_env().items() if k not in ("MUXSERVER_TOKEN", "MUXCHAT_TOKEN")}
    out = _run("--port", str(srv.port), env=env)
    assert out.returncode == 1
    assert out.stderr == (
        f"muxchat: 127.0.0.1:{srv.port} needs a token: pass --token TOKEN or set MUXSERVER_TOKEN\n"
    )
    wrong = _run("--port", str(srv.port), "--token", "nope", env=env)
    assert wrong.returncode == 1
    assert "refused the token (AUTH_FAILED" in wrong.stderr and "--token" in wrong.stderr
    ok = subprocess.run(
        [*muxchat_argv(), "--port", str(srv.port), "--nick", "t"], input="/quit\n",
        capture_output=True, text=True, env=dict(env, MUXSERVER_TOKEN="sesame"), timeout=30,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "connected to" in ok.stdout


def test_arrow_keys_are_not_sent_as_text(server, chats):
    """The line mode on a terminal (--plain): keys a terminal turns into escape codes."""
    chat = chats(server, "--nick", "kay", "--room", "r", "--plain")
    chat.expect(r"\* you joined #r")
    with Client.connect(server.host, server.port, nick="reader", reconnect=False) as reader:
        reader.join("r")
        chat.expect(r"\* reader joined #r")
        chat.say("up\x1b[A and\x1bOB\tdown")
        got = reader.recv(10)
        assert got.text == "up and down"
    chat.say("/quit")
    assert chat.finish() == 0
