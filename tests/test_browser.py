"""The web chat page in a real browser: headless Chromium driven by Playwright.

Debian's ``/usr/bin/chromium`` (``.ci/run`` installs it; Playwright never
downloads a browser here). Two browser contexts (two people, separate
storage) and one Python client on the raw protocol, version 2, in one room:
messages both ways, presence, a whisper, a nick change, a JSON payload from
Python arriving as an object in JavaScript, an ``<img onerror=...>`` attempt
shown as text, and reconnecting after the server restarts on the same port.
A screenshot of the conversation is written to reports/web-chat.png on every
run (docs/web-chat.png is one good copy of it).

Also runs the 15-line JavaScript example of docs/websocket.md in the page.
A missing browser fails these tests; they are never skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import RawClient, reply_count, restart_on_same_port
from playwright.sync_api import expect, sync_playwright

from muxserver import protocol as P

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "reports" / "web-chat.png"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_chat(browser, url: str, nick: str, room: str = "lobby"):
    context = browser.new_context(viewport={"width": 1180, "height": 720}, color_scheme="light")
    page = context.new_page()
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


def python_frames(client: RawClient, cls, n: int = 1) -> list:
    """The next ``n`` frames of type ``cls``; PINGs answered, every frame kept in ``client.seen``."""
    got = []
    seen = client.__dict__.setdefault("seen", [])
    while len(got) < n:
        frame = client.recv(timeout=15)
        seen.append(frame)
        if isinstance(frame, P.ServerPing):
            client.send(P.Pong(frame.nonce))
        elif isinstance(frame, cls):
            got.append(frame)
        elif not isinstance(frame, (P.Presence, P.Event, P.Reply)):
            raise AssertionError(f"unexpected {frame!r}")
    return got


def who(client: RawClient, room: str) -> list[str]:
    """Nicks in ``room`` from a WHO reply (u32 total, u16 listed, str8 each)."""
    body = client.request(P.Who(client.next_req(), room)).body
    nicks, pos = [], 6
    while pos < len(body):
        nicks.append(body[pos + 1 : pos + 1 + body[pos]].decode())
        pos += 1 + body[pos]
    return sorted(nicks)


def emit_v2(client: RawClient, target: int, to: str, event: str, payload: bytes, ptype: int):
    msg = P.Emit(client.next_req(), target, to, event, payload, P.emit_flags(payload_type=ptype))
    return client.request(msg)


def test_two_people_and_python_chat_in_a_browser(server_factory, browser):
    srv = server_factory()
    url = f"http://127.0.0.1:{srv.port}/"
    py = RawClient(srv.address)
    assert py.hello("turing", version=2).version == 2
    py.join("lobby", presence=True)

    ada = open_chat(browser, url, "ada")
    grace = open_chat(browser, url, "grace")
    # Presence: each sees the other, the Python client saw both join.
    expect(ada.locator('[data-testid="member"][data-nick="grace"]')).to_be_visible()
    expect(grace.locator('[data-testid="member"][data-nick="ada"]')).to_be_visible()
    expect(ada.get_by_test_id("member-count")).to_have_text("3")
    joins = [p for p in python_frames(py, P.Presence, 2)]
    assert [(p.kind, p.nick) for p in joins] == [(1, "ada"), (1, "grace")]
    expect(ada.locator('[data-testid="message"][data-kind="note"]').last).to_have_text(
        re.compile("grace joined")
    )

    # Messages both ways between the two browsers, and to Python as text.
    say(ada, "Hi Grace! Did the deploy go out?")
    msg = last_message(grace, "room")
    expect(msg.locator(".sender")).to_have_text("ada")
    expect(msg.locator(".text")).to_have_text("Hi Grace! Did the deploy go out?")
    event = python_frames(py, P.Event)[0]
    assert (event.sender, event.source, event.payload) == (
        "ada",
        "lobby",
        b"Hi Grace! Did the deploy go out?",
    )
    assert event.payload_type == P.PAYLOAD_TEXT
    say(grace, "Yes, 10 minutes ago. All green so far.")
    expect(last_message(ada, "room").locator(".text")).to_have_text(
        "Yes, 10 minutes ago. All green so far."
    )
    assert python_frames(py, P.Event)[0].sender == "grace"

    # Python -> browsers: text, then a JSON object (shown by its "text" field:
    # had it arrived as a string, the page would show the raw JSON).
    assert reply_count(emit_v2(py, 0, "lobby", "msg", b"Build 4812 passed.", 1)) == 2
    expect(last_message(ada, "room").locator(".sender")).to_have_text("turing")
    expect(last_message(grace, "room").locator(".text")).to_have_text("Build 4812 passed.")
    payload = json.dumps({"text": "Latency p99 is 41 ms", "p99_ms": 41}).encode()
    assert reply_count(emit_v2(py, 0, "lobby", "msg", payload, 2)) == 2
    for page in (ada, grace):
        expect(last_message(page, "room").locator(".text")).to_have_text("Latency p99 is 41 ms")

    # A whisper reaches grace only.
    say(ada, "/w grace can you look at the p99 later?")
    whisper = last_message(grace, "direct")
    expect(whisper.locator(".sender")).to_have_text("ada (whisper)")
    expect(whisper.locator(".text")).to_have_text("can you look at the p99 later?")
    expect(last_message(ada, "direct").locator(".sender")).to_have_text("to grace")

    # A nick change: everyone sees it, Python as PRESENCE kind 3.
    say(grace, "/nick grace_h")
    expect(ada.locator('[data-testid="member"][data-nick="grace_h"]')).to_be_visible()
    expect(ada.get_by_test_id("message-list")).to_contain_text("grace is now known as grace_h")
    expect(grace.get_by_test_id("me")).to_have_text("grace_h")
    assert python_frames(py, P.Presence)[0] == P.Presence(3, "lobby", "grace", "grace_h")

    say(grace, "Sure, after lunch. Thanks!")
    expect(last_message(ada, "room").locator(".text")).to_have_text("Sure, after lunch. Thanks!")
    assert python_frames(py, P.Event)[0].sender == "grace_h"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    ada.screenshot(path=str(SCREENSHOT))

    # An HTML injection attempt is shown as text and never runs.
    attack = '<img src=x onerror="window.__pwned=1">'
    say(ada, attack)
    expect(last_message(grace, "room").locator(".text")).to_have_text(attack)
    assert grace.locator('[data-testid="message-list"] img').count() == 0
    assert grace.evaluate("window.__pwned") is None
    assert python_frames(py, P.Event)[0].payload == attack.encode()

    # The Python client got every room message, never the whisper.
    py.send(P.Ping(99))
    while not isinstance(frame := py.recv(timeout=15), P.ServerPong):
        py.seen.append(frame)
    events = [f for f in py.seen if isinstance(f, P.Event)]
    assert [e.sender for e in events] == ["ada", "grace", "grace_h", "ada"]
    assert all(e.kind == P.TARGET_ROOM for e in events)

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
    py2 = RawClient(srv2.address)
    py2.hello("turing", version=2)
    assert who(py2, "lobby") == ["ada", "grace_h"]
    for page in (ada, grace):
        assert page.errors == []
        page.context.close()
    py2.close()


def test_reconnecting_state_is_visible(server_factory, browser):
    srv = server_factory()
    page = open_chat(browser, f"http://127.0.0.1:{srv.port}/", "ada")
    srv.stop()
    banner = page.get_by_test_id("status-banner")
    expect(banner).to_be_visible(timeout=10000)
    expect(banner).to_have_attribute("data-state", "reconnecting")
    expect(banner).to_contain_text("Reconnecting")
    page.context.close()


def docs_example() -> str:
    """The JavaScript example of docs/websocket.md (the block after the example marker)."""
    text = (ROOT / "docs" / "websocket.md").read_text(encoding="utf-8")
    block = text.split("<!-- example: run by tests/test_browser.py -->", 1)[1]
    return block.split("```js\n", 1)[1].split("```", 1)[0]


def test_docs_javascript_example_runs_in_the_browser(server_factory, browser):
    code = docs_example()
    assert len(code.strip().splitlines()) <= 15
    srv = server_factory()
    bob = RawClient(srv.address)
    bob.hello("bob", version=2)
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
    presence = python_frames(bob, P.Presence)[0]
    assert (presence.kind, presence.nick) == (1, "ann")
    hello = python_frames(bob, P.Event)[0]
    assert (hello.sender, hello.payload, hello.payload_type) == ("ann", b"hello", P.PAYLOAD_TEXT)
    # Python -> JS: a JSON object arrives as an object (the example prints its fields).
    payload = json.dumps({"text": "hi ann", "from": "python"}).encode()
    assert reply_count(emit_v2(bob, 0, "lobby", "msg", payload, 2)) == 1
    page.wait_for_function("() => window.lastData !== undefined", timeout=10000)
    assert page.evaluate("typeof window.lastData") == "object"
    assert page.evaluate("window.lastData") == {"text": "hi ann", "from": "python"}
    page.wait_for_timeout(100)
    assert "delivered to 1" in lines
    assert "bob: object hi ann" in lines
    assert errors == []
    context.close()
    bob.close()
