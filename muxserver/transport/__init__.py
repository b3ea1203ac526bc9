"""Transports: the seam between a session and its bytes.

A transport owns a socket (or, in tests, an in-memory pipe) and the bytes in
both directions; the session above it sees frames only. ``stream.py`` is raw
TCP and TLS; ``websocket.py`` is the browser side (HTTP sniffing, the RFC 6455
upgrade, inbound messages, hand-built outbound headers; protocol.md section
11). A transport offers the same small interface to the server:

* ``out``: a plain list of ready frame bytes the router appends to (the very
  same bytes object to every member: encode once, share everywhere);
* ``receive(data) -> frames`` (raises ``FrameError``), decoding input;
* ``flush(loop, data) -> unsent bytes``, one send per loop turn, where
  ``data`` is ``b"".join(out)``, shared between connections that queued the
  same frames; a transport that wraps its bytes (a WebSocket message header)
  adds its header here and still sends the shared bytes as they are;
* ``on_writable``, ``discard_unsent``, ``half_close``, ``close``.
"""
