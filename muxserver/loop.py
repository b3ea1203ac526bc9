"""A small single-threaded event loop over ``selectors``.

Why not asyncio: the server's hot path is "read, decode, append one shared
bytes object to N queues, flush once per turn". asyncio's transports and
futures add a layer of objects and calls per message that this design does
not need, and a hand-written loop keeps every step visible (Redis's ``ae.c``
is the model).

What it offers:

* fd callbacks: ``register(fileobj, events, callback)``; the callback gets the
  ready mask. ``modify`` changes interest (rarely: only when a socket's
  kernel buffer fills or drains, never per message). On Linux the loop
  drives ``select.epoll`` itself with a list of callbacks indexed by fd
  (the kernel hands out the lowest free fd, so the list stays dense): a
  ``selectors`` key (a SelectorKey tuple, its own fd int and dict slot) was
  about 180 bytes per idle connection, a list slot is 8, and ``select()``
  builds a list of (key, mask) pairs that the loop then walks a second time. Error and hang-up
  are reported as READ | WRITE, as ``selectors`` does. Elsewhere the
  ``selectors`` module does the same job.
* timers on a heap, with the clock injectable so tests can run heartbeat and
  timeout logic on fake time in milliseconds.
* a wake-up fd for signals (``signal.set_wakeup_fd``): a signal makes
  ``select`` return at once, and the signal numbers are read from the fd and
  handed to the registered handler *inside* the loop, never in the middle of
  a half-finished flush.
* before-sleep hooks, run right before each ``select``: this is where the
  server flushes all connections that have pending output, one send each.
* a histogram of turn busy times (select return to the next select: fd
  callbacks, timers, then the flush hooks) for the monitoring port: one
  clock read and one ``bisect`` per turn into preallocated counters.
"""

from __future__ import annotations

import heapq
import itertools
import select
import selectors
import signal
import socket
import time
from bisect import bisect_left
from collections.abc import Callable

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

_EPOLL = getattr(select, "epoll", None)
if _EPOLL is not None:
    _EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
    _EPOLL_TROUBLE = select.EPOLLERR | select.EPOLLHUP
    # EVENT_* mask -> epoll mask, indexed by the mask.
    _TO_EPOLL = (0, _EPOLLIN, _EPOLLOUT, _EPOLLIN | _EPOLLOUT)

# Upper bounds (seconds) of the turn-duration histogram buckets; the counter
# list has one more slot for "longer than the last bound".
TURN_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


class Timer:
    """Handle of a scheduled call; ``cancel()`` makes it a no-op."""

    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable, args: tuple) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        # The heap keeps the Timer until its time comes; drop what it points
        # at now, or a closed connection lives on for its whole drain timeout.
        self.cancelled = True
        self.callback = _noop_callback
        self.args = ()


class EventLoop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._epoll = _EPOLL() if _EPOLL is not None else None
        self._callbacks: list = []  # callback by fd, None where unwatched (epoll only)
        self._watched = 0
        self.selector = selectors.DefaultSelector() if self._epoll is None else None
        # Cached time of the current turn: handlers read ``loop.now`` instead
        # of calling the clock once per frame.
        self.now = clock()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._before_sleep: list[Callable[[], None]] = []
        self._running = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._signal_handler: Callable[[int], None] | None = None
        self._old_wakeup_fd: int | None = None
        # Turn busy-time histogram (see TURN_BUCKETS), read by stats.py.
        self.turn_counts = [0] * (len(TURN_BUCKETS) + 1)
        self.turn_seconds = 0.0
        self._turn_start: float | None = None

    # ------------------------------------------------------------- fds
    def register(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        if self._epoll is None:
            self.selector.register(fileobj, events, callback)
            return
        fd = fileobj if type(fileobj) is int else fileobj.fileno()
        self._epoll.register(fd, _TO_EPOLL[events])
        callbacks = self._callbacks
        if fd >= len(callbacks):
            callbacks.extend([None] * (fd + 1 - len(callbacks)))
        if callbacks[fd] is None:  # else: an fd closed without unregister, now reused
            self._watched += 1
        callbacks[fd] = callback

    def modify(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        if self._epoll is None:
            self.selector.modify(fileobj, events, callback)
            return
        fd = fileobj if type(fileobj) is int else fileobj.fileno()
        self._epoll.modify(fd, _TO_EPOLL[events])
        self._callbacks[fd] = callback

    def unregister(self, fileobj) -> None:
        if self._epoll is None:
            try:
                self.selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass
            return
        try:
            fd = fileobj if type(fileobj) is int else fileobj.fileno()
        except (OSError, ValueError):
            return
        callbacks = self._callbacks
        if 0 <= fd < len(callbacks) and callbacks[fd] is not None:
            callbacks[fd] = None
            self._watched -= 1
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it

    @property
    def watched(self) -> int:
        """File descriptors registered."""
        if self._epoll is None:
            return len(self.selector.get_map())
        return self._watched

    # ---------------------------------------------------------- timers
    def time(self) -> float:
        return self.clock()

    def call_later(self, delay: float, callback: Callable, *args) -> Timer:
        return self.call_at(self.clock() + delay, callback, *args)

    def call_at(self, when: float, callback: Callable, *args) -> Timer:
        timer = Timer(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def run_timers(self) -> int:
        """Run every timer that is due on the clock; returns how many ran."""
        now = self.now = self.clock()
        timers = self._timers
        ran = 0
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True  # a timer fires once
                timer.callback(*timer.args)
                ran += 1
        return ran

    def next_timeout(self, now: float | None = None) -> float | None:
        """Seconds until the next live timer, or None when there is none.

        ``now``: the clock, when the caller has just read it.
        """
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if not timers:
            return None
        return max(0.0, timers[0][0] - (self.clock() if now is None else now))

    # ---------------------------------------------------------- hooks
    def add_before_sleep(self, hook: Callable[[], None]) -> None:
        self._before_sleep.append(hook)

    # --------------------------------------------------------- signals
    def handle_signals(self, signums, handler: Callable[[int], None]) -> None:
        """Route ``signums`` to ``handler(signum)``, called from inside the loop."""
        if self._wake_r is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno())
            self.register(self._wake_r, EVENT_READ, self._on_wakeup)
        self._signal_handler = handler
        for signum in signums:
            # The Python-level handler does nothing: the C handler has already
            # written the signal number to the wake-up fd, which we read below.
            signal.signal(signum, _noop_signal)

    def _on_wakeup(self, _mask: int) -> None:
        try:
            data = self._wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        if self._signal_handler is not None:
            for signum in data:
                self._signal_handler(signum)

    # ------------------------------------------------------------- run
    def run_once(self, timeout: float | None = None) -> None:
        """One turn: before-sleep hooks, select, fd callbacks, due timers."""
        for hook in self._before_sleep:
            hook()
        # One clock read serves the turn histogram and the timeout, and
        # run_timers() is called only when a timer is due: at one message per
        # turn the calls were a tenth of the loop's share (bench.callgrind --rooms).
        now = self.clock()
        if self._turn_start is not None:
            busy = now - self._turn_start
            self.turn_counts[bisect_left(TURN_BUCKETS, busy)] += 1
            self.turn_seconds += busy
        wait = self.next_timeout(now)
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        if self._epoll is not None:
            callbacks = self._callbacks
            # poll() rounds the timeout up to whole milliseconds itself.
            ready = self._epoll.poll(-1 if wait is None else wait, self._watched or 1)
            self.now = self._turn_start = self.clock()
            for fd, ev in ready:
                callback = callbacks[fd]  # None if closed earlier this turn
                if callback is not None:
                    if ev & _EPOLL_TROUBLE:
                        callback(EVENT_READ | EVENT_WRITE)
                    else:
                        callback((ev & _EPOLLIN) | (ev & _EPOLLOUT) >> 1)
        else:
            events = self.selector.select(wait)
            self.now = self._turn_start = self.clock()
            for key, mask in events:
                key.data(mask)
        timers = self._timers
        if timers and timers[0][0] <= self.clock():
            self.run_timers()

    def run(self) -> None:
        self._running = True
        self._turn_start = None  # time spent stopped is not a turn
        while self._running:
            self.run_once()
        # Whatever the last turn queued still goes out.
        for hook in self._before_sleep:
            hook()

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        if self._wake_r is not None:
            self.unregister(self._wake_r)
            if self._old_wakeup_fd is not None:
                try:
                    signal.set_wakeup_fd(self._old_wakeup_fd)
                except ValueError:
                    pass
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r = self._wake_w = None
        if self._epoll is not None:
            self._epoll.close()
            self._callbacks.clear()
            self._watched = 0
        else:
            self.selector.close()


def _noop_signal(signum, frame) -> None:
    pass


def _noop_callback(*args) -> None:
    pass
