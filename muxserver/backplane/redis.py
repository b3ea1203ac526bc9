"""A non-blocking Redis link that lives on muxserver's own event loop.

Why not redis-py or asyncio: the server is one thread on ``muxserver.loop``,
and the backplane must share that loop's turn (read, dispatch, flush once
before sleeping) instead of adding threads or a second loop. hiredis.Reader
does the RESP parsing (C, sans-I/O: ``feed`` bytes, ``gets`` replies); this
module does the sockets, the ordering and the failure rules.

Decisions worth knowing:

* Two connections. A connection in SUBSCRIBE mode can only run pub/sub
  commands, so commands (pipelined, replies matched to callbacks in order)
  and pub/sub (pushes routed by channel) each get their own socket. The link
  is *up* only when both are connected, authenticated, and every channel held
  has been confirmed by Redis; either one failing takes the whole link down,
  because the cluster logic needs both to be correct.
* Calls made while connecting are queued on the new connection behind the
  handshake (AUTH, SELECT, SCRIPT LOAD, PING) and pipelined with it; if that
  attempt fails they fail with it. Calls made while down (backing off) fail at
  once with ``RedisError("not connected")``: the owner answers UNAVAILABLE
  rather than holding work for an outage of unknown length.
* Every callback is called exactly once: with the reply, or with a
  RedisError instance (a Redis error reply, "connection lost", "backlog
  full", "not connected", "link closed"). Rejections are delivered from the
  loop (``call_later(0)``), never from inside ``call``, so callers never see
  re-entrant callbacks.
* Unsent command bytes are capped (``max_backlog``); beyond it a call fails
  at once with "backlog full" instead of growing memory while Redis is slow.
* Writes are batched: ``call`` only appends to a list; a before-sleep hook
  sends each connection's list with one send per turn, like the server's
  output path. EVENT_WRITE is watched only while a kernel buffer is full.
* Confirmations are counted per channel per connection, so subscribe ->
  unsubscribe -> subscribe in one turn confirms the second SUBSCRIBE only when
  its own reply arrives, not the first one's.
* Host names are resolved with a blocking ``getaddrinfo`` at each connect
  attempt; use an IP address (or an /etc/hosts name) where that matters.
* A script's first call is an EVAL; later ones are EVALSHA, falling back to
  EVAL on NOSCRIPT, and every script used is loaded again in the handshake of
  each new connection. Only a SCRIPT FLUSH on a live server
  can reorder script calls that were in flight at that moment.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from muxserver.backplane.resp import (
    RedisError,
    RedisProtocolError,
    RedisURL,
    Script,
    encode_command,
    hiredis_module,
    parse_url,
)
from muxserver.loop import EVENT_READ, EVENT_WRITE, EventLoop

__all__ = ["RedisError", "RedisLink", "RedisURL", "Script", "encode_command", "parse_url"]

log = logging.getLogger("muxserver.backplane")

DOWN, CONNECTING, UP, CLOSED = 0, 1, 2, 3
STATE_NAMES = ("down", "connecting", "up", "closed")

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_PUSH_KINDS = frozenset(
    (b"message", b"pmessage", b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe")
)
_NOT_ENOUGH = object()  # hiredis.Reader's "need more data" marker (replies are never this)
_RBUF_SIZE = 256 * 1024
_SUB_BATCH = 512  # channels per SUBSCRIBE when restoring after a reconnect

Callback = Callable[[Any], None]

# Commands that change what the connection answers (pub/sub mode, RESP3,
# no replies) or that a reconnect would silently undo (SELECT: the URL's db).
_NOT_ON_CALL = frozenset(
    variant
    for name in ("SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE",
                 "SUNSUBSCRIBE", "MONITOR", "QUIT", "RESET", "HELLO", "SELECT")
    for variant in (name, name.encode())
)  # fmt: skip


class _Sub:
    __slots__ = ("on_message", "want", "confirmed", "waiters")

    def __init__(self, on_message: Callable[[bytes, bytes], None]) -> None:
        self.on_message = on_message
        self.want = 0  # the count of confirmations that includes our SUBSCRIBE
        self.confirmed = False
        self.waiters: list[Callable[[], None]] = []


# ---------------------------------------------------------- connection
class _Conn:
    """One socket: connect, TLS, RESP in, batched RESP out, pending callbacks."""

    __slots__ = (
        "link", "name", "sock", "reader", "out", "out_bytes", "pending", "state",
        "interest", "blocked", "sub_sent", "sub_recv", "ping_since",
    )  # fmt: skip

    def __init__(self, link: RedisLink, name: str) -> None:
        self.link = link
        self.name = name
        self.sock: socket.socket | None = None
        self.reader = hiredis_module().Reader(
            protocolError=RedisProtocolError, replyError=RedisError, notEnoughData=_NOT_ENOUGH
        )
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.pending: deque[Callback | None] = deque()
        self.state = "tcp"  # tcp -> tls -> open
        self.interest = 0
        self.blocked = False  # kernel buffer full: wait for EVENT_WRITE
        self.sub_sent: dict[tuple[bytes, bytes], int] = {}
        self.sub_recv: dict[tuple[bytes, bytes], int] = {}
        self.ping_since: float | None = None

    def queue(self, data: bytes, callback: Callback | None, reply: bool = True) -> None:
        """Append one command; ``reply=False`` for (P)(UN)SUBSCRIBE, answered by pushes."""
        self.out.append(data)
        self.out_bytes += len(data)
        if reply:
            self.pending.append(callback)
        link = self.link
        link.commands += 1
        link._dirty = True

    def start(self, url: RedisURL) -> None:
        infos = socket.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
        family, stype, proto, _, addr = infos[0]
        sock = self.sock = socket.socket(family, stype, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            raise OSError(err, f"connect to {url.host}:{url.port}: {errno.errorcode.get(err)}")
        self.set_interest(EVENT_WRITE)

    def set_interest(self, events: int) -> None:
        loop = self.link.loop
        if events == self.interest:
            return
        if self.interest == 0:
            loop.register(self.sock, events, self.on_event)
        else:
            loop.modify(self.sock, events, self.on_event)
        self.interest = events

    def close(self) -> None:
        if self.sock is not None:
            self.link.loop.unregister(self.sock)
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    # Events. Any exception here is the connection's failure, handled by the link.
    def on_event(self, mask: int) -> None:
        link = self.link
        try:
            if self.state == "tcp":
                self._on_connected()
            elif self.state == "tls":
                self._handshake()
            else:
                if mask & EVENT_WRITE:
                    self.blocked = False
                    self.flush()
                if mask & EVENT_READ and self.sock is not None:
                    self._on_readable()
        except (OSError, RedisError) as exc:
            link._fail(f"{self.name} connection: {exc or type(exc).__name__}")
        except Exception:
            # Our bug: contained to this link, which reconnects from scratch.
            log.exception("redis: internal error on the %s connection", self.name)
            link._fail(f"{self.name} connection: internal error")

    def _on_connected(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect: {errno.errorcode.get(err, str(err))}")
        if self.link.url.tls:
            # wrap_socket detaches the plain object: the selector must forget it first.
            self.link.loop.unregister(self.sock)
            self.interest = 0
            self.sock = self.link.ssl_context.wrap_socket(
                self.sock,
                server_hostname=self.link.url.host,
                do_handshake_on_connect=False,
            )
            self.state = "tls"
            self.set_interest(EVENT_READ | EVENT_WRITE)
            self._handshake()
            return
        self._opened()

    def _handshake(self) -> None:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.set_interest(EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self.set_interest(EVENT_WRITE)
            return
        self._opened()

    def _opened(self) -> None:
        self.state = "open"
        self.set_interest(EVENT_READ)
        self.link._dirty = True

    def _on_readable(self) -> None:
        link = self.link
        sock = self.sock
        buf = link._rbuf
        while True:
            try:
                n = sock.recv_into(buf)
            except _WOULD_BLOCK:
                return
            if n == 0:
                raise OSError("closed by Redis (EOF)")
            link.bytes_in += n
            self.reader.feed(buf, 0, n)
            self._dispatch()
            # TLS may hold decrypted bytes that select() cannot see.
            if self.sock is not sock or not (link.url.tls and sock.pending()):
                return

    def _dispatch(self) -> None:
        reader = self.reader
        link = self.link
        sock = self.sock
        while self.sock is sock:
            reply = reader.gets()
            if reply is _NOT_ENOUGH:
                return
            if (
                self is link._ps
                and type(reply) is list
                and reply
                and type(reply[0]) is bytes
                and reply[0] in _PUSH_KINDS
            ):
                link._on_push(self, reply)
                continue
            if not self.pending:
                raise RedisError(f"unexpected reply {reply!r:.80}")
            link.replies += 1
            callback = self.pending.popleft()
            if callback is not None:
                link._run(callback, reply)
            elif isinstance(reply, RedisError):
                log.warning("redis: error reply to a call without callback: %s", reply)

    def flush(self) -> None:
        if self.state != "open" or self.blocked or not self.out:
            return
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = self.sock.send(data)
        except _WOULD_BLOCK:
            sent = 0
        self.link.bytes_out += sent
        if sent == len(data):
            out.clear()
            self.out_bytes = 0
            if self.interest & EVENT_WRITE:
                self.set_interest(EVENT_READ)
            return
        rest = data[sent:]
        self.out = [rest]
        self.out_bytes = len(rest)
        self.blocked = True
        self.set_interest(EVENT_READ | EVENT_WRITE)


# ----------------------------------------------------------------- link
class RedisLink:
    """Commands and pub/sub to one Redis server, on ``loop``.

    ``start()`` connects; the link then keeps itself connected until
    ``close()``. ``on_up()`` fires each time both connections are ready and
    every subscription is confirmed; ``on_down(reason)`` each time an up link
    fails.
    """

    def __init__(
        self,
        loop: EventLoop,
        url: str | RedisURL,
        *,
        on_up: Callable[[], None] | None = None,
        on_down: Callable[[str], None] | None = None,
        connect_timeout: float = 2.0,
        ping_interval: float = 3.0,
        ping_timeout: float = 2.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        max_backlog: int = 8 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
    ) -> None:
        hiredis_module()  # fail now, with the install hint, not at the first connect
        for what, value in (("connect_timeout", connect_timeout), ("ping_interval", ping_interval),
                            ("ping_timeout", ping_timeout), ("backoff_min", backoff_min),
                            ("max_backlog", max_backlog)):  # fmt: skip
            if not value > 0:
                raise ValueError(f"{what} must be > 0, got {value!r}")
        if backoff_max < backoff_min:
            raise ValueError(f"backoff_max ({backoff_max}) is below backoff_min ({backoff_min})")
        self.loop = loop
        self.url = url if isinstance(url, RedisURL) else parse_url(url)
        self.on_up = on_up
        self.on_down = on_down
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_backlog = max_backlog
        self.ssl_context = ssl_context
        if self.url.tls and ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self._rng = rng or random.Random()
        self.state = DOWN
        self._cmd: _Conn | None = None
        self._ps: _Conn | None = None
        self._cmd_ready = self._ps_ready = False
        self._subs: dict[tuple[bytes, bytes], _Sub] = {}  # (b"", channel) / (b"p", pattern)
        self._scripts: dict[bytes, Script] = {}
        self._timers: list = []
        self._attempt = 0
        self._dirty = False
        self._rbuf = bytearray(_RBUF_SIZE)
        self.last_error = ""
        # Stats (ints, read by the monitoring port)
        self.commands = self.replies = self.messages = 0
        self.bytes_in = self.bytes_out = 0
        self.reconnects = self.rejected = 0
        loop.add_before_sleep(self._flush)

    # ------------------------------------------------------------ public
    @property
    def up(self) -> bool:
        return self.state == UP

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]

    def stats(self) -> dict[str, int]:
        return {
            "state": self.state,
            "commands_sent": self.commands,
            "replies": self.replies,
            "messages_received": self.messages,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "reconnects": self.reconnects,
            "rejected": self.rejected,
            "backlog_bytes": self._cmd.out_bytes if self._cmd else 0,
            "subscriptions": len(self._subs),
        }

    def start(self) -> None:
        if self.state == DOWN and not self._timers:
            self._connect()

    def close(self) -> None:
        """Disconnect for good; pending callbacks get RedisError("link closed")."""
        if self.state == CLOSED:
            return
        failed = self._teardown()
        self.state = CLOSED
        for callback in failed:
            self._run(callback, RedisError("link closed"))

    def call(self, *args, callback: Callback | None = None) -> bool:
        """Queue one command; ``callback(reply_or_RedisError)`` once. False if rejected.

        Raises ValueError for commands that would break reply matching or
        outlive a reconnect (see _NOT_ON_CALL): use subscribe() and the URL.
        """
        if not args:
            raise ValueError("call() needs a command")  # Redis does not answer "*0"
        name = args[0]
        if (name.upper() if isinstance(name, (bytes, str)) else name) in _NOT_ON_CALL:
            raise ValueError(f"{name!r} is not allowed on the command connection")
        return self._call_raw(encode_command(args), callback)

    def eval_script(
        self, script: Script, keys: list, args: list, callback: Callback | None = None
    ) -> bool:
        """EVALSHA, falling back to EVAL (which loads the script) on NOSCRIPT.

        A script's first call is an EVAL: calls pipelined behind it then find
        it loaded. (EVALSHA first would make every call sent before the first
        NOSCRIPT came back fail and be re-sent as EVAL *after* later calls
        that succeeded: the first calls of a script would run out of order.)
        """
        tail = (len(keys), *keys, *args)
        if script.sha not in self._scripts:
            self._scripts[script.sha] = script
            return self.call(b"EVAL", script.source, *tail, callback=callback)

        def on_reply(reply: Any) -> None:
            if isinstance(reply, RedisError) and str(reply).startswith("NOSCRIPT"):
                # EVAL runs it and loads it; a rejection reaches callback itself.
                self.call(b"EVAL", script.source, *tail, callback=callback)
            elif callback is not None:
                callback(reply)

        return self.call(b"EVALSHA", script.sha, *tail, callback=on_reply)

    def subscribe(
        self,
        channel: bytes | str,
        on_message: Callable[[bytes, bytes], None],
        on_confirmed: Callable[[], None] | None = None,
    ) -> None:
        """Hold ``channel``: ``on_message(channel, data)`` per message, across reconnects.

        ``on_confirmed()`` fires once Redis has confirmed the SUBSCRIBE (at once,
        from the loop, if it already had); while the link is down it waits for the
        confirmation after the reconnect. Subscribing again replaces on_message.
        """
        self._hold(b"", channel, on_message, on_confirmed)

    def psubscribe(
        self,
        pattern: bytes | str,
        on_message: Callable[[bytes, bytes], None],
        on_confirmed: Callable[[], None] | None = None,
    ) -> None:
        """Like subscribe, for a glob pattern; on_message gets the real channel."""
        self._hold(b"p", pattern, on_message, on_confirmed)

    def unsubscribe(self, channel: bytes | str) -> None:
        """Stop holding ``channel``; its on_confirmed waiters not yet fired are dropped."""
        self._release(b"", channel)

    def punsubscribe(self, pattern: bytes | str) -> None:
        self._release(b"p", pattern)

    # ---------------------------------------------------------- commands
    def _call_raw(self, data: bytes, callback: Callback | None) -> bool:
        cmd = self._cmd
        if self.state not in (UP, CONNECTING) or cmd is None:
            return self._reject(
                callback, "link closed" if self.state == CLOSED else "not connected"
            )
        if cmd.out_bytes + len(data) > self.max_backlog:
            return self._reject(callback, "backlog full")
        cmd.queue(data, callback)
        return True

    def _reject(self, callback: Callback | None, reason: str) -> bool:
        self.rejected += 1
        if callback is not None:
            self.loop.call_later(0, self._run, callback, RedisError(reason))
        return False

    def _run(self, callback: Callable, *args) -> None:
        # The owner's bug must not take the link (or the loop) down with it.
        try:
            callback(*args)
        except Exception:
            log.exception("redis: callback %r failed", callback)

    def _flush(self) -> None:
        if self._dirty:
            self._dirty = False
            for conn in (self._cmd, self._ps):
                if conn is not None and conn.out:
                    try:
                        conn.flush()
                    except OSError as exc:
                        self._fail(f"{conn.name} connection: {exc}")
                        return

    # ----------------------------------------------------------- pub/sub
    def _hold(self, kind: bytes, name, on_message, on_confirmed) -> None:
        if self.state == CLOSED:
            raise RedisError("link closed")
        key = (kind, name.encode() if isinstance(name, str) else bytes(name))
        sub = self._subs.get(key)
        if sub is None:
            sub = self._subs[key] = _Sub(on_message)
            if on_confirmed is not None:
                sub.waiters.append(on_confirmed)
            if self._ps is not None:
                self._send_subscribe(self._ps, kind, [key[1]])
            return
        sub.on_message = on_message
        if on_confirmed is not None:
            if sub.confirmed:
                self.loop.call_later(0, self._run, on_confirmed)
            else:
                sub.waiters.append(on_confirmed)

    def _release(self, kind: bytes, name) -> None:
        key = (kind, name.encode() if isinstance(name, str) else bytes(name))
        if self._subs.pop(key, None) is not None and self._ps is not None:
            self._ps.queue(encode_command((kind + b"UNSUBSCRIBE", key[1])), None, reply=False)
            if self.state == CONNECTING:
                self._maybe_up()  # it may have been the last unconfirmed one

    def _send_subscribe(self, conn: _Conn, kind: bytes, names: list[bytes]) -> None:
        conn.queue(encode_command((kind + b"SUBSCRIBE", *names)), None, reply=False)
        for name in names:
            key = (kind, name)
            conn.sub_sent[key] = n = conn.sub_sent.get(key, 0) + 1
            self._subs[key].want = n

    def _on_push(self, conn: _Conn, reply: list) -> None:
        kind = reply[0]
        if kind == b"message":
            self.messages += 1
            sub = self._subs.get((b"", reply[1]))
            if sub is not None:
                self._run(sub.on_message, reply[1], reply[2])
        elif kind == b"pmessage":
            self.messages += 1
            sub = self._subs.get((b"p", reply[1]))
            if sub is not None:
                self._run(sub.on_message, reply[2], reply[3])
        elif kind in (b"subscribe", b"psubscribe"):
            key = (b"p" if kind == b"psubscribe" else b"", reply[1])
            conn.sub_recv[key] = n = conn.sub_recv.get(key, 0) + 1
            sub = self._subs.get(key)
            if sub is not None and not sub.confirmed and n >= sub.want:
                sub.confirmed = True
                waiters, sub.waiters = sub.waiters, []
                for waiter in waiters:
                    self._run(waiter)
                if self.state == CONNECTING:
                    self._maybe_up()
        # unsubscribe / punsubscribe confirmations need no action

    # --------------------------------------------------------- lifecycle
    def _connect(self) -> None:
        self._timers.clear()
        self.state = CONNECTING
        self._cmd_ready = self._ps_ready = False
        cmd = self._cmd = _Conn(self, "command")
        ps = self._ps = _Conn(self, "pub/sub")
        url = self.url
        for conn in (cmd, ps):
            if url.password is not None:
                auth = (
                    (b"AUTH", url.username, url.password)
                    if url.username
                    else (b"AUTH", url.password)
                )
                conn.queue(encode_command(auth), self._handshake_step)
        if url.db:
            cmd.queue(encode_command((b"SELECT", url.db)), self._handshake_step)
        for script in self._scripts.values():
            cmd.queue(encode_command((b"SCRIPT", b"LOAD", script.source)), self._handshake_step)
        # PING last: Redis is really answering (not -LOADING) when this returns.
        cmd.queue(encode_command((b"PING",)), self._handshake_done(cmd))
        ps.queue(encode_command((b"PING",)), self._handshake_done(ps))
        for kind in (b"", b"p"):
            names = [key[1] for key in self._subs if key[0] == kind]
            for i in range(0, len(names), _SUB_BATCH):
                self._send_subscribe(ps, kind, names[i : i + _SUB_BATCH])
        self._timers.append(self.loop.call_later(self.connect_timeout, self._connect_timeout, cmd))
        try:
            cmd.start(url)
            ps.start(url)
        except OSError as exc:
            # Deferred: _fail from inside start() would re-enter the caller.
            self._timers.append(self.loop.call_later(0, self._fail, f"connect: {exc}", cmd))

    def _handshake_step(self, reply: Any) -> None:
        if isinstance(reply, RedisError):
            self._fail(f"handshake: {reply}")

    def _handshake_done(self, conn: _Conn) -> Callback:
        def done(reply: Any) -> None:
            if isinstance(reply, RedisError):
                self._fail(f"handshake: {reply}")
                return
            if conn is not self._cmd and conn is not self._ps:
                return  # a connection of an earlier attempt
            if conn is self._cmd:
                self._cmd_ready = True
            else:
                self._ps_ready = True
            self._maybe_up()

        return done

    def _maybe_up(self) -> None:
        if not (self._cmd_ready and self._ps_ready):
            return
        if not all(sub.confirmed for sub in self._subs.values()):
            return
        self.state = UP
        self._attempt = 0
        for timer in self._timers:
            timer.cancel()
        self._timers = [self.loop.call_later(self.ping_interval, self._health_check)]
        log.info("redis: link up (%s:%d)", self.url.host, self.url.port)
        if self.on_up is not None:
            self._run(self.on_up)

    def _connect_timeout(self, cmd: _Conn) -> None:
        if self.state == CONNECTING and self._cmd is cmd:
            self._fail(f"connect timeout ({self.connect_timeout:g} s)")

    def _health_check(self) -> None:
        if self.state != UP:
            return
        now = self.loop.time()
        for conn in (self._cmd, self._ps):
            if conn.ping_since is not None and now - conn.ping_since > self.ping_timeout:
                self._fail(f"{conn.name} connection: no PING reply in {self.ping_timeout:g} s")
                return
        for conn in (self._cmd, self._ps):
            if conn.ping_since is None:
                conn.ping_since = now
                conn.queue(encode_command((b"PING",)), self._pong(conn))
        self._timers.append(self.loop.call_later(self.ping_timeout, self._ping_deadline))
        self._timers.append(self.loop.call_later(self.ping_interval, self._health_check))
        del self._timers[:-2]  # the fired ones

    def _ping_deadline(self) -> None:
        if self.state != UP:
            return
        now = self.loop.time()
        for conn in (self._cmd, self._ps):
            if conn.ping_since is not None and now - conn.ping_since >= self.ping_timeout:
                self._fail(f"{conn.name} connection: no PING reply in {self.ping_timeout:g} s")
                return

    def _pong(self, conn: _Conn) -> Callback:
        def pong(reply: Any) -> None:
            conn.ping_since = None
            if isinstance(reply, RedisError):
                self._fail(f"{conn.name} connection: PING: {reply}")

        return pong

    def _fail(self, reason: str, cmd: _Conn | None = None) -> None:
        if self.state not in (UP, CONNECTING) or (cmd is not None and cmd is not self._cmd):
            return
        was_up = self.state == UP
        self.last_error = reason
        log.warning("redis: link down: %s", reason)
        failed = self._teardown()
        delay = min(self.backoff_max, self.backoff_min * 2**self._attempt)
        delay *= self._rng.uniform(0.8, 1.2)
        self._attempt = min(self._attempt + 1, 30)
        self._timers.append(self.loop.call_later(delay, self._reconnect))
        # State is settled before any owner code runs (it may call, or close).
        for callback in failed:
            self._run(callback, RedisError("connection lost"))
        if was_up and self.on_down is not None and self.state != CLOSED:
            self._run(self.on_down, reason)

    def _reconnect(self) -> None:
        if self.state == DOWN:
            self.reconnects += 1
            self._connect()

    def _teardown(self) -> list[Callback]:
        """Close both connections; return the pending callbacks, for the caller to fail."""
        self.state = DOWN
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        conns = [c for c in (self._cmd, self._ps) if c is not None]
        self._cmd = self._ps = None
        for sub in self._subs.values():
            sub.confirmed = False
        for conn in conns:
            conn.close()
        failed = []
        for conn in conns:
            failed.extend(cb for cb in conn.pending if cb is not None)
            conn.pending.clear()
            conn.out.clear()
            conn.out_bytes = 0
        return failed
