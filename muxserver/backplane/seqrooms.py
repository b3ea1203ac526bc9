"""Sequenced rooms across the cluster (protocol sections 9 and 12): one numbering, history in Redis.

Mixed into :class:`~muxserver.backplane.cluster.Backplane`. With history on
(``--history-size`` > 0) every room's runs go through ``scripts.ROOM_RUN``
instead of a bare PUBLISH: one script call per run of EMITs takes the run's
range of seqs, keeps each message in the room's stream and publishes the run.

Decisions worth knowing:

* **One source of order.** Every node, the sender's included, delivers a
  room's EVENT_SEQs from the room's channel, which carries the runs in the
  order the script ran them, i.e. in seq order. The sender's node gives its
  plain members their EVENTs at once (as for any room), and on receiving its
  own run back gives them nothing more; other nodes give plain members the
  run's ready bytes and build one EVENT_SEQ per message (a 13-byte head on the
  EVENT body) only when they have SEQUENCED members.
* **Acked EMITs wait for the script.** Their REPLY carries the cluster seq,
  so the session protocol leaves acked EMITs out of its fast runs in a
  cluster (``SessionProtocol._acks_wait``), and the slow path hands the ack
  to the run (``emitted``); the REPLY is queued from the script's answer.
  The session is not blocked: later frames are handled meanwhile, and every
  later run goes to Redis behind this one on the same connection, so
  per-sender order holds. A REPLY that needs no Redis (PONG, an error) can
  overtake it; requests are matched by ``req``.
* **No hole goes unannounced.** Each node tracks, per room, the last seq it
  delivered (``RoomSeq.last``). A run whose first seq is further on (Redis
  cut the subscriber, the link reconnected) is held, with every run after
  it, while ``scripts.room_range`` reads the hole from the stream; what the
  stream no longer holds is a GAP frame to the SEQUENCED members. On every
  reconnect each room reads what it missed the same way.
* **SEQUENCED JOIN**: the session is blocked; once Redis has confirmed the
  room's subscription and the member, ``scripts.room_join`` answers the
  recovery plan and the replay in one atomic read (``first..last``). The
  REPLY and the replay are queued at once; the member then takes live runs
  from ``last + 1`` on (its value in ``Room.seq``), so a run in flight on the
  subscription that the replay already held is not sent twice. If this node
  had already delivered past ``last``, those messages are read for it too
  before it turns live. A replay is bounded by the history size (in Redis,
  ``--history-size`` messages; ``--history-bytes`` and ``--history-memory``
  are per-node bounds and do not apply to the Redis history).
* **Outage**: a sequenced room's EMIT reaches this node's plain members only
  and is answered UNAVAILABLE; it gets no seq, so SEQUENCED members anywhere
  see no hole for it. A SEQUENCED JOIN while the link is down is answered
  UNAVAILABLE and changes nothing.
* **History TTL**: the room's keys expire ``--history-ttl`` seconds after its
  last message or SEQUENCED JOIN (one node ages each message; Redis ages the
  room). A Redis restart without persistence loses the history: the next run
  starts a new epoch, which nodes take as the new numbering.
"""

from __future__ import annotations

import logging
import math

from muxserver import protocol as P
from muxserver.backplane import scripts as S
from muxserver.backplane.redis import RedisError
from muxserver.hub import Room

log = logging.getLogger("muxserver.backplane")

_OPEN = 1  # session.OPEN


class RoomSeq:
    """This node's position in one room's cluster numbering."""

    __slots__ = ("epoch", "last", "low", "filling", "buffer")

    def __init__(self) -> None:
        self.epoch = 0  # 0: the room had no history when this node looked
        self.last: int | None = None  # last seq delivered here; None: not known yet
        # Set by the baseline read: runs up to this seq may still arrive (they
        # were published between our SUBSCRIBE and that read): not duplicates.
        self.low: int | None = None
        self.filling = False  # a range read is filling a hole: runs wait in buffer
        self.buffer: list[tuple] = []


class Run:
    """A run sent to ROOM_RUN, and the acked EMITs waiting for its seqs."""

    __slots__ = ("acks", "refused")

    def __init__(self) -> None:
        self.acks: list[tuple] = []  # (session, req, recipients, index in the run)
        self.refused = False


def seq_frames(first: int, frames: list[bytes]) -> list[bytes]:
    """EVENT_SEQ frames ``first, first+1, ...`` of EVENT frames (the same body behind a seq)."""
    pack = P.SEQ_HEAD.pack
    extra, kind = P.EVENT_SEQ_EXTRA, P.EVENT_SEQ
    return [pack(len(f) - 4 + extra, kind, seq) + f[5:] for seq, f in enumerate(frames, first)]


def legacy_of(frame: bytes) -> bytes | None:
    """The version-1 form of a version-2 EVENT frame (payload type bits cleared), or None."""
    kind = frame[5]
    if not kind & ~0x03:
        return None
    return frame[:5] + bytes((kind & 0x03,)) + frame[6:]


def parse_who(who: bytes) -> tuple[bytes, int, int]:
    """``(origin node, conn, echo)`` of a stream entry's "o" field."""
    n = who[0]
    conn, echo = S.WHO.unpack_from(who, 1 + n)
    return who[1 : 1 + n], conn, echo


class SeqRooms:
    """The sequenced half of the Backplane (which provides link, router, protocol...)."""

    def _seq_init(self) -> None:
        history = self.protocol.history
        self.seq_on = history.enabled
        self.hist_size = history.size
        self.hist_ttl = int(math.ceil(history.ttl))
        self._cs: dict[Room, RoomSeq] = {}
        self._last_run: Run | None = None
        # The session protocol keeps acked room EMITs out of its fast runs:
        # their REPLY waits for the cluster seq.
        self.protocol._acks_wait = self.seq_on
        self.seq_runs = 0  # runs this node sequenced through ROOM_RUN
        self.seq_fills = 0  # range reads that filled a hole (or a reconnect's catch-up)
        self.seq_filled = 0  # messages those reads delivered
        self.seq_gaps = 0  # GAP frames sent for messages the stream no longer held

    # ======================================================== sending side
    def _publish_run(self, sender, room: Room, channel: bytes, data, legacy, messages, echo):
        """One ROOM_RUN call for a run; the Run (acks wait on it), or None if refused."""
        run = Run()

        def done(reply) -> None:
            if run.refused:
                return  # counted and answered by emitted()
            for sess, req, count, index in run.acks:
                if sess.state != _OPEN:
                    continue
                if isinstance(reply, RedisError):
                    self._unavailable(sess, req, f"cluster link: {reply}")
                elif sess.version >= 2:
                    self._reply(sess, P.reply_count_seq(req, count, reply[1] + index))
                else:
                    self._reply(sess, P.reply_count(req, count))

        ok = S.room_run(self.link, channel[:-3], self.origin8, data, messages, legacy, sender.id,
                        bool(echo), maxlen=self.hist_size, ttl=self.hist_ttl, callback=done)  # fmt: skip
        if not ok:
            run.refused = True
            return None
        self.seq_runs += 1
        self.published += 1
        self.published_bytes += len(data) + len(legacy or b"")
        return run

    # ====================================================== receiving side
    def _on_seq_run(self, room: Room, data: bytes, at: int, origin: bytes) -> None:
        first, epoch, conn, echo, messages, body, legacy = S.parse_run(data, at)
        st = self._cs.get(room)
        if st is None:
            st = self._cs[room] = RoomSeq()
        run = (first, epoch, origin, conn, echo, messages, body, legacy)
        if st.filling:
            st.buffer.append(run)
            return
        self._seq_step(room, st, run)

    def _seq_step(self, room: Room, st: RoomSeq, run: tuple) -> None:
        first, epoch, origin, conn, echo, messages, body, legacy = run
        end = first + messages - 1
        if st.low is not None:
            if first <= st.low and epoch == st.epoch:
                self._deliver(room, first, origin, conn, echo, messages, body, legacy)
                st.last = max(st.last, end)
                if end >= st.low:
                    st.low = None
                return
            st.low = None
        if st.epoch == 0 and st.last == 0:
            st.epoch = epoch  # the room's first history, numbered from 1 as we knew
        if st.last is None or epoch != st.epoch:
            # The first run seen here, or the history restarted (a new epoch):
            # the numbering starts from this run.
            st.epoch = epoch
            st.last = first - 1
        elif first > st.last + 1:
            st.buffer.append(run)
            self._fill(room, st, first - 1)
            return
        if end <= st.last:
            return  # a fill delivered it already
        skip = st.last + 1 - first
        if skip > 0:
            body = b"".join(S.split_frames(body)[skip:])
            legacy = b"".join(S.split_frames(legacy)[skip:]) if legacy else None
            first, messages = first + skip, messages - skip
        self._deliver(room, first, origin, conn, echo, messages, body, legacy)
        st.last = end

    def _deliver(self, room, first, origin, conn, echo, messages, body, legacy) -> None:
        own = origin == self.node
        seqframes = seq_frames(first, S.split_frames(body)) if room.seq else None
        skip = self.server.sessions.get(conn) if own and not echo else None
        # Our own run: the plain members had it when it was sent.
        self.router.remote_seq(room, None if own else body, legacy, messages, seqframes, first,
                               skip)  # fmt: skip

    def _fill(self, room: Room, st: RoomSeq, upto: int | None) -> None:
        """Read ``st.last + 1 .. upto`` (None: all the stream holds) and deliver it, then the buffer."""
        st.filling = True
        after = st.last
        count = upto - after if upto is not None else 0  # (0: all it holds)
        self.seq_fills += 1
        ns_name = room.key[0]

        def done(reply) -> None:
            if self._cs.get(room) is not st:
                return  # the room left this node meanwhile
            st.filling = False
            end = upto
            if not isinstance(reply, RedisError) and reply[0] == st.epoch:
                _epoch, last, entries = reply
                if end is None:
                    end = last
                nxt = after + 1
                for seq, frame, who in entries:
                    if seq > end:
                        break
                    if seq < nxt:
                        continue
                    if seq > nxt:
                        self._gap(room, nxt, seq - 1)
                    origin, conn, echo = parse_who(who)
                    self._deliver(room, seq, origin, conn, echo, 1, frame, legacy_of(frame))
                    self.seq_filled += 1
                    nxt = seq + 1
                if nxt <= end:
                    self._gap(room, nxt, end)
            elif end is not None:
                self._gap(room, after + 1, end)  # the link failed, or the history restarted
            if end is not None and end > st.last:
                st.last = end
            buffer, st.buffer = st.buffer, []
            for run in buffer:
                if st.filling:
                    st.buffer.append(run)
                else:
                    self._seq_step(room, st, run)

        base = S.room_base(ns_name, room.name)
        S.room_range(self.link, base, after, count, callback=self._guarded_loop(done))

    def _guarded_loop(self, fn):
        """A Redis callback that is no session's: a bug is logged, the loop goes on."""

        def call(reply) -> None:
            try:
                fn(reply)
            except Exception:
                self.server.stats["internal_errors"] += 1
                log.exception("cluster: internal error while filling a room's hole")

        return call

    def _gap(self, room: Room, first: int, last: int) -> None:
        """Tell the room's live SEQUENCED members that ``first..last`` are gone."""
        name = room.name.encode()
        for member, start in room.seq.items():
            a = first if start is None or start <= first else start
            if a <= last:
                self.router.reply(member, P.gap_frame(name, a, last))
                self.seq_gaps += 1

    def _seq_baseline(self, room: Room, base: bytes) -> None:
        """The room's channel was just confirmed here: read where its numbering stands.

        Runs that arrive before the answer set the position themselves; from
        the answer on, a jump is seen even in the first runs (and a reconnect
        knows where to read from).
        """
        st = self._cs.get(room)
        if st is None:
            st = self._cs[room] = RoomSeq()
        elif st.last is not None:
            return

        def done(reply) -> None:
            if self._cs.get(room) is not st or st.last is not None or not isinstance(reply, list):
                return
            epoch, last = reply
            st.epoch = int.from_bytes(epoch, "big") if epoch else 0
            st.last = st.low = int(last) if epoch and last else 0

        self.link.call(
            b"HMGET", base + b":meta", b"epoch", b"seq", callback=self._guarded_loop(done)
        )

    def _catch_up(self) -> None:
        """After a reconnect: every room reads what its channel may have missed."""
        for room, st in list(self._cs.items()):
            if st.last is not None and not st.filling:
                self._fill(room, st, None)

    def _seq_forget(self, room: Room) -> None:
        self._cs.pop(room, None)

    # ================================================================ JOIN
    def _seq_join(self, sess, room: Room, msg, then) -> None:
        """A SEQUENCED JOIN of ``room`` (joined here, channel confirmed); ``then()`` when done."""
        room.seq.pop(sess, None)
        room.held[sess] = None  # silent until the replay is queued
        base = S.room_base(sess.ns.name, room.name)
        stats = self.protocol.stats

        def done(reply) -> None:
            if sess.state != _OPEN or sess.rooms.get(room.name) is not room:
                then()
                return
            if isinstance(reply, RedisError):
                self._unavailable(sess, msg.req, f"history unavailable: {reply}")
                then()
                return
            recovery, epoch, first, last, entries = reply
            stats["replays"][P.RECOVERY_NAMES[recovery]] += 1
            self._reply(sess, P.reply_join_seq(msg.req, recovery, epoch, first, last))
            frames = [f for _, f, _ in entries]
            if frames:
                sess.out.extend(seq_frames(entries[0][0], frames))
                stats["replayed_messages"] += len(frames)
            self._join_live(sess, room, epoch, last, then)

        S.room_join(self.link, base, msg.epoch, msg.after, msg.replay_max, self.hist_size,
                    self.hist_ttl, self._guarded(sess, done))  # fmt: skip

    def _join_live(self, sess, room: Room, epoch: int, last: int, then) -> None:
        st = self._cs.get(room)
        if st is None or st.last is None or st.last <= last or st.epoch != epoch:
            room.held.pop(sess, None)
            room.seq[sess] = last + 1  # live runs from here on
            then()
            return
        # This node has delivered past the replay already: read those for it.
        upto = st.last
        base = S.room_base(sess.ns.name, room.name)

        def done(reply) -> None:
            if sess.state != _OPEN or sess.rooms.get(room.name) is not room:
                then()
                return
            nxt = last + 1
            if not isinstance(reply, RedisError) and reply[0] == epoch:
                entries = [e for e in reply[2] if nxt <= e[0] <= upto]
                if entries and entries[0][0] > nxt:
                    self._reply(sess, P.gap_frame(room.name.encode(), nxt, entries[0][0] - 1))
                if entries:
                    sess.out.extend(seq_frames(entries[0][0], [f for _, f, _ in entries]))
                    nxt = entries[-1][0] + 1
            if nxt <= upto:
                self._reply(sess, P.gap_frame(room.name.encode(), nxt, upto))
            self._join_live(sess, room, epoch, upto, then)

        S.room_range(self.link, base, last, upto - last, callback=self._guarded(sess, done))
