"""The request handlers of a session: JOIN, LEAVE, NICK, WHO, ROOMS, PING, PONG, BYE.

Split out of session.py (which keeps HELLO, the EMIT paths and closing) so
that each file stays readable. :class:`RequestHandlers` is a mixin of
:class:`muxserver.session.SessionProtocol`: its methods use that class's
hub, router, history sequencer and, in a cluster, backplane. Every request
gets exactly one REPLY with its ``req`` (protocol section 2), through
``_reply_error`` or the router. The EMIT rate limit's token bucket lives
here too, for the same reason: session.py keeps to its size.
"""

from __future__ import annotations

import logging

from . import protocol as P
from .hub import HubError

log = logging.getLogger("muxserver")


class RequestHandlers:
    def _take_token(self, sess) -> bool:
        """Token bucket: ``rate_limit`` per second, up to ``rate_burst`` saved."""
        now = self.clock.now
        bucket = sess.bucket
        tokens = bucket[0] + (now - bucket[1]) * self._rate
        bucket[1] = now
        if tokens > self._burst:
            tokens = self._burst
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _reply_error(self, sess, req: int, status: int, message: str) -> None:
        self.router.reply(sess, P.reply_error(req, status, message))
        errors = self.stats["reply_errors"]
        errors[status] = errors.get(status, 0) + 1

    def _membership(self, sess, req: int, change) -> None:
        """JOIN, LEAVE, NICK: run the hub change, tell the watchers, answer."""
        try:
            changes = change()
        except HubError as exc:
            self._reply_error(sess, req, exc.status, exc.message)
            return
        self.router.presence(changes)
        self.router.reply(sess, P.reply_ok(req))

    def _on_join(self, sess, body: bytes) -> None:
        msg = P.decode_join(body, sess.version)
        if self.backplane is not None:
            self.backplane.join(sess, msg)
            return
        presence = bool(msg.flags & P.JOIN_PRESENCE)
        if sess.version < 2 or not msg.flags & P.JOIN_SEQUENCED:
            self._membership(sess, msg.req, lambda: self.hub.join(sess, msg.room, presence))
            room = sess.rooms.get(msg.room)
            if room is not None and (sess in room.seq or sess in room.held):
                self.sequencer.unsequence(sess, room)  # the latest JOIN's flags decide
            return
        try:
            changes = self.hub.join(sess, msg.room, presence)
        except HubError as exc:
            self._reply_error(sess, msg.req, exc.status, exc.message)
            return
        self.router.presence(changes)
        self.router.reply(sess, self.sequencer.join(sess, sess.rooms[msg.room], msg))

    def _on_leave(self, sess, body: bytes) -> None:
        msg = P.decode(P.LEAVE, body)
        if self.backplane is not None:
            self.backplane.leave(sess, msg)
            return
        self._membership(sess, msg.req, lambda: self.hub.leave(sess, msg.room))

    def _on_nick(self, sess, body: bytes) -> None:
        msg = P.decode(P.NICK, body)
        if self.backplane is not None:
            self.backplane.nick(sess, msg)
            return

        def rename():
            changes = self.hub.rename(sess, msg.nick)
            sess.set_prefixes()  # EVENTs carry the new nick from now on
            return changes

        self._membership(sess, msg.req, rename)

    def _on_who(self, sess, body: bytes) -> None:
        msg = P.decode(P.WHO, body)
        if self.backplane is not None and self.backplane.who(sess, msg):
            return
        try:
            nicks = self.hub.who(sess, msg.room)
        except HubError as exc:
            self._reply_error(sess, msg.req, exc.status, exc.message)
            return
        entries = [P.str8(n) for n in nicks]
        self.router.reply(sess, P.listing_reply(msg.req, entries, self.config.max_frame))

    def _on_rooms(self, sess, body: bytes) -> None:
        msg = P.decode(P.ROOMS, body)
        if self.backplane is not None and self.backplane.rooms(sess, msg):
            return
        rooms = self.hub.rooms(sess, all_rooms=msg.scope == 1)
        entries = [P.str8(name) + P.U32.pack(count) for name, count in rooms]
        self.router.reply(sess, P.listing_reply(msg.req, entries, self.config.max_frame))

    def _on_ping(self, sess, body: bytes) -> None:
        nonce = P.decode(P.PING, body).nonce  # exactly 8 bytes, or BAD_FRAME
        self.router.reply(sess, P.ping_frame(P.SERVER_PONG, nonce))

    def _on_pong(self, sess, body: bytes) -> None:
        P.decode(P.PONG, body)  # any frame counts as alive: last_rx is already set

    def _on_bye(self, sess, body: bytes) -> None:
        P.decode(P.BYE, body)  # must be empty
        log.debug(
            "bye #%d %s from %s", sess.id, sess.nick, sess.peer,
            extra={"conn": sess.id, "peer": sess.peer, "nick": sess.nick, "reason": "BYE"},
        )  # fmt: skip
        self.detach(sess)
        self.begin_close(sess)
