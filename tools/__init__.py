"""Long-running test harnesses for issue 6 (hardening): fuzz, connection scale, soak.

They are not unit tests: each one starts its own server process on a free
loopback port, drives it for a bounded time, prints a summary and exits
non-zero when an invariant breaks. ``make fuzz``, ``make conns`` and
``make soak`` run them at full size; tests/test_hardening.py runs short
versions inside ``make test``.
"""
