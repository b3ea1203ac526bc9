// chat.js: the muxchat web page (served by muxserver at /, talks to ws(s)://<host>/ws).
//
// Stable hooks for browser tests (id = data-testid unless noted):
//   nick-input, first-room-input, join-button, login-error   login form
//   me                     your nick (click: change it)
//   room-list              rooms; each <li data-testid="room-item" data-room=NAME
//                          data-joined="1|0"> holds .name and .badge (member count)
//   room-input, join-room-button, refresh-rooms
//   room-title, leave-button
//   status-banner          hidden when online; data-state="connecting|reconnecting|error"
//   message-list           <li data-testid="message" data-kind="room|direct|broadcast|note|error|recovery">
//                          with <time>, .sender and .text; a replayed room message
//                          also has data-replayed="earlier" (history shown on
//                          joining) or "recovered" (missed while disconnected);
//                          a recovery line has data-outcome="fresh|complete|gap|reset"
//   message-input, send-button
//   member-list            <li data-testid="member" data-nick=NICK> (click: whisper)
//   member-count
//
// Commands: /w NICK TEXT (whisper), /all TEXT (everyone in the namespace),
// /nick NEW, /join ROOM, /leave, /help. Plain lines go to the current room.
// Chat lines travel as event "msg" with a text payload, like the terminal
// muxchat; a v1 client's binary payload is shown as UTF-8.
//
// Rooms are joined sequenced (protocol.md section 9), with the latest EARLIER
// messages replayed and marked as earlier ones. After a reconnect the client
// resumes from each room's position, and the page says what came back
// ("recovered 12 missed messages in #games") or what is gone ("messages
// 40..57 in #games were lost"); muxclient.js drops anything seen twice.
//
// All text from the network is put in the page with textContent (see el()):
// never innerHTML, so "<img onerror=...>" shows literally. The pure parts
// (input parsing, formatting, state, rendering on any document) are exported
// for tests/js/chat.test.mjs; boot() only runs in a browser.

import { MuxClient, checkName } from "./muxclient.js";

export const EVENT = "msg";
const ROOM_REFRESH_MS = 15000;
export const EARLIER = 20; // history replayed on joining a room

// ------------------------------------------------------------ pure helpers
/** One line typed into the composer -> what to do. */
export function parseInput(line) {
  const text = line.trim();
  if (!text) return { kind: "none" };
  if (!text.startsWith("/") || text.startsWith("//")) {
    return { kind: "say", text: text.startsWith("//") ? text.slice(1) : text };
  }
  const [cmd, ...rest] = text.slice(1).split(/\s+/);
  const arg = text.slice(1 + cmd.length).trim();
  switch (cmd.toLowerCase()) {
    case "w":
    case "msg":
    case "whisper": {
      const [nick] = rest;
      const body = nick ? arg.slice(nick.length).trim() : "";
      if (!nick || !body) return { kind: "error", message: "Usage: /w NICK TEXT" };
      return { kind: "whisper", nick, text: body };
    }
    case "all":
    case "broadcast":
      return arg ? { kind: "broadcast", text: arg } : { kind: "error", message: "Usage: /all TEXT" };
    case "nick":
      return arg ? { kind: "nick", nick: arg } : { kind: "error", message: "Usage: /nick NEW_NICK" };
    case "join":
      return arg ? { kind: "join", room: arg } : { kind: "error", message: "Usage: /join ROOM" };
    case "leave":
    case "part":
      return { kind: "leave", room: arg || null };
    case "help":
      return { kind: "help" };
    default:
      return { kind: "error", message: `Unknown command /${cmd} (try /help)` };
  }
}

export const HELP = [
  "/w NICK TEXT - whisper to one person (or click their name)",
  "/all TEXT - send to everyone on the server",
  "/nick NEW - change your nickname",
  "/join ROOM - join or create a room; /leave - leave the current one",
  "Start a line with // to send a message that begins with /",
];

export function formatTime(date) {
  return `${String(date.getHours()).padStart(2, "0")}:${String(date.getMinutes()).padStart(2, "0")}`;
}

/** The text of a chat payload, whatever type it came as. */
export function messageText(data) {
  if (typeof data === "string") return data;
  if (data instanceof Uint8Array) return new TextDecoder().decode(data);
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  return JSON.stringify(data);
}

export function presenceText(p) {
  if (p.kind === "join") return `${p.nick} joined`;
  if (p.kind === "leave") return `${p.nick} left`;
  if (p.kind === "nick") return `${p.nick} is now known as ${p.newNick}`;
  return `${p.nick}: ${p.kind}`;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

/** The lines a 'recovery' of muxclient.js puts in the room's log (none when nothing happened). */
export function recoveryLines(r) {
  const where = `#${r.room}`;
  const lines = [];
  if (r.outcome === "reset") {
    lines.push(`the history of ${where} restarted: messages sent while you were away cannot be recovered`);
  }
  if (r.outcome === "gap" && r.missing) {
    const [a, b] = r.missing;
    lines.push(a === b ? `message ${a} in ${where} was lost` : `messages ${a}..${b} in ${where} were lost`);
  }
  // A GAP frame comes in the middle of a replay already announced.
  const announce = r.outcome !== "fresh" && (r.outcome !== "gap" || r.rejoin);
  if (r.outcome === "fresh" && r.replayed) lines.push(`${plural(r.replayed, "earlier message")} in ${where}`);
  if (announce && r.replayed) lines.push(`recovered ${plural(r.replayed, "missed message")} in ${where}`);
  return lines;
}

const FRIENDLY = {
  NICK_TAKEN: "That nickname is already taken. Pick another one.",
  INVALID_NAME: "That name is not allowed",
  NOT_MEMBER: "You are not in that room. Join it first.",
  NO_SUCH_TARGET: "Nobody with that nickname is online.",
  RATE_LIMITED: "You are sending too fast. Slow down a little.",
  LIMIT: "Limit reached: the server is full, or you are in too many rooms.",
  TOO_LARGE: "That message is too long.",
  AUTH_FAILED: "The server refused the access token.",
  DISCONNECTED: "Not connected. Reconnecting...",
  TIMEOUT: "The server did not answer in time.",
  SHUTTING_DOWN: "The server is restarting.",
  IDLE_TIMEOUT: "The connection went silent. Reconnecting...",
  SLOW_CONSUMER: "The connection fell behind. Reconnecting...",
  UNAVAILABLE: "The server is temporarily unavailable.",
};

/** A person-readable message for any error (MuxError or not). */
export function errorText(err) {
  const status = err?.status;
  const base = FRIENDLY[status];
  if (!base) return err?.message || String(err);
  if (status === "INVALID_NAME" && err.detail) return `${base}: ${err.detail}.`;
  return base;
}

// ------------------------------------------------------------------ state
/** What the page shows, kept apart from the DOM so it can be tested. */
export class ChatState {
  constructor() {
    this.me = "";
    this.current = null; // the room whose messages are shown
    this.joined = new Map(); // room -> {messages: [], members: [], unread: 0}
    this.directory = new Map(); // every room of the namespace -> member count
    this.home = []; // what is said while no room is open (welcome, whispers)
  }

  messagesOf(name) {
    return name === null ? this.home : this.room(name).messages;
  }

  room(name) {
    let r = this.joined.get(name);
    if (!r) {
      // replay: how replayed messages are marked ("earlier" on joining,
      // "recovered" after a reconnect), from the room's latest recovery.
      r = { messages: [], members: [], unread: 0, replay: "earlier" };
      this.joined.set(name, r);
    }
    return r;
  }

  addMessage(roomName, msg, limit = 500) {
    const target = roomName ?? this.current;
    const list = this.messagesOf(target);
    list.push(msg);
    if (list.length > limit) list.splice(0, list.length - limit);
    if (target !== null && target !== this.current) this.room(target).unread += 1;
    return target;
  }

  presence(p) {
    const r = this.joined.get(p.room);
    if (!r) return;
    if (p.kind === "join" && !r.members.includes(p.nick)) r.members.push(p.nick);
    if (p.kind === "leave") r.members = r.members.filter((n) => n !== p.nick);
    if (p.kind === "nick") r.members = r.members.map((n) => (n === p.nick ? p.newNick : n));
    if (p.kind !== "nick") this.directory.set(p.room, r.members.length);
  }

  /** Rooms for the sidebar: joined ones first, then the rest, each with a count. */
  roomList() {
    const names = new Set([...this.joined.keys(), ...this.directory.keys()]);
    return [...names]
      .map((name) => ({
        name,
        joined: this.joined.has(name),
        members: this.directory.get(name) ?? this.joined.get(name)?.members.length ?? 0,
        unread: this.joined.get(name)?.unread ?? 0,
      }))
      .sort((a, b) => (b.joined - a.joined) || a.name.localeCompare(b.name));
  }
}

// -------------------------------------------------------------- rendering
/** Create an element; text goes in via textContent only. */
export function el(doc, tag, { className, text, attrs } = {}, ...children) {
  const node = doc.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  for (const [k, v] of Object.entries(attrs ?? {})) node.setAttribute(k, v);
  for (const child of children) node.appendChild(child);
  return node;
}

/** One message line: {kind, time, sender, text, mine, replayed, outcome}. */
export function renderMessage(doc, m) {
  const classes = ["msg", m.kind];
  if (m.mine) classes.push("mine");
  const attrs = { "data-testid": "message", "data-kind": m.kind };
  if (m.replayed) { classes.push(m.replayed); attrs["data-replayed"] = m.replayed; }
  if (m.outcome) attrs["data-outcome"] = m.outcome;
  const li = el(doc, "li", { className: classes.join(" "), attrs });
  li.appendChild(el(doc, "time", { text: formatTime(m.time), attrs: { datetime: m.time.toISOString() } }));
  if (m.sender !== undefined) {
    let label = m.sender;
    if (m.kind === "direct") label = m.mine ? `to ${m.to}` : `${m.sender} (whisper)`;
    if (m.kind === "broadcast") label = `${m.sender} (everyone)`;
    li.appendChild(el(doc, "span", { className: "sender", text: label, attrs: { "data-nick": m.mine && m.to ? m.to : m.sender } }));
  }
  li.appendChild(el(doc, "span", { className: "text", text: m.text }));
  return li;
}

export function renderRoomItem(doc, r, current) {
  const classes = [r.name === current ? "current" : "", r.joined ? "" : "not-joined"].filter(Boolean).join(" ");
  const li = el(doc, "li", {
    className: classes,
    attrs: { "data-testid": "room-item", "data-room": r.name, "data-joined": r.joined ? "1" : "0", title: r.joined ? r.name : `Join ${r.name}` },
  });
  li.appendChild(el(doc, "span", { className: "name", text: r.name }));
  const badge = r.unread ? `${r.unread} new` : String(r.members);
  li.appendChild(el(doc, "span", { className: r.unread ? "badge unread" : "badge", text: badge }));
  return li;
}

export function renderMember(doc, nick, me) {
  const li = el(doc, "li", { attrs: { "data-testid": "member", "data-nick": nick, title: nick === me ? "You" : `Whisper to ${nick}` } });
  li.appendChild(el(doc, "span", { className: "name", text: nick }));
  if (nick === me) li.appendChild(el(doc, "span", { className: "you", text: "you" }));
  return li;
}

// ------------------------------------------------------------------- page
function wsUrl(loc) {
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/ws`;
}

export function boot(doc, win) {
  const $ = (id) => doc.getElementById(id);
  const state = new ChatState();
  const params = new URLSearchParams(win.location.search);
  let client = null;
  let refreshTimer = null;

  const banner = (text, kind = "reconnecting") => {
    const b = $("status-banner");
    b.hidden = !text;
    b.textContent = text || "";
    b.dataset.state = text ? kind : "online";
  };

  function note(text, kind = "note", room = null, extra = {}) {
    const target = state.addMessage(room, { kind, time: new Date(), text, ...extra });
    if (target === state.current) appendMessage(state.messagesOf(target).at(-1));
    renderRooms();
  }

  function appendMessage(m) {
    const list = $("message-list");
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 40;
    list.appendChild(renderMessage(doc, m));
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  function renderRooms() {
    $("room-list").replaceChildren(...state.roomList().map((r) => renderRoomItem(doc, r, state.current)));
  }

  function renderMembers() {
    const members = state.current ? state.room(state.current).members : [];
    $("member-list").replaceChildren(...members.map((n) => renderMember(doc, n, state.me)));
    $("member-count").textContent = members.length ? String(members.length) : "";
  }

  function renderCurrent() {
    const room = state.current;
    $("room-title").textContent = room ? `# ${room}` : "No room";
    $("room-sub").textContent = room ? "" : "Join a room from the list, or create one below.";
    $("leave-button").hidden = !room;
    const list = $("message-list");
    list.replaceChildren(...state.messagesOf(room).map((m) => renderMessage(doc, m)));
    list.scrollTop = list.scrollHeight;
    renderMembers();
    renderRooms();
  }

  function switchTo(room) {
    state.current = room;
    if (room) state.room(room).unread = 0;
    renderCurrent();
    $("message-input").focus();
  }

  async function refreshRooms() {
    if (!client?.connected) return;
    try {
      const { rooms } = await client.rooms({ all: true });
      state.directory = new Map(rooms.map((r) => [r.name, r.members]));
      renderRooms();
    } catch { /* shown on the next refresh */ }
  }

  async function refreshMembers(room) {
    try {
      const { nicks } = await client.who(room);
      state.room(room).members = nicks;
      if (room === state.current) renderMembers();
    } catch { /* the room list refresh will show the problem */ }
  }

  async function joinRoom(room) {
    const why = checkName(room, "room");
    if (why) { note(`Cannot join: ${why}.`, "error"); return; }
    try {
      await client.join(room, { presence: true, history: EARLIER });
      state.room(room);
      switchTo(room);
      note(`You joined ${room}.`, "note", room);
      await refreshMembers(room);
      refreshRooms();
    } catch (err) {
      note(errorText(err), "error");
    }
  }

  async function leaveRoom(room) {
    if (!room) return;
    try {
      await client.leave(room);
    } catch (err) {
      note(errorText(err), "error");
      return;
    }
    state.joined.delete(room);
    switchTo(state.joined.keys().next().value ?? null);
    refreshRooms();
  }

  async function send(line) {
    const cmd = parseInput(line);
    const now = new Date();
    try {
      switch (cmd.kind) {
        case "none": return;
        case "say":
          if (!state.current) { note("Join a room first.", "error"); return; }
          await client.emit(EVENT, cmd.text, { room: state.current }, { ack: true, echo: false });
          show(state.current, { kind: "room", time: now, sender: state.me, text: cmd.text, mine: true });
          return;
        case "whisper":
          await client.emit(EVENT, cmd.text, { nick: cmd.nick }, { ack: true });
          show(null, { kind: "direct", time: now, sender: state.me, to: cmd.nick, text: cmd.text, mine: true });
          return;
        case "broadcast": {
          await client.emit(EVENT, cmd.text, { broadcast: true }, { ack: true });
          show(null, { kind: "broadcast", time: now, sender: state.me, text: cmd.text, mine: true });
          return;
        }
        case "nick": {
          const old = state.me;
          await client.setNick(cmd.nick);
          state.me = client.nick;
          $("me").textContent = state.me;
          for (const r of state.joined.values()) r.members = r.members.map((n) => (n === old ? state.me : n));
          note(`You are now known as ${state.me}.`);
          renderMembers();
          return;
        }
        case "join": await joinRoom(cmd.room); return;
        case "leave": await leaveRoom(cmd.room ?? state.current); return;
        case "help": for (const h of HELP) note(h); return;
        case "error": note(cmd.message, "error"); return;
        default: return;
      }
    } catch (err) {
      note(errorText(err), "error");
    }
  }

  // A message into a room's log (or the current view), shown if visible.
  function show(room, m) {
    const target = state.addMessage(room, m);
    if (target === state.current) appendMessage(m);
    renderRooms();
  }

  function wire(c) {
    c.on(EVENT, (data, meta) => {
      const m = { kind: meta.kind, time: new Date(), sender: meta.sender, text: messageText(data) };
      if (meta.replayed) m.replayed = state.room(meta.room).replay;
      show(meta.kind === "room" ? meta.room : null, m);
    });
    // Comes as the JOIN's REPLY is read, before the replayed messages.
    c.on("recovery", (r) => {
      const room = state.room(r.room);
      if (r.outcome !== "gap" || r.rejoin) room.replay = r.outcome === "fresh" ? "earlier" : "recovered";
      for (const line of recoveryLines(r)) note(line, "recovery", r.room, { outcome: r.outcome });
    });
    c.on("presence", (p) => {
      state.presence(p);
      if (p.room === state.current) renderMembers();
      note(presenceText(p), "note", p.room);
    });
    c.on("disconnect", () => banner("Connection lost. Reconnecting..."));
    c.on("reconnect", (r) => {
      banner("");
      state.me = r.nick;
      $("me").textContent = state.me;
      for (const room of [...state.joined.keys()]) {
        if (!r.rooms.includes(room)) state.joined.delete(room);
        else refreshMembers(room);
      }
      if (state.current && !state.joined.has(state.current)) switchTo(state.joined.keys().next().value ?? null);
      note("Reconnected.");
      refreshRooms();
    });
    c.on("error", (err) => {
      if (!c.connected && !c.reconnect) banner(errorText(err), "error");
      else note(errorText(err), "error");
    });
  }

  async function login(ev) {
    ev.preventDefault();
    const nick = $("nick-input").value.trim();
    const firstRoom = $("first-room-input").value.trim();
    const err = $("login-error");
    const why = checkName(nick, "nick");
    if (why) { err.textContent = `Nickname: ${why}.`; return; }
    err.textContent = "";
    $("join-button").disabled = true;
    banner("Connecting...", "connecting");
    try {
      client = await MuxClient.connect(wsUrl(win.location), {
        nick,
        namespace: params.get("ns") || "/",
        token: params.get("token") || "",
        reconnect: true,
      });
    } catch (e) {
      err.textContent = errorText(e);
      $("join-button").disabled = false;
      banner("");
      return;
    }
    banner("");
    state.me = client.nick;
    $("me").textContent = state.me;
    wire(client);
    $("login").hidden = true;
    $("app").hidden = false;
    renderCurrent();
    note(`Welcome, ${state.me}. Type /help for commands.`);
    if (firstRoom) await joinRoom(firstRoom);
    refreshRooms();
    refreshTimer = win.setInterval(refreshRooms, ROOM_REFRESH_MS);
  }

  $("login-form").addEventListener("submit", login);
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("message-input");
    const line = input.value;
    input.value = "";
    send(line);
  });
  $("join-room-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const room = $("room-input").value.trim();
    $("room-input").value = "";
    if (room) joinRoom(room);
  });
  $("room-list").addEventListener("click", (ev) => {
    const item = ev.target.closest("[data-room]");
    if (!item) return;
    const room = item.dataset.room;
    if (state.joined.has(room)) switchTo(room);
    else joinRoom(room);
  });
  const whisperTo = (nick) => {
    if (!nick || nick === state.me) return;
    const input = $("message-input");
    input.value = `/w ${nick} `;
    input.focus();
  };
  $("member-list").addEventListener("click", (ev) => whisperTo(ev.target.closest("[data-nick]")?.dataset.nick));
  $("message-list").addEventListener("click", (ev) => whisperTo(ev.target.closest(".sender")?.dataset.nick));
  $("leave-button").addEventListener("click", () => leaveRoom(state.current));
  $("refresh-rooms").addEventListener("click", refreshRooms);
  $("me").addEventListener("click", () => {
    const input = $("message-input");
    input.value = "/nick ";
    input.focus();
  });
  win.addEventListener("beforeunload", () => {
    win.clearInterval(refreshTimer);
    client?.close();
  });
}

if (typeof document !== "undefined" && typeof window !== "undefined") {
  boot(document, window);
}
