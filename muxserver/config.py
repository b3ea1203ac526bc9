"""Server settings: one dataclass, filled by cli.py from arguments and the environment.

Kept apart from server.py so that every layer (session rules, transports,
monitoring) can read the settings without importing the glue.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 7878
    max_frame: int = 1024 * 1024
    max_connections: int = 10000
    max_output: int = 8 * 1024 * 1024
    max_rooms: int = 1000
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    drain_timeout: float = 5.0
    hello_timeout: float = 10.0
    name: str = "muxserver"
    token: str = ""
    rate_limit: float = 0.0  # EMITs per second per connection; 0 = off
    rate_burst: int = 0  # bucket size; 0 = max(1, rate_limit)
    tls_cert: str = ""
    tls_key: str = ""
    max_input_memory: int = 256 * 1024 * 1024  # bytes in incomplete frames, all connections
    frame_timeout: float = 30.0  # seconds a started frame has to complete
    allowed_origins: str = ""  # comma-separated origins WebSocket upgrades may come from; * any
    web: bool = True  # serve the chat page and muxclient.js (the /ws endpoint stays either way)
    # Sections 9 and 10: per-room history bounds and the resume window.
    history_size: int = 100  # messages per room; 0 turns history off
    history_bytes: int = 1024 * 1024  # per room
    history_ttl: float = 120.0  # seconds a message (and an empty room's numbering) lives
    history_memory: int = 64 * 1024 * 1024  # all rooms together
    resume_window: float = 120.0  # seconds a lost session stays parked; 0 turns resume off
    reuse_port: bool = False  # SO_REUSEPORT: set in --workers children (workers.py)
