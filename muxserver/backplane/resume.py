"""Session resume on any cluster node (protocol sections 10 and 12).

Mixed into :class:`~muxserver.backplane.cluster.Backplane`. A session that
parks (muxserver.resume) is written to Redis as a record that expires with the
resume window::

    mux:resume:<selector>   hash: h = sha256 hex of the token's validator,
                            ns, node, conn, nick, key (its nick_key),
                            rooms = "<flags><room>\\n" per room (flags: a
                            digit, bit0 PRESENCE watcher, bit1 SEQUENCED)

A HELLO with that token on any node (this one included) runs ``TAKE``: one
script checks the validator's hash and the namespace, deletes the record (a
token works once), and moves the parked session's registrations (its nick
and every room membership, join order kept) from the old owner
``<node>|<conn>`` to the new one, without PRESENCE and without changing any
count. It then tells the old node (DROP on its node channel) to drop the
parked session silently, and every node to re-read the rooms' sizes (SYNC).
The new node rebuilds the session in its hub (restored SEQUENCED memberships
are held, silent, until re-joined, as on one node), waits for Redis to
confirm the channels, and answers WELCOME resumed=1 with a new token.

A session still attached to a live connection (the client saw the failure
first) has no record. Every selector a cluster node issues starts with that
node's id (``<node>~<16 hex>``, so the token stays within 64 bytes), which
tells any node where the token's session lives without a registry in Redis
(nothing to write per WELCOME, nothing to clean up when a node dies). When
TAKE finds no record and the selector names another node, this node sends
that node REPLACE on its node channel (selector, sha256 of the validator,
namespace, its wall clock) and the HELLO waits (``replace_wait``, 2 s). The
owner compares the hash with its own token's (``hmac.compare_digest``) and
checks the namespace; if both match it parks the session (ERROR REPLACED on
the old connection, which closes as any ERROR does) and answers REPLACED yes
once PARK has written the record; otherwise it answers no. On yes this node
runs TAKE again, as above; on no, no answer in time, or no node listening (a
dead node), the HELLO is a fresh session, as for any unknown token. On the
HELLO's own node the session is found in the local tokens and replaced
before TAKE.

The owner refuses a REPLACE older than half that wait: it stalled, the
asker may have given up, and the session would be parked with nobody to
take it over. (Node clocks are assumed to agree to well within a second, as
for WHO's join order; a skew beyond that makes such HELLOs fresh sessions.)
An answer that still arrives after the timeout is ignored.

Why a hash of the validator: Lua compares strings in time that depends on
their content; comparing hashes leaks nothing about the validator, and the
validator itself never crosses Redis. Why the record is written only at park
time: a live session changes rooms and nicks all the time, and keeping a
copy current would cost a write per change.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import struct
import time

from muxserver import protocol as P
from muxserver.backplane import keys as K
from muxserver.backplane.requests import gate
from muxserver.backplane.resp import Script
from muxserver.backplane.scripts import room_base
from muxserver.hub import HubError, nick_key

_HELLO_WAIT, _OPEN = 0, 1  # session states (session.py)
_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,14}")  # a node id that fits a token's selector
log = logging.getLogger("muxserver.backplane")
_U64 = struct.Struct(">Q")

PARK = Script("""
-- KEYS[1] record; ARGV: window (ms), field, value, ...
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
""")

# Returns false (token unknown, used, expired, wrong namespace, or its nick
# was lost meanwhile), or {nick, old node, old conn, flags..room, member value, ...}.
TAKE = Script("""
-- KEYS[1] record; ARGV: validator hash, namespace, new node, new conn
local r = redis.call('HMGET', KEYS[1], 'h', 'ns', 'node', 'conn', 'nick', 'key', 'rooms')
if not r[1] or r[1] ~= ARGV[1] or r[2] ~= ARGV[2] then return false end
redis.call('DEL', KEYS[1])
local ns, node, conn, nick, key, rooms = r[2], r[3], r[4], r[5], r[6], r[7]
local esc = (string.gsub((string.gsub(ns, '%%', '%%25')), '|', '%%7C'))
local old, new = node .. '|' .. conn, ARGV[3] .. '|' .. ARGV[4]
local hk = 'mux:nicks:' .. esc
local cur = redis.call('HGET', hk, key)
if not cur or string.sub(cur, 1, #old + 1) ~= old .. '|' then return false end
redis.call('HSET', hk, key, new .. '|' .. nick)
redis.call('SREM', 'mux:node:' .. node .. ':nicks', hk .. '\\n' .. key)
redis.call('SADD', 'mux:node:' .. ARGV[3] .. ':nicks', hk .. '\\n' .. key)
local rk = 'mux:rooms:' .. esc
local origin = string.char(#ARGV[3]) .. ARGV[3]
local out, bases = {nick, node, conn}, {}
for line in string.gmatch(rooms, '[^\\n]+') do
  local room = string.sub(line, 2)
  local base = 'mux:{' .. esc .. '|' .. room .. '}'
  local v = redis.call('HGET', base .. ':m', old)
  if v then
    redis.call('HDEL', base .. ':m', old)
    redis.call('HSET', base .. ':m', new, v)
    redis.call('SREM', 'mux:node:' .. node .. ':rooms',
      rk .. '\\n' .. room .. '\\n' .. base .. '\\n' .. old)
    redis.call('SADD', 'mux:node:' .. ARGV[3] .. ':rooms',
      rk .. '\\n' .. room .. '\\n' .. base .. '\\n' .. new)
    out[#out + 1] = line
    out[#out + 1] = v
    bases[#bases + 1] = base
  end
end
redis.call('PUBLISH', 'mux:node:' .. node .. ':ev',
  string.char(8) .. origin .. string.char(#conn) .. conn)
for _, base in ipairs(bases) do
  redis.call('PUBLISH', base .. ':ev', string.char(5) .. origin)
end
return out
""")


def record_key(selector: str) -> bytes:
    return b"mux:resume:" + selector.encode("ascii", "replace")


def validator_hash(validator: str) -> bytes:
    return hashlib.sha256(validator.encode("utf-8", "surrogateescape")).hexdigest().encode()


class Resumes:
    """The resume half of the Backplane (which provides link, hub, protocol...)."""

    def _resume_init(self) -> None:
        self.resumed_remote = 0  # sessions resumed here through Redis
        self.replace_wait = 2.0  # seconds a HELLO waits for another node's REPLACED
        self._asks: dict[bytes, tuple] = {}  # ask id -> (callback(yes), timeout timer)
        self._ask_seq = 0
        self._after_park: dict = {}  # session -> what to do once its record is written
        self._resume_kinds = {K.DROP: self._on_drop, K.REPLACE: self._on_replace,
                              K.REPLACED: self._on_replaced}  # fmt: skip
        resumer = self.protocol.resumer
        resumer.on_park = self._parked
        resumer.on_expire = self._park_expired
        node = self.node.decode("ascii", "replace")
        if _NODE_ID.fullmatch(node):
            resumer.prefix = node + "~"
        else:  # the token would not fit in 64 bytes (or could not be parsed back)
            log.warning("cluster: node id %r is not 1-14 of [A-Za-z0-9_-]: a session attached "
                        "here cannot be replaced from another node", node)  # fmt: skip

    # ======================================================== the old node
    def _parked(self, sess) -> None:
        """Write the parked session's record (its window as the TTL)."""
        resumer = self.protocol.resumer
        entry = resumer.tokens.get(sess.resume_key)
        then = self._after_park.pop(sess, None)
        if entry is None or sess.ns is None:
            if then is not None:
                then(False)
            return
        rooms = []
        for room in sess.rooms.values():
            flags = (1 if sess in room.watchers else 0) | (
                2 if sess in room.seq or sess in room.held else 0
            )
            rooms.append(b"%d%s\n" % (flags, room.name.encode()))
        args = [int(resumer.window * 1000),
                b"h", hashlib.sha256(entry[0]).hexdigest().encode(),
                b"ns", sess.ns.name.encode(), b"node", self.node, b"conn", str(sess.id).encode(),
                b"nick", sess.nick.encode(), b"key", nick_key(sess.nick).encode(),
                b"rooms", b"".join(rooms)]  # fmt: skip
        written = None if then is None else (lambda reply: then(reply == 1))
        self._eval(PARK, [record_key(sess.resume_key)], args, written)  # (a rejection calls it)

    def _park_expired(self, sess, selector: str) -> None:
        """The window ran out here: the record goes, and the session leaves the cluster."""
        if selector:
            self.link.call(b"DEL", record_key(selector))  # (else it expires with the window)
        self.detach(sess)

    def _on_drop(self, data: bytes) -> None:
        """DROP on our node channel: a parked session of ours was resumed elsewhere."""
        _, _origin, at = K.split_origin(data)
        conn, _ = K.read_str8(data, at)
        self._drop_parked(int(conn))

    def _on_replace(self, data: bytes) -> None:
        """REPLACE on our node channel: another node holds a HELLO with one of our tokens."""
        _, origin, at = K.split_origin(data)
        ask, at = K.read_str8(data, at)
        (sent_ms,) = _U64.unpack_from(data, at)
        selector, at = K.read_str8(data, at + 8)
        given, ns_name = data[at : at + 64], data[at + 64 :].decode("utf-8", "replace")

        def answer(yes: bool) -> None:
            verdict = b"\x01" if yes else b"\x00"
            reply = bytes((K.REPLACED,)) + self.origin8 + K.str8(ask) + verdict
            self.link.call(b"PUBLISH", K.node_channel(origin), reply)

        if time.time() * 1000 - sent_ms > self.replace_wait * 500:
            # Older than half the asker's wait (this node stalled): it may
            # have given up already, and nobody would take the session over.
            answer(False)
            return
        resumer = self.protocol.resumer
        entry = resumer.tokens.get(selector.decode("utf-8", "surrogateescape"))
        sess = entry[1] if entry is not None else None
        if (
            sess is None
            or not hmac.compare_digest(hashlib.sha256(entry[0]).hexdigest().encode(), given)
            or sess.ns is None
            or sess.ns.name != ns_name
        ):
            answer(False)  # (the same answer for every reason: it says nothing of the token)
            return
        if sess in resumer.parked:
            # It parked just before (its record may have been in flight when
            # that node's TAKE ran): write it again, answer once it is written.
            self._after_park[sess] = answer
            self._parked(sess)
            return
        if not resumer.can_park(sess):
            answer(False)
            return
        self._after_park[sess] = answer  # the record is written first (on_park -> _parked)
        shell = resumer.park(sess)
        self.protocol.fatal(shell, P.REPLACED, "this session was resumed elsewhere")
        resumer.stats["resumes_replaced"] += 1

    def _drop_parked(self, conn: int) -> None:
        resumer = self.protocol.resumer
        sess = next((s for s in resumer.parked if s.id == conn), None)
        if sess is None:
            return  # already dropped (a resume on this node), or its window ended
        ns_name = sess.ns.name
        names = list(sess.rooms)
        resumer.drop(sess)
        self.hub.detach(sess)  # no PRESENCE: the session lives on, elsewhere
        for name in names:
            self._orders.pop((sess.id, ns_name, name), None)
            self._forget_room_if_empty(ns_name, name)
        self._drop_ns_if_empty(ns_name)

    # ======================================================== the new node
    def resume(self, sess, hello, fresh) -> None:
        """HELLO v2 with a resume token (cluster): resume through Redis, else ``fresh()``."""
        selector, dot, validator = hello.resume.partition(".")
        if not dot or not self.link.up:
            fresh()
            return
        resumer = self.protocol.resumer
        local = resumer._find(hello.resume, hello.namespace)
        if local is not None and local.state == _OPEN and resumer.can_park(local):
            # Still attached here: the client saw the failure first (section 10).
            shell = resumer.park(local)  # writes the record, ahead of TAKE on the link
            self.protocol.fatal(shell, P.REPLACED, "this session was resumed elsewhere")
            resumer.stats["resumes_replaced"] += 1
        self.protocol.block(sess)
        ns_name = hello.namespace

        owner = self._owner_of(selector)

        def done(reply, asked: bool) -> None:
            taken = isinstance(reply, list) and len(reply) >= 3
            if sess.state != _HELLO_WAIT:
                if taken:  # it closed meanwhile: what we took leaves for good
                    self._abandon(sess, ns_name, reply)
                self.protocol.unblock(sess)
                return
            if not taken and owner is not None and not asked:
                # No record: the session may still be attached on the node that
                # issued the token. Ask it to replace (park) it, then TAKE again.
                self._ask_replace(owner, selector, validator, ns_name, self._guarded(sess, answer))
                return
            if not taken:
                self._fresh_after(sess, fresh)  # unknown, used or expired (section 10)
                return
            self._restore_session(sess, ns_name, reply)

        def answer(yes: bool) -> None:
            if sess.state != _HELLO_WAIT:
                self.protocol.unblock(sess)
            elif yes:
                take(True)
            else:
                self._fresh_after(sess, fresh)  # not there, wrong validator, or no answer

        def take(asked: bool) -> None:
            self._eval(TAKE, [record_key(selector)], args,
                       self._guarded(sess, lambda reply: done(reply, asked)))  # fmt: skip

        args = [validator_hash(validator), ns_name.encode(), self.node, str(sess.id).encode()]
        take(False)

    def _owner_of(self, selector: str) -> bytes | None:
        """The other node that issued this selector (its prefix), if it names one."""
        node, tilde, _ = selector.partition("~")
        if not tilde or not _NODE_ID.fullmatch(node) or node.encode() == self.node:
            return None
        return node.encode()

    def _ask_replace(self, owner: bytes, selector: str, validator: str, ns_name: str, then):
        """REPLACE on ``owner``'s node channel; ``then(yes)`` on its answer or the timeout."""
        self._ask_seq += 1
        ask = str(self._ask_seq).encode()
        msg = b"".join((bytes((K.REPLACE,)), self.origin8, K.str8(ask),
                        _U64.pack(time.time_ns() // 1_000_000),
                        K.str8(selector.encode("utf-8", "surrogateescape")),
                        validator_hash(validator), ns_name.encode()))  # fmt: skip
        timer = self.loop.call_later(self.replace_wait, self._answered, ask, False)
        self._asks[ask] = (then, timer)

        def sent(count) -> None:
            if not isinstance(count, int) or count < 1:
                self._answered(ask, False)  # that node is gone (or Redis is): nobody will answer

        self.link.call(b"PUBLISH", K.node_channel(owner), msg, callback=sent)

    def _answered(self, ask: bytes, yes: bool) -> None:
        entry = self._asks.pop(ask, None)
        if entry is not None:  # (else answered already, or timed out)
            then, timer = entry
            timer.cancel()
            then(yes)

    def _on_replaced(self, data: bytes) -> None:
        """REPLACED on our node channel: the answer to one of our REPLACE requests."""
        _, _origin, at = K.split_origin(data)
        ask, at = K.read_str8(data, at)
        self._answered(ask, data[at : at + 1] == b"\x01")

    def _fresh_after(self, sess, fresh) -> None:
        """``fresh()`` (the HELLO as a new session) from a Redis callback, keeping the input order.

        It blocks the session again for its nick claim: the frames held so far
        go first in that new hold, so they are handled after its WELCOME.
        """
        held, sess.deferred = sess.deferred, None
        try:
            fresh()
        except P.ProtocolError as exc:
            self.protocol.fatal(sess, exc.code, exc.message)
        if sess.deferred is not None:
            sess.deferred[:0] = held or []
        else:
            sess.deferred = held
            self.protocol.unblock(sess)

    def _restore_session(self, sess, ns_name: str, reply: list) -> None:
        nick = reply[0].decode()
        if reply[1] == self.node:
            self._drop_parked(int(reply[2]))  # it was parked here: now, not on DROP
        try:
            self.hub.attach(sess, ns_name, nick)
        except HubError as exc:  # cannot happen while Redis and this hub agree
            self._abandon(sess, ns_name, reply)
            self.protocol.fatal(sess, exc.status, exc.message)
            self.protocol.unblock(sess)
            return
        pairs = list(zip(reply[3::2], reply[4::2], strict=True))
        channels = [self._hold(K.ns_channel(ns_name), ns_name, None)]
        for line, value in pairs:
            flags, name = line[0] - 48, line[1:].decode()
            self.hub.join(sess, name, bool(flags & 1))  # no PRESENCE join (section 10)
            room = sess.rooms[name]
            if flags & 2:
                room.held[sess] = None  # silent until re-joined SEQUENCED
            self._orders[sess.id, ns_name, name] = int(value[:16])
            base = room_base(ns_name, name)
            self._room_ch[room] = base + b":ev"
            channels.append(self._hold(base + b":ev", ns_name, name))
            self.link.call(b"HLEN", base + b":m", callback=self._recount_cb(room))
        self.link.call(b"HLEN", K.nicks_key(ns_name), callback=self._ns_recount(sess.ns))

        def welcome() -> None:
            try:
                if sess.state != _HELLO_WAIT:
                    return
                protocol = self.protocol
                sess.state = _OPEN
                if protocol._rate:
                    sess.bucket = [protocol._burst, protocol.clock.now]
                sess.set_prefixes()
                protocol.resumer.stats["resumes"] += 1
                self.resumed_remote += 1
                protocol._welcome(sess, resumed=True)
            finally:
                self.protocol.unblock(sess)

        ready = gate(len(channels), self._guarded(sess, welcome))
        for ch in channels:
            self._when_ready(ch, ready)

    def _recount_cb(self, room):
        return lambda n: self._recount(room, n)

    def _abandon(self, sess, ns_name: str, reply: list) -> None:
        """TAKE moved a session to a connection that closed before it was rebuilt."""
        nick = reply[0].decode()
        for line in reply[3::2]:
            self._member_gone(sess.id, ns_name, line[1:].decode(), nick)
        self._release(sess, ns_name, nick, leaving=True)

    def _forget_room_if_empty(self, ns_name: str, name: str) -> None:
        ns = self.hub.namespaces.get(ns_name)
        if ns is not None and name in ns.rooms:
            return
        channel = room_base(ns_name, name) + b":ev"
        self._drop(channel)
        for room, ch in list(self._room_ch.items()):
            if ch == channel:
                del self._room_ch[room]
                self._seq_forget(room)
