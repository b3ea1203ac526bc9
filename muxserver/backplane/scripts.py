"""Lua scripts for sequenced rooms in a cluster (protocol sections 9 and 12), and their wrappers.

A room's seq, epoch and history live in Redis so that every node numbers the
room's messages from one counter. One script per *run* of EMITs (the messages
of one sender to one room from one read) does the whole step atomically, since
Redis runs a script alone: create the epoch if the room has none, take the
run's range of seqs (one HINCRBY), append each message to the history stream,
trim it, refresh the TTLs, PUBLISH the run. A second script reads the history
after a seq (gap fill), a third answers a SEQUENCED JOIN (the recovery plan of
section 9 and its replay, in one atomic read).

Key layout (all keys of a room share the hash tag ``{...}``, so one room lives
in one Redis Cluster slot and the scripts can run there unchanged)::

    mux:{<ns>|<room>}:ev       channel: the room's runs (and PRESENCE, keys.py)
    mux:{<ns>|<room>}:meta     hash: epoch = 8 raw bytes (u64 BE, never 0),
                                      seq   = last seq assigned (integer)
    mux:{<ns>|<room>}:hist     stream: one entry per run, id "<first seq>-0",
                               fields "m" = the run's version-2 EVENT frames,
                               "o" = str8 origin node | u32 conn | u8 echo;
                               trimmed to the runs holding the latest
                               history-size messages

``<ns>`` has ``%`` and ``|`` percent-escaped (``%25``, ``%7C``) so the first
``|`` always ends it: ``/a|b`` + ``c`` and ``/a`` + ``b|c`` stay two rooms. The
room name needs no escaping (it runs to the closing brace we add; a ``}``
inside a room name only shortens the hash tag, identically for all its keys).

Published run (binary, on the room channel; keys.SEQ_EVENTS)::

    u8 7 | str8 origin | u64 first seq | 8 bytes epoch | u32 conn | u8 echo
         | u32 messages | u32 len(data) | data | legacy

``data`` is the run's EVENT frames as the sender's node built them, ``legacy``
their version-1 encoding when it differs: receivers append them as they are,
and build EVENT_SEQ frames (a 13-byte head per message) only when they have
SEQUENCED members. ``conn`` and ``echo`` let the origin node leave the sender
out of its own live EVENT_SEQs.

Why the epoch comes from the caller: a script must be deterministic for
replication, so the random u64 is drawn in Python (``secrets``) and passed on
every call; the script uses it only when the room's meta hash is missing (new
room, or its TTL ran out), and then also drops any stale history stream, since
a new epoch restarts the numbering at 1. Lua numbers are doubles: seq is exact
up to 2**53, and the epoch stays an opaque 8-byte string inside Lua.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from typing import Any

from muxserver.backplane.keys import SEQ_EVENTS
from muxserver.backplane.redis import RedisError, RedisLink, Script

# After a run message's kind and origin: first seq, epoch, conn, echo, messages, len(data).
RUN_HEAD = struct.Struct(">Q8sIBII")
WHO = struct.Struct(">IB")  # conn, echo (after the str8 origin, in the "o" field)
TAIL_HEAD_COUNTS = struct.Struct(">II")  # messages, len(data): after conn and echo

_NEW_EPOCH = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
"""

# Entries of the stream holding seqs ARGV-given a..b (b nil: to the end): the
# run that starts at or before a (it may end before a: the caller filters),
# then every run starting in a+1..b.
_RUNS = """
local function runs(a, b)
  local out = {}
  local prev = redis.call('XREVRANGE', KEYS[2], string.format('%d-0', a), '-', 'COUNT', 1)
  if #prev > 0 then out[1] = prev[1] end
  local stop = '+'
  if b then stop = string.format('%d-0', b) end
  if not b or b > a then
    for _, e in ipairs(redis.call('XRANGE', KEYS[2], string.format('%d-0', a + 1), stop)) do
      out[#out + 1] = e
    end
  end
  return out
end
"""

RUN_SOURCE = (
    """
-- KEYS[1] meta, KEYS[2] hist
-- ARGV: new epoch (8 bytes), maxlen, ttl, channel, head (kind + str8 origin),
--       tail head (conn, echo, messages, len(data)), legacy, who, data (the frames), messages
"""
    + _NEW_EPOCH
    + """
local n = tonumber(ARGV[10])
local last = redis.call('HINCRBY', KEYS[1], 'seq', n)
local first = last - n + 1
local data = ARGV[9]
-- One entry per run (its id is the run's first seq): one XADD, not one per message.
redis.call('XADD', KEYS[2], string.format('%d-0', first), 'm', data, 'o', ARGV[8])
-- Drop the runs that hold nothing of the latest maxlen messages.
local keep = last - tonumber(ARGV[2]) + 1
if keep > 1 then
  local from = redis.call('XREVRANGE', KEYS[2], string.format('%d-0', keep), '-', 'COUNT', 1)
  if #from > 0 then redis.call('XTRIM', KEYS[2], 'MINID', from[1][1]) end
end
local v, b = first, {}
for i = 8, 1, -1 do
  b[i] = v % 256
  v = math.floor(v / 256)
end
redis.call('PUBLISH', ARGV[4], ARGV[5] .. string.char(unpack(b)) .. epoch .. ARGV[6]
  .. data .. ARGV[7])
return {epoch, first}
"""
)

RANGE_SOURCE = (
    """
-- KEYS[1] meta, KEYS[2] hist; ARGV: after (seq), count (0: no bound)
"""
    + _RUNS
    + """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if not meta[1] then
  return {'', 0, {}}
end
local after, count = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = nil
if count > 0 then b = after + count end
return {meta[1], tonumber(meta[2]), runs(after + 1, b)}
"""
)

# The recovery plan of section 9, as muxserver.history.History.plan_join
# computes it for one node, over the room's Redis history (of exactly
# ``maxlen`` messages, though its oldest run may hold a few more).
JOIN_SOURCE = (
    """
-- KEYS[1] meta, KEYS[2] hist
-- ARGV: new epoch, maxlen, ttl, the JOIN's epoch (8 bytes), after, replay_max
"""
    + _NEW_EPOCH
    + _RUNS
    + """
local last = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local oldest = last + 1
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #head > 0 then
  oldest = math.max(tonumber(string.match(head[1][1], '^(%d+)')), last - tonumber(ARGV[2]) + 1)
end
local given, after, cap = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local fresh = given == string.rep('\\0', 8)
local recovery, first
if fresh or given ~= epoch or after > last then
  first = oldest
  if fresh then recovery = 0 else recovery = 3 end
else
  first = math.max(after + 1, oldest)
  recovery = -1
end
if cap ~= 65535 then first = math.max(first, last - cap + 1) end
if recovery < 0 then
  if first == after + 1 then recovery = 1 else recovery = 2 end
end
local entries = {}
if first <= last then entries = runs(first, last) end
return {epoch, last, first, recovery, entries}
"""
)

ROOM_RUN = Script(RUN_SOURCE)
ROOM_RANGE = Script(RANGE_SOURCE)
ROOM_JOIN = Script(JOIN_SOURCE)


def room_base(namespace: str | bytes, room: str | bytes) -> bytes:
    """``mux:{<ns>|<room>}``: the prefix of the room's keys and channel."""
    ns = namespace.encode() if isinstance(namespace, str) else namespace
    name = room.encode() if isinstance(room, str) else room
    ns = ns.replace(b"%", b"%25").replace(b"|", b"%7C")
    return b"mux:{" + ns + b"|" + name + b"}"


def new_epoch() -> bytes:
    """A random non-zero u64, as the 8 bytes the script stores."""
    while True:
        epoch = secrets.token_bytes(8)
        if epoch != bytes(8):
            return epoch


def _keys(base: bytes) -> list[bytes]:
    return [base + b":meta", base + b":hist"]


def _check_bounds(maxlen: int, ttl: int) -> None:
    if not isinstance(maxlen, int) or maxlen < 1:
        raise ValueError(f"maxlen must be an int >= 1, got {maxlen!r}")
    if not isinstance(ttl, int) or ttl < 0:
        raise ValueError(f"ttl must be an int >= 0 (seconds), got {ttl!r}")


def split_frames(data: bytes) -> list[bytes]:
    """The frames (length prefixes included) of a run's joined EVENT bytes."""
    out = []
    at, end = 0, len(data)
    while at < end:
        n = int.from_bytes(data[at : at + 4], "big") + 4
        if n < 5 or at + n > end:
            raise ValueError(f"run data is not whole frames (frame at {at} of {end} bytes)")
        out.append(data[at : at + n])
        at += n
    return out


def room_run(
    link: RedisLink,
    base: bytes,
    origin8: bytes,
    data: bytes,
    messages: int,
    legacy: bytes | None,
    conn: int,
    echo: bool,
    *,
    maxlen: int,
    ttl: int,
    callback: Callable[[Any], None],
) -> bool:
    """Sequence, keep and publish one run of EVENT frames in one script call.

    ``data`` is the run's ``messages`` EVENT frames, joined (as the router
    has them). ``callback((epoch, first seq))`` with ints (the run has seqs
    ``first .. first + messages - 1``), or a RedisError. ``maxlen`` is the history
    size (>= 1), ``ttl`` seconds (0 = keys never expire). False if the link
    refused the call (down, or its backlog is full).
    """
    _check_bounds(maxlen, ttl)
    if not isinstance(messages, int) or messages < 1 or not data:
        raise ValueError(f"a run has at least one message, got {messages!r} in {len(data)} bytes")

    def on_reply(reply: Any) -> None:
        if isinstance(reply, RedisError):
            callback(reply)
            return
        try:
            epoch, first = reply
            result = (int.from_bytes(epoch, "big"), int(first))
        except (TypeError, ValueError):
            callback(RedisError(f"room run: unexpected reply {reply!r:.80}"))
            return
        callback(result)

    who = WHO.pack(conn & 0xFFFFFFFF, 1 if echo else 0)
    tail_head = who + TAIL_HEAD_COUNTS.pack(messages, len(data))
    args = [new_epoch(), maxlen, ttl, base + b":ev", bytes((SEQ_EVENTS,)) + origin8, tail_head,
            legacy or b"", origin8 + who, data, messages]  # fmt: skip
    return link.eval_script(ROOM_RUN, _keys(base), args, callback=on_reply)


def parse_run(data: bytes, at: int) -> tuple[int, int, int, int, int, bytes, bytes | None]:
    """``(first, epoch, conn, echo, messages, data, legacy)`` of a run message's body at ``at``."""
    if len(data) < at + RUN_HEAD.size:
        raise ValueError(f"run message of {len(data)} bytes is shorter than its header")
    first, epoch, conn, echo, messages, size = RUN_HEAD.unpack_from(data, at)
    at += RUN_HEAD.size
    body = data[at : at + size]
    return (
        first,
        int.from_bytes(epoch, "big"),
        conn,
        echo,
        messages,
        body,
        data[at + size :] or None,
    )


def _entries(raw, lo: int, hi: int | None) -> list[tuple[int, bytes, bytes]]:
    """``(seq, frame, who)`` of each message ``lo..hi`` in stream entries (one per run)."""
    out = []
    for entry_id, fields in raw:
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
        seq = int(entry_id.split(b"-", 1)[0])
        who = fields.get(b"o", b"")
        for frame in split_frames(fields[b"m"]):
            if seq >= lo and (hi is None or seq <= hi):
                out.append((seq, frame, who))
            seq += 1
    return out


def room_range(
    link: RedisLink,
    base: bytes,
    after: int,
    count: int,
    callback: Callable[[Any], None],
) -> bool:
    """The room's history after seq ``after``, at most ``count`` messages (0: all).

    ``callback((epoch, last_seq, [(seq, frame, who), ...]))`` in one atomic
    read, so the entries belong to that epoch; ``epoch == 0`` when the room
    has no history in Redis. Or a RedisError.
    """
    if not isinstance(after, int) or after < 0:
        raise ValueError(f"after must be an int >= 0, got {after!r}")
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0 (0: no bound), got {count!r}")

    def on_reply(reply: Any) -> None:
        if isinstance(reply, RedisError):
            callback(reply)
            return
        try:
            epoch, last, entries = reply
            hi = after + count if count else None
            messages = _entries(entries, after + 1, hi)
            result = (int.from_bytes(epoch, "big") if epoch else 0, int(last), messages)
        except (TypeError, ValueError, KeyError, AttributeError):
            callback(RedisError(f"room range: unexpected reply {reply!r:.80}"))
            return
        callback(result)

    return link.eval_script(ROOM_RANGE, _keys(base), [after, count], callback=on_reply)


def room_join(
    link: RedisLink,
    base: bytes,
    epoch: int,
    after: int,
    replay_max: int,
    maxlen: int,
    ttl: int,
    callback: Callable[[Any], None],
) -> bool:
    """A SEQUENCED JOIN's plan and replay, from the room's Redis history.

    ``callback((recovery, epoch, first, last, [(seq, frame, who), ...]))``,
    the replay being exactly ``first..last``; or a RedisError. Starts the
    room's history (a new epoch) if it has none, as one node does.
    """
    _check_bounds(maxlen, ttl)

    def on_reply(reply: Any) -> None:
        if isinstance(reply, RedisError):
            callback(reply)
            return
        try:
            room_epoch, last, first, recovery, entries = reply
            first, last = int(first), int(last)
            result = (int(recovery), int.from_bytes(room_epoch, "big"), first, last,
                      _entries(entries, first, last))  # fmt: skip
        except (TypeError, ValueError, KeyError, AttributeError):
            callback(RedisError(f"room join: unexpected reply {reply!r:.80}"))
            return
        callback(result)

    args = [new_epoch(), maxlen, ttl, epoch.to_bytes(8, "big"), after, replay_max]
    return link.eval_script(ROOM_JOIN, _keys(base), args, callback=on_reply)
