"""Time from starting `asynq-sidecar serve` (the moment before the process is spawned) to the first
200 answer on /metrics, polled in a tight loop (a new connection every millisecond or so)."""

from __future__ import annotations

from bench.core import Report, Row, ServeProcess, judge, load_registrations, median, private_redis, workdir

TARGET_SECONDS = 0.5


def startup(quick: bool) -> Report:
    reps = 3 if quick else 10
    times = []
    with private_redis() as (server, client), workdir() as wd:
        load_registrations(client, 10, expires_in=86_400)
        for _ in range(reps):
            sc = ServeProcess(server.url, wd)
            try:
                sc.start()
                times.append(sc.wait_served())
            finally:
                sc.stop()
    return Report([Row("startup", "process start -> first 200 on /metrics (python -m exporter serve)",
                       times, "s", f"median <= {TARGET_SECONDS:g} s",
                       judge(median(times), TARGET_SECONDS))])
