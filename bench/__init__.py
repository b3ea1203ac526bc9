"""The benchmark harness behind ``make bench``: load generator, peer servers, runner.

It lives outside the ``muxserver`` package on purpose: it is a tool for
deciding whether to trust the server's speed, not something a user installs.
``bench.loadgen`` drives any of the compared systems over loopback,
``bench.peers`` holds the asyncio/uvloop servers we compare against,
``bench.systems`` starts and stops every system under test, and ``bench.run``
runs the workloads and writes the table, JSON and chart under ``reports/``.
"""
