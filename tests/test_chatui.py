"""``muxchat``'s interactive mode (muxserver/chatui.py, prompt_toolkit).

In process, with prompt_toolkit's pipe input and DummyOutput: a message that
arrives while a half-typed line is in the buffer is printed and leaves the
buffer as it was; history; aliases. Tab completion of commands, rooms and
nicks. And end to end on a real pseudo-terminal: the prompt names the room,
an incoming line appears while the person is mid-line, and the finished
line goes out whole, printed once.
"""

from __future__ import annotations

import asyncio
import io
import time

import pexpect
import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from test_chat import chat_env, muxchat_argv

from muxserver.chat import Chat
from muxserver.chatui import ChatCompleter, make_session, run_interactive
from muxserver.client import Client


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_incoming_line_leaves_the_half_typed_line_intact(server):
    alice = Client.connect(server.host, server.port, nick="alice", reconnect=False)
    bob = Client.connect(server.host, server.port, nick="bob", reconnect=False)
    out = io.StringIO()
    chat = Chat(alice, out, colour=False)
    chat.handle("/join games")
    bob.join("games")

    async def main() -> None:
        with create_pipe_input() as pipe:
            session = make_session(chat, input=pipe, output=DummyOutput())
            task = asyncio.create_task(run_interactive(chat, session, proxy_output=False))
            await _until(lambda: session.app.is_running)
            assert chat.prompt() == "#games> "
            pipe.send_text("hel")
            await _until(lambda: session.default_buffer.text == "hel")
            bob.emit("msg", "news while you type", room="games")
            await _until(lambda: "<bob> news while you type" in out.getvalue())
            await asyncio.sleep(0.1)  # a redraw would have happened by now
            assert session.default_buffer.text == "hel"
            assert session.default_buffer.cursor_position == 3
            pipe.send_text("lo bob\r")
            await _until(lambda: "#games <alice> hello bob" in out.getvalue())
            pipe.send_text("/j lobby\r")
            await _until(lambda: chat.room == "lobby")
            pipe.send_text("\x1b[A\x1b[A")  # Up, Up: history
            await _until(lambda: session.default_buffer.text == "hello bob")
            pipe.send_text("\x15/q\r")  # Ctrl-U clears the line, then quit
            await asyncio.wait_for(task, 10)

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
        got = bob.recv(5)
        assert (got.sender, got.text) == ("alice", "hello bob")
        assert chat.done
        assert out.getvalue().count("hello bob") == 1  # printed once, as sent
    finally:
        alice.close()
        bob.close()


def _complete(chat, text: str) -> list[str]:
    completer = ChatCompleter(chat)
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]


def test_tab_completion():
    client = Client("127.0.0.1", 7878)  # never opened: the completer reads its state only
    client.nick, client._joined = "me", {"games": True, "garden": False}
    chat = Chat(client, io.StringIO(), colour=False)
    chat.nicks = {"me", "bob", "Bea", "carol"}
    chat.rooms_seen = {"lobby"}
    assert _complete(chat, "/j") == ["/join"]  # "/j" itself is complete already
    assert _complete(chat, "/q") == ["/quit"]
    assert _complete(chat, "/join g") == ["games", "garden"]
    assert _complete(chat, "/switch #ga") == ["games", "garden"]
    assert _complete(chat, "/who l") == ["lobby"]
    assert _complete(chat, "/msg b") == ["Bea", "bob"]  # case-insensitive, never myself
    assert _complete(chat, "/m c") == ["carol"]
    assert _complete(chat, "/msg bob hi c") == ["carol"]
    assert _complete(chat, "/rooms a") == ["all"]
    assert _complete(chat, "/nick b") == []  # a new nick is yours to invent
    assert _complete(chat, "thanks b") == ["Bea", "bob"]
    assert _complete(chat, "thanks m") == []


def test_half_typed_line_survives_on_a_real_terminal(server):
    env = chat_env(colour=True)  # TERM=xterm: the interactive mode
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"  # pexpect does not answer cursor-position queries
    argv = muxchat_argv()
    child = pexpect.spawn(
        argv[0], [*argv[1:], "--port", str(server.port), "--nick", "ann", "--room", "games"],
        env=env, encoding="utf-8", timeout=15, dimensions=(30, 120),
    )  # fmt: skip
    log = io.StringIO()
    child.logfile_read = log
    try:
        child.expect("you joined")
        child.expect("#games>")
        with Client.connect(server.host, server.port, nick="ben", reconnect=False) as ben:
            ben.join("games")
            child.expect("ben joined")
            child.send("good mor")
            child.expect("good mor")
            ben.emit("msg", "anyone awake?", room="games")
            child.expect("anyone awake\\?")
            # The prompt and the half-typed line are drawn again below it.
            child.expect("good mor")
            child.send("ning\r")
            got = ben.recv(10)
            assert got.text == "good morning"
            child.expect("<ann>")
            child.send("/q\r")
            child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert "Traceback" not in log.getvalue(), log.getvalue()
    assert child.exitstatus == 0


@pytest.mark.parametrize("term", ["dumb"])
def test_dumb_terminal_keeps_the_line_mode(server, term):
    env = chat_env()  # TERM=dumb
    argv = muxchat_argv()
    child = pexpect.spawn(
        argv[0], [*argv[1:], "--port", str(server.port), "--nick", "dee"],
        env=env, encoding="utf-8", timeout=15,
    )  # fmt: skip
    try:
        child.expect(r"\* connected")
        child.sendline("/quit")
        child.expect(r"\* bye")
        child.expect(pexpect.EOF)
        assert "> " not in child.before  # no prompt: plain lines
    finally:
        child.close(force=True)


def test_missing_prompt_toolkit_gives_a_hint_and_the_line_mode(server, tmp_path):
    # A prompt_toolkit that cannot be imported, ahead of the real one on the path.
    fake = tmp_path / "prompt_toolkit"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('prompt_toolkit is not installed')\n")
    env = chat_env(colour=True)  # a terminal that could take the interactive mode
    env["PYTHONPATH"] = str(tmp_path)
    argv = muxchat_argv()
    child = pexpect.spawn(
        argv[0], [*argv[1:], "--port", str(server.port), "--nick", "eve"],
        env=env, encoding="utf-8", timeout=15,
    )  # fmt: skip
    try:
        child.expect(r"line editing needs prompt_toolkit: pip install 'muxserver\[chat\]'")
        child.expect(r"connected to")
        child.sendline("/quit")
        child.expect(r"bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
