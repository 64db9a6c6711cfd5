"""Benchmarks that prove the performance targets of issue 9 (`python -m bench all`, or one by name).

Every measurement starts its own redis-server on a free port, loads its registrations with
pipelines, runs real `asynq-sidecar` processes where the question is about a process, repeats,
and reports median / p99 / max next to its target. docs/performance.md has the methodology.
"""
