"""The worker's lifecycle: the line protocol (protocol), its sources (the socket listener, the
in-process launcher, the Python client) and the pure state machine they feed (tracker).

protocol and tracker are pure (no I/O, no clock of their own). The sources import asyncio and
the settings, never Redis: what the lifecycle means for Redis is cleanup/'s job.
"""
