"""Cluster key layout, node-to-node message codec and the Lua scripts behind them.

Kept apart from cluster.py so that the Redis data model can be read (and
tested) in one place. Every multi-key change is one Lua script, so Redis runs
it alone and no node ever sees half of a JOIN, a nick claim or a node's
clean-up. Separators: ``|`` inside owner ids (node ids and conn ids never hold
one) and ``\\n`` inside per-node index entries (no name may hold a control
character, protocol section 1).

Keys (``<ns>`` is the namespace, percent-escaped as in scripts.room_base;
``<base>`` is ``scripts.room_base(ns, room)``, so a room's keys share one hash
tag)::

    mux:nodes                 set: live node ids
    mux:hb:<node>             string with a TTL: the node's heartbeat
    mux:node:<node>:ev        channel: direct messages for that node's members
    mux:node:<node>:rooms     set: "<rooms key>\\n<room>\\n<base>\\n<member>" per membership
    mux:node:<node>:nicks     set: "<nicks key>\\n<nick_key>" per nick held
    mux:nicks:<ns>            hash: nick_key -> "<node>|<conn>|<nick>"
    mux:rooms:<ns>            hash: room -> members in the cluster
    mux:ns:<ns>:ev            channel: namespace broadcasts
    <base>:m                  hash: "<node>|<conn>" -> "<16-digit join order>|<nick>"
    <base>:ev                 channel: the room's EVENT runs and PRESENCE

``<base>:meta`` and ``<base>:hist`` hold a room's seq and history (scripts.py).

Messages on the channels (binary)::

    u8 kind | str8 origin node | body
    EVENTS (1 room, 4 broadcast): u32 messages | u32 len(data) | data | legacy
    PRESENCE (2): u8 kind | str8 nick | str8 new_nick | str8 member
    DIRECT (3):   str8 conn id (decimal) | u32 len(data) | data | legacy
    SYNC (5):     empty: members were registered again (after a Redis restart)
                  without PRESENCE; receivers re-read the room's size
    NS_COUNT (6): u8 1 a member joined the namespace, 2 one left, 5 re-read the
                  size (the nicks hash); on the namespace channel
    SEQ_EVENTS (7): a sequenced run, published by scripts.ROOM_RUN (layout there)
    DROP (8):     str8 conn id: that parked session was resumed on another node;
                  drop it without PRESENCE (on the node channel)
    REPLACE (9):  str8 ask id | u64 sender's wall clock (ms) | str8 selector |
                  64 bytes: sha256 hex of the validator | namespace (the rest):
                  a HELLO on the origin node holds the token of a session
                  attached here; park it (resume.py)
    REPLACED (10): str8 ask id | u8 1 (its record is in Redis now: TAKE it)
                  or 0 (no such session here, or the token is wrong)

``data`` is the ready EVENT frames (length prefixes included) of the sender's
run; ``legacy`` their version-1 encoding when it differs (else empty), so a
receiving node appends them to its members' queues as they are.
"""

from __future__ import annotations

import struct

from muxserver.backplane.resp import Script

EVENTS, PRESENCE, DIRECT, BROADCAST, SYNC, NS_COUNT, SEQ_EVENTS, DROP = 1, 2, 3, 4, 5, 6, 7, 8
REPLACE, REPLACED = 9, 10
NS_JOIN, NS_LEAVE, NS_SYNC = 1, 2, 5  # the byte after a NS_COUNT message's origin
U32 = struct.Struct(">I")
U32X2 = struct.Struct(">II")

NODES = b"mux:nodes"


def esc(namespace: str) -> bytes:
    return namespace.encode().replace(b"%", b"%25").replace(b"|", b"%7C")


def heartbeat_key(node: bytes) -> bytes:
    return b"mux:hb:" + node


def node_channel(node: bytes) -> bytes:
    return b"mux:node:" + node + b":ev"


def node_rooms(node: bytes) -> bytes:
    return b"mux:node:" + node + b":rooms"


def node_nicks(node: bytes) -> bytes:
    return b"mux:node:" + node + b":nicks"


def nicks_key(namespace: str) -> bytes:
    return b"mux:nicks:" + esc(namespace)


def rooms_key(namespace: str) -> bytes:
    return b"mux:rooms:" + esc(namespace)


def ns_channel(namespace: str) -> bytes:
    return b"mux:ns:" + esc(namespace) + b":ev"


def str8(data: bytes) -> bytes:
    return bytes((len(data),)) + data


def events_message(kind: int, origin8: bytes, messages: int, data: bytes, legacy) -> bytes:
    return b"".join((bytes((kind,)), origin8, U32X2.pack(messages, len(data)), data, legacy or b""))


def presence_message(origin8: bytes, kind: int, nick: str, new: str, member: bytes) -> bytes:
    return b"".join(
        (bytes((PRESENCE,)), origin8, bytes((kind,)), str8(nick.encode()), str8(new.encode()),
         str8(member))
    )  # fmt: skip


def split_origin(msg: bytes) -> tuple[int, bytes, int]:
    """(kind, origin node, offset of the body)."""
    n = msg[1]
    return msg[0], msg[2 : 2 + n], 2 + n


def read_str8(msg: bytes, at: int) -> tuple[bytes, int]:
    n = msg[at]
    return msg[at + 1 : at + 1 + n], at + 1 + n


def read_events(msg: bytes, at: int) -> tuple[int, bytes, bytes | None]:
    """(messages, data, legacy or None) from an EVENTS / DIRECT body at ``at``."""
    messages, size = U32X2.unpack_from(msg, at)
    at += 8
    data = msg[at : at + size]
    legacy = msg[at + size :] or None
    return messages, data, legacy


MEMBER_ADD = Script("""
-- KEYS: member hash, namespace rooms hash, node rooms set
-- ARGV: member, value, room, entry, channel, presence join ('' = quiet: a restore)
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('SADD', KEYS[3], ARGV[4])
return redis.call('HLEN', KEYS[1])
""")

MEMBER_REMOVE = Script("""
-- KEYS: member hash, namespace rooms hash, node rooms set
-- ARGV: member, room, entry, channel, presence message
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
redis.call('SREM', KEYS[3], ARGV[3])
return 0
""")

MEMBER_RENAME = Script("""
-- KEYS: member hash; ARGV: member, new nick, channel, presence message
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  redis.call('HSET', KEYS[1], ARGV[1], string.sub(cur, 1, 17) .. ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 0
""")

# Returns {1-based index of the first candidate claimed (0 if all are held by
# someone else), size of the nicks hash}. A nick this owner already holds
# counts as claimed (restore). The namespace message goes out if it was free.
NICK_CLAIM = Script("""
-- KEYS: nicks hash, node nicks set
-- ARGV: owner "node|conn|", entry prefix, channel, message ('' = none), key1, nick1, ...
for i = 5, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if (not cur) or string.sub(cur, 1, #ARGV[1]) == ARGV[1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[1] .. ARGV[i + 1])
    redis.call('SADD', KEYS[2], ARGV[2] .. ARGV[i])
    if (not cur) and ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
    return {(i - 3) / 2, redis.call('HLEN', KEYS[1])}
  end
end
return {0, redis.call('HLEN', KEYS[1])}
""")

NICK_RELEASE = Script("""
-- KEYS: nicks hash, node nicks set
-- ARGV: owner "node|conn|", entry, key, channel, message ('' = none: a rename)
local cur = redis.call('HGET', KEYS[1], ARGV[3])
if cur and string.sub(cur, 1, #ARGV[1]) == ARGV[1] then
  redis.call('HDEL', KEYS[1], ARGV[3])
  if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
end
redis.call('SREM', KEYS[2], ARGV[2])
return 0
""")

NICK_RENAME = Script("""
-- KEYS: nicks hash; ARGV: owner, key, nick (a change of case: same key, new spelling)
local cur = redis.call('HGET', KEYS[1], ARGV[2])
if cur and string.sub(cur, 1, #ARGV[1]) == ARGV[1] then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[1] .. ARGV[3])
end
return 0
""")

# The direct message goes to the node holding the nick; the reply is the
# number of nodes that received it (0: no such nick, or its node is gone).
DIRECT_SEND = Script("""
-- KEYS: nicks hash; ARGV: key, message head (kind + origin), message tail (u32 len, data, legacy)
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local node, conn = string.match(cur, '^([^|]*)|([^|]*)|')
return redis.call('PUBLISH', 'mux:node:' .. node .. ':ev',
  ARGV[2] .. string.char(#conn) .. conn .. ARGV[3])
""")

# The heartbeat; returns 0 if this node had been reaped (a stall longer than
# the TTL with the link still up): the caller then registers everything again.
BEAT = Script("""
-- ARGV: node, ttl in ms
local was = redis.call('SISMEMBER', 'mux:nodes', ARGV[1])
redis.call('SET', 'mux:hb:' .. ARGV[1], '1', 'PX', ARGV[2])
redis.call('SADD', 'mux:nodes', ARGV[1])
return was
""")

ROOM_COUNTS = Script("""
-- KEYS: member hashes; returns their sizes
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HLEN', key) end
return out
""")

# Undo everything a node registered. ARGV[1] = '' reaps every node whose
# heartbeat expired; otherwise that one node (a clean shutdown) is reaped.
# Its members leave with a PRESENCE published as if the node had sent it.
REAP = Script("""
local function reap(node)
  local origin = string.char(#node) .. node
  for _, e in ipairs(redis.call('SMEMBERS', 'mux:node:' .. node .. ':rooms')) do
    local rk, room, base, member = string.match(e, '^([^\\n]*)\\n([^\\n]*)\\n([^\\n]*)\\n(.*)$')
    if rk then
      local v = redis.call('HGET', base .. ':m', member)
      if v then
        redis.call('HDEL', base .. ':m', member)
        if redis.call('HINCRBY', rk, room, -1) <= 0 then redis.call('HDEL', rk, room) end
        local nick = string.sub(v, 18)
        redis.call('PUBLISH', base .. ':ev', string.char(2) .. origin .. string.char(2)
          .. string.char(#nick) .. nick .. string.char(0) .. string.char(#member) .. member)
      end
    end
  end
  for _, e in ipairs(redis.call('SMEMBERS', 'mux:node:' .. node .. ':nicks')) do
    local hk, key = string.match(e, '^([^\\n]*)\\n(.*)$')
    if hk then
      local cur = redis.call('HGET', hk, key)
      if cur and string.sub(cur, 1, #node + 1) == node .. '|' then
        redis.call('HDEL', hk, key)
        -- hk is mux:nicks:<ns>: the namespace loses a member
        redis.call('PUBLISH', 'mux:ns:' .. string.sub(hk, 11) .. ':ev',
          string.char(6) .. origin .. string.char(2))
      end
    end
  end
  redis.call('DEL', 'mux:node:' .. node .. ':rooms', 'mux:node:' .. node .. ':nicks',
    'mux:hb:' .. node)
  redis.call('SREM', 'mux:nodes', node)
end
local reaped = {}
if ARGV[1] ~= '' then
  reap(ARGV[1])
  return {ARGV[1]}
end
for _, node in ipairs(redis.call('SMEMBERS', 'mux:nodes')) do
  if redis.call('EXISTS', 'mux:hb:' .. node) == 0 then
    reap(node)
    reaped[#reaped + 1] = node
  end
end
return reaped
""")
