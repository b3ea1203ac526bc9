"""THE delivery path: a scope and ready frame bytes in, bytes on local queues out.

Every EVENT and PRESENCE the server produces goes through here, so there is
one place that knows how a message reaches its recipients (and, in a
cluster, one place where a backplane plugs in). The session above decides
*what* the frame is and *who* the scope is (a room, a namespace, one
member); the router appends the frame to each recipient's ``out`` list and
marks it pending for the flush at the end of the loop turn.

Two decisions on the hot path:

* Encode once per *variant*, never per member. A room or namespace counts its
  version-1 members (``legacy``); a frame whose bytes differ for them
  (a version-2 payload type in the EVENT's source_kind) comes with a
  ``legacy`` variant, and only a group that has such members pays for the
  per-member check.
* The sender is always a member of the room it emits to and gets exactly one
  append per call, so "everyone but the sender" is an append to all and one
  ``pop()`` of the sender's last item: no per-member comparison.
* A room's members are marked pending once per turn, however many runs of
  messages reach it (``_queued``); whoever joins later in the turn is pending
  anyway, for its JOIN reply.
"""

from __future__ import annotations

from .protocol import PRESENCE, encode


class Router:
    __slots__ = ("pending", "deliveries", "frames_out_by_type", "_queued", "backplane")

    def __init__(self) -> None:
        # The cluster backplane (muxserver.backplane.cluster) or None: every
        # room and namespace run is handed to it after local delivery.
        self.backplane = None
        self.pending: set = set()  # sessions with output queued this turn
        self.deliveries = 0  # EVENTs queued, one per recipient
        # Frames queued by type byte, for those not counted as deliveries.
        self.frames_out_by_type = [0] * 256
        self._queued: set = set()  # groups whose members were marked pending this turn

    def new_turn(self) -> None:
        """Called by the flush: pending was emptied, so every group must mark again."""
        self._queued.clear()

    def fanout(self, sender, group, data: bytes, legacy: bytes | None, messages: int, echo) -> int:
        """Queue ``data`` to every member of ``group`` (a room or a namespace).

        ``data`` holds ``messages`` EVENT frames; ``legacy`` is their
        version-1 encoding when it differs (None otherwise). The sender must
        be a member; it is left out unless ``echo``. Returns the recipients
        of one message.
        """
        members = group.members
        if legacy is None or not group.legacy:
            for member in members:
                member.out.append(data)
        else:
            for member in members:
                member.out.append(legacy if member.version < 2 else data)
        count = len(members) - group.parked  # parked sessions get nothing (section 10)
        if not echo:
            sender.out.pop()  # it got its copy last: take it back
            count -= 1
        queued = self._queued
        if group not in queued:
            queued.add(group)
            self.pending.update(members)
        self.deliveries += count * messages
        if self.backplane is not None:
            count += self.backplane.publish(sender, group, data, legacy, messages, echo)
        return count

    def fanout_seq(
        self, sender, room, data: bytes, legacy: bytes | None, seqdata: bytes, messages: int, echo
    ) -> int:
        """``fanout`` for a room with SEQUENCED members (protocol section 9).

        ``seqdata`` (the EVENT_SEQ encoding) goes to ``room.seq``, nothing to
        ``room.held`` (they catch up from the history), ``data`` / ``legacy``
        to the rest. A room whose members are all live SEQUENCED pays no
        per-member check.
        """
        if self.backplane is not None:
            # A cluster numbers the run in Redis: SEQUENCED members get it from
            # the room's channel, in cluster seq order (backplane/seqrooms.py).
            return self._fanout_plain(sender, room, data, legacy, messages, echo)
        members = room.members
        seq = room.seq
        held = room.held
        if len(seq) == len(members):
            for member in members:
                member.out.append(seqdata)
        else:
            if legacy is None:
                legacy = data
            for member in members:
                if member in seq:
                    member.out.append(seqdata)
                elif member in held:
                    continue
                elif member.version < 2:
                    member.out.append(legacy)
                else:
                    member.out.append(data)
        count = len(members) - room.parked
        if not echo:
            count -= 1
            if sender not in held:
                sender.out.pop()  # it got its copy last: take it back
        queued = self._queued
        if room not in queued:
            queued.add(room)
            self.pending.update(members)
        self.deliveries += count * messages
        return count

    def _fanout_plain(self, sender, room, data: bytes, legacy, messages: int, echo) -> int:
        """``fanout`` to a room's members that are not SEQUENCED (cluster mode)."""
        seq, held = room.seq, room.held
        old = data if legacy is None else legacy
        plain = 0
        for member in room.members:
            if member not in seq and member not in held:
                member.out.append(old if member.version < 2 else data)
                plain += 1
        count = len(room.members) - room.parked
        if not echo:
            count -= 1
            if sender not in seq and sender not in held:
                sender.out.pop()  # it got its copy last: take it back
                plain -= 1
        queued = self._queued
        if room not in queued:
            queued.add(room)
            self.pending.update(room.members)
        self.deliveries += plain * messages
        return count + self.backplane.publish(sender, room, data, legacy, messages, echo)

    def remote_seq(self, room, data, legacy, messages: int, seqframes, first: int, skip) -> None:
        """A sequenced run from the room's cluster channel (backplane/seqrooms.py).

        ``data``/``legacy`` go to the members that are not SEQUENCED (None: the
        run started here and they had it then); ``seqframes`` (EVENT_SEQ, seqs
        ``first..``; None when the room has no live SEQUENCED member) to the
        live SEQUENCED members from the seq each one waits for (its value in
        ``room.seq``), except ``skip`` (the sender, without echo).
        """
        seq, held = room.seq, room.held
        count = 0
        if seqframes is not None:
            joined = None
            n = len(seqframes)
            for member, start in seq.items():
                if member is skip:
                    continue
                if start is None or start <= first:
                    if joined is None:
                        joined = b"".join(seqframes)
                    member.out.append(joined)
                    count += n
                elif start - first < n:
                    member.out.append(b"".join(seqframes[start - first :]))
                    count += n - (start - first)
        if data is not None:
            if legacy is None:
                legacy = data
            for member in room.members:
                if member not in seq and member not in held:
                    member.out.append(legacy if member.version < 2 else data)
                    count += messages
        queued = self._queued
        if room not in queued:
            queued.add(room)
            self.pending.update(room.members)
        self.deliveries += count

    def remote(self, group, data: bytes, legacy: bytes | None, messages: int) -> None:
        """A run from another cluster node: queue it to every local member of ``group``."""
        members = group.members
        if legacy is None or not group.legacy:
            for member in members:
                member.out.append(data)
        else:
            for member in members:
                member.out.append(legacy if member.version < 2 else data)
        queued = self._queued
        if group not in queued:
            queued.add(group)
            self.pending.update(members)
        self.deliveries += len(members) * messages

    def to_one(self, sender, target, data: bytes, legacy: bytes | None, echo) -> int:
        """A direct message; to oneself it follows the echo rule like any other."""
        if (target is sender and not echo) or target.transport is None:
            return 0  # (no transport: parked, nothing is queued for it)
        target.out.append(legacy if legacy is not None and target.version < 2 else data)
        self.pending.add(target)
        self.deliveries += 1
        return 1

    def reply(self, session, frame: bytes) -> None:
        """A frame for one session only (REPLY, WELCOME, PING, PONG, ERROR)."""
        session.out.append(frame)
        self.pending.add(session)
        self.frames_out_by_type[frame[4]] += 1

    def presence(self, changes) -> None:
        """Hub changes: each PRESENCE encoded once, shared by its recipients."""
        for recipients, notice in changes:
            frame = encode(notice)
            for member in recipients:
                member.out.append(frame)
            self.pending.update(recipients)
            self.frames_out_by_type[PRESENCE] += len(recipients)
