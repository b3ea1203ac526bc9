"""The backplane's answers to session requests that are cluster-wide.

Split from cluster.py (which owns the link, the channels and delivery) to
keep each module readable: these are the handlers the session protocol hands
over in cluster mode (HELLO and NICK claim nicks, JOIN/LEAVE/disconnect keep
the member hashes, WHO and ROOMS read them). Each one that needs Redis first
blocks its session (``SessionProtocol.block``) and unblocks it when the
answer is queued, so the session's later frames are handled after it, in
order. Every callback checks the session's state first: it may have closed
while Redis was answering.
"""

from __future__ import annotations

from muxserver import protocol as P
from muxserver.backplane import keys as K
from muxserver.backplane.redis import RedisError
from muxserver.backplane.scripts import room_base
from muxserver.hub import HubError, Room, nick_key
from muxserver.session import HELLO_WAIT as P_HELLO_WAIT
from muxserver.session import OPEN as P_OPEN


def gate(count: int, then):
    """A callable that runs ``then()`` on its ``count``-th call."""
    left = [count]

    def step(*_args) -> None:
        left[0] -= 1
        if left[0] == 0:
            then()

    return step


class Requests:
    """Mixed into Backplane, whose helpers (_eval, _reply, _hold...) these use."""

    # ============================================================ HELLO, NICK
    def _ns_message(self, what: int) -> bytes:
        return bytes((K.NS_COUNT,)) + self.origin8 + bytes((what,))

    def _claim(self, sess, ns_name: str, nicks: list[str], callback, joining=False) -> bool:
        """NICK_CLAIM; ``callback(index or RedisError, size of the nicks hash or None)``."""
        hkey = K.nicks_key(ns_name)
        notice = self._ns_message(K.NS_JOIN) if joining else b""
        args = [self._owner(sess), hkey + b"\n", K.ns_channel(ns_name), notice]
        for nick in nicks:
            args += [nick_key(nick).encode(), nick.encode()]

        def on_reply(reply) -> None:
            if isinstance(reply, list) and len(reply) == 2:
                callback(reply[0], reply[1])
            else:
                callback(reply if isinstance(reply, RedisError) else RedisError(repr(reply)), None)

        return self._eval(K.NICK_CLAIM, [hkey, K.node_nicks(self.node)], args, on_reply)

    def _release(self, sess, ns_name: str, nick: str, leaving: bool = False) -> None:
        hkey = K.nicks_key(ns_name)
        key = nick_key(nick).encode()
        notice = self._ns_message(K.NS_LEAVE) if leaving else b""
        args = [self._owner(sess), hkey + b"\n" + key, key, K.ns_channel(ns_name), notice]
        self._eval(K.NICK_RELEASE, [hkey, K.node_nicks(self.node)], args, retry=True)

    def hello(self, sess, ns_name: str, nick: str, chosen: bool) -> None:
        why = P.check_name(ns_name, "namespace") or P.check_name(nick, "nick")
        if why:
            raise P.ProtocolError(P.INVALID_NAME, why)
        if not self.link.up:
            self.unavailable += 1
            raise P.ProtocolError(P.UNAVAILABLE, "the cluster link is down: try again shortly")
        if chosen and self.hub.nick_taken(ns_name, nick):
            raise P.ProtocolError(P.NICK_TAKEN, f"nick {nick!r} is taken in {ns_name}")
        candidates = [nick]
        if not chosen:  # guest-<conn id> is per node: another node's may hold it
            candidates.append(f"{nick}-{self.node.decode()}")
        result: list = []
        protocol = self.protocol

        def on_claim(reply, size) -> None:
            result.append(reply)
            result.append(size)

        def finish() -> None:
            try:
                reply = result[0] if result else RedisError("no reply")
                claimed = isinstance(reply, int) and reply > 0
                got = candidates[reply - 1] if claimed else ""
                if sess.state != P_HELLO_WAIT:
                    if claimed:
                        self._release(sess, ns_name, got, leaving=True)
                elif isinstance(reply, RedisError):
                    self.unavailable += 1
                    protocol.fatal(sess, P.UNAVAILABLE, f"the cluster link is down: {reply}")
                elif not claimed:
                    protocol.fatal(sess, P.NICK_TAKEN, f"nick {nick!r} is taken in {ns_name}")
                else:
                    try:
                        protocol.admit(sess, ns_name, got)
                    except P.ProtocolError as exc:
                        self._release(sess, ns_name, got, leaving=True)
                        protocol.fatal(sess, exc.code, exc.message)
                    else:
                        sess.ns.remote = max(0, result[1] - len(sess.ns.members))
                left = self._hellos.pop(ns_name, 1) - 1
                if left:
                    self._hellos[ns_name] = left
                self._drop_ns_if_empty(ns_name)
            finally:
                protocol.unblock(sess)

        protocol.block(sess)
        self._hellos[ns_name] = self._hellos.get(ns_name, 0) + 1
        done_when = gate(2, self._guarded(sess, finish))
        self._claim(sess, ns_name, candidates, lambda r, n: (on_claim(r, n), done_when()), True)
        self._when_ready(self._hold(K.ns_channel(ns_name), ns_name, None), done_when)

    def nick(self, sess, msg) -> None:
        new = msg.nick
        why = P.check_name(new, "nick")
        if why:
            self._error(sess, msg.req, P.INVALID_NAME, why)
            return
        if new == sess.nick:
            self._reply(sess, P.reply_ok(msg.req))
            return
        if not self.link.up:
            self.unavailable += 1
            self._error(
                sess, msg.req, P.UNAVAILABLE, "the cluster link is down: nicks cannot change"
            )
            return
        ns_name = sess.ns.name
        if nick_key(new) == nick_key(sess.nick):  # a change of case: same owner, same key
            self._renamed(sess, new)
            self._eval(K.NICK_RENAME, [K.nicks_key(ns_name)],
                       [self._owner(sess), nick_key(new).encode(), new.encode()])  # fmt: skip
            self._reply(sess, P.reply_ok(msg.req))
            return
        holder = self.hub.find(sess, new)
        if holder is not None and holder is not sess:
            self._error(sess, msg.req, P.NICK_TAKEN, f"nick {new!r} is taken in {ns_name}")
            return

        def done(reply, _size) -> None:
            try:
                claimed = isinstance(reply, int) and reply > 0
                if sess.state != P_OPEN or sess.ns is None:
                    if claimed:
                        self._release(sess, ns_name, new)
                elif isinstance(reply, RedisError):
                    self.unavailable += 1
                    self._error(sess, msg.req, P.UNAVAILABLE, f"cluster link: {reply}")
                elif not claimed:
                    self._error(sess, msg.req, P.NICK_TAKEN, f"nick {new!r} is taken in {ns_name}")
                else:
                    old = sess.nick
                    if self._renamed(sess, new, msg.req):
                        self._release(sess, ns_name, old)
                        self._reply(sess, P.reply_ok(msg.req))
                    else:
                        self._release(sess, ns_name, new)
            finally:
                self.protocol.unblock(sess)

        self.protocol.block(sess)
        self._claim(sess, ns_name, [new], self._guarded(sess, done))

    def _renamed(self, sess, new: str, req: int = 0) -> bool:
        """The local rename, its PRESENCE here and on every room channel."""
        old = sess.nick
        try:
            changes = self.hub.rename(sess, new)
        except HubError as exc:
            self._error(sess, req, exc.status, exc.message)
            return False
        sess.set_prefixes()
        self.router.presence(changes)
        member = self._member_id(sess)
        notice = K.presence_message(self.origin8, P.PRESENCE_NICK, old, new, member)
        for room in sess.rooms.values():
            base = room_base(sess.ns.name, room.name)
            self._eval(K.MEMBER_RENAME, [base + b":m"],
                       [member, new.encode(), base + b":ev", notice])  # fmt: skip
        return True

    # ============================================================ rooms
    def _member_add(self, sess, ns_name: str, room: Room, base: bytes, quiet: bool, then=None):
        member = self._member_id(sess)
        rkey = K.rooms_key(ns_name)
        entry = b"\n".join((rkey, room.name.encode(), base, member))
        # The join order is kept, so a re-registration after a Redis restart
        # does not reorder WHO.
        order = self._orders.get((sess.id, ns_name, room.name))
        if order is None:
            order = self._orders[sess.id, ns_name, room.name] = self._next_order()
        value = b"%016d|%s" % (order, sess.nick.encode())
        notice = b"" if quiet else K.presence_message(
            self.origin8, P.PRESENCE_JOIN, sess.nick, "", member)  # fmt: skip

        def done(reply) -> None:
            if isinstance(reply, int) and self._room_ch.get(room) is not None:
                room.remote = max(0, reply - len(room.members))
            if then is not None:
                then()

        keys = [base + b":m", rkey, K.node_rooms(self.node)]
        args = [member, value, room.name.encode(), entry, base + b":ev", notice]
        return self._eval(K.MEMBER_ADD, keys, args, done)

    def _member_gone(self, sess_id: int, ns_name: str, room_name: str, nick: str) -> None:
        self._orders.pop((sess_id, ns_name, room_name), None)
        base = room_base(ns_name, room_name)
        member = self.node + b"|" + str(sess_id).encode()
        rkey = K.rooms_key(ns_name)
        entry = b"\n".join((rkey, room_name.encode(), base, member))
        notice = K.presence_message(self.origin8, P.PRESENCE_LEAVE, nick, "", member)
        keys = [base + b":m", rkey, K.node_rooms(self.node)]
        args = [member, room_name.encode(), entry, base + b":ev", notice]
        self._eval(K.MEMBER_REMOVE, keys, args, retry=True)
        ns = self.hub.namespaces.get(ns_name)
        if ns is None or room_name not in ns.rooms:
            channel = base + b":ev"
            self._drop(channel)
            for room, ch in list(self._room_ch.items()):
                if ch == channel:
                    del self._room_ch[room]
                    self._seq_forget(room)

    def join(self, sess, msg) -> None:
        name = msg.room
        sequenced = sess.version >= 2 and msg.flags & P.JOIN_SEQUENCED
        if sequenced and self.seq_on and not self.link.up:
            # The plan and the replay are in Redis: nothing changes.
            self._unavailable(sess, msg.req, "the cluster link is down: JOIN again shortly")
            return
        before = sess.rooms.get(name)
        try:
            changes = self.hub.join(sess, name, bool(msg.flags & P.JOIN_PRESENCE))
        except HubError as exc:
            self._error(sess, msg.req, exc.status, exc.message)
            return
        self.router.presence(changes)
        room = sess.rooms[name]
        answered = False  # a SEQUENCED JOIN with history off is answered here
        if not sequenced:
            room.seq.pop(sess, None)  # the latest JOIN's flags decide
            room.held.pop(sess, None)
        elif not self.seq_on:
            # History off (section 9): seq 0 everywhere, an empty replay; the
            # member gets plain EVENTs.
            recovery = P.FRESH if msg.epoch == 0 else P.RESET
            self._reply(sess, P.reply_join_seq(msg.req, recovery, 0, 1, 0))
            self.protocol.stats["replays"][P.RECOVERY_NAMES[recovery]] += 1
            sequenced = False
            answered = True
            if before is not None:
                return
        ns_name = sess.ns.name
        base = room_base(ns_name, name)
        channel = base + b":ev"

        def finish() -> None:
            if sequenced and sess.state == P_OPEN:
                try:
                    self._seq_join(sess, room, msg, lambda: self.protocol.unblock(sess))
                except BaseException:
                    self.protocol.unblock(sess)
                    raise
                return
            try:
                if sess.state == P_OPEN and not answered:
                    self._reply(sess, P.reply_ok(msg.req))
            finally:
                self.protocol.unblock(sess)

        if before is not None:
            if not sequenced:
                self._reply(sess, P.reply_ok(msg.req))
                return
            self.protocol.block(sess)
            self._when_ready(self._hold(channel, ns_name, name), self._guarded(sess, finish))
            return
        self._room_ch[room] = channel
        ch = self._hold(channel, ns_name, name)
        done_when = gate(2, self._guarded(sess, finish))
        if not self._member_add(sess, ns_name, room, base, quiet=False, then=done_when):
            if not answered:
                self._reply(sess, P.reply_ok(msg.req))  # down: restored on reconnect
            return
        self.protocol.block(sess)
        self._when_ready(ch, done_when)

    def leave(self, sess, msg) -> None:
        was = sess.rooms.get(msg.room)
        try:
            changes = self.hub.leave(sess, msg.room)
        except HubError as exc:
            self._error(sess, msg.req, exc.status, exc.message)
            return
        self.router.presence(changes)
        if was is not None:
            self._member_gone(sess.id, sess.ns.name, msg.room, sess.nick)
        self._reply(sess, P.reply_ok(msg.req))

    def detach(self, sess) -> None:
        ns_name = sess.ns.name
        names = list(sess.rooms)
        nick = sess.nick
        self.router.presence(self.hub.detach(sess))
        for name in names:
            self._member_gone(sess.id, ns_name, name, nick)
        self._release(sess, ns_name, nick, leaving=True)
        self._drop_ns_if_empty(ns_name)

    # ============================================================ queries
    def who(self, sess, msg) -> bool:
        if not self.link.up or P.check_name(msg.room, "room"):
            return False  # this node's view (or the name error), from the hub

        def done(reply) -> None:
            try:
                if isinstance(reply, RedisError) or not isinstance(reply, list):
                    nicks = self.hub.who(sess, msg.room)
                else:
                    values = sorted(reply[1::2])
                    nicks = [v[17:].decode("utf-8", "replace") for v in values]
                entries = [P.str8(n) for n in nicks]
                max_frame = self.protocol.config.max_frame
                if sess.state == P_OPEN:
                    self._reply(sess, P.listing_reply(msg.req, entries, max_frame))
            finally:
                self.protocol.unblock(sess)

        self.protocol.block(sess)
        base = room_base(sess.ns.name, msg.room)
        self.link.call(b"HGETALL", base + b":m", callback=self._guarded(sess, done))
        return True

    def rooms(self, sess, msg) -> bool:
        if not self.link.up:
            return False
        names = list(sess.rooms)
        if msg.scope != 1 and not names:
            return False

        def done(reply) -> None:
            try:
                if isinstance(reply, RedisError) or not isinstance(reply, list):
                    rooms = self.hub.rooms(sess, all_rooms=msg.scope == 1)
                elif msg.scope == 1:
                    pairs = zip(reply[::2], reply[1::2], strict=True)
                    rooms = sorted((k.decode("utf-8", "replace"), int(v)) for k, v in pairs)
                else:
                    rooms = list(zip(names, (int(n) for n in reply), strict=True))
                entries = [P.str8(name) + P.U32.pack(count) for name, count in rooms]
                if sess.state == P_OPEN:
                    max_frame = self.protocol.config.max_frame
                    self._reply(sess, P.listing_reply(msg.req, entries, max_frame))
            finally:
                self.protocol.unblock(sess)

        self.protocol.block(sess)
        callback = self._guarded(sess, done)
        ns_name = sess.ns.name
        if msg.scope == 1:
            self.link.call(b"HGETALL", K.rooms_key(ns_name), callback=callback)
        else:
            keys = [room_base(ns_name, name) + b":m" for name in names]
            self._eval(K.ROOM_COUNTS, keys, [], callback)
        return True
