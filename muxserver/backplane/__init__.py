"""The cluster backplane: what lets several server processes share state.

``redis.py`` is the link (two connections to one Redis server, driven by the
server's own event loop); ``scripts.py`` holds the Lua scripts that make a
sequenced room message one atomic step. Nothing here is imported by the rest
of muxserver unless ``--redis`` is given, and hiredis is imported only when a
link is built, so a server without the ``cluster`` extra still runs.
"""

from muxserver.backplane.redis import RedisError, RedisLink, RedisURL, Script, parse_url

__all__ = ["RedisError", "RedisLink", "RedisURL", "Script", "parse_url"]
