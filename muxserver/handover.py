"""Moving a connection from one session object to another (session resume, protocol section 10).

The hub's member is the :class:`~muxserver.session.Session` object, so a
resumed session must be the *same* object: every room and namespace dict
then keeps it where it was (join order included) and nothing is copied.
What moves is the connection (its transport, output list, counters, the
selector callback and the server's ``sessions`` entry):

* :func:`split_connection`: parking. The connection goes to a new *shell*
  session outside the hub, which sends the ERROR, if any, and closes like
  any other connection; the session keeps its hub state, with no
  connection.
* :func:`join_connection`: resuming. A new connection, still in HELLO, is
  given to the parked (or replaced) session; the session object that
  connection started with is left empty, ``successor`` pointing at the one
  that took over, so the rest of that read is handled for the right session.
"""

from __future__ import annotations

_CLOSED = 4  # session.CLOSED: this module imports no session code (session -> resume -> here)


class _Sink:
    """The ``out`` of a session without a connection: appends are dropped (nothing is queued)."""

    __slots__ = ()

    def append(self, frame) -> None:
        pass

    def extend(self, frames) -> None:
        pass

    def clear(self) -> None:
        pass

    def __len__(self) -> int:
        return 0


SINK = _Sink()


def split_connection(server, sess):
    """Move ``sess``'s connection to a new session outside the hub; returns it."""
    server._next_id += 1
    shell = type(sess)(server._next_id, sess.transport, sess.peer, sess.connected_at)
    shell.state, shell.version, shell.nick = sess.state, sess.version, sess.nick
    shell.last_rx, shell.last_ping = sess.last_rx, sess.last_ping
    shell.counted, sess.counted = sess.counted, False
    shell.frames_in, shell.frames_out = sess.frames_in, sess.frames_out
    sess.frames_in = sess.frames_out = 0
    _rebind(server, shell)
    server.sessions.pop(sess.id, None)
    server.sessions[shell.id] = shell
    sess.transport = None
    sess.out = SINK
    return shell


def join_connection(server, new, sess) -> None:
    """Give ``new``'s connection to ``sess`` (a resume); ``new`` is left empty."""
    sess.transport, sess.out, sess._peer = new.transport, new.out, new._peer
    sess.counted, new.counted = new.counted, False
    sess.frames_in, sess.frames_out = new.frames_in, new.frames_out
    sess.connected_at = new.connected_at
    _rebind(server, sess)
    # conn_id names a connection (WELCOME, /connz, logs): the new one's.
    server.sessions.pop(new.id, None)
    sess.id = new.id
    server.sessions[sess.id] = sess
    new.state = _CLOSED
    new.successor = sess
    new.transport = None
    new.out = []


def _rebind(server, sess) -> None:
    """Point the transport's event handler at ``sess``.

    The loop calls the transport, which calls ``callback(owner, mask)``
    (transport/stream.py), so handing a connection over is one assignment.
    """
    transport = sess.transport
    transport.callback, transport.owner = server._on_event_shared, sess
