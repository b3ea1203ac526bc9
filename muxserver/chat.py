"""``muxchat``: a terminal chat on muxserver, the program this project grew from.

A person picks a nickname, joins rooms, talks, whispers, changes nick and
leaves. Plain lines go to the current room; ``/commands`` do the rest
(``/help`` lists them).

On a terminal (stdin and stdout a tty, TERM not "dumb", no ``--plain``)
it runs on prompt_toolkit (:mod:`muxserver.chatui`): line editing, history,
Tab completion, a prompt naming the current room, and incoming lines printed
above the line being typed. Everywhere else it is the line mode below, which
scripts and the tests drive.

The line mode is single-threaded like the server: one selector watches
stdin and the client's socket. The blocking :class:`muxserver.client.Client` does the
protocol work; its requests block for one round trip, which on a chat is
shorter than a keystroke. Incoming lines are printed by client handlers when
``poll(0)`` dispatches them. Auto-reconnect is on, and the selector is
re-pointed whenever the client's socket changes.

Rooms are joined sequenced (protocol section 9): a join shows the room's
latest messages between two "earlier messages" lines, and after a reconnect
the chat says what came back ("recovered 12 missed messages in #games") or
what is gone for good ("messages 40..57 in #games were lost").

With ``--tls`` (or ``--ca PATH``, a CA to trust) the connection is TLS, on
reconnects too; the selector watches the TLS socket's descriptor, which is
safe because every client read drains what the SSL object has decrypted.

Output is plain lines (no cursor tricks in the line mode), so it reads the
same in a pipe, a log or a pseudo-terminal. Colour is used only when stdout is a terminal and
neither ``NO_COLOR`` nor ``TERM=dumb`` says otherwise; text from other people
has control characters replaced, so nobody can send escape sequences to your
terminal.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import ssl
import sys
import time
import zlib
from typing import TextIO

from . import __version__
from .client import (
    AuthFailed,
    Backoff,
    Client,
    ConnectionClosed,
    Event,
    MuxError,
    NotConnected,
    Presence,
    Recovery,
)

HELP = """\
commands (Tab completes commands, rooms and nicks on a terminal):
  TEXT               say TEXT in the current room (start with // to say a line beginning with /)
  /join ROOM         join ROOM and make it current (also /j)
  /leave [ROOM]      leave ROOM (default: the current room)
  /switch ROOM       make ROOM (already joined) the current room
  /nick NEW          change your nickname
  /msg NICK TEXT     whisper TEXT to NICK only (also /m)
  /all TEXT          say TEXT to everyone in the namespace
  /who [ROOM]        who is in ROOM (default: the current room) (also /w)
  /rooms [all]       your rooms, or every room in the namespace
  /help              this list
  /quit              leave (also /q)"""

COMMANDS = ("join", "leave", "switch", "nick", "msg", "all", "who", "rooms", "help", "quit")
ALIASES = {"j": "join", "m": "msg", "q": "quit", "w": "who"}
ROOM_COMMANDS = frozenset({"join", "leave", "switch", "who"})  # first argument: a room
NICK_COMMANDS = frozenset({"msg"})  # first argument: a nick
TEXT_COMMANDS = frozenset({"msg", "all"})  # the rest is text (nicks complete in it)
NICK_MAX = 32  # bytes of UTF-8 (protocol section 1)
TOKEN_ENV = "MUXSERVER_TOKEN"  # the server's own variable, so one export serves both

RESET, BOLD, DIM, RED, GREEN, YELLOW, MAGENTA, CYAN = (
    "\x1b[0m", "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[35m", "\x1b[36m",
)  # fmt: skip
NICK_COLOURS = ("\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[34m", "\x1b[35m", "\x1b[36m")
EVENT = "msg"  # the event name chat lines travel under
EARLIER = 20  # messages of a room's history shown on joining it


# Terminal key sequences (arrows, Home, F-keys: CSI and SS3) that a line-mode
# terminal hands over as typed text; nobody means to send them.
_KEY_SEQUENCE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|O[@-~])")


def _typed(text: str) -> str:
    """A typed line without terminal key sequences; tabs become spaces, other controls go."""
    text = _KEY_SEQUENCE.sub("", text).replace("\t", " ")
    return "".join(ch for ch in text if not (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F))


def _clean(text: str) -> str:
    """Control characters (escape sequences included) shown as '?', never sent to the tty."""
    return "".join("?" if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F else ch for ch in text)


def _room_arg(text: str) -> str:
    """``#games`` and ``games`` both name room "games", as people type them both."""
    return text[1:] if text.startswith("#") and len(text) > 1 else text


def want_colour(stream: TextIO, mode: str = "auto", environ: dict | None = None) -> bool:
    environ = os.environ if environ is None else environ
    if mode != "auto":
        return mode == "always"
    if "NO_COLOR" in environ or environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


class Chat:
    """One chat session: parses input lines, runs commands, prints what arrives."""

    # The command tables, for Tab completion in muxserver/chatui.py.
    commands, aliases = COMMANDS, ALIASES
    room_commands, nick_commands, text_commands = ROOM_COMMANDS, NICK_COMMANDS, TEXT_COMMANDS

    def __init__(self, client: Client, out: TextIO, colour: bool) -> None:
        self.client = client
        self.out = out
        self.colour = colour
        self.room: str | None = None
        self.recent: list[str] = []  # joined rooms, most recently used first
        self.nicks: set[str] = set()  # people seen, for Tab completion
        self.rooms_seen: set[str] = set()  # rooms listed by /rooms all, for Tab completion
        self.done = False
        self._last_rename: tuple[str, str] | None = None
        # room -> seq of the last earlier message being shown after a join
        self._earlier_until: dict[str, int] = {}
        client.on("*", self.show_event)
        client.on("recovery", self.show_recovery)
        client.on_presence(self.show_presence)
        client.on_error(lambda exc: self.error(exc))
        client.on_disconnect(self.show_disconnect)
        client.on_reconnect(self.show_reconnect)

    # --------------------------------------------------------- printing
    def paint(self, text: str, colour: str) -> str:
        return f"{colour}{text}{RESET}" if self.colour else text

    def nick(self, nick: str) -> str:
        colour = NICK_COLOURS[zlib.crc32(nick.encode()) % len(NICK_COLOURS)]
        return self.paint(f"<{nick}>", colour)

    def line(self, text: str) -> None:
        stamp = self.paint(time.strftime("%H:%M:%S"), DIM)
        self.out.write(f"{stamp} {text}\n")
        self.out.flush()

    def info(self, text: str) -> None:
        self.line(self.paint(f"* {text}", YELLOW))

    def error(self, exc: BaseException | str) -> None:
        self.line(self.paint(f"! {_clean(str(exc))}", RED))

    def room_tag(self, room: str) -> str:
        return self.paint(f"#{room}", CYAN)

    # ------------------------------------------------------ interactive
    def prompt(self) -> str:
        """The interactive prompt: the room lines go to."""
        return f"#{self.room}> " if self.room else "(no room)> "

    def known_nicks(self) -> set[str]:
        return self.nicks - {self.client.nick}

    def known_rooms(self) -> set[str]:
        return set(self.client.joined) | self.rooms_seen

    def use(self, room: str) -> None:
        """Make ``room`` the current room and the most recently used."""
        self.room = room
        if room in self.recent:
            self.recent.remove(room)
        self.recent.insert(0, room)

    def show_event(self, ev: Event) -> None:
        self.nicks.add(ev.sender)
        if ev.kind == "room":
            where = self.room_tag(ev.room)
        elif ev.kind == "direct":
            where = self.paint("whisper", MAGENTA)
        else:
            where = self.paint("all", GREEN)
        text = _clean(ev.text)
        if ev.event != EVENT:
            text = f"[{_clean(ev.event)}] {text}"
        self.line(f"{where} {self.nick(ev.sender)} {text}")
        if ev.replayed and self._earlier_until.get(ev.room) == ev.seq:
            del self._earlier_until[ev.room]
            self.info(f"--- end of earlier messages in #{ev.room} ---")

    def show_recovery(self, rec: Recovery) -> None:
        """What a sequenced join found: earlier messages, or what a reconnect got back or lost."""
        room = f"#{rec.room}"
        if rec.outcome == "fresh":
            if rec.replayed:
                self._earlier_until[rec.room] = rec.last
                self.info(f"--- earlier messages in {room} ---")
            return
        if rec.outcome == "reset":
            self.error(
                f"{room} was restarted on the server: what was sent there while you were "
                "away is lost"
            )
        elif rec.outcome == "gap" and rec.missing is not None:
            first, last = rec.missing
            which = f"message {first}" if first == last else f"messages {first}..{last}"
            self.error(f"{which} in {room} {'was' if first == last else 'were'} lost")
        if rec.replayed:
            if rec.outcome == "reset":
                self.info(f"the latest {rec.replayed} in {room} follow")
            else:
                s = "" if rec.replayed == 1 else "s"
                self.info(f"recovered {rec.replayed} missed message{s} in {room}")

    def show_presence(self, p: Presence) -> None:
        self.nicks.add(p.nick)
        if p.kind == "nick":
            self.nicks.discard(p.nick)
            self.nicks.add(p.new_nick)
            # One PRESENCE per shared room; say it once.
            if self._last_rename == (p.nick, p.new_nick):
                return
            self._last_rename = (p.nick, p.new_nick)
            self.info(f"{p.nick} is now known as {p.new_nick}")
            return
        self._last_rename = None
        verb = "joined" if p.kind == "join" else "left" if p.kind == "leave" else p.kind
        self.info(f"{p.nick} {verb} #{p.room}")

    def show_disconnect(self, exc: MuxError) -> None:
        self.error(f"connection lost ({exc}); reconnecting...")

    def show_reconnect(self) -> None:
        rooms = " ".join(f"#{r}" for r in self.client.joined) or "no rooms"
        self.info(f"reconnected as {self.client.nick} ({rooms})")
        self.recent = [r for r in self.recent if r in self.client.joined]
        if self.room not in self.client.joined:
            self.room = self.recent[0] if self.recent else next(iter(self.client.joined), None)

    # --------------------------------------------------------- commands
    def handle(self, raw: str) -> None:
        """One line typed by the user."""
        text = _typed(raw.rstrip("\r\n"))
        if not text.strip():
            return
        try:
            if text.startswith("/") and not text.startswith("//"):
                cmd, _, rest = text[1:].partition(" ")
                cmd = cmd.lower()
                self.command(ALIASES.get(cmd, cmd), rest.strip())
            else:
                self.say(text[1:] if text.startswith("//") else text)
        except NotConnected as exc:
            self.error(f"{exc.message}; not sent")
        except ConnectionClosed as exc:
            self.error(exc)
        except MuxError as exc:
            self.error(exc)
        except (TimeoutError, ValueError) as exc:
            self.error(exc)

    def say(self, text: str) -> None:
        if self.room is None:
            self.error("you are in no room: /join ROOM first")
            return
        self.client.emit(EVENT, text, room=self.room, ack=True)
        self.use(self.room)
        self.line(f"{self.room_tag(self.room)} {self.nick(self.client.nick)} {_clean(text)}")

    def command(self, cmd: str, arg: str) -> None:
        c = self.client
        if cmd == "join" and arg:
            room = _room_arg(arg)
            # Shown by show_recovery and show_event once poll dispatches them.
            c.join(room, presence=True, history=EARLIER if c.session_version >= 2 else 0)
            self.use(room)
            self.info(f"you joined #{room} ({self._members(room)})")
        elif cmd == "leave":
            room = _room_arg(arg) if arg else self.room
            if room is None:
                self.error("you are in no room")
                return
            if room not in c.joined:
                self.error(f"you are not in #{room}; nothing to leave")
                return
            c.leave(room)
            if room in self.recent:
                self.recent.remove(room)
            self.info(f"you left #{room}")
            if room == self.room:
                # Back to the room used last, as a person expects, not the oldest.
                left = [r for r in self.recent if r in c.joined]
                self.room = left[0] if left else None
                if self.room:
                    self.info(f"now talking in #{self.room}")
                else:
                    self.info("you are in no room now: /join ROOM to talk")
        elif cmd == "switch" and arg:
            room = _room_arg(arg)
            if room not in c.joined:
                self.error(f"you are not in #{room}: /join {room} first")
                return
            self.use(room)
            self.info(f"now talking in #{room}")
        elif cmd == "nick" and arg:
            c.set_nick(arg)
            self.info(f"you are now known as {c.nick}")
        elif cmd == "msg" and " " in arg:
            to, _, text = arg.partition(" ")
            c.emit(EVENT, text, nick=to, ack=True)
            self.line(f"{self.paint('whisper', MAGENTA)} -> {self.nick(to)} {_clean(text)}")
        elif cmd == "all" and arg:
            c.emit(EVENT, arg, broadcast=True, ack=True)
            self.line(f"{self.paint('all', GREEN)} {self.nick(c.nick)} {_clean(arg)}")
        elif cmd == "who":
            room = _room_arg(arg) if arg else self.room
            if room is None:
                self.error("which room? /who ROOM")
                return
            who = c.who(room)
            self.nicks.update(who)
            if not who.total:
                # Rooms exist while someone is in them (protocol section 4).
                self.info(f"#{room} does not exist: nobody is in it")
                return
            self.info(f"#{room}: {self._members(room, names=True, who=who)}")
        elif cmd == "rooms":
            everywhere = arg == "all"
            rooms = c.rooms(all=everywhere)
            if everywhere:
                self.rooms_seen = {r.name for r in rooms}
            listed = ", ".join(f"#{r.name} ({r.members})" for r in rooms) or "none"
            self.info(f"{'rooms in ' + c.namespace if everywhere else 'your rooms'}: {listed}")
        elif cmd == "help":
            self.out.write(HELP + "\n")
            self.out.flush()
        elif cmd in ("quit", "exit"):
            self.done = True
        elif cmd in ("join", "switch", "nick", "msg", "all"):
            usage = next(h for h in HELP.splitlines() if f"/{cmd} " in h)
            self.error(f"usage: {usage.split('  ')[1].strip()}")
        else:
            self.error(f"unknown command /{cmd} (try /help)")

    def _members(self, room: str, names: bool = False, who: list | None = None) -> str:
        who = self.client.who(room) if who is None else who
        self.nicks.update(who)
        count = f"{who.total} {'member' if who.total == 1 else 'members'}"
        return f"{', '.join(who)} ({count})" if names else count

    # ------------------------------------------------------------- loop
    def run(self, stdin_fd: int) -> None:
        """Until /quit or end of input: one selector over stdin and the socket."""
        sel = selectors.DefaultSelector()
        sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
        sock = sock_fd = None
        pending = b""
        self.client.poll(0)  # what came with the --room join (its earlier messages)
        while not self.done:
            if self.client.sock is not sock:  # reconnected (or lost): watch the new socket
                if sock_fd is not None:
                    sel.unregister(sock_fd)
                sock = self.client.sock
                sock_fd = sock.fileno() if sock is not None else None
                if sock_fd is not None:
                    sel.register(sock_fd, selectors.EVENT_READ, "sock")
            # Disconnected: wake up now and then so poll() can reconnect when due.
            timeout = None if sock is not None else 0.2
            for key, _ in sel.select(timeout):
                if key.data != "stdin":
                    continue
                data = os.read(stdin_fd, 65536)
                if not data:
                    self.done = True
                    break
                pending += data
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self.handle(raw.decode("utf-8", "replace"))
                    if self.done:
                        break
            if not self.done:
                self.client.poll(0)  # also dispatches what arrived during a request
        sel.close()


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 0..65535")
    return port


def _room(text: str) -> str:
    room = _room_arg(text)
    if not room:
        raise argparse.ArgumentTypeError("a room name cannot be empty")
    return room


def _nick(text: str) -> str:
    # Only the size, which the client could not even encode past 255 bytes;
    # the server is the judge of everything else in a nick.
    size = len(text.encode("utf-8", "surrogateescape"))
    if size > NICK_MAX:
        raise argparse.ArgumentTypeError(f"nicks are at most {NICK_MAX} bytes (this one is {size})")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muxchat", description="Terminal chat on a muxserver. Type /help once connected."
    )
    parser.add_argument("--version", action="version", version=f"muxchat {__version__}")
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=7878, help="server port (default 7878)")
    parser.add_argument(
        "--nick", type=_nick, default=None, help="nickname (default: the server picks one)"
    )
    parser.add_argument("--namespace", default="/", help="namespace (default /)")
    parser.add_argument("--room", type=_room, default=None, help="room to join at start")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or os.environ.get("MUXCHAT_TOKEN") or None,
        help=f"server token, if it needs one (default: ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--plain", action="store_true",
        help="plain line mode even on a terminal (no line editing, no completion)",
    )  # fmt: skip
    parser.add_argument(
        "--tls", action="store_true",
        help="connect with TLS, checking the server's certificate (default: plain TCP)",
    )  # fmt: skip
    parser.add_argument(
        "--ca", default=None, metavar="PATH",
        help="PEM file of the CA(s) to trust for --tls instead of the system's (implies --tls)",
    )  # fmt: skip
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto",
        help="colour output (auto: only on a terminal, and not with NO_COLOR set)",
    )  # fmt: skip
    return parser


# OpenSSL verify codes that mean "I do not trust who signed this".
_UNTRUSTED = {18, 19, 20, 21}  # self-signed, self-signed in chain, unknown issuer (x2)


def _tls_why(exc: ssl.SSLError) -> str:
    """One line on a failed TLS handshake, with the likely fix."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = " (trust its CA with --ca PATH)" if exc.verify_code in _UNTRUSTED else ""
        return f"certificate verify failed: {exc.verify_message}{hint}"
    if exc.reason == "WRONG_VERSION_NUMBER":
        return "the server did not answer in TLS (is it serving TLS on this port?)"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ca is not None and not os.path.isfile(args.ca):
        parser.error(f"--ca {args.ca}: no such file")
    out = sys.stdout
    try:
        client = Client.connect(
            args.host, args.port, nick=args.nick, namespace=args.namespace,
            token=args.token, reconnect=True, backoff=Backoff(initial=0.5, maximum=30.0),
            tls=args.tls, ca=args.ca,
        )  # fmt: skip
    except AuthFailed as exc:
        where = f"{args.host}:{args.port}"
        if not args.token:
            print(
                f"muxchat: {where} needs a token: pass --token TOKEN or set {TOKEN_ENV}",
                file=sys.stderr,
            )
        else:
            print(
                f"muxchat: {where} refused the token ({exc}); check --token or ${TOKEN_ENV}",
                file=sys.stderr,
            )
        return 1
    except MuxError as exc:
        print(f"muxchat: {args.host}:{args.port} refused us: {exc}", file=sys.stderr)
        return 1
    except ssl.SSLError as exc:
        print(f"muxchat: TLS with {args.host}:{args.port} failed: {_tls_why(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        why = exc.strerror or str(exc)
        print(f"muxchat: cannot connect to {args.host}:{args.port}: {why}", file=sys.stderr)
        return 1
    chat = Chat(client, out, want_colour(out, args.color))
    run_interactive = None if args.plain else _interactive_runner(out)
    over = " over TLS" if client.tls else ""
    chat.info(f"connected to {args.host}:{args.port}{over} as {client.nick} (/help for commands)")
    status = 0
    try:
        if args.room:
            chat.handle(f"/join {args.room}")
        if run_interactive is not None:
            run_interactive(chat)
        else:
            chat.run(sys.stdin.fileno())
    except KeyboardInterrupt:
        status = 130
    except MuxError as exc:  # the connection ended for good (e.g. reconnect refused)
        chat.error(exc)
        status = 1
    finally:
        client.close()
    if status == 0:
        chat.info("bye")
    return status


def _interactive_runner(out: TextIO):
    """The prompt_toolkit front end, when stdin/stdout are a terminal that can take it.

    None means the line mode: not a terminal, TERM=dumb (no cursor control),
    or prompt_toolkit is not installed (then a hint says how to get it).
    """
    if not (sys.stdin.isatty() and out.isatty()) or os.environ.get("TERM") == "dumb":
        return None
    try:
        import asyncio

        from .chatui import make_session, run_interactive
    except ImportError:
        print(
            "muxchat: line editing needs prompt_toolkit: pip install 'muxserver[chat]' "
            "(continuing in plain line mode)",
            file=sys.stderr,
        )
        return None

    def run(chat: Chat) -> None:
        async def main() -> None:
            await run_interactive(chat, make_session(chat))

        asyncio.run(main())

    return run


if __name__ == "__main__":
    sys.exit(main())
