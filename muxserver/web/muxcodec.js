// muxcodec.js: the byte layer of muxclient.js (protocol.md sections 1, 3, 8, 9):
// frame encoders, the server-frame decoder, REPLY body parsers, name rules and
// payload types. Pure functions over Uint8Array, no sockets and no timers, so
// tests/js runs them against the Python codec's bytes; muxclient.js re-exports
// everything here, so importing "/muxclient.js" alone is enough.
//
// u64 fields (nonces, seq, epoch) decode to BigInt: epochs are random 64-bit
// numbers that a Number would round.

export const VERSION = 2;

export const T = Object.freeze({
  HELLO: 0x01, JOIN: 0x02, LEAVE: 0x03, NICK: 0x04, EMIT: 0x05, PING: 0x06, PONG: 0x07,
  WHO: 0x08, ROOMS: 0x09, BYE: 0x0a,
  WELCOME: 0x81, REPLY: 0x82, EVENT: 0x83, PRESENCE: 0x84, ERROR: 0x85,
  SERVER_PING: 0x86, SERVER_PONG: 0x87, EVENT_SEQ: 0x88, GAP: 0x89,
});

export const STATUS_NAMES = [
  "OK", "BAD_FRAME", "UNKNOWN_TYPE", "NOT_HELLO", "AUTH_FAILED", "UNSUPPORTED_VERSION",
  "TOO_LARGE", "NICK_TAKEN", "INVALID_NAME", "NOT_MEMBER", "NO_SUCH_TARGET", "LIMIT",
  "RATE_LIMITED", "SLOW_CONSUMER", "IDLE_TIMEOUT", "SHUTTING_DOWN", "REPLACED", "UNAVAILABLE",
];

export const KINDS = ["room", "direct", "broadcast"];
export const PAYLOAD = Object.freeze({ BINARY: 0, TEXT: 1, JSON: 2 });
const PRESENCE_KINDS = { 1: "join", 2: "leave", 3: "nick" };
export const DEFAULT_MAX_FRAME = 1024 * 1024;
export const SERVER_SLACK = 512; // server frames may be this much over max_frame
// JOIN flags; a SEQUENCED JOIN carries epoch, after and replay_max (section 9).
export const JOIN_PRESENCE = 1;
export const JOIN_SEQUENCED = 2;
export const REPLAY_ALL = 0xffff; // replay_max: no cap but the history's
export const RECOVERY = Object.freeze(["fresh", "complete", "gap", "reset"]);

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

export class MuxError extends Error {
  constructor(status, message) {
    super(message ? `${status}: ${message}` : status);
    this.status = status;
    this.name = status;
    this.detail = message || "";
  }
}

export function statusName(code) {
  return STATUS_NAMES[code] ?? `STATUS_${code}`;
}

// ------------------------------------------------------------------ names
function badChar(cp, nick) {
  return cp < 0x20 || (cp >= 0x7f && cp <= 0x9f) || (nick && /\s/u.test(String.fromCodePoint(cp)));
}

/** null if `name` is a valid room/event/namespace/nick, else why not (protocol.md section 1). */
export function checkName(name, kind = "room") {
  if (typeof name !== "string") return `${kind} must be a string`;
  const n = encoder.encode(name).length;
  const max = kind === "nick" ? 32 : 255;
  if (n < 1 || n > max) return `${kind} must be 1..${max} bytes of UTF-8`;
  if (kind === "namespace" && !name.startsWith("/")) return "namespace must start with '/'";
  for (const ch of name) {
    const cp = ch.codePointAt(0);
    if (cp >= 0xd800 && cp <= 0xdfff) return `${kind} is not valid UTF-8`;
    if (badChar(cp, kind === "nick")) {
      return kind === "nick" ? "nick must not contain control characters or whitespace"
        : `${kind} must not contain control characters`;
    }
  }
  return null;
}

export function requireName(name, kind) {
  const why = checkName(name, kind);
  if (why) throw new MuxError("INVALID_NAME", why);
}

// ------------------------------------------------------------------ codec
/** Builds one frame: fields appended in order, `frame(type)` adds the length prefix. */
export class Writer {
  constructor() { this.parts = []; this.size = 0; }
  bytes(b) { this.parts.push(b); this.size += b.length; return this; }
  u8(v) { return this.bytes(Uint8Array.of(v & 0xff)); }
  u16(v) { const b = new Uint8Array(2); new DataView(b.buffer).setUint16(0, v); return this.bytes(b); }
  u32(v) { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, v >>> 0); return this.bytes(b); }
  u64(v) { const b = new Uint8Array(8); new DataView(b.buffer).setBigUint64(0, BigInt(v)); return this.bytes(b); }
  str8(s) {
    const raw = typeof s === "string" ? encoder.encode(s) : s;
    if (raw.length > 255) throw new MuxError("INVALID_NAME", "string over 255 bytes");
    return this.u8(raw.length).bytes(raw);
  }
  frame(type) {
    const out = new Uint8Array(5 + this.size);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, this.size + 1);
    out[4] = type;
    let pos = 5;
    for (const p of this.parts) { out.set(p, pos); pos += p.length; }
    return out;
  }
}

/** Cursor over one frame body; running short is BAD_FRAME. */
export class Reader {
  constructor(body, kind) {
    this.body = body;
    this.dv = new DataView(body.buffer, body.byteOffset, body.byteLength);
    this.pos = 0;
    this.kind = kind;
  }
  need(n) {
    const p = this.pos;
    if (p + n > this.body.length) throw new MuxError("BAD_FRAME", `${this.kind} body too short`);
    this.pos = p + n;
    return p;
  }
  u8() { return this.body[this.need(1)]; }
  u16() { return this.dv.getUint16(this.need(2)); }
  u32() { return this.dv.getUint32(this.need(4)); }
  u64() { return this.dv.getBigUint64(this.need(8)); }
  raw8() { const n = this.u8(); const p = this.need(n); return this.body.subarray(p, p + n); }
  str8() { return utf8(this.raw8(), this.kind); }
  rest() { const p = this.pos; this.pos = this.body.length; return this.body.subarray(p); }
  end() { if (this.pos !== this.body.length) throw new MuxError("BAD_FRAME", `${this.kind}: trailing bytes`); }
}

function utf8(bytes, kind) {
  try {
    return decoder.decode(bytes);
  } catch {
    throw new MuxError("BAD_FRAME", `${kind}: string is not valid UTF-8`);
  }
}

/** Split one WebSocket message into whole frames [{type, body}]; a partial frame is BAD_FRAME. */
export function splitFrames(data, maxFrame = DEFAULT_MAX_FRAME + SERVER_SLACK) {
  const buf = data instanceof Uint8Array ? data : new Uint8Array(data);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const frames = [];
  let pos = 0;
  while (pos < buf.length) {
    if (buf.length - pos < 4) throw new MuxError("BAD_FRAME", "message ends inside a length prefix");
    const len = dv.getUint32(pos);
    if (len === 0) throw new MuxError("BAD_FRAME", "frame length 0");
    if (len > maxFrame) throw new MuxError("TOO_LARGE", `frame of ${len} bytes over ${maxFrame}`);
    if (pos + 4 + len > buf.length) throw new MuxError("BAD_FRAME", "message ends inside a frame");
    frames.push({ type: buf[pos + 4], body: buf.subarray(pos + 5, pos + 4 + len) });
    pos += 4 + len;
  }
  return frames;
}

export const encode = {
  hello: ({ namespace = "/", nick = "", token = "", resume = "" } = {}) =>
    new Writer().u8(VERSION).str8(namespace).str8(nick).str8(token).str8(resume).frame(T.HELLO),
  // seq = {epoch, after, replayMax} makes it a SEQUENCED JOIN (the flag follows
  // the fields, so the two cannot disagree).
  join: (req, room, flags = 0, seq = null) => {
    const bits = seq ? flags | JOIN_SEQUENCED : flags & ~JOIN_SEQUENCED;
    const w = new Writer().u32(req).u8(bits).str8(room);
    if (seq) w.u64(seq.epoch).u64(seq.after).u16(seq.replayMax);
    return w.frame(T.JOIN);
  },
  leave: (req, room) => new Writer().u32(req).str8(room).frame(T.LEAVE),
  nick: (req, nick) => new Writer().u32(req).str8(nick).frame(T.NICK),
  emit: (req, flags, kind, target, event, payload) =>
    new Writer().u32(req).u8(flags).u8(kind).str8(target).str8(event).bytes(payload).frame(T.EMIT),
  ping: (nonce) => new Writer().u64(nonce).frame(T.PING),
  pong: (nonce) => new Writer().u64(nonce).frame(T.PONG),
  who: (req, room) => new Writer().u32(req).str8(room).frame(T.WHO),
  rooms: (req, scope) => new Writer().u32(req).u8(scope).frame(T.ROOMS),
  bye: () => new Writer().frame(T.BYE),
};

function eventBody(r, seq) {
  const sk = r.u8();
  return {
    seq,
    kind: KINDS[sk & 3] ?? `kind${sk & 3}`,
    ptype: (sk >> 4) & 3,
    sender: r.str8(),
    source: r.str8(),
    event: r.str8(),
    payload: r.rest(),
  };
}

/** One server frame -> a plain object {type: "WELCOME", ...}. Throws MuxError(BAD_FRAME / UNKNOWN_TYPE). */
export function decodeServerFrame(type, body) {
  switch (type) {
    case T.WELCOME: {
      const r = new Reader(body, "WELCOME");
      const w = {
        type: "WELCOME", version: r.u8(), connId: r.u32(), nick: r.str8(), maxFrame: r.u32(),
        pingIntervalMs: r.u32(), serverName: r.str8(),
        resumeToken: "", resumeWindowMs: 0, resumed: false,
      };
      if (w.version >= 2) {
        w.resumeToken = r.raw8().slice();
        w.resumeWindowMs = r.u32();
        w.resumed = r.u8() === 1;
      }
      r.end();
      return w;
    }
    case T.REPLY: {
      const r = new Reader(body, "REPLY");
      return { type: "REPLY", req: r.u32(), status: r.u16(), body: r.rest() };
    }
    case T.EVENT:
      return { type: "EVENT", ...eventBody(new Reader(body, "EVENT"), null) };
    case T.EVENT_SEQ: {
      const r = new Reader(body, "EVENT_SEQ");
      const seq = r.u64();
      return { type: "EVENT_SEQ", ...eventBody(r, seq) };
    }
    case T.PRESENCE: {
      const r = new Reader(body, "PRESENCE");
      const p = { type: "PRESENCE", kind: PRESENCE_KINDS[r.u8()] ?? "unknown", room: r.str8(), nick: r.str8(), newNick: r.str8() };
      r.end();
      return p;
    }
    case T.ERROR: {
      const r = new Reader(body, "ERROR");
      const code = r.u16();
      return { type: "ERROR", code, status: statusName(code), message: new TextDecoder().decode(r.rest()) };
    }
    case T.SERVER_PING:
    case T.SERVER_PONG: {
      if (body.length !== 8) throw new MuxError("BAD_FRAME", "PING/PONG body must be 8 bytes");
      const r = new Reader(body, "PING");
      return { type: type === T.SERVER_PING ? "PING" : "PONG", nonce: r.u64() };
    }
    case T.GAP: {
      const r = new Reader(body, "GAP");
      const g = { type: "GAP", room: r.str8(), first: r.u64(), last: r.u64() };
      r.end();
      return g;
    }
    default:
      throw new MuxError("UNKNOWN_TYPE", `unknown frame type 0x${type.toString(16)}`);
  }
}

// REPLY bodies after req and status, by the request they answer.
export const parseReply = {
  empty: () => undefined,
  emit: (body) => parseReply.emitSeq(body).recipients,
  // v2: u32 recipients, u64 seq (0 outside history); v1: recipients only.
  emitSeq: (body) => {
    const r = new Reader(body, "EMIT reply");
    const out = { recipients: r.u32(), seq: body.length > 4 ? r.u64() : 0n };
    r.end();
    return out;
  },
  who: (body) => {
    const r = new Reader(body, "WHO reply");
    const total = r.u32();
    const nicks = Array.from({ length: r.u16() }, () => r.str8());
    r.end();
    return { total, nicks };
  },
  rooms: (body) => {
    const r = new Reader(body, "ROOMS reply");
    const total = r.u32();
    const rooms = Array.from({ length: r.u16() }, () => ({ name: r.str8(), members: r.u32() }));
    r.end();
    return { total, rooms };
  },
  // An empty body is what a server without SEQUENCED support answers (as the
  // Python codec's parse_join_reply reads it): a fresh join with nothing held.
  sequencedJoin: (body) => {
    if (body.length === 0) return { recovery: 0, epoch: 0n, first: 1n, last: 0n };
    const r = new Reader(body, "JOIN reply");
    const out = { recovery: r.u8(), epoch: r.u64(), first: r.u64(), last: r.u64() };
    r.end();
    return out;
  },
};

// --------------------------------------------------------------- payloads
function isPlainJson(v) {
  if (v === null || typeof v === "number" || typeof v === "boolean" || Array.isArray(v)) return true;
  if (typeof v !== "object") return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

/** A value -> {ptype, bytes}: string text, ArrayBuffer/typed array binary, plain object/array JSON. */
export function encodePayload(value) {
  if (value === undefined) return { ptype: PAYLOAD.BINARY, bytes: new Uint8Array(0) };
  if (typeof value === "string") return { ptype: PAYLOAD.TEXT, bytes: encoder.encode(value) };
  if (value instanceof ArrayBuffer) return { ptype: PAYLOAD.BINARY, bytes: new Uint8Array(value) };
  if (ArrayBuffer.isView(value)) {
    return { ptype: PAYLOAD.BINARY, bytes: new Uint8Array(value.buffer, value.byteOffset, value.byteLength) };
  }
  if (isPlainJson(value)) return { ptype: PAYLOAD.JSON, bytes: encoder.encode(JSON.stringify(value)) };
  throw new TypeError("payload must be a string, ArrayBuffer/typed array, or a plain object/array");
}

/** {ptype, bytes} -> the value: Uint8Array (a copy), string, or the parsed JSON. */
export function decodePayload(ptype, bytes) {
  if (ptype === PAYLOAD.TEXT) return new TextDecoder().decode(bytes);
  if (ptype === PAYLOAD.JSON) return JSON.parse(new TextDecoder().decode(bytes));
  return bytes.slice();
}

