"""Soak clients for the version-2 features: sequenced rooms with resumes, and the monitoring port.

Driven with the raw codec (muxserver.protocol) over the tests' blocking
clients, so they check the wire as protocol.md sections 9 and 10 state it,
not as a client library happens to implement it:

* :class:`SeqWriter` emits numbered messages into a sequenced room with an
  ack each, and checks that the REPLY's seq goes up by exactly one.
* :class:`Resumer` is a SEQUENCED member of that room that keeps losing its
  connection (close or reset, never BYE) and coming back: HELLO v2 with its
  resume token (WELCOME must say resumed=1 with its nick), then a SEQUENCED
  JOIN with its epoch and last seq, which must be COMPLETE with
  ``first = after + 1``; every EVENT_SEQ, replayed or live, must be the
  next seq (no hole, no duplicate) carrying the writer's next number. Now
  and then it ends with BYE instead and comes back as a fresh session that
  resumes its position the same way.
* :class:`Scraper` reads /metrics and /healthz every few seconds; the
  server must answer and report no internal error.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import urllib.request

from muxserver import protocol as P

from .harness import Failures, Tally
from .load import Unexpected, drain_to_eof

NUMBER = struct.Struct(">Q")
NAMESPACE = "/seq"  # their own: no other client's broadcast reaches them
EMIT_OK = struct.Struct(">IQ")  # v2 REPLY to a room EMIT: recipients, seq


def next_frame(c, timeout: float):
    """Next frame, answering the server's PINGs."""
    while True:
        frame = c.recv(timeout)
        if isinstance(frame, P.ServerPing):
            c.send(P.Pong(frame.nonce))
            continue
        return frame


class SeqWriter(threading.Thread):
    """Numbered, acked messages into ``room`` at ``rate`` per second until ``stop``."""

    def __init__(self, connect, room: str, rate: float, stop, tally: Tally, failures: Failures):
        super().__init__(name=f"seq-writer-{room}", daemon=True)
        self.connect, self.room, self.period = connect, room, 1.0 / rate
        self.stop, self.tally, self.failures = stop, tally, failures
        self.last_seq = 0
        self.sent = 0
        self.done = threading.Event()

    def run(self) -> None:
        c = None
        try:
            c = self.connect()
            c.hello(f"writer-{self.room}", NAMESPACE, version=2)
            c.send(P.Join(1, self.room))
            reply = next_frame(c, 10)
            if not isinstance(reply, P.Reply) or reply.status != P.OK:
                raise Unexpected(f"JOIN {self.room}: {reply!r}")
            req = 1
            while not self.stop.wait(self.period):
                req += 1
                payload = NUMBER.pack(self.sent)
                c.send(P.Emit(req, P.TARGET_ROOM, self.room, "n", payload))
                reply = next_frame(c, 15)
                if not isinstance(reply, P.Reply) or reply.req != req or reply.status != P.OK:
                    raise Unexpected(f"EMIT #{self.sent} answered {reply!r}")
                _, seq = EMIT_OK.unpack_from(reply.body)
                if self.last_seq and seq != self.last_seq + 1:
                    raise Unexpected(f"REPLY seq {seq} after {self.last_seq}")
                self.last_seq = seq
                self.sent += 1
            c.send(P.Bye())
            drain_to_eof(c, 15)
        except Exception as exc:
            self.failures.add(f"{self.name}: {type(exc).__name__}: {exc}")
        finally:
            if c is not None:
                c.close()
            self.tally.add("sequenced messages sent", self.sent)
            self.done.set()


class Resumer(threading.Thread):
    """A SEQUENCED member of ``room`` that drops its connection and resumes (module docstring)."""

    def __init__(self, name: str, connect, room: str, stop, tally, failures, seed) -> None:
        super().__init__(name=name, daemon=True)
        self.nick, self.connect, self.room = name, connect, room
        self.stop, self.tally, self.failures = stop, tally, failures
        self.rng = random.Random(f"{seed}:{name}")
        self.token = ""  # resume token of the parked session ("" after BYE: start fresh)
        self.epoch = 0
        self.last = 0  # the last seq received
        self.offset = None  # seq - writer's number: constant within the epoch

    def run(self) -> None:
        k = 0
        while not self.stop.is_set():
            try:
                self.cycle(self.rng.uniform(1.0, 4.0), final=False)
            except Exception as exc:
                self.failures.add(f"{self.nick} cycle {k}: {type(exc).__name__}: {exc}")
                self.token = ""  # a broken cycle: start over as a fresh session
            k += 1
            self.stop.wait(self.rng.uniform(0.05, 1.5))  # parked meanwhile

    def cycle(self, spell: float, final: bool, target: int = 0) -> None:
        c = self.connect()
        try:
            resuming = bool(self.token)
            c.send(P.Hello(2, NAMESPACE, self.nick, "", self.token))
            welcome = next_frame(c, 15)
            if not isinstance(welcome, P.Welcome):
                raise Unexpected(f"HELLO answered {welcome!r}")
            if resuming and (welcome.resumed != 1 or welcome.nick != self.nick):
                raise Unexpected(f"resume refused: {welcome!r}")
            if not welcome.resume_token:
                raise Unexpected("WELCOME v2 without a resume token")
            self.token = welcome.resume_token
            self.tally.add("resumes" if resuming else "fresh sessions")
            self.seq_join(c)
            deadline = time.monotonic() + spell
            while time.monotonic() < deadline and not (final and self.last >= target):
                try:
                    frame = next_frame(c, max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    break
                self.take(frame)
            if final:
                if self.last < target:
                    raise Unexpected(f"caught up to seq {self.last} only, writer's last is {target}")
                self.bye(c)
                return
            how = self.rng.choices(("close", "reset", "bye"), (5, 4, 1))[0]
            self.tally.add(f"resumer left by {how}")
            if how == "bye":
                self.bye(c)
            elif how == "reset":
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            c.close()

    def bye(self, c, timeout: float = 15.0) -> None:
        """BYE, then read to end of stream: what was queued before it still comes (section 2),
        and is checked like the rest."""
        c.send(P.Bye())
        self.token = ""
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = next_frame(c, max(0.01, deadline - time.monotonic()))
            except EOFError:
                return
            self.take(frame)

    def seq_join(self, c) -> None:
        if self.epoch:
            msg = P.Join(1, self.room, P.JOIN_SEQUENCED, self.epoch, self.last, P.REPLAY_ALL)
        else:
            msg = P.Join(1, self.room, P.JOIN_SEQUENCED, 0, 0, 0)
        c.send(msg)
        reply = next_frame(c, 15)  # nothing of the room may come before it (section 10)
        if not isinstance(reply, P.Reply) or reply.status != P.OK:
            raise Unexpected(f"SEQUENCED JOIN answered {reply!r}")
        recovery, epoch, first, last = P.parse_join_reply(reply.body)
        if not self.epoch:
            if recovery != P.FRESH or first != last + 1:
                raise Unexpected(f"fresh JOIN: recovery {recovery}, first {first}, last {last}")
            self.epoch, self.last = epoch, last
            return
        if recovery != P.COMPLETE or epoch != self.epoch or first != self.last + 1:
            raise Unexpected(
                f"resume after seq {self.last}: {P.RECOVERY_NAMES.get(recovery)} epoch "
                f"{epoch:#x} (ours {self.epoch:#x}) first {first} last {last}"
            )
        self.tally.add("replayed on resume", max(0, last - first + 1))

    def take(self, frame) -> None:
        if isinstance(frame, P.EventSeq):
            if frame.seq != self.last + 1:
                what = "hole" if frame.seq > self.last + 1 else "duplicate"
                raise Unexpected(f"EVENT_SEQ {frame.seq} after {self.last} ({what})")
            (number,) = NUMBER.unpack_from(frame.payload)
            if self.offset is None:
                self.offset = frame.seq - number
            elif frame.seq - number != self.offset:
                raise Unexpected(f"seq {frame.seq} carries the writer's #{number}")
            self.last = frame.seq
            self.tally.add("sequenced deliveries checked")
        elif isinstance(frame, P.Gap):
            raise Unexpected(f"GAP {frame!r} (the history bounds hold far more than a park)")
        elif not isinstance(frame, P.Presence):
            raise Unexpected(f"got {frame!r}")


class Scraper(threading.Thread):
    """GET /metrics and /healthz every ``period`` seconds; both must answer, 0 internal errors."""

    def __init__(self, port: int, period: float, stop, tally, failures, label: str) -> None:
        super().__init__(name=f"scraper-{label}", daemon=True)
        self.base = f"http://127.0.0.1:{port}"
        self.period, self.stop, self.tally, self.failures = period, stop, tally, failures
        self.label = label

    def run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                self.scrape()
            except Exception as exc:
                self.failures.add(f"{self.label} monitoring port: {type(exc).__name__}: {exc}")

    def scrape(self) -> None:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = value
        if values.get("muxserver_up") != "1":
            raise Unexpected("muxserver_up is not 1")
        if float(values.get("muxserver_internal_errors_total", "nan")) != 0:
            raise Unexpected(f"internal errors: {values.get('muxserver_internal_errors_total')}")
        with urllib.request.urlopen(self.base + "/healthz", timeout=10) as r:
            if r.status != 200:
                raise Unexpected(f"/healthz answered {r.status}")
        self.tally.add(f"{self.label} scrapes")
