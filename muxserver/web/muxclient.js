// muxclient.js: the browser client of muxserver, protocol version 2 over WebSocket.
//
// An ES module with no build step and no dependencies (served by the server at
// /muxclient.js). Every WebSocket binary message carries one or more whole
// frames (protocol.md sections 1 and 11), so decoding is per message: a message
// that ends inside a frame is the server's bug and ends the connection.
//
//   import { MuxClient } from "/muxclient.js";
//   const c = await MuxClient.connect("ws://host:port/ws", { nick: "ann", reconnect: true });
//   c.on("say", (data, meta) => console.log(meta.sender, data));
//   await c.join("lobby", { presence: true });
//   await c.emit("say", { text: "hi" }, { room: "lobby" }, { ack: true });  // -> recipients
//
// Decisions worth knowing about:
// * The payload type travels with the message (EMIT flag bits 1-2, EVENT
//   source_kind bits 4-5): a string is text, a plain object/array (or number,
//   boolean, null) is JSON, an ArrayBuffer or typed array is binary. Handlers
//   get the value decoded by that type, so a Python sender's dict arrives as an
//   object here.
// * Failures are Promise rejections with a MuxError whose .status (and .name)
//   is the protocol status name ("NOT_MEMBER"), or "DISCONNECTED" / "TIMEOUT"
//   for what the client itself detects.
// * Reconnect keeps the nick and re-joins every room with its presence flag;
//   the backoff is 0.5 s doubling to 30 s with +-20 % jitter. u64 fields
//   (nonces, seq, epoch) are BigInt.
// * Sequenced rooms (EVENT_SEQ, GAP, resume) are parsed now; each room's
//   position lives in `client.joined.get(name)` as {epoch, lastSeq} so a later
//   SEQUENCED re-join can resume from it.

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
const RESERVED = new Set(["presence", "connect", "disconnect", "reconnect", "error", "gap"]);
// Fatal errors after which trying again cannot help.
const NO_RETRY = new Set(["AUTH_FAILED", "UNSUPPORTED_VERSION", "INVALID_NAME", "REPLACED", "NOT_HELLO"]);
const DEFAULT_MAX_FRAME = 1024 * 1024;
const SERVER_SLACK = 512;

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

function requireName(name, kind) {
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
  join: (req, room, flags = 0, seq = null) => {
    const w = new Writer().u32(req).u8(flags).str8(room);
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
  emit: (body) => { const r = new Reader(body, "EMIT reply"); const n = r.u32(); if (body.length >= 12) r.u64(); r.end(); return n; },
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
  sequencedJoin: (body) => {
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

// ------------------------------------------------------------------ client
export function backoffDelay(attempt, random = Math.random, initial = 500, max = 30000) {
  const base = Math.min(max, initial * 2 ** attempt);
  return Math.round(base * (0.8 + 0.4 * random()));
}

export class MuxClient {
  /** Open a connection and resolve once the server's WELCOME arrives. */
  static connect(url, options = {}) {
    const client = new MuxClient(url, options);
    return client._open(false).then(() => client);
  }

  constructor(url, options = {}) {
    this.url = url;
    this.namespace = options.namespace ?? "/";
    this.token = options.token ?? "";
    this.reconnect = options.reconnect ?? true;
    this.requestTimeout = options.requestTimeout ?? 15000;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._random = options.random ?? Math.random;
    this._backoff = { initial: 500, max: 30000, ...(options.backoff ?? {}) };
    // Wrapped: a browser's setTimeout throws "Illegal invocation" when called
    // as a method of another object.
    const setT = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    const clearT = options.clearTimeout ?? ((t) => globalThis.clearTimeout(t));
    this._timers = { set: setT, clear: clearT };
    this.nick = options.nick ?? "";
    if (this.nick) requireName(this.nick, "nick");
    requireName(this.namespace, "namespace");
    // room -> {presence, sequenced, epoch, lastSeq}: what a reconnect re-joins,
    // and each sequenced room's position for a later resume.
    this.joined = new Map();
    this.welcome = null;
    this.connected = false;
    this.maxFrame = DEFAULT_MAX_FRAME;
    this._handlers = new Map();
    this._pending = new Map();
    this._nextReq = 1;
    this._ws = null;
    this._closing = false;
    this._attempt = 0;
    this._retryTimer = null;
    this._idleTimer = null;
    this._deadTimer = null;
    this._resumeToken = new Uint8Array(0);
    this._onFinalClose = null;
    this._dropCurrent = () => {};
  }

  // ------------------------------------------------------------ handlers
  on(event, handler) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(handler);
    return this;
  }

  off(event, handler) {
    const set = this._handlers.get(event);
    if (set) { if (handler) set.delete(handler); else set.clear(); }
    return this;
  }

  once(event, handler) {
    const wrapper = (...args) => { this.off(event, wrapper); handler(...args); };
    return this.on(event, wrapper);
  }

  _fire(event, ...args) {
    for (const handler of [...(this._handlers.get(event) ?? [])]) {
      try {
        handler(...args);
      } catch (err) {
        // One broken handler must not stop the others or the connection.
        if (event !== "error") this._fire("error", err); else console.error(err);
      }
    }
  }

  // ------------------------------------------------------------ requests
  join(room, { presence = false } = {}) {
    return this._request((req) => encode.join(req, room, presence ? 1 : 0), parseReply.empty, [[room, "room"]])
      .then(() => { this.joined.set(room, { presence, sequenced: false, epoch: 0n, lastSeq: 0n }); });
  }

  leave(room) {
    return this._request((req) => encode.leave(req, room), parseReply.empty, [[room, "room"]])
      .then(() => { this.joined.delete(room); });
  }

  setNick(nick) {
    return this._request((req) => encode.nick(req, nick), parseReply.empty, [[nick, "nick"]])
      .then(() => { this.nick = nick; });
  }

  who(room) {
    return this._request((req) => encode.who(req, room), parseReply.who, [[room, "room"]]);
  }

  rooms({ all = false } = {}) {
    return this._request((req) => encode.rooms(req, all ? 1 : 0), parseReply.rooms, []);
  }

  /** Emit `event` to {room}, {nick} or {broadcast: true}; with {ack: true} resolves to the recipient count. */
  emit(event, data, target = {}, { echo = false, ack = false } = {}) {
    let kind, name;
    if (target.room !== undefined) { kind = 0; name = target.room; }
    else if (target.nick !== undefined) { kind = 1; name = target.nick; }
    else if (target.broadcast) { kind = 2; name = ""; }
    else return Promise.reject(new TypeError("emit target must be {room}, {nick} or {broadcast: true}"));
    if (RESERVED.has(event)) return Promise.reject(new MuxError("INVALID_NAME", `"${event}" is a reserved event name`));
    let payload;
    try { payload = encodePayload(data); } catch (err) { return Promise.reject(err); }
    const flags = (echo ? 1 : 0) | (payload.ptype << 1);
    const checks = [[event, "event"]];
    if (kind !== 2) checks.push([name, kind === 0 ? "room" : "nick"]);
    const build = (req) => encode.emit(req, flags, kind, name, event, payload.bytes);
    if (ack) return this._request(build, parseReply.emit, checks);
    try {
      this._check(checks);
      this._send(build(0));
    } catch (err) {
      return Promise.reject(err);
    }
    return Promise.resolve();
  }

  _check(checks) {
    for (const [name, kind] of checks) requireName(name, kind);
    if (!this.connected) throw new MuxError("DISCONNECTED", "not connected");
  }

  _request(build, parse, checks) {
    let frame;
    const req = this._nextReq;
    this._nextReq = this._nextReq >= 0xffffffff ? 1 : this._nextReq + 1;
    try {
      this._check(checks);
      frame = build(req);
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise((resolve, reject) => {
      const timer = this._later(() => {
        this._pending.delete(req);
        reject(new MuxError("TIMEOUT", "no reply from the server"));
      }, this.requestTimeout);
      this._pending.set(req, { resolve, reject, parse, timer });
      try { this._send(frame); } catch (err) { this._settle(req, err); }
    });
  }

  _settle(req, err, value) {
    const p = this._pending.get(req);
    if (!p) return false;
    this._pending.delete(req);
    this._timers.clear(p.timer);
    if (err) p.reject(err); else p.resolve(value);
    return true;
  }

  _send(frame) {
    if (frame.length - 4 > this.maxFrame) throw new MuxError("TOO_LARGE", `frame of ${frame.length - 4} bytes over max_frame ${this.maxFrame}`);
    if (!this._ws || this._ws.readyState !== 1) throw new MuxError("DISCONNECTED", "not connected");
    this._ws.send(frame);
  }

  /** Say BYE and close; no reconnect afterwards. Resolves when the socket has closed. */
  close() {
    this._closing = true;
    this._timers.clear(this._retryTimer);
    const ws = this._ws;
    if (!ws || ws.readyState > 1) return Promise.resolve();
    return new Promise((resolve) => {
      this._onFinalClose = resolve;
      try { if (ws.readyState === 1) ws.send(encode.bye()); } catch { /* closing anyway */ }
      // The server closes after BYE; don't wait on it forever.
      this._later(() => { try { ws.close(1000); } catch { /* gone */ } resolve(); }, 2000);
    });
  }

  // ---------------------------------------------------------- connection
  _open(isReconnect) {
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new this._WebSocket(this.url, ["muxserver"]);
      } catch (err) {
        reject(err);
        return;
      }
      ws.binaryType = "arraybuffer";
      this._ws = ws;
      let welcomed = false;
      let fatal = null;
      ws.onopen = () => {
        try {
          ws.send(encode.hello({ namespace: this.namespace, nick: this.nick, token: this.token, resume: this._resumeToken }));
        } catch (err) {
          fatal = err;
          ws.close(1000);
        }
      };
      ws.onmessage = (ev) => {
        if (ws !== this._ws) return;
        let frames;
        try {
          frames = splitFrames(ev.data, this.welcome ? this.maxFrame + SERVER_SLACK : 16 * 1024 * 1024);
        } catch (err) {
          this._fire("error", err);
          ws.close(4000 + (STATUS_NAMES.indexOf(err.status) >= 0 ? STATUS_NAMES.indexOf(err.status) : 1));
          return;
        }
        this._alive();
        for (const { type, body } of frames) {
          let msg;
          try {
            msg = decodeServerFrame(type, body);
          } catch (err) {
            this._fire("error", err);
            continue;
          }
          if (msg.type === "WELCOME" && !welcomed) {
            welcomed = true;
            this._welcomed(msg, isReconnect);
            resolve();
          } else if (msg.type === "ERROR") {
            fatal = new MuxError(msg.status, msg.message);
            fatal.code = msg.code;
            if (!welcomed) reject(fatal);
            if (welcomed || isReconnect) this._fire("error", fatal);
          } else if (welcomed) {
            this._dispatch(msg);
          }
        }
      };
      ws.onerror = () => { /* onclose follows with the details */ };
      let closed = false;
      const handleClose = (ev) => {
        if (closed || ws !== this._ws) return;
        closed = true;
        const wasConnected = this.connected;
        this.connected = false;
        this._stopLiveness();
        const code = ev?.code ?? 1006;
        const reason = ev?.reason ?? "";
        const err = fatal ?? new MuxError("DISCONNECTED", `connection closed (${code}${reason ? " " + reason : ""})`);
        for (const req of [...this._pending.keys()]) this._settle(req, err);
        if (!welcomed && !isReconnect) reject(err);
        if (wasConnected) this._fire("disconnect", { code, reason, error: fatal });
        if (wasConnected || isReconnect) {
          const retry = this.reconnect && !this._closing && !(fatal && NO_RETRY.has(fatal.status));
          if (retry) this._scheduleReconnect();
        }
        if (this._closing && this._onFinalClose) this._onFinalClose();
      };
      ws.onclose = handleClose;
      // A server gone silent (half-open TCP) may take the browser minutes to
      // notice; the liveness timer ends the session at once instead.
      this._dropCurrent = (code, reason) => {
        handleClose({ code, reason });
        try { ws.close(code, reason); } catch { /* already gone */ }
      };
    });
  }

  _welcomed(w, isReconnect) {
    this.welcome = w;
    this.connected = true;
    this.nick = w.nick;
    this.connId = w.connId;
    this.maxFrame = w.maxFrame;
    this.serverName = w.serverName;
    this._resumeToken = w.resumeToken || new Uint8Array(0);
    this._attempt = 0;
    this._alive();
    if (!isReconnect) {
      this._fire("connect", { nick: w.nick, connId: w.connId, serverName: w.serverName });
      return;
    }
    // Every room back, with its presence flag (a JOIN of a room a resumed
    // session is still in is OK and changes nothing).
    const joins = [...this.joined].map(([room, info]) =>
      this._request((req) => encode.join(req, room, info.presence ? 1 : 0), parseReply.empty, [[room, "room"]])
        .then(() => null, (err) => ({ room, err })));
    Promise.all(joins).then((results) => {
      for (const r of results) {
        if (r) { this.joined.delete(r.room); this._fire("error", r.err); }
      }
      this._fire("reconnect", { nick: w.nick, resumed: w.resumed, rooms: [...this.joined.keys()] });
    });
  }

  _scheduleReconnect() {
    const delay = backoffDelay(this._attempt, this._random, this._backoff.initial, this._backoff.max);
    this._attempt += 1;
    this._retryTimer = this._timers.set(() => {
      if (this._closing) return;
      this._open(true).catch(() => { /* onclose schedules the next try */ });
    }, delay);
  }

  // Liveness: the server PINGs a silent client; we PING a silent server, and
  // a server that stays silent after that is gone (half-open TCP).
  _alive() {
    this._stopLiveness();
    const interval = this.welcome?.pingIntervalMs || 25000;
    this._idleTimer = this._later(() => {
      try { this._send(encode.ping(BigInt(Date.now()))); } catch { return; }
      this._deadTimer = this._later(() => this._dropCurrent(4014, "IDLE_TIMEOUT"), 10000);
    }, interval);
  }

  // Timers never keep a Node process alive on their own (the socket does);
  // in a browser setTimeout returns a number and unref does not exist.
  _later(fn, ms) {
    const t = this._timers.set(fn, ms);
    t?.unref?.();
    return t;
  }

  _stopLiveness() {
    this._timers.clear(this._idleTimer);
    this._timers.clear(this._deadTimer);
  }

  _dispatch(msg) {
    switch (msg.type) {
      case "REPLY": {
        const p = this._pending.get(msg.req);
        if (msg.status !== 0) {
          const err = new MuxError(statusName(msg.status), new TextDecoder().decode(msg.body));
          if (!this._settle(msg.req, err)) this._fire("error", err);
          return;
        }
        if (!p) return;
        let value;
        try { value = p.parse(msg.body); } catch (err) { this._settle(msg.req, err); return; }
        this._settle(msg.req, null, value);
        return;
      }
      case "EVENT":
      case "EVENT_SEQ": {
        if (msg.seq !== null && msg.kind === "room") {
          const info = this.joined.get(msg.source);
          if (info) info.lastSeq = msg.seq;
        }
        let data;
        try {
          data = decodePayload(msg.ptype, msg.payload);
        } catch {
          this._fire("error", new MuxError("BAD_PAYLOAD", `event "${msg.event}" from ${msg.sender}: invalid JSON`));
          return;
        }
        const meta = { sender: msg.sender, room: msg.kind === "room" ? msg.source : null, kind: msg.kind, event: msg.event };
        if (msg.seq !== null) meta.seq = msg.seq;
        this._fire(msg.event, data, meta);
        return;
      }
      case "PRESENCE":
        this._fire("presence", { kind: msg.kind, room: msg.room, nick: msg.nick, newNick: msg.newNick });
        return;
      case "PING":
        try { this._send(encode.pong(msg.nonce)); } catch { /* closing */ }
        return;
      case "GAP":
        this._fire("gap", { room: msg.room, first: msg.first, last: msg.last });
        return;
      default:
        return; // PONG: its arrival already counted as liveness
    }
  }
}
