"""RESP and configuration pieces of the Redis link, with no I/O.

Kept apart from ``redis.py`` (the sockets and the failure rules) so they can be
read and tested alone: the error types, the URL parser, the command encoder
(RESP arrays of bulk strings; replies are parsed by hiredis.Reader, a C parser
we feed bytes to), and ``Script`` (Lua source with its SHA1 for EVALSHA).
hiredis itself is imported only by ``hiredis_module()``, so importing muxserver
never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import sha1
from urllib.parse import unquote, urlsplit


class RedisError(Exception):
    """A Redis error reply, or the link's own failure ("connection lost", ...)."""


class RedisProtocolError(RedisError):
    """Bytes from Redis that are not RESP: the connection cannot go on."""


def hiredis_module():
    """The hiredis module, or a RuntimeError naming the extra to install."""
    try:
        import hiredis
    except ImportError as exc:  # the cluster extra is optional
        raise RuntimeError(
            "the Redis backplane needs hiredis: pip install 'muxserver[cluster]'"
        ) from exc
    return hiredis


# ------------------------------------------------------------------ URL
@dataclass(frozen=True)
class RedisURL:
    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_url(url: str) -> RedisURL:
    """``redis://[[user]:password@]HOST[:PORT][/DB]`` or ``rediss://`` (TLS)."""
    if not isinstance(url, str) or not url:
        raise ValueError("Redis URL: expected redis://HOST:PORT/DB, got an empty value")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"Redis URL {url!r}: {exc}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"Redis URL {url!r}: the scheme must be redis:// or rediss://")
    if not parts.hostname:
        raise ValueError(f"Redis URL {url!r}: no host (expected redis://HOST:PORT/DB)")
    if port == 0:
        raise ValueError(f"Redis URL {url!r}: port 0 is not a port")
    if parts.query or parts.fragment:
        raise ValueError(f"Redis URL {url!r}: query strings and fragments are not supported")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ValueError(f"Redis URL {url!r}: the database must be a number, got {path!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username and password is None:
        raise ValueError(f"Redis URL {url!r}: a user name needs a password (user:pass@)")
    return RedisURL(
        host=parts.hostname,
        port=port or 6379,
        db=int(path) if path else 0,
        username=username,
        password=password or None,
        tls=parts.scheme == "rediss",
    )


# --------------------------------------------------------------- codec
def encode_command(args: tuple) -> bytes:
    """RESP array of bulk strings; str is UTF-8, int and float are decimal."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, (bytes, bytearray, memoryview)):
            data = bytes(arg)
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"Redis argument must be bytes, str, int or float, not {type(arg)}")
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class Script:
    """A Lua script with its SHA1, for ``RedisLink.eval_script``."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str | bytes) -> None:
        self.source = source.encode() if isinstance(source, str) else source
        self.sha = sha1(self.source).hexdigest().encode()
