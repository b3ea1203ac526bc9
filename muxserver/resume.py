"""Session resume (protocol section 10): tokens, parked sessions, REPLACED.

A session is the hub member (nick, rooms, namespace); a connection is what
carries it. Parking separates the two: the connection goes to a *shell*
session (``handover.split_connection``) that sends the ERROR, if any, and closes
like any other, while the session object stays in the hub with no
connection, state PARKED, and an ``out`` that drops whatever is appended
(``handover.SINK``): it keeps its nick and rooms, WHO and ROOMS count it, no
PRESENCE leave goes out, and nothing is queued for it. Resuming hands the new
connection to the parked session (``handover.join_connection``), so every room
and namespace dict keeps the same member object in the same join order, and
no hub state is copied or rebuilt.

Tokens are ``selector.validator``: the selector (random, not secret) finds
the entry in a dict, and the validator (``secrets``, 192 bits) is compared
with :func:`hmac.compare_digest`, so lookup time says nothing about the
secret. A token works once: a resume issues a new one.

Readings chosen here: a session parks on a lost connection (EOF, reset,
write error), ``IDLE_TIMEOUT`` and ``SLOW_CONSUMER``, never after BYE,
``SHUTTING_DOWN``, a protocol error or an internal error; version-1 sessions
never park (they have no token). The WELCOME of a resumed session carries the
new connection's ``conn_id`` (it names a connection). Restored SEQUENCED memberships are held (silent)
until re-joined SEQUENCED; plain ones are live at once.
"""

from __future__ import annotations

import hmac
import logging
import secrets

from . import handover
from . import protocol as P
from .handover import SINK

log = logging.getLogger("muxserver")

PARKED = 5  # session state: in the hub, no connection (after session.CLOSED)
_OPEN, _CLOSED = 1, 4  # session.OPEN, session.CLOSED (session.py imports this module)

# The fatal codes that park a session instead of ending it.
PARK_CODES = frozenset((P.IDLE_TIMEOUT, P.SLOW_CONSUMER))


class Resumer:
    """Resume tokens of every version-2 session, and the parked sessions with their timers."""

    def __init__(self, config, hub, router, sequencer, clock, host, stats: dict, fatal) -> None:
        self.fatal = fatal  # SessionProtocol.fatal, for REPLACED
        self.window = float(config.resume_window)
        self.hub = hub
        self.router = router
        self.sequencer = sequencer
        self.clock = clock  # the loop: ``now`` and ``call_later``
        self.host = host
        self.stats = stats
        for key in ("resumes", "resumes_replaced", "parked_total", "parked_expired"):
            stats.setdefault(key, 0)
        self.tokens: dict[str, tuple[bytes, object]] = {}  # selector -> (validator, session)
        self.parked: dict = {}  # session -> expiry Timer
        # The cluster backplane's hooks (backplane/resume.py): on_park(session)
        # after a session parks; on_expire(session, selector) ends one whose
        # window ran out (instead of the local leave below).
        self.on_park = None
        self.on_expire = None
        # In a cluster, every selector starts with "<node id>~" (the node that
        # issued it), so any node knows where a live session's token points.
        self.prefix = ""

    # ----------------------------------------------------------- tokens
    def issue(self, sess) -> str:
        """A new token for ``sess`` (the old one stops working); "" when resume is off."""
        if not self.window:
            return ""
        self.tokens.pop(sess.resume_key, None)
        selector = self.prefix + secrets.token_hex(8)
        while selector in self.tokens:
            selector = self.prefix + secrets.token_hex(8)
        validator = secrets.token_urlsafe(24)
        self.tokens[selector] = (validator.encode("ascii"), sess)
        sess.resume_key = selector
        return f"{selector}.{validator}"  # 49 bytes + prefix: within the 64 of section 10

    def _find(self, token: str, ns_name: str):
        selector, dot, validator = token.partition(".")
        entry = self.tokens.get(selector) if dot else None
        if entry is None:
            return None
        secret, sess = entry
        given = validator.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, secret):
            return None
        if sess.ns is None or sess.ns.name != ns_name:
            return None  # a token resumes a session of the HELLO's namespace only
        return sess

    def drop(self, sess) -> None:
        """A parked session resumed on another cluster node: gone here, no PRESENCE leave."""
        if self.parked.get(sess) is None:
            return
        self._count_parked(sess, -1)
        self.forget(sess)
        sess.state = _CLOSED

    def forget(self, sess) -> None:
        """``sess`` ended for good (BYE, error, window over): its token dies with it."""
        if sess.resume_key:
            self.tokens.pop(sess.resume_key, None)
            sess.resume_key = ""
        timer = self.parked.pop(sess, None)
        if timer is not None:
            timer.cancel()

    # ---------------------------------------------------------- parking
    def can_park(self, sess) -> bool:
        return (
            self.window > 0
            and sess.state == _OPEN
            and bool(sess.resume_key)
            and not self.host.shutting_down
        )

    def park(self, sess):
        """Keep ``sess`` in the hub without its connection; returns the shell now holding it."""
        shell = handover.split_connection(self.host, sess)
        self._count_parked(sess, 1)
        sess.state = PARKED
        sess.out = SINK
        self.sequencer.hold(sess)
        self.parked[sess] = self.clock.call_later(self.window, self._expire, sess)
        self.stats["parked_total"] += 1
        if self.on_park is not None:
            self.on_park(sess)
        log.debug(
            "parked #%d %s for %g s", sess.id, sess.nick, self.window,
            extra={"conn": sess.id, "nick": sess.nick, "reason": "PARKED"},
        )  # fmt: skip
        return shell

    def _expire(self, sess) -> None:
        """The window ended without a resume: leave everything, PRESENCE leaves go out."""
        if self.parked.pop(sess, None) is None:
            return
        self.stats["parked_expired"] += 1
        self._count_parked(sess, -1)
        selector = sess.resume_key
        self.forget(sess)
        sess.state = _CLOSED
        if self.on_expire is not None:
            self.on_expire(sess, selector)
            return
        self.router.presence(self.hub.detach(sess))

    # ----------------------------------------------------------- resume
    def resume(self, new, hello: P.Hello):
        """HELLO v2 with a resume token on connection ``new``: the session it resumes, or None.

        On success the session owns ``new``'s connection (``new.successor``
        points at it) and is OPEN; the caller sends WELCOME resumed=1.
        """
        sess = self._find(hello.resume, hello.namespace)
        if sess is None:
            return None
        if sess.state == _OPEN:
            # Still attached: the client saw the failure before we did.
            shell = handover.split_connection(self.host, sess)
            self.fatal(shell, P.REPLACED, "this session was resumed elsewhere")
            self.stats["resumes_replaced"] += 1
        else:
            timer = self.parked.pop(sess, None)
            if timer is None:
                return None
            timer.cancel()
            self._count_parked(sess, -1)
        handover.join_connection(self.host, new, sess)
        now = self.clock.now
        sess.state = _OPEN
        sess.last_rx = sess.last_ping = now
        if sess.bucket is not None:
            sess.bucket[1] = now  # the rate-limit bucket refills from the resume on
        self.sequencer.hold(sess)
        self.stats["resumes"] += 1
        return sess

    @staticmethod
    def _count_parked(sess, delta: int) -> None:
        """Rooms and namespaces count their parked members: they are not recipients."""
        sess.ns.parked += delta
        for room in sess.rooms.values():
            room.parked += delta

    @property
    def parked_count(self) -> int:
        return len(self.parked)
