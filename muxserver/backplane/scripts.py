"""Lua scripts for sequenced rooms in a cluster, and their Python wrappers.

A sequenced room's seq, epoch and history live in Redis so that every node
numbers the room's messages from one counter. One script per message does the
whole step atomically (Redis runs a script alone): create the epoch if the room
has none, take the next seq, append to the history stream, trim it, refresh the
TTLs, PUBLISH. A second script reads the history after a seq (replay, gap fill).

Key layout (all keys of a room share the hash tag ``{...}``, so one room lives
in one Redis Cluster slot and the scripts can run there unchanged)::

    mux:{<ns>|<room>}          pub/sub channel of the room's sequenced messages
    mux:{<ns>|<room>}:meta     hash: epoch = 8 raw bytes (u64 BE, never 0),
                                      seq   = last seq assigned (integer)
    mux:{<ns>|<room>}:hist     stream: one entry per message, id "<seq>-0",
                               one field "m" = the message bytes; MAXLEN = the
                               history size (exact trim)

``<ns>`` has ``%`` and ``|`` percent-escaped (``%25``, ``%7C``) so the first
``|`` always ends it: ``/a|b`` + ``c`` and ``/a`` + ``b|c`` stay two rooms. The
room name needs no escaping (it runs to the closing brace we add; a ``}``
inside a room name only shortens the hash tag, identically for all its keys).

Published message (binary, on the room channel)::

    u64 seq (BE) | u64 epoch (BE) | message bytes (the rest)

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

from muxserver.backplane.redis import RedisError, RedisLink, Script

HEADER = struct.Struct(">QQ")  # seq, epoch: the published message's header

PUBLISH_SOURCE = """
-- KEYS[1] meta, KEYS[2] hist; ARGV: message, maxlen, ttl, epoch (8 bytes), channel
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], string.format('%d-0', seq), 'm', ARGV[1])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
local n, b = seq, {}
for i = 8, 1, -1 do
  b[i] = n % 256
  n = math.floor(n / 256)
end
local subscribers = redis.call('PUBLISH', ARGV[5], string.char(unpack(b)) .. epoch .. ARGV[1])
return {epoch, seq, subscribers}
"""

RANGE_SOURCE = """
-- KEYS[1] meta, KEYS[2] hist; ARGV: after (seq), count
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if not meta[1] then
  return {'', 0, {}}
end
local first = string.format('%d-0', tonumber(ARGV[1]) + 1)
return {meta[1], tonumber(meta[2]), redis.call('XRANGE', KEYS[2], first, '+', 'COUNT', ARGV[2])}
"""

ROOM_PUBLISH = Script(PUBLISH_SOURCE)
ROOM_RANGE = Script(RANGE_SOURCE)


def room_base(namespace: str | bytes, room: str | bytes) -> bytes:
    """``mux:{<ns>|<room>}``: the room's channel and the prefix of its keys."""
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


def room_publish(
    link: RedisLink,
    base: bytes,
    message: bytes,
    *,
    maxlen: int,
    ttl: int,
    callback: Callable[[Any], None],
) -> bool:
    """Sequence and publish one room message.

    ``callback((epoch, seq, subscribers))`` with ints, or a RedisError.
    ``maxlen`` is the history size (>= 1), ``ttl`` seconds (0 = keys never expire).
    """
    if not isinstance(maxlen, int) or maxlen < 1:
        raise ValueError(f"maxlen must be an int >= 1, got {maxlen!r}")
    if not isinstance(ttl, int) or ttl < 0:
        raise ValueError(f"ttl must be an int >= 0 (seconds), got {ttl!r}")

    def on_reply(reply: Any) -> None:
        if isinstance(reply, RedisError):
            callback(reply)
            return
        try:
            epoch, seq, subscribers = reply
            result = (int.from_bytes(epoch, "big"), int(seq), int(subscribers))
        except (TypeError, ValueError):
            callback(RedisError(f"room publish: unexpected reply {reply!r:.80}"))
            return
        callback(result)

    keys = [base + b":meta", base + b":hist"]
    return link.eval_script(
        ROOM_PUBLISH, keys, [message, maxlen, ttl, new_epoch(), base], callback=on_reply
    )


def parse_published(data: bytes) -> tuple[int, int, bytes]:
    """``(seq, epoch, message)`` from a message received on a room channel."""
    if len(data) < HEADER.size:
        raise ValueError(f"room message of {len(data)} bytes is shorter than its header")
    seq, epoch = HEADER.unpack_from(data)
    return seq, epoch, data[HEADER.size :]


def room_range(
    link: RedisLink,
    base: bytes,
    after: int,
    count: int,
    callback: Callable[[Any], None],
) -> bool:
    """The room's history after seq ``after``, at most ``count`` messages.

    ``callback((epoch, last_seq, [(seq, message), ...]))`` in one atomic read,
    so the entries belong to that epoch; ``epoch == 0`` when the room has no
    history in Redis. Or a RedisError.
    """
    if not isinstance(after, int) or after < 0:
        raise ValueError(f"after must be an int >= 0, got {after!r}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")

    def on_reply(reply: Any) -> None:
        if isinstance(reply, RedisError):
            callback(reply)
            return
        try:
            epoch, last, entries = reply
            messages = []
            for entry_id, fields in entries:
                fields = dict(zip(fields[::2], fields[1::2], strict=True))
                messages.append((int(entry_id.split(b"-", 1)[0]), fields[b"m"]))
            result = (int.from_bytes(epoch, "big") if epoch else 0, int(last), messages)
        except (TypeError, ValueError, KeyError, AttributeError):
            callback(RedisError(f"room range: unexpected reply {reply!r:.80}"))
            return
        callback(result)

    keys = [base + b":meta", base + b":hist"]
    return link.eval_script(ROOM_RANGE, keys, [after, count], callback=on_reply)
