"""A session blocked on the backplane keeps its order (in memory, no Redis).

Cluster mode answers some requests only after a Redis round trip; meanwhile
that session's later frames wait (SessionProtocol.block/unblock). A fake
backplane stands in for Redis here so the ordering rule is checked alone.
"""

import functools

from muxserver import protocol as P
from muxserver.backplane.cluster import set_reading
from muxserver.loop import EVENT_READ
from muxserver.testing import MemoryPair, memory_server


class FakeBackplane:
    """Answers JOIN only when the test says so; everything else passes through."""

    def __init__(self, server) -> None:
        self.server = server
        self.waiting: list = []

    def join(self, sess, msg) -> None:
        protocol = self.server.protocol
        protocol.block(sess)

        def answer() -> None:
            if sess.ns is not None:  # like the real one: it may have closed meanwhile
                self.server.router.presence(self.server.hub.join(sess, msg.room))
                self.server.router.reply(sess, P.reply_ok(msg.req))
            protocol.unblock(sess)

        self.waiting.append(answer)

    def publish(self, sender, group, data, legacy, messages, echo) -> int:
        return 0

    def emitted(self, sess, req, count=0) -> bool:
        return True

    def detach(self, sess) -> None:
        self.server.router.presence(self.server.hub.detach(sess))


def test_frames_after_a_blocked_request_wait_and_keep_their_order():
    server, _clock = memory_server()
    a, b = MemoryPair(server), MemoryPair(server)
    a.send(P.Hello(1, "/", "a", ""))
    b.send(P.Hello(1, "/", "b", ""))
    a.frames(), b.frames()
    fake = FakeBackplane(server)
    server.protocol.backplane = server.router.backplane = fake
    server.protocol.on_block = functools.partial(set_reading, server)
    b.send(P.Join(1, "r"))
    fake.waiting.pop()()
    assert b.frames() == [P.Reply(1, P.OK)]
    # One read: JOIN (blocks), EMIT to that room, PING. Nothing may overtake.
    a.send(P.Join(1, "r"), P.Emit(2, P.TARGET_ROOM, "r", "m", b"x"), P.Ping(3))
    assert a.frames() == [] and b.frames() == []
    assert not a.session.transport.interest & EVENT_READ  # reading is paused meanwhile
    a.send(P.Ping(4))  # a read that was already under way waits too
    assert a.frames() == []
    fake.waiting.pop()()
    assert a.frames() == [P.Reply(1, P.OK), P.Reply(2, P.OK, P.U32.pack(1)),
                          P.ServerPong(3), P.ServerPong(4)]  # fmt: skip
    assert b.frames() == [P.Event(0, "a", "r", "m", b"x")]
    assert a.session.transport.interest & EVENT_READ
    # Closing while blocked: the answer finds the session gone and sends nothing.
    a.send(P.Join(5, "s"), P.Ping(6))
    a.close()
    fake.waiting.pop()()
    assert server.sessions.get(a.session.id) is None
