// Shared by the muxclient tests: a FakeWebSocket standing in for the browser's
// (the test plays the server on it), frame builders, and a connected client.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import { MuxClient, T, Writer, Reader, splitFrames } from "../../muxserver/web/muxclient.js";

export const hex = (u8) => Buffer.from(u8).toString("hex");
export const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));

export function fixtures() {
  const path = process.env.MUXCLIENT_FIXTURES;
  assert.ok(path, "MUXCLIENT_FIXTURES is not set: run this through pytest tests/test_js_client.py");
  return JSON.parse(readFileSync(path, "utf-8"));
}

// "u64:N" -> BigInt, "hex:..." -> Uint8Array, recursively.
export function revive(v) {
  if (typeof v === "string" && v.startsWith("u64:")) return BigInt(v.slice(4));
  if (typeof v === "string" && v.startsWith("hex:")) return unhex(v.slice(4));
  if (Array.isArray(v)) return v.map(revive);
  if (v && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, revive(x)]));
  return v;
}

// -------------------------------------------------------- fake socket
export class FakeWebSocket {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeWebSocket.all.push(this);
  }
  send(data) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(new Uint8Array(data));
  }
  close(code = 1000, reason = "") {
    if (this.readyState >= 2) return;
    this.closedWith = code;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }
  // ---- the server's side
  accept() { this.readyState = 1; this.onopen?.(); }
  push(...frames) {
    const size = frames.reduce((n, f) => n + f.length, 0);
    const buf = new Uint8Array(size);
    let pos = 0;
    for (const f of frames) { buf.set(f, pos); pos += f.length; }
    this.onmessage?.({ data: buf.buffer });
  }
  drop(code = 1006) { this.readyState = 3; this.onclose?.({ code, reason: "" }); }
  // decoded frames the client sent: {type, r: Reader}
  frames() { return this.sent.flatMap((m) => splitFrames(m, 1 << 30)).map(({ type, body }) => ({ type, r: new Reader(body, "sent") })); }
  last() { const f = this.frames(); return f[f.length - 1]; }
}

export const welcome = (nick, { version = 2, maxFrame = 1048576, ping = 25000 } = {}) => {
  const w = new Writer().u8(version).u32(1).str8(nick).u32(maxFrame).u32(ping).str8("muxserver");
  if (version === 2) w.str8(Uint8Array.of(7, 7)).u32(120000).u8(0);
  return w.frame(T.WELCOME);
};
export const replyOk = (req, extra = new Uint8Array(0)) => new Writer().u32(req).u16(0).bytes(extra).frame(T.REPLY);
export const replyErr = (req, status, msg) => new Writer().u32(req).u16(status).bytes(new TextEncoder().encode(msg)).frame(T.REPLY);
export const tick = () => new Promise((r) => setImmediate(r));

export async function connected(opts = {}) {
  FakeWebSocket.all = [];
  const p = MuxClient.connect("ws://test/ws", { nick: "ann", WebSocket: FakeWebSocket, ...opts });
  const ws = FakeWebSocket.all[0];
  assert.equal(ws.binaryType, "arraybuffer");
  assert.deepEqual(ws.protocols, ["muxserver"]);
  ws.accept();
  const hello = ws.last();
  assert.equal(hello.type, T.HELLO);
  assert.equal(hello.r.u8(), 2);
  assert.equal(hello.r.str8(), opts.namespace ?? "/");
  assert.equal(hello.r.str8(), "ann");
  ws.push(welcome("ann"));
  const c = await p;
  return { c, ws };
}

/** Resolves once `cond()` is true (polled every 2 ms); fails after `ms`, so a slow machine only waits longer. */
export async function until(cond, what, ms = 5000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}
