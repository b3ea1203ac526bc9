// Sequenced rooms in muxclient.js (protocol.md sections 9 and 10), under
// `node --test` via tests/test_js_client.py: the SEQUENCED JOIN, its REPLY,
// EVENT_SEQ and GAP against the Python codec's bytes, then the client's
// position tracking over a FakeWebSocket: replayed flags, duplicate drop, a
// throwing handler, GAP, and the re-joins of a reconnect (COMPLETE, GAP, RESET).

import { test } from "node:test";
import assert from "node:assert/strict";

import { T, Writer, decodePayload, decodeServerFrame, encode, parseReply, splitFrames } from "../../muxserver/web/muxclient.js";
import { FakeWebSocket, connected, fixtures, hex, replyOk, revive, tick, unhex, until } from "./helpers.mjs";

const EPOCH = 2n ** 64n - 3n; // above 2**53: a Number would round it
const text = (s) => new TextEncoder().encode(s);

const joinReply = (req, recovery, epoch, first, last) =>
  new Writer().u32(req).u16(0).u8(recovery).u64(epoch).u64(first).u64(last).frame(T.REPLY);
const eventSeq = (seq, room, body, sender = "bob") =>
  new Writer().u64(seq).u8(1 << 4).str8(sender).str8(room).str8("say").bytes(text(body)).frame(T.EVENT_SEQ);
const gapFrame = (room, first, last) => new Writer().str8(room).u64(first).u64(last).frame(T.GAP);

/** The JOIN the client sent last: {req, flags, room, epoch, after, replayMax} (the last three if SEQUENCED). */
function lastJoin(ws) {
  const joins = ws.frames().filter((f) => f.type === T.JOIN);
  return joins.length ? readJoin(joins.at(-1)) : null;
}

function readJoin({ r }) {
  const j = { req: r.u32(), flags: r.u8(), room: r.str8() };
  if (j.flags & 2) Object.assign(j, { epoch: r.u64(), after: r.u64(), replayMax: r.u16() });
  r.end();
  return j;
}

/** A client with a "say" handler recording [text, meta] and a "recovery" log, both in one `log`. */
async function sequencedClient(opts = {}) {
  const { c, ws } = await connected({ backoff: { initial: 5, max: 5 }, random: () => 0.5, ...opts });
  const log = [];
  c.on("say", (data, meta) => log.push(["say", data, meta.seq, meta.replayed]));
  c.on("recovery", (r) => log.push(["recovery", r]));
  return { c, ws, log };
}

/** join(room) answered with a REPLY (and any frames after it) in one WebSocket message. */
async function joinWith(c, ws, room, options, reply, ...after) {
  const p = c.join(room, options);
  const j = lastJoin(ws);
  ws.push(joinReply(j.req, ...reply), ...after);
  return { j, result: await p };
}

// ------------------------------------------------------------ fixtures
test("SEQUENCED JOINs encode to the Python codec's bytes", async () => {
  const { sequenced } = fixtures();
  for (const fx of sequenced.joins) {
    const { c, ws } = await connected();
    c.join(fx.room, fx.options).catch(() => {});
    assert.equal(hex(ws.sent.at(-1)), fx.hex, `join(${fx.room}, ${JSON.stringify(fx.options)})`);
  }
  for (const fx of sequenced.encodes) {
    const [req, room, flags, epoch, after, replayMax] = revive(fx.args);
    assert.equal(hex(encode.join(req, room, flags, { epoch, after, replayMax })), fx.hex);
  }
  assert.ok(sequenced.joins.length >= 3 && sequenced.encodes.length >= 2);
});

test("JOIN REPLY, EVENT_SEQ and GAP decode to the Python codec's values", () => {
  const { sequenced } = fixtures();
  for (const fx of sequenced.replies) {
    const [{ type, body }] = splitFrames(unhex(fx.hex));
    const msg = decodeServerFrame(type, body);
    assert.equal(msg.type, "REPLY");
    assert.deepEqual(parseReply.sequencedJoin(msg.body), revive(fx.expect));
  }
  for (const fx of sequenced.frames) {
    const [{ type, body }] = splitFrames(unhex(fx.hex));
    const msg = decodeServerFrame(type, body);
    for (const [key, value] of Object.entries(revive(fx.expect))) {
      const got = key === "value" ? decodePayload(msg.ptype, msg.payload) : msg[key];
      assert.deepEqual(got, value, `${msg.type}.${key}`);
    }
  }
  assert.equal(sequenced.replies.length, 4);
  assert.throws(() => parseReply.sequencedJoin(new Uint8Array(24)), (e) => e.status === "BAD_FRAME");
});

// ------------------------------------------------------------ positions
test("a fresh join with history: recovery first, replayed flags, position after the handlers", async () => {
  const { c, ws, log } = await sequencedClient();
  // The REPLY and the replay share one WebSocket message: the position must
  // already be set when the first EVENT_SEQ is dispatched.
  const { j, result } = await joinWith(c, ws, "lobby", { history: 3 }, [0, EPOCH, 5n, 7n],
    eventSeq(5n, "lobby", "five"), eventSeq(6n, "lobby", "six"), eventSeq(7n, "lobby", "seven"),
    eventSeq(8n, "lobby", "eight"));
  assert.deepEqual([j.flags, j.epoch, j.after, j.replayMax], [2, 0n, 0n, 3]);
  const want = { room: "lobby", outcome: "fresh", epoch: EPOCH, first: 5, last: 7, missing: null, replayed: 3, rejoin: false };
  assert.deepEqual(result, want);
  assert.deepEqual(log, [
    ["recovery", want],
    ["say", "five", 5, true], ["say", "six", 6, true], ["say", "seven", 7, true], ["say", "eight", 8, false],
  ]);
  assert.deepEqual(c.position("lobby"), { epoch: EPOCH, last: 8 });
  assert.equal(typeof c.position("lobby").epoch, "bigint");
});

test("events at or below the position are dropped as duplicates", async () => {
  const { c, ws, log } = await sequencedClient();
  await joinWith(c, ws, "lobby", {}, [0, EPOCH, 11n, 10n]); // nothing replayed, at 10
  assert.deepEqual(c.position("lobby"), { epoch: EPOCH, last: 10 });
  log.length = 0;
  ws.push(eventSeq(9n, "lobby", "old"), eventSeq(10n, "lobby", "old"), eventSeq(11n, "lobby", "new"),
    eventSeq(11n, "lobby", "again"), eventSeq(12n, "lobby", "next"));
  assert.deepEqual(log, [["say", "new", 11, false], ["say", "next", 12, false]]);
  assert.equal(c.duplicatesDropped, 3);
  assert.deepEqual(c.position("lobby"), { epoch: EPOCH, last: 12 });
  // seq 0 (the server keeps no history) is never a duplicate
  ws.push(eventSeq(0n, "lobby", "h0"), eventSeq(0n, "lobby", "h0 again"));
  assert.deepEqual(log.slice(2).map((e) => e[1]), ["h0", "h0 again"]);
  assert.deepEqual(c.position("lobby"), { epoch: EPOCH, last: 12 });
});

test("a throwing handler leaves the position, and the re-join asks for that event again", async () => {
  const { c, ws } = await sequencedClient();
  await joinWith(c, ws, "lobby", {}, [0, EPOCH, 4n, 3n]);
  const errors = [];
  c.on("error", (e) => errors.push(e.message));
  let calls = 0;
  c.on("say", (_data, meta) => { calls += 1; if (meta.seq === 5) throw new Error("handler broke on 5"); });
  ws.push(eventSeq(4n, "lobby", "four"), eventSeq(5n, "lobby", "five"));
  assert.equal(calls, 2);
  assert.deepEqual(errors, ["handler broke on 5"]);
  assert.deepEqual(c.position("lobby"), { epoch: EPOCH, last: 4 });
  ws.drop(1006);
  await until(() => FakeWebSocket.all.length === 2, "the reconnect");
  const ws2 = FakeWebSocket.all.at(-1);
  ws2.accept();
  ws2.push(new Writer().u8(2).u32(2).str8("ann").u32(1048576).u32(25000).str8("muxserver")
    .str8(Uint8Array.of(9)).u32(120000).u8(1).frame(T.WELCOME));
  const j = lastJoin(ws2);
  assert.deepEqual([j.room, j.flags, j.epoch, j.after, j.replayMax], ["lobby", 2, EPOCH, 4n, 0xffff]);
});

test("a GAP frame is a recovery with its range, and the position moves past it", async () => {
  const { c, ws, log } = await sequencedClient();
  await joinWith(c, ws, "ünï", { history: 100 }, [0, EPOCH, 3n, 20n], eventSeq(3n, "ünï", "three"));
  log.length = 0;
  ws.push(gapFrame("ünï", 4n, 9n), eventSeq(10n, "ünï", "ten"));
  assert.deepEqual(log, [
    ["recovery", { room: "ünï", outcome: "gap", epoch: EPOCH, first: 10, last: 20, missing: [4, 9], replayed: 11, rejoin: false }],
    ["say", "ten", 10, true],
  ]);
  assert.deepEqual(c.position("ünï"), { epoch: EPOCH, last: 10 });
});

test("sequenced: false, per join or as the client's default, joins plain", async () => {
  for (const [opts, joinOpts] of [[{}, { sequenced: false }], [{ sequenced: false }, {}]]) {
    const { c, ws } = await connected(opts);
    const p = c.join("plain", { presence: true, ...joinOpts });
    const j = lastJoin(ws);
    assert.deepEqual(j, { req: j.req, flags: 1, room: "plain" });
    ws.push(replyOk(j.req));
    assert.equal(await p, undefined);
    assert.equal(c.position("plain"), null);
  }
  const { c, ws } = await connected();
  const before = ws.sent.length;
  await assert.rejects(c.join("x", { history: 0x10000 }), RangeError);
  await assert.rejects(c.join("x", { history: 1.5 }), RangeError);
  assert.equal(ws.sent.length, before);
});

test("an acked emit of ours moves the position only when nothing lies between", async () => {
  const { c, ws } = await sequencedClient();
  await joinWith(c, ws, "lobby", {}, [0, EPOCH, 8n, 7n]);
  const emit = async (seq) => {
    const p = c.emit("say", "mine", { room: "lobby" }, { ack: true });
    ws.push(new Writer().u32(ws.last().r.u32()).u16(0).u32(2).u64(seq).frame(T.REPLY));
    assert.equal(await p, 2);
  };
  await emit(8n); // right after our position: nothing to replay to us
  assert.deepEqual(c.position("lobby"), { epoch: EPOCH, last: 8 });
  await emit(10n); // seq 9 is still on its way: it must not be skipped
  assert.deepEqual(c.position("lobby"), { epoch: EPOCH, last: 8 });
});

// ------------------------------------------------------------ reconnect
test("reconnect: resume token, every room re-joined, COMPLETE / GAP / RESET reported", async () => {
  const { c, ws, log } = await sequencedClient();
  await joinWith(c, ws, "a", { presence: true }, [0, EPOCH, 1n, 0n]);
  await joinWith(c, ws, "b", {}, [0, 77n, 1n, 0n]);
  await joinWith(c, ws, "c", {}, [0, 5n, 1n, 0n]);
  const plain = c.join("p", { sequenced: false });
  ws.push(replyOk(lastJoin(ws).req));
  await plain;
  ws.push(eventSeq(1n, "a", "a1"), eventSeq(2n, "a", "a2"), eventSeq(1n, "b", "b1"), eventSeq(30n, "c", "c30"));
  const events = [];
  c.on("reconnect", (r) => events.push(["reconnect", r.resumed, r.rooms]));
  c.on("recovery", (r) => events.push(["recovery", r.room, r.outcome]));
  ws.drop(1006);
  await until(() => FakeWebSocket.all.length === 2, "the reconnect");
  const ws2 = FakeWebSocket.all.at(-1);
  ws2.accept();
  const hello = ws2.last().r;
  hello.u8(); hello.str8(); hello.str8(); hello.str8();
  assert.deepEqual(hello.raw8(), Uint8Array.of(7, 7)); // the token of the first WELCOME
  ws2.push(new Writer().u8(2).u32(2).str8("ann").u32(1048576).u32(25000).str8("muxserver")
    .str8(Uint8Array.of(8)).u32(120000).u8(1).frame(T.WELCOME));
  const joins = ws2.frames().filter((f) => f.type === T.JOIN).map(readJoin);
  assert.deepEqual(joins.map(({ req, ...j }) => j), [
    { flags: 3, room: "a", epoch: EPOCH, after: 2n, replayMax: 0xffff },
    { flags: 2, room: "b", epoch: 77n, after: 1n, replayMax: 0xffff },
    { flags: 2, room: "c", epoch: 5n, after: 30n, replayMax: 0xffff },
    { flags: 0, room: "p" },
  ]);
  log.length = 0;
  ws2.push(
    joinReply(joins[0].req, 1, EPOCH, 3n, 4n), eventSeq(3n, "a", "a3"), eventSeq(4n, "a", "a4"),
    joinReply(joins[1].req, 2, 77n, 6n, 6n), eventSeq(6n, "b", "b6"),
    // c's history restarted: a new epoch counts from 1 again, below the old position
    joinReply(joins[2].req, 3, 99n, 1n, 2n), eventSeq(1n, "c", "c1"), eventSeq(2n, "c", "c2"),
    replyOk(joins[3].req), eventSeq(3n, "c", "c3"),
  );
  await tick();
  const rec = (room, outcome, epoch, first, last, missing, replayed) =>
    ["recovery", { room, outcome, epoch, first, last, missing, replayed, rejoin: true }];
  assert.deepEqual(log, [
    rec("a", "complete", EPOCH, 3, 4, null, 2), ["say", "a3", 3, true], ["say", "a4", 4, true],
    rec("b", "gap", 77n, 6, 6, [2, 5], 1), ["say", "b6", 6, true],
    rec("c", "reset", 99n, 1, 2, null, 2), ["say", "c1", 1, true], ["say", "c2", 2, true],
    ["say", "c3", 3, false],
  ]);
  assert.deepEqual(events, [
    ["recovery", "a", "complete"], ["recovery", "b", "gap"], ["recovery", "c", "reset"],
    ["reconnect", true, ["a", "b", "c", "p"]],
  ]);
  assert.deepEqual(c.position("c"), { epoch: 99n, last: 3 });
  assert.equal(c.joined.get("a").presence, true);
});

test("a socket that cannot even be created is retried", async () => {
  const { c, ws } = await connected({ backoff: { initial: 5, max: 5 }, random: () => 0.5 });
  const real = c._WebSocket;
  let refused = 0;
  c._WebSocket = class { constructor() { refused += 1; throw new Error("SecurityError"); } };
  ws.drop(1006);
  await until(() => refused >= 2, "a second try after a constructor failure");
  c._WebSocket = real;
  await until(() => FakeWebSocket.all.length === 2, "a socket once the constructor works");
  assert.equal(c.connected, false); // not accepted yet: the fake server has not answered
});
