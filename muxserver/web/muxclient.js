// muxclient.js: the browser client of muxserver, protocol version 2 over WebSocket.
//
// An ES module with no build step and no dependencies (served by the server at
// /muxclient.js, with its byte layer /muxcodec.js, re-exported here). Every
// WebSocket binary message carries one or more whole frames (protocol.md
// sections 1 and 11), so decoding is per message: a message that ends inside a
// frame is the server's bug and ends the connection.
//
//   import { MuxClient } from "/muxclient.js";
//   const c = await MuxClient.connect("ws://host:port/ws", { nick: "ann", reconnect: true });
//   c.on("say", (data, meta) => console.log(meta.sender, data, meta.seq, meta.replayed));
//   c.on("recovery", (r) => console.log(r.room, r.outcome, r.missing));
//   await c.join("lobby", { presence: true, history: 20 });  // -> the recovery object
//   await c.emit("say", { text: "hi" }, { room: "lobby" }, { ack: true });  // -> recipients
//
// Decisions worth knowing about:
// * The payload type travels with the message (EMIT flag bits 1-2, EVENT
//   source_kind bits 4-5): a string is text, a plain object/array (or number,
//   boolean, null) is JSON, an ArrayBuffer or typed array is binary.
// * Failures are Promise rejections with a MuxError whose .status (and .name)
//   is the protocol status name ("NOT_MEMBER"), or "DISCONNECTED" / "TIMEOUT"
//   for what the client itself detects.
// * Rooms are joined SEQUENCED by default (section 9): each keeps a position
//   (epoch, last seq handled) in `client.joined`, set from the JOIN REPLY and
//   advanced only once every handler of an event has returned (a throwing
//   handler leaves it, so that event comes again if the connection drops
//   before a later one is handled). Events at or below the position are
//   duplicates and are dropped. The REPLY's state is taken as it is
//   dispatched, before the replayed frames behind it in the same message.
// * Reconnect resumes the session with the WELCOME's token (section 10) and
//   re-joins every room: plain rooms with their presence flag, sequenced ones
//   from their position with no replay cap, so nothing in the history is lost
//   and what is gone is reported ('recovery' with outcome "gap"). The backoff
//   is 0.5 s doubling to 30 s with +-20 % jitter.
// * u64 fields: epochs stay BigInt (random 64-bit numbers); the seqs handed to
//   handlers (meta.seq, recovery first/last/missing) are Numbers, as seqs
//   count messages and stay far below 2**53; positions compare as BigInt.

import {
  DEFAULT_MAX_FRAME, JOIN_PRESENCE, MuxError, RECOVERY, REPLAY_ALL, SERVER_SLACK, STATUS_NAMES,
  decodePayload, decodeServerFrame, encode, encodePayload, parseReply, requireName, splitFrames,
  statusName,
} from "./muxcodec.js";

export * from "./muxcodec.js";

const RESERVED = new Set(["presence", "connect", "disconnect", "reconnect", "error", "recovery"]);
// Fatal errors after which trying again cannot help.
const NO_RETRY = new Set(["AUTH_FAILED", "UNSUPPORTED_VERSION", "INVALID_NAME", "REPLACED", "NOT_HELLO"]);

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
    this.sequenced = options.sequenced ?? true; // join()'s default
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
    // room -> {presence, sequenced, epoch, lastSeq, replayLast}: what a
    // reconnect re-joins, and each sequenced room's position (epoch, lastSeq:
    // BigInt) and the REPLY's last (what is "replayed").
    this.joined = new Map();
    this.duplicatesDropped = 0;
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

  /** Call every handler of `event`; false if one threw (the others still ran). */
  _fire(event, ...args) {
    let ok = true;
    for (const handler of [...(this._handlers.get(event) ?? [])]) {
      try {
        handler(...args);
      } catch (err) {
        // One broken handler must not stop the others or the connection.
        ok = false;
        if (event !== "error") this._fire("error", err); else console.error(err);
      }
    }
    return ok;
  }

  // ------------------------------------------------------------ requests
  /**
   * Join `room`. Sequenced (the default): resolves with the recovery object
   * (outcome "fresh") once the REPLY is in, and `history: N` replays the
   * room's latest N messages first (meta.replayed true). `sequenced: false`:
   * plain EVENTs, resolves with undefined.
   */
  join(room, { presence = false, sequenced = this.sequenced, history = 0 } = {}) {
    if (!sequenced) return this._plainJoin(room, presence);
    if (!Number.isInteger(history) || history < 0 || history > REPLAY_ALL) {
      return Promise.reject(new RangeError(`history must be an integer 0..${REPLAY_ALL}, got ${history}`));
    }
    return this._sequencedJoin(room, presence, { epoch: 0n, after: 0n, replayMax: history }, false);
  }

  /** A sequenced room's position {epoch (BigInt), last (Number)}, or null. */
  position(room) {
    const info = this.joined.get(room);
    return info?.sequenced ? { epoch: info.epoch, last: Number(info.lastSeq) } : null;
  }

  _plainJoin(room, presence) {
    const parse = (body) => {
      parseReply.empty(body);
      this.joined.set(room, { presence, sequenced: false, epoch: 0n, lastSeq: 0n, replayLast: 0n });
    };
    return this._request((req) => encode.join(req, room, presence ? JOIN_PRESENCE : 0), parse, [[room, "room"]]);
  }

  // The parse callback runs as the REPLY is dispatched: the position must be
  // in place before the replayed EVENT_SEQ frames that follow it, often in
  // the same WebSocket message (a .then() would run after all of them).
  _sequencedJoin(room, presence, seq, rejoin) {
    const parse = (body) => {
      const { recovery, epoch, first, last } = parseReply.sequencedJoin(body);
      const outcome = RECOVERY[recovery];
      if (!outcome) throw new MuxError("BAD_FRAME", `JOIN reply: unknown recovery ${recovery}`);
      // Replayed: first..last; live: last+1 on. min() so that a reply with
      // first > last + 1 cannot make live messages look like duplicates.
      const start = first - 1n < last ? first - 1n : last;
      this.joined.set(room, { presence, sequenced: true, epoch, lastSeq: start, replayLast: last });
      const r = {
        room, outcome, epoch, first: Number(first), last: Number(last),
        missing: outcome === "gap" ? [Number(seq.after + 1n), Number(first - 1n)] : null,
        replayed: first <= last ? Number(last - first + 1n) : 0, rejoin,
      };
      this._fire("recovery", r);
      return r;
    };
    const build = (req) => encode.join(req, room, presence ? JOIN_PRESENCE : 0, seq);
    return this._request(build, parse, [[room, "room"]]);
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
    if (ack) {
      if (kind !== 0 || echo) return this._request(build, parseReply.emit, checks);
      return this._request(build, (body) => this._ownSeq(name, parseReply.emitSeq(body)), checks);
    }
    try {
      this._check(checks);
      this._send(build(0));
    } catch (err) {
      return Promise.reject(err);
    }
    return Promise.resolve();
  }

  // Our own message (not echoed) is in the room's history: when nothing lies
  // between it and our position, the position moves past it, so a resume
  // does not replay it to us. Anything between (we are still catching up)
  // leaves the position alone: it will be replayed, never skipped.
  _ownSeq(room, { recipients, seq }) {
    const info = this.joined.get(room);
    if (info?.sequenced && seq > 0n && seq === info.lastSeq + 1n) info.lastSeq = seq;
    return recipients;
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
        // No socket, so no onclose to schedule the next try.
        if (isReconnect && !this._closing) this._scheduleReconnect();
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
    // session is still in is OK and changes nothing); sequenced rooms from
    // their position, uncapped (a restarted history answers RESET).
    const joins = [...this.joined].map(([room, info]) => {
      const p = info.sequenced
        ? this._sequencedJoin(room, info.presence, {
          epoch: info.epoch, after: info.epoch === 0n ? 0n : info.lastSeq, replayMax: REPLAY_ALL,
        }, true)
        : this._plainJoin(room, info.presence);
      return p.then(() => null, (err) => ({ room, err }));
    });
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
      case "EVENT_SEQ":
        this._event(msg);
        return;
      case "PRESENCE":
        this._fire("presence", { kind: msg.kind, room: msg.room, nick: msg.nick, newNick: msg.newNick });
        return;
      case "PING":
        try { this._send(encode.pong(msg.nonce)); } catch { /* closing */ }
        return;
      case "GAP":
        this._gap(msg);
        return;
      default:
        return; // PONG: its arrival already counted as liveness
    }
  }

  _event(msg) {
    const room = msg.kind === "room" ? msg.source : null;
    const info = msg.seq !== null && room !== null ? this.joined.get(room) : undefined;
    // seq 0: the server keeps no history, so there is no order to track.
    const tracked = info?.sequenced === true && msg.seq > 0n;
    if (tracked && msg.seq <= info.lastSeq) {
      this.duplicatesDropped += 1;
      return;
    }
    const meta = {
      sender: msg.sender, room, kind: msg.kind, event: msg.event,
      seq: msg.seq === null ? null : Number(msg.seq),
      replayed: tracked && msg.seq <= info.replayLast,
    };
    let ok;
    try {
      const data = decodePayload(msg.ptype, msg.payload);
      ok = this._fire(msg.event, data, meta);
    } catch {
      // Reported, and passed: a replay would bring the same bytes again.
      this._fire("error", new MuxError("BAD_PAYLOAD", `event "${msg.event}" from ${msg.sender}: invalid JSON`));
      ok = true;
    }
    // A handler may have left or re-joined the room: that position is gone.
    if (tracked && ok && this.joined.get(room) === info) info.lastSeq = msg.seq;
  }

  // A slow replay met eviction (section 9): msg.first..msg.last are gone and
  // the replay goes on after them.
  _gap(msg) {
    const info = this.joined.get(msg.room);
    const sequenced = info?.sequenced === true;
    const last = sequenced && info.replayLast > msg.last ? info.replayLast : msg.last;
    const r = {
      room: msg.room, outcome: "gap", epoch: sequenced ? info.epoch : 0n,
      first: Number(msg.last + 1n), last: Number(last),
      missing: [Number(msg.first), Number(msg.last)], replayed: Number(last - msg.last), rejoin: false,
    };
    const ok = this._fire("recovery", r);
    if (sequenced && ok && this.joined.get(msg.room) === info && msg.last > info.lastSeq) info.lastSeq = msg.last;
  }
}
