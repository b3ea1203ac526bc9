"""Log output for the ``muxserver`` command: human text or one JSON object per line.

Why a module of its own: log shippers (journald, Loki, Elasticsearch) want
fields, not sentences. The server attaches the fields it knows to the few
lines it logs (``extra={"conn": ..., "peer": ..., "reason": ...}``; only on
connection events and the periodic summary, never per message), and the
formatter chosen here decides whether they end up as JSON keys or are simply
left out of the text line, whose message already says the same in words.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time

# Attributes every LogRecord has; anything else on a record came in through
# ``extra=`` and is a field worth emitting.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def pack_peer(peer):
    """An IPv4 ``(host, port)`` as one int; anything else as it is.

    A peer tuple with its port int costs 88 bytes per connection, the int 32;
    :func:`unpack_peer` gives the tuple back when a log line or /connz wants it.
    """
    if type(peer) is tuple and len(peer) == 2 and type(peer[1]) is int:
        try:
            return int.from_bytes(socket.inet_pton(socket.AF_INET, peer[0]), "big") << 16 | peer[1]
        except (OSError, TypeError):
            pass
    return peer


def unpack_peer(peer):
    if type(peer) is int:
        return (socket.inet_ntop(socket.AF_INET, (peer >> 16).to_bytes(4, "big")), peer & 0xFFFF)
    return peer


def format_peer(peer) -> str:
    """``("127.0.0.1", 5000)`` -> ``"127.0.0.1:5000"``, IPv6 in brackets."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "" if peer is None else str(peer)


def _tidy_peer(record: logging.LogRecord) -> None:
    """Show the peer as ``host:port`` in the message, not as a tuple repr.

    The server passes the raw address (no formatting cost on a disabled
    debug line) both as an argument and as ``extra={"peer": ...}``; the one
    that is equal to it gets replaced here, when the line is emitted.
    """
    peer = record.__dict__.get("peer")
    if isinstance(peer, tuple) and isinstance(record.args, tuple):
        # Equal, not only the same object: Session.peer unpacks a new tuple per read.
        record.args = tuple(
            format_peer(a) if a is peer or (type(a) is tuple and a == peer) else a
            for a in record.args
        )


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        _tidy_peer(record)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        _tidy_peer(record)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = format_peer(value) if key == "peer" else value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        # default=str: a field that is not JSON (a Path, an enum) still logs.
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: str = "text", stream=None) -> None:
    """Configure the root logger once, for the ``muxserver`` process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
