"""Talking to Redis: connections (standalone, TLS, Sentinel, Cluster), Redis's clock, the health
of the link (what counts as a Redis failure) and one retry-with-backoff loop.

Imports redis-py and the settings only.
"""
