"""asyncio client for muxserver: the blocking client's API, with ``async`` methods.

asyncio programs (bots, bridges, web backends) should neither block their
loop on a socket nor wrap the blocking client in threads. Everything that is
not I/O -- request ids, frames, reply parsing, error classes, the backoff
policy, the TLS context -- comes from :mod:`muxserver.clientcore` (the
public names are imported from :mod:`muxserver.client`, as for the blocking
client); this module only moves bytes with asyncio streams.

One background task per client owns the reading side. It routes each REPLY
to the future of the request waiting for it, answers server PINGs at once
(so, unlike the blocking client, heartbeats work while the program is busy
elsewhere), queues events for ``recv`` / ``async for`` / ``run_forever``,
and, with ``reconnect=True``, reconnects with backoff and re-joins rooms.
Requests may be made from many tasks at once: each frame is one
``writer.write``, so frames never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import time
from collections.abc import Callable
from typing import Any

from . import protocol as P
from .clientcore import (
    _UNSET,
    CLOSE_LINGER,
    RECV_SIZE,
    Ack,
    ConnectionClosed,
    Event,
    Listing,
    MuxError,
    NotConnected,
    Presence,
    Recovery,
    _Call,
    _Core,
    _why,
)

__all__ = ["AsyncClient", "connect"]

_END = object()  # queue sentinel: no more items; raise ``_final``


class AsyncClient(_Core):
    """An asyncio muxserver client: ``async with AsyncClient(...) as c:``.

    ``AsyncClient(...)`` takes the arguments of :meth:`connect` and does not
    connect yet; ``async with`` (or ``await client.open()``) connects, and
    leaving the block closes. ``await AsyncClient.connect(...)`` does both
    steps at once for programs that manage the lifetime themselves.
    """

    def __init__(self, *args, **kwargs) -> None:
        # Same arguments as connect() (documented there), kept in one place:
        # _Core.__init__.
        super().__init__(*args, **kwargs)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pings: dict[int, asyncio.Future] = {}
        self._task: asyncio.Task | None = None
        self._rejoin_task: asyncio.Task | None = None
        self._final: BaseException | None = None
        self._opened = False

    @classmethod
    async def connect(cls, *args, **kwargs) -> AsyncClient:
        """Connect and complete HELLO/WELCOME: ``await AsyncClient(*args, **kwargs).open()``.

        Arguments and errors as for ``Client.connect`` (the one list is
        ``_Core.__init__``). No ``heartbeat``: the reader task answers server
        PINGs all along.
        """
        client = cls(*args, **kwargs)
        return await client.open()

    async def open(self) -> AsyncClient:
        """Connect and complete HELLO/WELCOME, then call the ``on("connect")`` handlers."""
        if self._opened:
            raise RuntimeError("this client has been opened already")
        self._opened = True
        await self._open()
        self._up = True
        self._task = asyncio.create_task(self._supervise())
        await self._fire(self._connect_handlers)
        return self

    @property
    def connected(self) -> bool:
        return self._up

    async def __aenter__(self) -> AsyncClient:
        if not self._opened:
            await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncClient:
        return self

    async def __anext__(self) -> Event | Presence | Ack:
        try:
            return await self.recv()
        except NotConnected:
            if self._closed:
                raise StopAsyncIteration from None
            raise

    # ---------------------------------------------------------- requests
    async def join(
        self, room: str, presence: bool = False, *, sequenced: bool | None = None,
        history: int = 0,
    ) -> Recovery | None:  # fmt: skip
        """As ``Client.join``: sequenced by default (version 2); returns the Recovery."""
        return await self._request(self._join_call(room, presence, sequenced, history))

    async def leave(self, room: str) -> None:
        await self._request(self._leave_call(room))

    async def set_nick(self, nick: str) -> None:
        await self._request(self._nick_call(nick))

    async def emit(
        self,
        event: str,
        data: Any = b"",
        room: str | None = None,
        *,
        nick: str | None = None,
        broadcast: bool = False,
        echo: bool = False,
        ack: bool = False,
        wait: bool = True,
        to: Any = _UNSET,
    ) -> int | None:
        """As ``Client.emit``: with ``ack`` returns the recipient count.

        With ``ack=True, wait=False`` returns the request id once written; the
        answer is an :class:`Ack` (or the error, ``.req`` set) from ``recv``,
        ``async for`` and the ``on_ack`` (``on_error``) handlers.
        """
        call = self._emit_call(event, data, room, nick, broadcast, echo, ack, to)
        if not ack or wait:
            return await self._request(call)
        self._ensure()
        self._ack_sent(call.req)
        try:
            await self._send(call.frame, call.req)
        except BaseException:
            self._acks.pop(call.req, None)
            raise
        return call.req

    async def who(self, room: str) -> Listing:
        return await self._request(self._who_call(room))

    async def rooms(self, all: bool = False) -> Listing:
        return await self._request(self._rooms_call(all))

    async def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        self._ensure()
        nonce, frame = self._ping_frame()
        fut = self._pings[nonce] = asyncio.get_running_loop().create_future()
        start = time.monotonic()
        await self._send(frame, None)
        await self._wait(fut, lambda: self._pings.pop(nonce, None), "PONG")
        return time.monotonic() - start

    async def close(self) -> None:
        """Say BYE, wait briefly for the server to finish, close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, writer = self._task, self._writer
        if writer is not None and self._up:
            try:
                writer.write(P.encode(P.Bye()))
                await asyncio.wait_for(writer.drain(), CLOSE_LINGER)
                # The reader task ends at the server's FIN; waiting for it
                # means we never close with unread input (which resets).
                if task is not None:
                    await asyncio.wait_for(asyncio.shield(task), CLOSE_LINGER)
            except (OSError, asyncio.TimeoutError):
                pass
        for t in (task, self._rejoin_task):
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        self._drop(NotConnected("the client is closed"))
        if self._final is None:
            self._queue.put_nowait(_END)
        self._final = NotConnected("the client is closed")  # iteration ends, not raises
        if writer is not None:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # --------------------------------------------------------- receiving
    async def recv(self, timeout: float | None = None) -> Event | Presence | Ack | Recovery | None:
        """The next Event, Presence, Ack or Recovery; None if ``timeout`` seconds pass first.

        As ``Client.recv``: a sequenced Event counts as handled once returned,
        duplicates are dropped, and the Recovery a ``join()`` returned is not
        handed out again. Raises an error that arrived for an EMIT sent
        without ack or without waiting, and ConnectionClosed when the
        connection has ended for good.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            raw = await self._next(left)
            if raw is None:
                return None
            item = self._for_recv(raw)
            if item is not None:
                return item

    async def poll(self, timeout: float | None = 0.0) -> int:
        """Dispatch what has arrived to the handlers, waiting up to ``timeout`` for the first."""
        await asyncio.sleep(0)  # let the reader task queue what is readable
        count = 0
        item = await self._next(timeout)
        while item is not None:
            count += await self._dispatch(item)
            if self._closed:
                break
            item = await self._next(0)
        return count

    async def run_forever(self) -> None:
        """Dispatch to the handlers (plain or ``async def``) until :meth:`close`."""
        while not self._closed:
            try:
                item = await self._next(None)
            except NotConnected:
                if self._closed:
                    return
                raise
            await self._dispatch(item)

    async def _next(self, timeout: float | None) -> Any:
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout is not None and timeout <= 0:
                return None
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                return None
        if item is _END:
            self._queue.put_nowait(_END)  # every later call ends too
            exc = self._final
            if not isinstance(exc, NotConnected):
                self._final = NotConnected(f"not connected ({exc}); not reconnecting")
            raise exc
        return item

    async def _dispatch(self, raw: Any) -> bool:
        """Hand ``raw`` to its handlers; False for a duplicate, dropped instead."""
        item = self._seq.take(raw)
        if item is None:  # a duplicate of a sequenced message handled already
            return False
        for fn in self._handlers_for(item):
            result = fn(item)
            if inspect.isawaitable(result):
                await result
        self._seq.done(item)  # only now: a handler that raised leaves the position
        return True

    # ------------------------------------------------------------ guts
    async def _open(self) -> None:
        try:
            tls = {} if self._tls is None else {"ssl": self._tls, "server_hostname": self.host}
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, **tls), self.timeout
            )
        except asyncio.TimeoutError:
            raise TimeoutError(f"connecting to {self.host}:{self.port} timed out") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fresh_session()
        self._reader, self._writer = reader, writer
        try:
            writer.write(self._hello_frame())
            await asyncio.wait_for(self._handshake(), self.timeout)
        except asyncio.TimeoutError:
            self._drop(NotConnected("no WELCOME"))
            raise TimeoutError(f"no WELCOME within {self.timeout:g} s") from None
        except BaseException as exc:
            self._drop(exc if isinstance(exc, MuxError) else NotConnected("handshake failed"))
            raise
        self._accept_welcome()

    async def _handshake(self) -> None:
        while self._welcome is None:
            exc = await self._read_once()
            if exc is not None:
                raise exc

    async def _read_once(self) -> MuxError | None:
        """Read and handle one chunk; returns the error that ended the connection, if any."""
        try:
            data = await self._reader.read(RECV_SIZE)
        except OSError as exc:
            return ConnectionClosed(None, f"connection lost: {_why(exc)}")
        if not data:
            return ConnectionClosed(None, "the server closed the connection")
        msgs, bad = self._parse(data)
        try:
            for msg in msgs:
                self._incoming(msg)
        except MuxError as exc:
            return exc
        return bad

    async def _supervise(self) -> None:
        """The reader task: read until the connection ends, then reconnect or finish."""
        try:
            while True:
                exc = None
                while exc is None:
                    exc = await self._read_once()
                was_up = self._up
                self._drop(exc)
                if self._closed:
                    return
                self._down = exc
                if was_up:
                    await self._fire(self._disconnect_handlers, exc)
                if not await self._reconnect_loop():
                    self._end(self._down)
                    return
                self._rejoin_task = asyncio.create_task(self._rejoin())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must surface in recv, not vanish with the task
            self._drop(NotConnected("client failed"))
            self._end(exc)

    async def _reconnect_loop(self) -> bool:
        while self._can_retry(self._down):
            delay = self._next_delay()
            if delay is None:
                return False
            await asyncio.sleep(delay)
            if self._closed:
                return False
            try:
                await self._open()
                return True
            except MuxError as exc:
                self._down = exc
            except OSError as exc:
                why = f"reconnect to {self.host}:{self.port} failed: {_why(exc)}"
                self._down = ConnectionClosed(None, why)
        return False

    async def _rejoin(self) -> None:
        """Re-join every room (sequenced ones from their positions, pipelined), then report."""
        calls = [(room, self._rejoin_call(room, flag)) for room, flag in self._joined.items()]
        loop = asyncio.get_running_loop()
        futs = {call.req: loop.create_future() for _, call in calls}
        self._pending.update(futs)
        if calls:
            self._writer.write(b"".join(call.frame for _, call in calls))
        for room, call in calls:
            try:
                reply = await self._wait(futs[call.req], lambda: None, "REPLY")
            except ConnectionClosed:
                return  # lost again: the reader task starts over
            except TimeoutError:
                self._writer.close()  # a server that does not answer: cut and retry
                return
            try:
                self._finish(call, reply)
            except MuxError as exc:
                self._rejoin_refused(room)
                self._deliver(exc)
        self._up = True
        self._attempt = 0
        await self._fire([*self._reconnect_handlers, *self._connect_handlers])

    async def _fire(self, handlers: list[Callable], *args: Any) -> None:
        for fn in list(handlers):
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # reported like any callback error; keeps us reconnecting
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"muxserver.aio: exception in {fn!r}", "exception": exc}
                )

    def _drop(self, exc: BaseException) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        self._up = False
        waiting = [*self._pending.values(), *self._pings.values()]
        self._pending.clear()
        self._pings.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)
        if writer is not None:
            writer.close()

    def _end(self, exc: BaseException) -> None:
        if self._final is None:
            self._final = exc
            self._queue.put_nowait(_END)

    def _ensure(self) -> None:
        if self._up and self._writer is not None:
            return
        if self._closed:
            raise NotConnected("the client is closed")
        if self._final is not None or not self._can_retry(self._down):
            raise NotConnected(f"not connected ({self._down}); not reconnecting")
        raise NotConnected(f"not connected ({self._down}); reconnecting")

    async def _request(self, call: _Call) -> Any:
        self._ensure()
        fut = None
        if call.req:
            fut = self._pending[call.req] = asyncio.get_running_loop().create_future()
        await self._send(call.frame, call.req)
        if fut is None:
            return None

        def abandon() -> None:
            self._pending.pop(call.req, None)
            self._abandoned.add(call.req)

        return self._finish(call, await self._wait(fut, abandon, "reply"))

    async def _send(self, frame: bytes, req: int | None) -> None:
        writer = self._writer
        writer.write(frame)
        try:
            await writer.drain()
        except OSError as exc:
            self._pending.pop(req, None)
            raise ConnectionClosed(None, f"connection lost: {_why(exc)}") from None

    async def _wait(self, fut: asyncio.Future, abandon: Callable[[], Any], what: str) -> Any:
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            abandon()
            raise TimeoutError(f"no {what} within {self.timeout:g} s") from None

    # I/O hooks for _Core.
    def _deliver(self, item: Event | Presence | Ack | Recovery | MuxError) -> None:
        self._queue.put_nowait(item)

    def _on_reply(self, reply: P.Reply) -> None:
        fut = self._pending.pop(reply.req)
        if not fut.done():
            fut.set_result(reply)

    def _on_pong(self, nonce: int) -> None:
        fut = self._pings.pop(nonce, None)
        if fut is not None and not fut.done():
            fut.set_result(nonce)

    def _write(self, frame: bytes) -> None:
        if self._writer is not None:
            self._writer.write(frame)


connect = AsyncClient.connect
