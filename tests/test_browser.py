"""The web chat page in a real browser: headless Chromium driven by Playwright.

Debian's ``/usr/bin/chromium`` (``.ci/run`` installs it; Playwright never
downloads a browser here). Two browser contexts (two people, separate
storage) and one Python client (``muxserver.client.Client``, protocol
version 2) in one room:
messages both ways, presence, a whisper, a nick change, a JSON payload from
Python arriving as an object in JavaScript, an ``<img onerror=...>`` attempt
shown as text, and reconnecting after the server restarts on the same port.
A screenshot of the conversation is written to reports/web-chat.png on every
run (docs/web-chat.png is one good copy of it).

Sequenced rooms (protocol sections 9 and 10) in the page: the latest
messages shown as earlier ones on joining; the page's socket cut while the
Python client goes on sending, and after the reconnect the missed messages
recovered (or, past a small ``--history-size``, the lost ones named), each
message shown exactly once. A script run before the page's own wraps
``WebSocket`` so that the test can mute the page (the server, hearing
nothing for ``--ping-interval`` + ``--ping-timeout``, cuts it with
IDLE_TIMEOUT and parks its session) and refuse it new sockets for as long as
it wants: the disconnection then lasts exactly over the messages the test
sends.

Also runs the 15-line JavaScript example of docs/websocket.md in the page.
A missing browser fails these tests; they are never skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import restart_on_same_port
from playwright.sync_api import expect, sync_playwright

from muxserver import protocol as P
from muxserver.client import Client, Event, Presence

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "reports" / "web-chat.png"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


# Runs before the page's scripts (Playwright init scripts are not subject to the
# page's CSP). A refused socket is a constructor that throws, which the client
# retries with its backoff, as it would a browser's SecurityError; a muted
# page sends nothing (not even PONG), as over a dead network.
SOCKET_CONTROL = """
(() => {
  const Real = window.WebSocket;
  window.__sockets = [];
  window.__refuseSockets = false;
  window.__muted = false;
  window.WebSocket = class extends Real {
    constructor(url, protocols) {
      if (window.__refuseSockets) throw new DOMException("refused by the test", "NetworkError");
      super(url, protocols);
      window.__sockets.push(this);
    }
    send(data) {
      if (!window.__muted) super.send(data);
    }
  };
})();
"""
# The server cuts a silent page after 1 + 1 s.
QUICK_CUT = ("--ping-interval", "1", "--ping-timeout", "1")


def open_chat(browser, url: str, nick: str, room: str = "lobby", init_script: str | None = None):
    context = browser.new_context(viewport={"width": 1180, "height": 720}, color_scheme="light")
    page = context.new_page()
    if init_script:
        page.add_init_script(init_script)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.goto(url)
    page.get_by_test_id("nick-input").fill(nick)
    page.get_by_test_id("first-room-input").fill(room)
    page.get_by_test_id("join-button").click()
    expect(page.get_by_test_id("room-title")).to_have_text(f"# {room}")
    return page


def say(page, text: str) -> None:
    box = page.get_by_test_id("message-input")
    box.fill(text)
    box.press("Enter")


def last_message(page, kind: str | None = None):
    sel = '[data-testid="message"]' + (f'[data-kind="{kind}"]' if kind else "")
    return page.locator(sel).last


def incoming(client: Client, cls, n: int = 1) -> list:
    """The next ``n`` items of type ``cls`` from ``client.recv``; every item kept in ``seen``."""
    got = []
    seen = client.__dict__.setdefault("seen", [])
    while len(got) < n:
        item = client.recv(timeout=15)
        assert item is not None, f"no {cls.__name__} within 15 s"
        seen.append(item)
        if isinstance(item, cls):
            got.append(item)
    return got


def test_two_people_and_python_chat_in_a_browser(server_factory, browser):
    srv = server_factory()
    url = f"http://127.0.0.1:{srv.port}/"
    py = Client.connect(*srv.address, nick="turing")
    assert py.session_version == 2
    py.join("lobby", presence=True)

    ada = open_chat(browser, url, "ada")
    grace = open_chat(browser, url, "grace")
    # Presence: each sees the other, the Python client saw both join.
    expect(ada.locator('[data-testid="member"][data-nick="grace"]')).to_be_visible()
    expect(grace.locator('[data-testid="member"][data-nick="ada"]')).to_be_visible()
    expect(ada.get_by_test_id("member-count")).to_have_text("3")
    joins = incoming(py, Presence, 2)
    assert [(p.kind, p.nick) for p in joins] == [("join", "ada"), ("join", "grace")]
    expect(ada.locator('[data-testid="message"][data-kind="note"]').last).to_have_text(
        re.compile("grace joined")
    )

    # Messages both ways between the two browsers, and to Python as text.
    say(ada, "Hi Grace! Did the deploy go out?")
    msg = last_message(grace, "room")
    expect(msg.locator(".sender")).to_have_text("ada")
    expect(msg.locator(".text")).to_have_text("Hi Grace! Did the deploy go out?")
    event = incoming(py, Event)[0]
    assert (event.sender, event.room, event.data) == (
        "ada",
        "lobby",
        "Hi Grace! Did the deploy go out?",
    )
    assert event.payload_type == P.PAYLOAD_TEXT
    say(grace, "Yes, 10 minutes ago. All green so far.")
    expect(last_message(ada, "room").locator(".text")).to_have_text(
        "Yes, 10 minutes ago. All green so far."
    )
    assert incoming(py, Event)[0].sender == "grace"

    # Python -> browsers: text, then a dict sent as JSON (shown by its "text"
    # field: had it arrived as a string, the page would show the raw JSON).
    assert py.emit("msg", "Build 4812 passed.", room="lobby", ack=True) == 2
    expect(last_message(ada, "room").locator(".sender")).to_have_text("turing")
    expect(last_message(grace, "room").locator(".text")).to_have_text("Build 4812 passed.")
    stats = {"text": "Latency p99 is 41 ms", "p99_ms": 41}
    assert py.emit("msg", stats, room="lobby", ack=True) == 2
    for page in (ada, grace):
        expect(last_message(page, "room").locator(".text")).to_have_text("Latency p99 is 41 ms")

    # A whisper reaches grace only.
    say(ada, "/w grace can you look at the p99 later?")
    whisper = last_message(grace, "direct")
    expect(whisper.locator(".sender")).to_have_text("ada (whisper)")
    expect(whisper.locator(".text")).to_have_text("can you look at the p99 later?")
    expect(last_message(ada, "direct").locator(".sender")).to_have_text("to grace")

    # A nick change: everyone sees it, Python as a Presence "nick".
    say(grace, "/nick grace_h")
    expect(ada.locator('[data-testid="member"][data-nick="grace_h"]')).to_be_visible()
    expect(ada.get_by_test_id("message-list")).to_contain_text("grace is now known as grace_h")
    expect(grace.get_by_test_id("me")).to_have_text("grace_h")
    assert incoming(py, Presence)[0] == Presence("nick", "lobby", "grace", "grace_h")

    say(grace, "Sure, after lunch. Thanks!")
    expect(last_message(ada, "room").locator(".text")).to_have_text("Sure, after lunch. Thanks!")
    assert incoming(py, Event)[0].sender == "grace_h"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    ada.screenshot(path=str(SCREENSHOT))

    # An HTML injection attempt is shown as text and never runs.
    attack = '<img src=x onerror="window.__pwned=1">'
    say(ada, attack)
    expect(last_message(grace, "room").locator(".text")).to_have_text(attack)
    assert grace.locator('[data-testid="message-list"] img').count() == 0
    assert grace.evaluate("window.__pwned") is None
    assert incoming(py, Event)[0].data == attack

    # The Python client got every room message, never the whisper.
    py.ping()  # a round trip: everything sent before it has arrived
    while (item := py.recv(timeout=0.2)) is not None:
        py.seen.append(item)
    events = [e for e in py.seen if isinstance(e, Event)]
    assert [e.sender for e in events] == ["ada", "grace", "grace_h", "ada"]
    assert all(e.kind == "room" for e in events)

    # The server restarts on the same port: both pages show the reconnecting
    # state, then come back with the same nick and room, and chat again.
    py.close()
    srv2 = restart_on_same_port(server_factory, srv)
    for page in (ada, grace):
        banner = page.get_by_test_id("status-banner")
        expect(banner).to_be_hidden(timeout=20000)
        expect(page.get_by_test_id("message-list")).to_contain_text("Reconnected.", timeout=20000)
    expect(ada.locator('[data-testid="member"][data-nick="grace_h"]')).to_be_visible(timeout=15000)
    say(ada, "Back after the restart?")
    expect(last_message(grace, "room").locator(".text")).to_have_text("Back after the restart?")
    with Client.connect(*srv2.address, nick="turing") as py2:
        assert sorted(py2.who("lobby")) == ["ada", "grace_h"]
    for page in (ada, grace):
        assert page.errors == []
        page.context.close()


def test_reconnecting_state_is_visible(server_factory, browser):
    srv = server_factory()
    page = open_chat(browser, f"http://127.0.0.1:{srv.port}/", "ada")
    srv.stop()
    banner = page.get_by_test_id("status-banner")
    expect(banner).to_be_visible(timeout=10000)
    expect(banner).to_have_attribute("data-state", "reconnecting")
    expect(banner).to_contain_text("Reconnecting")
    page.context.close()


def room_texts(page, replayed: str | None = None) -> list[str]:
    sel = '[data-testid="message"][data-kind="room"]'
    if replayed:
        sel += f'[data-replayed="{replayed}"]'
    return page.locator(f"{sel} .text").all_text_contents()


def recovery_lines(page, outcome: str):
    sel = f'[data-testid="message"][data-kind="recovery"][data-outcome="{outcome}"] .text'
    return page.locator(sel)


def disconnected_while(page, send) -> None:
    """Have the server cut the page, ``send()`` while it is refused a new socket, then let it back."""
    page.evaluate("() => { window.__refuseSockets = true; window.__muted = true; }")
    banner = page.get_by_test_id("status-banner")
    expect(banner).to_have_attribute("data-state", "reconnecting", timeout=15000)
    expect(page.get_by_test_id("message-list")).to_contain_text("The connection went silent.")
    page.evaluate("() => { window.__muted = false; }")
    send()
    page.evaluate("() => { window.__refuseSockets = false; }")
    expect(banner).to_be_hidden(timeout=20000)


def test_history_on_join_and_missed_messages_recovered(server_factory, browser):
    srv = server_factory(*QUICK_CUT)
    # with the quick cut, a blocking client idle over 2 s needs the heartbeat
    py = Client.connect(*srv.address, nick="turing", heartbeat=True)
    py.join("lobby", presence=True)
    emit = lambda i: py.emit("msg", f"m{i}", room="lobby", ack=True)  # noqa: E731
    for i in range(1, 26):
        emit(i)
    page = open_chat(browser, f"http://127.0.0.1:{srv.port}/", "ada", init_script=SOCKET_CONTROL)
    # The latest 20 (of 25), marked as earlier messages, under one line saying so.
    expect(recovery_lines(page, "fresh")).to_have_text("20 earlier messages in #lobby")
    expect(page.locator('[data-replayed="earlier"]')).to_have_count(20)
    assert room_texts(page, "earlier") == [f"m{i}" for i in range(6, 26)]
    for i in range(26, 31):
        emit(i)
    expect(last_message(page, "room").locator(".text")).to_have_text("m30")

    # The page is away while turing sends 12 more, then comes back and keeps up.
    disconnected_while(page, lambda: [emit(i) for i in range(31, 43)])
    expect(recovery_lines(page, "complete")).to_have_text("recovered 12 missed messages in #lobby")
    for i in range(43, 51):
        emit(i)
    expect(last_message(page, "room").locator(".text")).to_have_text("m50")
    assert room_texts(page) == [f"m{i}" for i in range(6, 51)]  # each exactly once, in order
    assert room_texts(page, "recovered") == [f"m{i}" for i in range(31, 43)]
    assert page.locator('[data-testid="message"][data-kind="recovery"]').count() == 2
    # The session was resumed: one "ada" in the room, who never left or re-joined.
    assert py.who("lobby") == ["turing", "ada"]
    py.ping()  # a round trip: everything sent before it has arrived
    seen = []
    while (item := py.recv(timeout=0.2)) is not None:
        seen.append(item)
    assert [(p.kind, p.nick) for p in seen if isinstance(p, Presence)] == [("join", "ada")]
    assert page.evaluate("window.__sockets.length") == 2
    assert page.errors == []
    page.context.close()
    py.close()


def test_messages_past_the_history_are_named_as_lost(server_factory, browser):
    srv = server_factory("--history-size", "5", *QUICK_CUT)
    # with the quick cut, a blocking client idle over 2 s needs the heartbeat
    py = Client.connect(*srv.address, nick="turing", heartbeat=True)
    py.join("lobby")
    emit = lambda i: py.emit("msg", f"m{i}", room="lobby", ack=True)  # noqa: E731
    for i in range(1, 4):
        emit(i)
    page = open_chat(browser, f"http://127.0.0.1:{srv.port}/", "ada", init_script=SOCKET_CONTROL)
    expect(recovery_lines(page, "fresh")).to_have_text("3 earlier messages in #lobby")
    # 12 sent while away, the history holds the last 5: m4..m10 are gone.
    disconnected_while(page, lambda: [emit(i) for i in range(4, 16)])
    expect(recovery_lines(page, "gap")).to_have_text(
        ["messages 4..10 in #lobby were lost", "recovered 5 missed messages in #lobby"]
    )
    emit(16)
    expect(last_message(page, "room").locator(".text")).to_have_text("m16")
    assert room_texts(page) == ["m1", "m2", "m3", "m11", "m12", "m13", "m14", "m15", "m16"]
    assert room_texts(page, "recovered") == [f"m{i}" for i in range(11, 16)]
    assert page.errors == []
    page.context.close()
    py.close()


def docs_example() -> str:
    """The JavaScript example of docs/websocket.md (the block after the example marker)."""
    text = (ROOT / "docs" / "websocket.md").read_text(encoding="utf-8")
    block = text.split("<!-- example: run by tests/test_browser.py -->", 1)[1]
    return block.split("```js\n", 1)[1].split("```", 1)[0]


def test_docs_javascript_example_runs_in_the_browser(server_factory, browser):
    code = docs_example()
    assert len(code.strip().splitlines()) <= 15
    srv = server_factory()
    bob = Client.connect(*srv.address, nick="bob")
    bob.join("lobby", presence=True)
    # The example stands for a page of your own site on the server's origin
    # (through a reverse proxy, say); the chat page's CSP forbids inline
    # scripts, so it is lifted for this page only.
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    lines: list[str] = []
    page.on("console", lambda m: lines.append(m.text))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"http://127.0.0.1:{srv.port}/")  # its own origin, like a page of the site
    page.add_script_tag(type="module", content=code)
    presence = incoming(bob, Presence)[0]
    assert (presence.kind, presence.nick) == ("join", "ann")
    hello = incoming(bob, Event)[0]
    assert (hello.sender, hello.data, hello.payload_type) == ("ann", "hello", P.PAYLOAD_TEXT)
    # Python -> JS: a dict arrives as an object (the example prints its fields).
    assert bob.emit("msg", {"text": "hi ann", "from": "python"}, room="lobby", ack=True) == 1
    page.wait_for_function("() => window.lastData !== undefined", timeout=10000)
    assert page.evaluate("typeof window.lastData") == "object"
    assert page.evaluate("window.lastData") == {"text": "hi ann", "from": "python"}
    page.wait_for_timeout(100)
    assert "delivered to 1" in lines
    assert "bob: object hi ann" in lines
    assert errors == []
    context.close()
    bob.close()
