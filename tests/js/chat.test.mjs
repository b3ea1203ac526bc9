// The web chat page's pure parts (tests/test_js_client.py runs this too):
// command parsing, formatting, page state, and rendering on a minimal DOM
// stub whose innerHTML throws, so any HTML injection path fails loudly.

import { test } from "node:test";
import assert from "node:assert/strict";

import {
  ChatState, errorText, formatTime, messageText, parseInput, presenceText, recoveryLines,
  renderMember, renderMessage, renderRoomItem,
} from "../../muxserver/web/chat.js";
import { MuxError } from "../../muxserver/web/muxclient.js";

class StubNode {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.children = [];
    this.attributes = {};
    this.className = "";
    this._text = "";
  }
  set textContent(v) { this._text = String(v); this.children = []; }
  get textContent() { return this._text + this.children.map((c) => c.textContent).join(""); }
  set innerHTML(_v) { throw new Error("innerHTML must never be used"); }
  get innerHTML() { throw new Error("innerHTML must never be used"); }
  setAttribute(k, v) { this.attributes[k] = String(v); }
  appendChild(c) { this.children.push(c); return c; }
  find(cls) { return this.children.find((c) => c.className.split(" ").includes(cls)); }
}
const doc = { createElement: (tag) => new StubNode(tag) };

test("parseInput: plain lines, commands, usage errors", () => {
  assert.deepEqual(parseInput("  hello  "), { kind: "say", text: "hello" });
  assert.deepEqual(parseInput(""), { kind: "none" });
  assert.deepEqual(parseInput("//etc/passwd"), { kind: "say", text: "/etc/passwd" });
  assert.deepEqual(parseInput("/w bob hi  there"), { kind: "whisper", nick: "bob", text: "hi  there" });
  assert.deepEqual(parseInput("/w bob"), { kind: "error", message: "Usage: /w NICK TEXT" });
  assert.deepEqual(parseInput("/all hey all"), { kind: "broadcast", text: "hey all" });
  assert.deepEqual(parseInput("/nick ann2"), { kind: "nick", nick: "ann2" });
  assert.deepEqual(parseInput("/join  rust fans"), { kind: "join", room: "rust fans" });
  assert.deepEqual(parseInput("/leave"), { kind: "leave", room: null });
  assert.deepEqual(parseInput("/HELP"), { kind: "help" });
  assert.equal(parseInput("/frob").kind, "error");
});

test("formatting helpers", () => {
  assert.equal(formatTime(new Date(2026, 0, 1, 9, 5)), "09:05");
  assert.equal(messageText("hi"), "hi");
  assert.equal(messageText(new TextEncoder().encode("héllo")), "héllo");
  assert.equal(messageText({ text: "t" }), "t");
  assert.equal(messageText({ a: 1 }), '{"a":1}');
  assert.equal(presenceText({ kind: "join", nick: "bob" }), "bob joined");
  assert.equal(presenceText({ kind: "leave", nick: "bob" }), "bob left");
  assert.equal(presenceText({ kind: "nick", nick: "bob", newNick: "rob" }), "bob is now known as rob");
  assert.match(errorText(new MuxError("NICK_TAKEN", "x")), /already taken/);
  assert.match(errorText(new MuxError("IDLE_TIMEOUT", "nothing received for 2 s")), /went silent/);
  assert.match(errorText(new MuxError("INVALID_NAME", "nick must be 1..32 bytes")), /1\.\.32/);
  assert.equal(errorText(new Error("boom")), "boom");
});

test("user text is rendered as text, never as HTML", () => {
  const evil = '<img src=x onerror="alert(1)">';
  const li = renderMessage(doc, { kind: "room", time: new Date(0), sender: evil, text: evil });
  assert.equal(li.find("text").textContent, evil);
  assert.equal(li.find("sender").textContent, evil);
  assert.equal(li.attributes["data-testid"], "message");
  assert.equal(li.attributes["data-kind"], "room");
  const whisper = renderMessage(doc, { kind: "direct", time: new Date(0), sender: "me", to: evil, text: "x", mine: true });
  assert.equal(whisper.find("sender").textContent, `to ${evil}`);
  assert.equal(whisper.find("sender").attributes["data-nick"], evil);
  const room = renderRoomItem(doc, { name: evil, joined: false, members: 3, unread: 0 }, null);
  assert.equal(room.attributes["data-room"], evil);
  assert.equal(room.find("name").textContent, evil);
  assert.equal(room.find("badge").textContent, "3");
  const member = renderMember(doc, evil, "ann");
  assert.equal(member.attributes["data-nick"], evil);
  assert.equal(member.find("name").textContent, evil);
});

test("ChatState: messages, unread counts, presence, room list", () => {
  const s = new ChatState();
  s.room("a").members = ["ann"];
  s.room("b");
  s.current = "a";
  s.addMessage("a", { text: "1" });
  s.addMessage("b", { text: "2" });
  s.addMessage(null, { text: "whisper" });
  assert.equal(s.room("a").messages.length, 2);
  s.current = null;
  s.addMessage(null, { text: "welcome" });
  assert.deepEqual(s.home, [{ text: "welcome" }]);
  assert.equal(s.joined.has(null), false);
  s.current = "a";
  assert.equal(s.room("a").unread, 0);
  assert.equal(s.room("b").unread, 1);
  s.presence({ kind: "join", room: "a", nick: "bob" });
  s.presence({ kind: "nick", room: "a", nick: "bob", newNick: "rob" });
  assert.deepEqual(s.room("a").members, ["ann", "rob"]);
  s.presence({ kind: "leave", room: "a", nick: "ann" });
  assert.deepEqual(s.room("a").members, ["rob"]);
  s.directory = new Map([["c", 5], ["a", 1]]);
  assert.deepEqual(s.roomList().map((r) => [r.name, r.joined, r.members]), [["a", true, 1], ["b", true, 0], ["c", false, 5]]);
  for (let i = 0; i < 600; i++) s.addMessage("a", { text: String(i) });
  assert.equal(s.room("a").messages.length, 500);
  assert.equal(s.room("a").messages.at(-1).text, "599");
});

test("recovery lines: earlier, recovered, lost, reset; nothing when nothing happened", () => {
  const r = (outcome, replayed, missing = null, rejoin = true) => ({ room: "games", outcome, replayed, missing, rejoin });
  assert.deepEqual(recoveryLines(r("fresh", 20, null, false)), ["20 earlier messages in #games"]);
  assert.deepEqual(recoveryLines(r("fresh", 0, null, false)), []);
  assert.deepEqual(recoveryLines(r("complete", 12)), ["recovered 12 missed messages in #games"]);
  assert.deepEqual(recoveryLines(r("complete", 1)), ["recovered 1 missed message in #games"]);
  assert.deepEqual(recoveryLines(r("complete", 0)), []);
  assert.deepEqual(recoveryLines(r("gap", 3, [40, 57])), [
    "messages 40..57 in #games were lost", "recovered 3 missed messages in #games",
  ]);
  assert.deepEqual(recoveryLines(r("gap", 0, [40, 40])), ["message 40 in #games was lost"]);
  // a GAP frame in the middle of a replay: the loss only (the count was told)
  assert.deepEqual(recoveryLines(r("gap", 5, [3, 9], false)), ["messages 3..9 in #games were lost"]);
  assert.deepEqual(recoveryLines(r("reset", 2)), [
    "the history of #games restarted: messages sent while you were away cannot be recovered",
    "recovered 2 missed messages in #games",
  ]);
});

test("replayed messages and recovery lines carry their marks", () => {
  const earlier = renderMessage(doc, { kind: "room", time: new Date(0), sender: "bob", text: "x", replayed: "earlier" });
  assert.equal(earlier.attributes["data-replayed"], "earlier");
  assert.match(earlier.className, /\bearlier\b/);
  const live = renderMessage(doc, { kind: "room", time: new Date(0), sender: "bob", text: "x" });
  assert.equal(live.attributes["data-replayed"], undefined);
  const line = renderMessage(doc, { kind: "recovery", time: new Date(0), text: "lost", outcome: "gap" });
  assert.equal(line.attributes["data-kind"], "recovery");
  assert.equal(line.attributes["data-outcome"], "gap");
  assert.equal(line.find("text").textContent, "lost");
});
