"""Resident memory of a real `asynq-sidecar serve`: steady at 100,000 registrations, and growth over
2,000 worker start/exit cycles through the lifecycle socket. VmRSS is read from /proc/PID/status."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

from redis.asyncio import Redis

from bench.core import (
    MIB,
    NOT_MEASURED,
    REPO,
    SIDECAR_HOST,
    BenchError,
    Report,
    Row,
    ServeProcess,
    Worker,
    judge,
    launcher_available,
    load_registrations,
    median,
    metric,
    metric_sum,
    private_redis,
    python_env,
    rss_bytes,
    stop_process,
    wait_until,
    workdir,
)
from exporter.asynq import model as asynq
from exporter.cleanup.confirm import CONFIRM_AFTER
from exporter.devtools.redis_server import free_port

RSS_TARGET_MIB = 47.0
GROWTH_TARGET_MIB = 2.0


# ---------------------------------------------------------------- steady RSS


def _steady(server, client, wd: str, n: int, *, reads: int, samples: int,
            watch_interval: float) -> tuple[list[float], float, str]:
    """Start serve on `n` live registrations (already loaded), connect one worker if the launcher
    exists, scrape until the watcher has finished `reads` full reads, then sample VmRSS."""
    with ServeProcess(server.url, wd, args=["--watch-interval", str(watch_interval)]) as sc:
        sc.wait_served()
        worker = None
        try:
            if launcher_available() is None:
                worker = Worker(server.url, sc.socket, log_path=os.path.join(wd, "worker.log")).start()
                worker.wait_registered(client)
                sc.wait_metric("asynq_sidecar_workers", lambda v: v == 1, state="running")
            expected = n + (1 if worker else 0)
            done, scrapes, last_age = 0, 0, None
            deadline = time.monotonic() + 60 + reads * (watch_interval + n / 5_000)
            while done < reads or scrapes < 5:
                if time.monotonic() > deadline:
                    raise BenchError(f"the watcher finished {done} of {reads} reads in time:\n{sc.tail()}")
                text = sc.scrape()
                scrapes += 1
                age = metric(text, "asynq_registry_snapshot_age_seconds")
                if (age is not None and last_age is not None and age < last_age
                        and metric_sum(text, "asynq_registry_servers") == expected):
                    done += 1
                last_age = age
                time.sleep(0.25)
            rss = []
            for _ in range(samples):
                sc.scrape()
                rss.append(rss_bytes(sc.pid) / MIB)
                time.sleep(0.5)
            hwm = rss_bytes(sc.pid, "VmHWM") / MIB
        finally:
            if worker is not None:
                worker.stop()
    who = "1 worker" if worker else "no worker (launcher not in this checkout)"
    return rss, hwm, f"{who}, after {scrapes} scrapes and {done} watcher reads"


def _floor(url: str, samples: int) -> list[float]:
    """VmRSS of bench.floor: the three libraries serving one /metrics."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.floor", str(port), url], cwd=REPO,
                            env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        import http.client

        def served() -> bool:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/metrics")
                ok = conn.getresponse().status == 200
                conn.close()
                return ok
            except OSError:
                return False

        wait_until(served, 15, "bench.floor to serve /metrics")
        out = []
        for _ in range(samples):
            served()
            out.append(rss_bytes(proc.pid) / MIB)
            time.sleep(0.2)
        return out
    finally:
        stop_process(proc)


def rss(quick: bool) -> Report:
    n = 10_000 if quick else 100_000
    reads, samples = (1, 4) if quick else (3, 10)
    rows = []
    with private_redis() as (server, client), workdir() as wd:
        load_registrations(client, n, expires_in=86_400)
        values, hwm, how = _steady(server, client, wd, n, reads=reads, samples=samples, watch_interval=5)
        rows.append(Row("rss", f"VmRSS of serve, {n:,} live registrations, {how}", values, "MiB",
                        f"max <= {RSS_TARGET_MIB:g} MiB", judge(max(values), RSS_TARGET_MIB)))
        rows.append(Row("rss", "VmHWM (peak RSS) of that serve process", [hwm], "MiB"))
        client.flushall()
        load_registrations(client, 10, expires_in=86_400)
        small, _, how = _steady(server, client, wd, 10, reads=1, samples=samples // 2, watch_interval=5)
        rows.append(Row("rss", f"VmRSS of serve, 10 registrations, {how}", small, "MiB"))
        rows.append(Row("rss", "floor: aiohttp + redis-py + prometheus-client serving /metrics",
                        _floor(server.url, samples // 2), "MiB"))
    return Report(rows)


# ---------------------------------------------------------------- growth over start/exit cycles


def _line(**obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def _cycle(redis: Redis, socket_path: str, pid: int) -> None:
    """One worker's life as the sidecar sees it: its registration appears, the launcher says
    hello, the worker is SIGKILLed (exited, signal), the connection closes; then wait until the
    sidecar has removed the leaked registration."""
    now = time.time()
    sid = str(uuid.uuid4())
    m = asynq.server_member(SIDECAR_HOST, pid, sid)
    info = asynq.ServerInfo(host=SIDECAR_HOST, pid=pid, server_id=sid, concurrency=10,
                            queues={"default": 1}, status="active", start_time=now)
    pipe = redis.pipeline(transaction=False)
    pipe.zadd(asynq.SERVERS, {m.key: int(now + 10)})
    pipe.zadd(asynq.WORKERS, {m.sibling("workers").key: int(now + 10)})
    pipe.set(m.key, asynq.encode_server_info(info), ex=10)
    await pipe.execute()
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(_line(event="hello", protocol=1, pid=pid, host=SIDECAR_HOST, started_at=now - 0.5)
                 + _line(event="exited", signal="SIGKILL"))
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    deadline = time.monotonic() + 15
    while await redis.zscore(asynq.SERVERS, m.key) is not None:
        if time.monotonic() > deadline:
            raise BenchError(f"the sidecar did not remove {m.key} within 15 s")
        await asyncio.sleep(0.005)


async def _cycles(url: str, socket_path: str, pids: range, concurrency: int = 8) -> None:
    redis = Redis.from_url(url)
    gate = asyncio.Semaphore(concurrency)

    async def one(pid: int) -> None:
        async with gate:
            await _cycle(redis, socket_path, pid)

    try:
        await asyncio.gather(*(one(pid) for pid in pids))
    finally:
        await redis.aclose()


def _settle_seconds() -> float:
    """How long after the last cycle the sidecar still holds work for it: each removal is read
    back CONFIRM_AFTER seconds later (a task per removal); then 2 s for the last cleanups to
    finish and connections to close."""
    return CONFIRM_AFTER + 2.0


def _settled_rss(pid: int) -> float:
    time.sleep(_settle_seconds())
    values = []
    for _ in range(5):
        values.append(rss_bytes(pid) / MIB)
        time.sleep(0.2)
    return median(values)


def growth(quick: bool) -> Report:
    """The warm-up is as many cycles as the measurement, run the same way: a burst of exits
    leaves a high-water mark (Python keeps freed memory for reuse), and what is measured is
    what more cycles add on top of it, which is what a leak would show."""
    why = launcher_available()
    if why is not None:
        return Report([Row("growth", f"needs the lifecycle socket: {why}", [], "MiB",
                           f"<= {GROWTH_TARGET_MIB:g} MiB", NOT_MEASURED)])
    cycles, chunks = (400, 2) if quick else (2_000, 4)
    with private_redis() as (server, client), workdir() as wd, \
            ServeProcess(server.url, wd) as sc:
        sc.wait_served()
        fresh = _settled_rss(sc.pid)
        pid = 300_000
        started = time.monotonic()
        asyncio.run(_cycles(server.url, sc.socket, range(pid, pid + cycles)))
        burst = time.monotonic() - started
        pid += cycles
        before = _settled_rss(sc.pid)
        trajectory = [before]
        per_chunk = cycles // chunks
        for _ in range(chunks):
            asyncio.run(_cycles(server.url, sc.socket, range(pid, pid + per_chunk)))
            pid += per_chunk
            trajectory.append(rss_bytes(sc.pid) / MIB)
        after = _settled_rss(sc.pid)
        text = sc.scrape()
        removed = metric(text, "asynq_sidecar_registrations_removed_total", reason="worker_exit")
        killed = metric(text, "asynq_sidecar_worker_exits_total", outcome="killed")
    total = 2 * cycles
    grew = after - before
    path = " -> ".join(f"{v:.1f}" for v in trajectory) + f" -> settled {after:.1f}"
    settle = _settle_seconds()
    rows = [
        Row("growth", f"VmRSS after {cycles:,} more start/exit cycles minus after {cycles:,} warm-up "
                      f"cycles, each read {settle:g} s after the last cycle (RSS MiB: {path})",
            [grew], "MiB", f"<= {GROWTH_TARGET_MIB:g} MiB", judge(grew, GROWTH_TARGET_MIB)),
        Row("growth", f"high-water kept after the warm-up burst ({cycles:,} exits in {burst:.1f} s, "
                      f"8 at a time): VmRSS after it minus fresh ({fresh:.1f} MiB)",
            [before - fresh], "MiB"),
        Row("growth", f"cycles per second (the sidecar counted {killed:.0f} killed exits and removed "
                      f"{removed:.0f} leaked registrations of {total:,})", [cycles / burst], "count"),
    ]
    if removed != total or killed != total:
        rows[-1].verdict = "MISS"
        rows[-1].target = f"every one of the {total:,} registrations removed"
    return Report(rows)
