"""From a worker's SIGKILL to its registration gone from asynq:servers, over 200 kills; again with a
backlog of 1,000,000 expired members in each set (a fleet that leaked for months).

Real processes: `asynq-sidecar serve` (`--host-pids unique`, see ServeProcess) and, per worker, `asynq-sidecar run
--socket S -- python -m exporter emulate --heartbeat 5`. Workers are started in batches; once
every worker of a batch is registered and older than two observer ticks (so the sidecar knows
which registration is whose, as for any worker that lived more than a second or two), they are
killed one at a time: the clock starts just before `kill(child, SIGKILL)` and stops when a tight
ZSCORE loop (one every ~1 ms, on its own connection) finds the member gone. The next kill waits
until the previous launcher has exited, and the next batch starts only after the last kill of
this one, so no start-up or teardown of ours competes with a measurement.
"""

from __future__ import annotations

import math
import os
import signal
import time

from bench.core import (
    MISS,
    NOT_MEASURED,
    PASS,
    BenchError,
    Report,
    Row,
    ServeProcess,
    Worker,
    launcher_available,
    load_registrations,
    median,
    metric,
    percentile,
    private_redis,
    wait_until,
    workdir,
)
from exporter.asynq import model as asynq

P50_MS, P99_MS = 20.0, 100.0
#: Seconds a worker must have been registered before it is killed (the observer ticks every 1 s).
OBSERVED_AFTER = 2.0
#: Give up on one kill after this many seconds (recorded as a timeout, which misses the target).
KILL_TIMEOUT = 15.0


def _kill_and_time(client, worker: Worker) -> float:
    """SIGKILL the emulator; milliseconds until its member is gone from asynq:servers."""
    member = worker.member
    assert member is not None and worker.child_pid is not None
    if not worker.is_our_child_alive():
        raise BenchError(f"worker pid {worker.child_pid} is not running before its kill")
    started = time.perf_counter()
    os.kill(worker.child_pid, signal.SIGKILL)
    deadline = started + KILL_TIMEOUT
    while client.zscore(asynq.SERVERS, member) is not None:
        now = time.perf_counter()
        if now > deadline:
            return math.inf
        time.sleep(0.001)
    return (time.perf_counter() - started) * 1000


#: Expired members of each set in the backlog run (--quick: a tenth).
BACKLOG = 1_000_000


def _measure(client, sc: ServeProcess, redis_url: str, wd: str, kills: int, batch: int,
             latencies: list[float]) -> None:
    sc.wait_served()
    log_path = os.path.join(wd, "workers.log")
    while len(latencies) < kills:
        workers = [Worker(redis_url, sc.socket, log_path=log_path).start()
                   for _ in range(min(batch, kills - len(latencies)))]
        try:
            wait_until(lambda: all(w.poll_registered(client) for w in workers), 60,
                       "a batch of workers to register")
            wait_until(lambda: time.monotonic() - max(w.registered_at for w in workers) > OBSERVED_AFTER,
                       10, "the observer to tick")
            for w in workers:
                latencies.append(_kill_and_time(client, w))
                # The launcher reports the exit, then exits itself: let it finish before the
                # next kill, so that its teardown does not compete with the next measurement.
                w.proc.wait(10)
        finally:
            for w in workers:
                w.stop()


def kill_to_removed(quick: bool) -> Report:
    return _kills(quick, backlog=0, name="kill")


def kill_with_backlog(quick: bool) -> Report:
    return _kills(quick, backlog=BACKLOG // 10 if quick else BACKLOG, name="kill-backlog")


def _kills(quick: bool, *, backlog: int, name: str) -> Report:
    why = launcher_available()
    if why is not None:
        return Report([Row(name, f"needs the launcher: {why}", [], "ms",
                           f"p50 <= {P50_MS:g} ms, p99 <= {P99_MS:g} ms", NOT_MEASURED)])
    kills, batch = (10, 5) if quick else (200, 10)
    latencies: list[float] = []
    with private_redis() as (server, client), workdir() as wd:
        if backlog:  # leaked long before the sidecar came: members only, their keys gone by TTL
            load_registrations(client, backlog, expires_in=-30 * 86_400, key_ttl=None, chunk=20_000)
        started = time.monotonic()
        sc = ServeProcess(server.url, wd).start()
        try:
            _measure(client, sc, server.url, wd, kills, batch, latencies)
            text = sc.scrape()
        finally:
            sc.stop()
    elapsed = time.monotonic() - started
    removed = metric(text, "asynq_sidecar_registrations_removed_total", reason="worker_exit") or 0
    killed = metric(text, "asynq_sidecar_worker_exits_total", outcome="killed") or 0
    timeouts = sum(1 for v in latencies if math.isinf(v))
    ok = median(latencies) <= P50_MS and percentile(latencies, 99) <= P99_MS
    rows = [
        Row(name, f"SIGKILL -> servers member gone, {kills} kills, batches of {batch}"
                  f"{f', {backlog:,} expired members in each set' if backlog else ''} "
                  f"({elapsed:.0f} s; {timeouts} timeouts)", latencies, "ms",
            f"p50 <= {P50_MS:g} ms, p99 <= {P99_MS:g} ms", PASS if ok else MISS),
    ]
    check = Row(name, f"the sidecar counted {killed:.0f} killed exits and removed {removed:.0f} "
                        f"registrations (worker_exit) of {kills}", [removed], "count")
    if removed != kills or killed != kills:
        check.target, check.verdict = f"all {kills} removed by the sidecar", MISS
    rows.append(check)
    return Report(rows)
