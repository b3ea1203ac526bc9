// muxclient.js under `node --test` (run by tests/test_js_client.py, which
// writes the byte fixtures from the Python codec and passes their path in
// MUXCLIENT_FIXTURES). A FakeWebSocket stands in for the browser's, so the
// connection logic (HELLO, requests, events, PING, reconnect) runs on bytes.

import { test } from "node:test";
import assert from "node:assert/strict";

import {
  MuxClient, MuxError, T, Writer, backoffDelay, checkName, decodePayload,
  decodeServerFrame, encode, encodePayload, parseReply, splitFrames,
} from "../../muxserver/web/muxclient.js";
import {
  FakeWebSocket, connected, fixtures, hex, replyErr, replyOk, revive, tick, unhex, welcome,
} from "./helpers.mjs";

// ------------------------------------------------------------ fixtures
test("client frames encode to the Python codec's bytes", () => {
  const { client } = fixtures();
  assert.ok(client.length >= 10);
  for (const fx of client) {
    const a = fx.args;
    let got;
    switch (fx.call) {
      case "hello": got = encode.hello({ namespace: a[0], nick: a[1], token: a[2], resume: a[3] }); break;
      case "join": got = encode.join(a[0], a[1], a[2]); break;
      case "leave": got = encode.leave(a[0], a[1]); break;
      case "nick": got = encode.nick(a[0], a[1]); break;
      case "emit_bin": got = encode.emit(a[0], a[1], a[2], a[3], a[4], Uint8Array.from(a[5])); break;
      case "emit_text":
      case "emit_json": {
        const p = encodePayload(a[5]);
        assert.equal((a[1] >> 1) & 3, p.ptype, `${fx.call}: payload type from the value`);
        got = encode.emit(a[0], a[1], a[2], a[3], a[4], p.bytes);
        break;
      }
      case "ping": got = encode.ping(BigInt(a[0])); break;
      case "pong": got = encode.pong(BigInt(a[0])); break;
      case "who": got = encode.who(a[0], a[1]); break;
      case "rooms": got = encode.rooms(a[0], a[1]); break;
      case "bye": got = encode.bye(); break;
      default: assert.fail(`unknown fixture call ${fx.call}`);
    }
    assert.equal(hex(got), fx.hex, `${fx.call}(${JSON.stringify(a)})`);
  }
});

test("server frames decode to the Python codec's values, several per message", () => {
  const { server } = fixtures();
  assert.ok(server.length >= 5);
  for (const fx of server) {
    const frames = splitFrames(unhex(fx.hex));
    assert.equal(frames.length, fx.expect.length);
    frames.forEach(({ type, body }, i) => {
      const want = revive(fx.expect[i]);
      const msg = decodeServerFrame(type, body);
      for (const [key, value] of Object.entries(want)) {
        if (key === "value") {
          const got = msg.type === "REPLY" ? parseReply[want.parse](msg.body) : decodePayload(msg.ptype, msg.payload);
          assert.deepEqual(got, value, `${msg.type} value`);
        } else if (key === "parse") {
          continue;
        } else if (key === "message" && msg.type === "REPLY") {
          assert.equal(new TextDecoder().decode(msg.body), value);
        } else {
          assert.deepEqual(msg[key], value, `${msg.type}.${key}`);
        }
      }
    });
  }
});

// ----------------------------------------------------------- codec unit
test("splitFrames refuses partial frames, zero length and over-long frames", () => {
  const ok = encode.bye();
  assert.equal(splitFrames(ok).length, 1);
  assert.throws(() => splitFrames(ok.subarray(0, 3)), (e) => e.status === "BAD_FRAME");
  assert.throws(() => splitFrames(new Uint8Array([...ok, 0, 0, 0, 9, 1])), (e) => e.status === "BAD_FRAME");
  assert.throws(() => splitFrames(Uint8Array.of(0, 0, 0, 0)), (e) => e.status === "BAD_FRAME");
  assert.throws(() => splitFrames(Uint8Array.of(0, 0, 1, 0, 1), 100), (e) => e.status === "TOO_LARGE");
  assert.deepEqual(splitFrames(new Uint8Array(0)), []);
});

test("decodeServerFrame: short bodies, bad UTF-8, unknown types", () => {
  assert.throws(() => decodeServerFrame(T.WELCOME, Uint8Array.of(2, 0)), (e) => e.status === "BAD_FRAME");
  assert.throws(() => decodeServerFrame(T.PRESENCE, Uint8Array.of(1, 1, 0xff, 0, 0)), (e) => e.status === "BAD_FRAME");
  assert.throws(() => decodeServerFrame(T.SERVER_PING, Uint8Array.of(1)), (e) => e.status === "BAD_FRAME");
  assert.throws(() => decodeServerFrame(0x99, new Uint8Array(0)), (e) => e.status === "UNKNOWN_TYPE");
});

test("payload types round trip", () => {
  const cases = [
    ["héllo ✓", 1, "héllo ✓"],
    [{ a: [1, { b: null }] }, 2, { a: [1, { b: null }] }],
    [[1, "two"], 2, [1, "two"]],
    [42, 2, 42],
    [Uint8Array.of(1, 2, 3), 0, Uint8Array.of(1, 2, 3)],
    [Uint8Array.of(9, 8, 7).buffer, 0, Uint8Array.of(9, 8, 7)],
    [new Uint16Array([0x0102]), 0, new Uint8Array(new Uint16Array([0x0102]).buffer)],
    [undefined, 0, new Uint8Array(0)],
  ];
  for (const [value, ptype, back] of cases) {
    const p = encodePayload(value);
    assert.equal(p.ptype, ptype);
    assert.deepEqual(decodePayload(p.ptype, p.bytes), back);
  }
  assert.throws(() => encodePayload(new Map()), TypeError);
  assert.throws(() => decodePayload(2, new TextEncoder().encode("{nope")));
});

test("name checks", () => {
  assert.equal(checkName("lobby"), null);
  assert.equal(checkName("é".repeat(127)), null);
  assert.match(checkName("é".repeat(128)), /1\.\.255/);
  assert.match(checkName(""), /1\.\.255/);
  assert.match(checkName("a\u0007b"), /control/);
  assert.match(checkName("a\u0085b"), /control/);
  assert.equal(checkName("ann", "nick"), null);
  assert.match(checkName("a b", "nick"), /whitespace/);
  assert.match(checkName("x".repeat(33), "nick"), /1\.\.32/);
  assert.match(checkName("game", "namespace"), /start/);
  assert.equal(checkName("/game", "namespace"), null);
});

test("backoff: 0.5 s doubling to 30 s, +-20 % jitter", () => {
  assert.equal(backoffDelay(0, () => 0.5), 500);
  assert.equal(backoffDelay(1, () => 0.5), 1000);
  assert.equal(backoffDelay(5, () => 0.5), 16000);
  assert.equal(backoffDelay(6, () => 0.5), 30000);
  assert.equal(backoffDelay(20, () => 0.5), 30000);
  assert.equal(backoffDelay(0, () => 0), 400);
  assert.equal(backoffDelay(0, () => 1), 600);
  assert.equal(backoffDelay(10, () => 0.999999), 36000);
});


test("connect, join, who, rooms, setNick, leave over a fake WebSocket", async () => {
  const { c, ws } = await connected();
  assert.equal(c.nick, "ann");
  assert.equal(c.maxFrame, 1048576);

  const joined = c.join("lobby", { presence: true, sequenced: false });
  const j = ws.last();
  assert.equal(j.type, T.JOIN);
  const req = j.r.u32();
  assert.equal(j.r.u8(), 1); // PRESENCE only: a plain JOIN ends at the room name
  assert.equal(j.r.str8(), "lobby");
  j.r.end();
  ws.push(replyOk(req));
  assert.equal(await joined, undefined);
  assert.deepEqual(c.joined.get("lobby").presence, true);
  assert.equal(c.position("lobby"), null);

  const who = c.who("lobby");
  const w = ws.last();
  ws.push(replyOk(w.r.u32(), new Writer().u32(2).u16(2).str8("ann").str8("bob").frame(0).subarray(5)));
  assert.deepEqual(await who, { total: 2, nicks: ["ann", "bob"] });

  const rooms = c.rooms({ all: true });
  const rq = ws.last();
  const rreq = rq.r.u32();
  assert.equal(rq.r.u8(), 1);
  ws.push(replyOk(rreq, new Writer().u32(1).u16(1).str8("lobby").u32(2).frame(0).subarray(5)));
  assert.deepEqual(await rooms, { total: 1, rooms: [{ name: "lobby", members: 2 }] });

  const nick = c.setNick("anna");
  ws.push(replyOk(ws.last().r.u32()));
  await nick;
  assert.equal(c.nick, "anna");

  const left = c.leave("lobby");
  ws.push(replyOk(ws.last().r.u32()));
  await left;
  assert.equal(c.joined.has("lobby"), false);
});

test("errors reject with the status name; invalid names never reach the wire", async () => {
  const { c, ws } = await connected();
  const p = c.emit("say", "hi", { room: "x" }, { ack: true });
  ws.push(replyErr(ws.last().r.u32(), 9, "not in room x"));
  await assert.rejects(p, (e) => e instanceof MuxError && e.status === "NOT_MEMBER" && e.name === "NOT_MEMBER");
  const before = ws.sent.length;
  await assert.rejects(c.join(""), (e) => e.status === "INVALID_NAME");
  await assert.rejects(c.setNick("has space"), (e) => e.status === "INVALID_NAME");
  await assert.rejects(c.emit("presence", 1, { broadcast: true }), (e) => e.status === "INVALID_NAME");
  await assert.rejects(c.emit("big", new Uint8Array(2 * 1048576), { broadcast: true }), (e) => e.status === "TOO_LARGE");
  assert.equal(ws.sent.length, before);
  // An unacked EMIT's failure arrives as REPLY req=0 and goes to "error".
  const errors = [];
  c.on("error", (e) => errors.push(e.status));
  await c.emit("say", "x", { nick: "nobody" });
  ws.push(replyErr(0, 10, "no such nick"));
  assert.deepEqual(errors, ["NO_SUCH_TARGET"]);
});

test("emit with ack resolves to the recipient count; flags carry echo and payload type", async () => {
  const { c, ws } = await connected();
  const p = c.emit("cfg", { a: 1 }, { broadcast: true }, { ack: true, echo: true });
  const e = ws.last();
  const req = e.r.u32();
  assert.equal(e.r.u8(), 1 | (2 << 1));
  assert.equal(e.r.u8(), 2);
  assert.equal(e.r.str8(), "");
  assert.equal(e.r.str8(), "cfg");
  assert.equal(new TextDecoder().decode(e.r.rest()), '{"a":1}');
  ws.push(new Writer().u32(req).u16(0).u32(5).u64(0).frame(T.REPLY));
  assert.equal(await p, 5);
  // without ack: req 0, resolves at once
  await c.emit("say", "hi", { nick: "bob" });
  const f = ws.last();
  assert.equal(f.r.u32(), 0);
  assert.equal(f.r.u8(), 1 << 1);
  assert.equal(f.r.u8(), 1);
});

test("events, presence and PING; several frames in one message", async () => {
  const { c, ws } = await connected();
  const got = [];
  c.on("say", (data, meta) => got.push([data, meta]));
  const presence = [];
  c.on("presence", (p) => presence.push(p));
  let onceCount = 0;
  c.once("say", () => { onceCount += 1; });
  const ev = (sk, sender, source, event, payload) =>
    new Writer().u8(sk).str8(sender).str8(source).str8(event).bytes(payload).frame(T.EVENT);
  ws.push(
    ev(0 | (1 << 4), "bob", "lobby", "say", new TextEncoder().encode("hi")),
    ev(1 | (2 << 4), "bob", "", "say", new TextEncoder().encode('{"n":1}')),
    new Writer().u8(3).str8("lobby").str8("bob").str8("bobby").frame(T.PRESENCE),
    new Writer().u64(77n).frame(T.SERVER_PING),
  );
  const plain = { seq: null, replayed: false };
  assert.deepEqual(got, [
    ["hi", { sender: "bob", room: "lobby", kind: "room", event: "say", ...plain }],
    [{ n: 1 }, { sender: "bob", room: null, kind: "direct", event: "say", ...plain }],
  ]);
  assert.equal(onceCount, 1);
  assert.deepEqual(presence, [{ kind: "nick", room: "lobby", nick: "bob", newNick: "bobby" }]);
  const pong = ws.last();
  assert.equal(pong.type, T.PONG);
  assert.equal(pong.r.u64(), 77n);
  // off removes a handler
  c.off("say");
  ws.push(ev(0, "bob", "lobby", "say", new Uint8Array(0)));
  assert.equal(got.length, 2);
});

test("a message ending inside a frame ends the connection", async () => {
  const { c, ws } = await connected({ reconnect: false });
  const errors = [];
  c.on("error", (e) => errors.push(e.status));
  ws.push(encode.bye().subarray(0, 3));
  assert.deepEqual(errors, ["BAD_FRAME"]);
  assert.equal(ws.closedWith, 4001);
});

test("fatal ERROR before WELCOME rejects connect with its status", async () => {
  FakeWebSocket.all = [];
  const p = MuxClient.connect("ws://test/ws", { nick: "ann", WebSocket: FakeWebSocket });
  const ws = FakeWebSocket.all[0];
  ws.accept();
  ws.push(new Writer().u16(7).bytes(new TextEncoder().encode("nick ann is taken")).frame(T.ERROR));
  ws.drop(4007);
  await assert.rejects(p, (e) => e.status === "NICK_TAKEN" && /taken/.test(e.message));
});

test("reconnect: backoff, same nick, rooms re-joined with their presence flag", async () => {
  const { c, ws } = await connected({ backoff: { initial: 5, max: 20 }, random: () => 0.5 });
  for (const [room, presence] of [["a", true], ["b", false]]) {
    const p = c.join(room, { presence, sequenced: false });
    ws.push(replyOk(ws.last().r.u32()));
    await p;
  }
  const events = [];
  c.on("disconnect", (d) => events.push(["disconnect", d.code]));
  c.on("reconnect", (r) => events.push(["reconnect", r.nick, r.rooms]));
  const pending = c.who("a");
  ws.drop(1006);
  await assert.rejects(pending, (e) => e.status === "DISCONNECTED");
  await assert.rejects(c.join("c"), (e) => e.status === "DISCONNECTED");
  assert.deepEqual(events, [["disconnect", 1006]]);

  // first retry is refused (the socket closes before WELCOME), the second works
  await new Promise((r) => setTimeout(r, 15));
  assert.equal(FakeWebSocket.all.length, 2);
  FakeWebSocket.all[1].drop(1006);
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(FakeWebSocket.all.length, 3);
  const ws3 = FakeWebSocket.all[2];
  ws3.accept();
  const hello = ws3.last().r;
  hello.u8();
  hello.str8();
  assert.equal(hello.str8(), "ann");
  hello.str8();
  assert.deepEqual(hello.raw8(), Uint8Array.of(7, 7)); // the resume token from WELCOME
  ws3.push(welcome("ann"));
  const joins = ws3.frames().filter((f) => f.type === T.JOIN).map((f) => [f.r.u32(), f.r.u8(), f.r.str8()]);
  assert.deepEqual(joins.map(([, flags, room]) => [room, flags]), [["a", 1], ["b", 0]]);
  ws3.push(...joins.map(([req]) => replyOk(req)));
  await tick();
  assert.deepEqual(events, [["disconnect", 1006], ["reconnect", "ann", ["a", "b"]]]);
  assert.equal(c.connected, true);

  // close(): BYE, and no reconnect after the server closes
  const closed = c.close();
  assert.equal(ws3.last().type, T.BYE);
  ws3.drop(1000);
  await closed;
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(FakeWebSocket.all.length, 3);
});

test("no reconnect after AUTH_FAILED", async () => {
  const { c, ws } = await connected({ backoff: { initial: 1, max: 1 } });
  ws.push(new Writer().u16(4).frame(T.ERROR));
  ws.drop(4004);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(FakeWebSocket.all.length, 1);
  assert.equal(c.connected, false);
});

test("timers are called as plain functions (a browser throws 'Illegal invocation' otherwise)", async () => {
  const real = globalThis.setTimeout;
  let calls = 0;
  globalThis.setTimeout = function strictSetTimeout(fn, ms) {
    if (this !== undefined && this !== globalThis) throw new TypeError("Illegal invocation");
    calls += 1;
    return real(fn, ms);
  };
  try {
    const { c, ws } = await connected();
    const p = c.who("lobby");
    ws.push(replyOk(ws.last().r.u32(), new Writer().u32(0).u16(0).frame(0).subarray(5)));
    assert.deepEqual(await p, { total: 0, nicks: [] });
    assert.ok(calls >= 2);
  } finally {
    globalThis.setTimeout = real;
  }
});

test("a silent server gets a PING, and is dropped when it stays silent", async () => {
  const timers = [];
  const setTimeout = (fn, ms) => { const t = { fn, ms, live: true }; timers.push(t); return t; };
  const clearTimeout = (t) => { if (t) t.live = false; };
  const fire = (ms) => {
    const t = timers.findLast((x) => x.live && x.ms === ms);
    assert.ok(t, `a live ${ms} ms timer`);
    t.live = false;
    t.fn();
  };
  FakeWebSocket.all = [];
  const p = MuxClient.connect("ws://test/ws", { nick: "ann", WebSocket: FakeWebSocket, setTimeout, clearTimeout, random: () => 0.5 });
  const ws = FakeWebSocket.all[0];
  ws.accept();
  ws.push(welcome("ann", { ping: 1000 }));
  const c = await p;
  const drops = [];
  c.on("disconnect", (d) => drops.push(d.code));
  fire(1000); // ping_interval of silence
  assert.equal(ws.last().type, T.PING);
  ws.push(new Writer().u64(1n).frame(T.SERVER_PONG)); // an answer resets the watch
  assert.equal(timers.filter((t) => t.live && t.ms === 10000).length, 0);
  fire(1000);
  fire(10000); // still silent 10 s after our PING
  assert.equal(ws.closedWith, 4014);
  assert.deepEqual(drops, [4014]);
  assert.equal(c.connected, false);
  assert.ok(timers.some((t) => t.live && t.ms === 500), "a reconnect is scheduled after 0.5 s");
});
