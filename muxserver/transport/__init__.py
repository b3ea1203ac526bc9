"""The seam between a connection and its bytes (protocol.md section 11).

Each transport turns what arrives on a socket into frame-stream bytes for the
session and frames the session's output for the wire. ``websocket`` is the
browser side: HTTP sniffing, the RFC 6455 upgrade, inbound messages, and the
hand-built outbound headers.
"""
