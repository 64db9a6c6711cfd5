"""The watcher's full read of live servers' details: time at 10,000, and peak memory by fleet size.

In-process: `DetailsWatcher.read_once()` against a private Redis holding N live servers. The time
is measured without tracemalloc (it slows allocation down); the peak of Python allocations during
`read_details` is then measured with tracemalloc in separate runs.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc

from redis.asyncio import Redis

from bench.core import (
    MIB,
    MISS,
    PASS,
    Report,
    Row,
    cpu_seconds,
    judge,
    load_registrations,
    median,
    private_redis,
)
from exporter.redisio.health import RedisHealth
from exporter.registrations.details import DetailsWatcher, read_details

TARGET_SECONDS = 1.0
#: The largest fleet's peak may exceed the 10,000 one's by this factor and still be "bounded".
BOUNDED_FACTOR = 1.5


async def _timed_reads(url: str, n: int, reps: int, client, redis_pid: int) -> tuple[list[float], float, float]:
    """Times of `reps` full reads; and Redis' cost of one read: commandstats usec, process CPU s."""
    redis = Redis.from_url(url)
    try:
        watcher = DetailsWatcher(redis, RedisHealth(url), interval=10.0)
        await watcher.read_once()  # warm-up: connection, first page
        times = []
        client.config_resetstat()
        cpu0 = cpu_seconds(redis_pid)
        for _ in range(reps):
            started = time.perf_counter()
            await watcher.read_once()
            times.append(time.perf_counter() - started)
            latest = watcher.latest
            if latest is None or latest.servers != n:
                raise RuntimeError(f"watcher read {latest and latest.servers} servers, expected {n}")
        cpu = cpu_seconds(redis_pid) - cpu0
        usec = sum(v["usec"] for k, v in client.info("commandstats").items() if k != "cmdstat_config|resetstat")
        return times, usec / reps / 1e6, cpu / reps
    finally:
        await redis.aclose()


async def _peak(url: str) -> int:
    redis = Redis.from_url(url)
    try:
        await redis.ping()
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            await read_details(redis, time.time(), lambda kind: None)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak - base
    finally:
        await redis.aclose()


def watcher(quick: bool) -> Report:
    reps = 3 if quick else 10
    sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000)
    rows: list[Row] = []
    peaks: dict[int, int] = {}
    times: dict[int, list[float]] = {}
    redis_cost: dict[int, tuple[float, float]] = {}
    with private_redis() as (server, client):
        for n in sizes:
            client.flushall()
            load_registrations(client, n, expires_in=86_400)
            times[n], usec, cpu = asyncio.run(_timed_reads(
                server.url, n, reps if n <= 10_000 else max(2, reps // 3), client, server.proc.pid))
            redis_cost[n] = (usec, cpu)
            peaks[n] = max(asyncio.run(_peak(server.url)) for _ in range(2))
    for n in sizes:
        if n == 10_000:
            rows.append(Row("watcher", "full read of 10,000 live servers' details (read_once)",
                            times[n], "s", f"median <= {TARGET_SECONDS:g} s",
                            judge(median(times[n]), TARGET_SECONDS)))
        else:
            rows.append(Row("watcher", f"full read of {n:,} live servers' details", times[n], "s"))
    for n in sizes:
        usec, cpu = redis_cost[n]
        rows.append(Row("watcher", f"Redis cost of one full read of {n:,}: command execution "
                                   f"(commandstats); redis-server process CPU {cpu * 1000:.1f} ms",
                        [usec * 1000], "ms"))
    for n in sizes:
        rows.append(Row("watcher", f"tracemalloc peak during read_details, {n:,} live servers",
                        [peaks[n] / MIB], "MiB"))
    largest, reference = sizes[-1], sizes[-2]
    ratio = peaks[largest] / peaks[reference]
    rows.append(Row("watcher", f"memory bounded: peak at {largest:,} / peak at {reference:,}",
                    [ratio], "x", f"<= {BOUNDED_FACTOR:g}x",
                    PASS if ratio <= BOUNDED_FACTOR else MISS))
    return Report(rows)
