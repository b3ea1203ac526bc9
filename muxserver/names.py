"""Name rules of protocol section 1, and the cache the hot path checks names through.

Room, event, namespace and nick names have rules (length, UTF-8, no control
characters, no whitespace in nicks) that the server checks on every EMIT.
They live apart from the frame codec because they are about meaning, not
bytes; ``protocol`` re-exports them so callers have one import.
"""

from __future__ import annotations


def _bad_char(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F


def check_name(name: str, kind: str = "room") -> str | None:
    """Return None if ``name`` is a valid room/event/namespace/nick, else why not."""
    raw_len = len(name.encode("utf-8", "surrogateescape"))
    if any("\udc80" <= ch <= "\udcff" for ch in name):
        return f"{kind} name is not valid UTF-8"
    if kind == "nick":
        if not 1 <= raw_len <= 32:
            return "nick must be 1..32 bytes"
        for ch in name:
            if _bad_char(ch) or ch.isspace():
                return "nick must not contain control characters or whitespace"
        return None
    if not 1 <= raw_len <= 255:
        return f"{kind} name must be 1..255 bytes"
    if kind == "namespace" and not name.startswith("/"):
        return "namespace must start with '/'"
    for ch in name:
        if _bad_char(ch):
            return f"{kind} name must not contain control characters"
    return None


class NameCache:
    """raw name bytes -> decoded str, for names that passed their check.

    The hot path sees the same few room and event names millions of times;
    a dict hit replaces a UTF-8 decode and a per-character scan. Bounded: the
    cache is emptied when full so a client inventing names cannot grow it.
    """

    __slots__ = ("kind", "known", "limit")

    def __init__(self, kind: str, limit: int = 8192) -> None:
        self.kind = kind
        # Public so the server's hot path can do a plain dict lookup; on a
        # miss it calls get(), which checks and remembers the name.
        self.known: dict[bytes, str] = {}
        self.limit = limit

    def get(self, raw: bytes) -> str | None:
        """The decoded name, or None if it breaks the rules."""
        name = self.known.get(raw)
        if name is not None:
            return name
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if check_name(name, self.kind) is not None:
            return None
        if len(self.known) >= self.limit:
            self.known.clear()
        self.known[raw] = name
        return name

    def why(self, raw: bytes) -> str:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return f"{self.kind} name is not valid UTF-8"
        return check_name(name, self.kind) or "ok"
