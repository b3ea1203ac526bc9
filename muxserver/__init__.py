"""muxserver: a real-time messaging server on a hand-written selectors loop.

The package is split the way the data flows: ``framing`` (bytes <-> frames),
``protocol`` (frames <-> typed messages, name rules), ``loop`` (the event
loop), ``connection`` (one socket's buffers), ``hub`` (rooms and nicks, no
I/O) and ``server`` (the glue). ``cli`` is the ``muxserver`` command.
"""

__version__ = "0.1.0"
