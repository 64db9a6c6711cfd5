"""Finding a new worker's registration with a backlog of 1,000,000 expired members in asynq:servers.

The sidecar's discovery (`RegistrationStore.find`, what the observer runs each tick until a
worker's registration is known, and the reaper at an exit) reads members by score from now on,
so its cost follows the live fleet (1,000 servers here), not the backlog. For reference, the same
run times the full scan with a MATCH pattern that discovery used before (and still uses where
the live part of the set is the larger one).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as redis_async

from bench.core import MISS, PASS, Report, Row, load_registrations, median, percentile, private_redis
from exporter.asynq import model as asynq
from exporter.cleanup.store import RegistrationStore
from exporter.redisio.clock import RedisClock

BACKLOG = 1_000_000
LIVE_FLEET = 1_000
TARGET_MS = 100.0


async def _scan(client: redis_async.Redis, host: str, pid: int) -> set[bytes]:
    """The previous discovery, for reference: a ZSCAN of the whole set with a MATCH pattern."""
    pattern = asynq.member_pattern("servers", host, pid)
    return {raw async for raw, _ in client.zscan_iter(asynq.SERVERS, match=pattern, count=1000)}


async def _time_finds(url: str, host: str, pid: int, want: str, looks: int, by_score: bool) -> list[float]:
    client = redis_async.Redis.from_url(url)
    store = RegistrationStore(client, RedisClock(), lambda coro, name: asyncio.ensure_future(coro))
    out = []
    try:
        for _ in range(looks):
            started = time.perf_counter()
            if by_score:
                found = set(await store.find(host, pid, time.time()))
            else:
                found = {raw.decode() for raw in await _scan(client, host, pid)}
            out.append((time.perf_counter() - started) * 1000)
            assert want in found, f"{want} not found"
    finally:
        await client.aclose()
    return out


def find(quick: bool) -> Report:
    backlog = BACKLOG // 10 if quick else BACKLOG
    looks = 10 if quick else 50
    with private_redis() as (server, client):
        load_registrations(client, backlog, expires_in=-30 * 86_400, key_ttl=None, chunk=20_000)
        load_registrations(client, LIVE_FLEET, expires_in=3600, host="live-fleet", pid_base=10_000_000)
        mine = asynq.server_member("new-worker-pod", 1, str(uuid.uuid4()))
        client.zadd(asynq.SERVERS, {mine.key: int(time.time() + 3600)})
        ranged = asyncio.run(_time_finds(server.url, mine.host, mine.pid, mine.key, looks, by_score=True))
        scanned = asyncio.run(_time_finds(server.url, mine.host, mine.pid, mine.key, max(3, looks // 10),
                                          by_score=False))
    p99 = percentile(ranged, 99)
    return Report([
        Row("find", f"a new worker's registration found (read by score), {backlog:,} expired and "
                    f"{LIVE_FLEET:,} live members, {looks} looks", ranged, "ms",
            f"p99 <= {TARGET_MS:g} ms", PASS if p99 <= TARGET_MS else MISS),
        Row("find", f"reference, same run: the full scan with MATCH (the previous discovery); "
                    f"median {median(scanned) / median(ranged):.0f}x the read by score", scanned, "ms"),
    ])
