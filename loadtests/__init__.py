"""Locust load test for muxserver: see loadtests/locustfile.py and docs/loadtesting.md.

A package so that ``loadtests.tally`` (the counting, free of Locust) imports
the same way from the locustfile, the runner script and the tests.
"""
