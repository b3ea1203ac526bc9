"""``muxchat`` on a terminal: line editing, history, completion, a live prompt.

Why a module of its own: it is the only code that needs prompt_toolkit (the
``chat`` extra), so :mod:`muxserver.chat` imports it only when stdin and
stdout are a terminal, and the line mode (pipes, scripts, TERM=dumb) keeps
working without it.

Decisions worth knowing:

* The :class:`muxserver.chat.Chat` object, its commands and its blocking
  :class:`~muxserver.client.Client` are the line mode's, unchanged. Here
  prompt_toolkit's asyncio loop replaces the selector: the client's socket
  is watched with ``loop.add_reader`` and ``poll(0)`` dispatches what came,
  re-pointed whenever a reconnect swaps the socket, and a 0.2 s ticker lets
  a disconnected client reconnect when its backoff is due. A command still
  blocks for one round trip, as in the line mode; on a chat that is shorter
  than a keystroke, and prompt_toolkit keeps the typed keys meanwhile.
* Incoming lines are written through a :class:`StdoutProxy`, which prints
  them above the prompt and redraws the half-typed line below, untouched.
* The prompt is erased when a line is submitted (``erase_when_done``): the
  chat prints the line once, as everyone else sees it, not once more as
  typed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.patch_stdout import StdoutProxy

from .client import MuxError

if TYPE_CHECKING:
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output

    from .client import Client

TICK = 0.2  # seconds between reconnect checks while disconnected


class Chat(Protocol):
    """What this module uses of :class:`muxserver.chat.Chat` (which imports us lazily).

    A protocol rather than an import, so that chat.py and this module do not
    import each other.
    """

    client: Client
    out: TextIO
    done: bool
    room: str | None
    commands: tuple[str, ...]  # command names, then their aliases and argument kinds
    aliases: Mapping[str, str]
    room_commands: frozenset[str]
    nick_commands: frozenset[str]
    text_commands: frozenset[str]

    def prompt(self) -> str: ...

    def known_nicks(self) -> set[str]: ...

    def known_rooms(self) -> set[str]: ...

    def handle(self, raw: str) -> None: ...


class ChatCompleter(Completer):
    """Tab completion: command names, then rooms or nicks by what the command takes."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def get_completions(self, document: Document, complete_event: CompleteEvent):
        chat = self.chat
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text:
            names = [*chat.commands, *chat.aliases]
            yield from _matching((f"/{n}" for n in names), text, text)
            return
        word = document.get_word_before_cursor(WORD=True)
        if text.startswith("/"):
            cmd, *args = text[1:].split(" ")
            cmd = chat.aliases.get(cmd.lower(), cmd.lower())
            first_arg = len(args) == 1  # completing the word right after the command
            if first_arg and cmd in chat.room_commands:
                yield from _matching(chat.known_rooms(), word.lstrip("#"), word)
            elif first_arg and cmd == "rooms":
                yield from _matching(["all"], word, word)
            elif (first_arg and cmd in chat.nick_commands) or cmd in chat.text_commands:
                yield from _matching(self.chat.known_nicks(), word, word)
            return
        yield from _matching(self.chat.known_nicks(), word, word)  # "bob: ..." in a line


def _matching(candidates: Iterable[str], prefix: str, replaced: str) -> Iterable[Completion]:
    """Completions of ``prefix`` (case-insensitive), each replacing ``replaced``."""
    low = prefix.lower()
    for cand in sorted(set(candidates), key=str.lower):
        if cand.lower().startswith(low) and cand != replaced:
            yield Completion(cand, start_position=-len(replaced))


class _SocketWatch:
    """Keeps ``loop.add_reader`` on the client's current socket; dispatches what arrives."""

    def __init__(self, chat: Chat, session: PromptSession, loop: asyncio.AbstractEventLoop):
        self.chat = chat
        self.session = session
        self.loop = loop
        self.fd: int | None = None
        self.sock = None
        self.failure: MuxError | None = None

    def sync(self) -> None:
        sock = self.chat.client.sock
        if sock is self.sock:
            return
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
        self.sock = sock
        self.fd = sock.fileno() if sock is not None else None
        if self.fd is not None:
            self.loop.add_reader(self.fd, self.pump)

    def pump(self) -> None:
        """Dispatch what has arrived (reconnecting when due); stop the prompt if it is over."""
        try:
            self.chat.client.poll(0)
        except MuxError as exc:  # the connection ended for good
            self.failure = exc
            self.chat.done = True
        self.sync()
        app = self.session.app
        if self.chat.done and app.is_running and not app.is_done:
            app.exit(exception=EOFError())
        else:
            app.invalidate()  # the prompt names the current room, which may have changed

    async def tick(self) -> None:
        while not self.chat.done:
            await asyncio.sleep(TICK)
            if self.chat.client.sock is None:
                self.pump()

    def close(self) -> None:
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            self.fd = None


def make_session(chat: Chat, input: Input | None = None, output: Output | None = None):
    """The PromptSession muxchat reads lines with (tests pass a pipe input)."""
    return PromptSession(
        input=input,
        output=output,
        history=InMemoryHistory(),
        completer=ChatCompleter(chat),
        complete_while_typing=False,  # Tab completes; typing a message pops nothing up
        erase_when_done=True,
    )


async def run_interactive(chat: Chat, session: PromptSession, proxy_output: bool = True) -> None:
    """Read and handle lines until /quit, Ctrl-D or the end of the connection.

    With ``proxy_output`` the chat's output goes above the prompt through a
    StdoutProxy on the terminal; without it (tests) ``chat.out`` is left as is.
    Raises the client's error if the connection ended for good, and
    KeyboardInterrupt on Ctrl-C.
    """
    loop = asyncio.get_running_loop()
    watch = _SocketWatch(chat, session, loop)
    proxy = StdoutProxy(raw=True, sleep_between_writes=0.05) if proxy_output else None
    original = chat.out
    if proxy is not None:
        chat.out = proxy
    ticker = loop.create_task(watch.tick())
    try:
        watch.sync()
        watch.pump()  # whatever arrived before the prompt was up
        while not chat.done:
            try:
                text = await session.prompt_async(chat.prompt)
            except EOFError:
                break
            chat.handle(text)
            watch.pump()  # also dispatches what arrived during the request
    finally:
        ticker.cancel()
        watch.close()
        if proxy is not None:
            proxy.close()
            chat.out = original
    if watch.failure is not None:
        raise watch.failure
