"""Reading asynq's registration sets: counts per scrape (O(1) commands) and a details watcher.

`RegistryCounts` is refreshed by the /metrics handler in one pipelined round trip of
ZCOUNT/ZRANGE commands (each O(log N)), so a scrape costs the same at 10 or 100,000
registrations. `DetailsWatcher` reads every live server's ServerInfo on its own interval,
aggregating as it goes, and never inside a scrape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from exporter import asynq
from exporter.health import REDIS_FAILURES, RedisHealth

log = logging.getLogger("exporter.registry")


@dataclass(frozen=True)
class SetCounts:
    live: int
    expired: int
    oldest_expired_age: float  # seconds; 0 when nothing is expired


@dataclass(frozen=True)
class CountsSnapshot:
    at: float
    sets: dict[str, SetCounts]


async def read_counts(redis: Redis, now: float) -> CountsSnapshot:
    """Live/expired counts and the oldest expired score of each set, in one round trip.

    A member is live when its score (an expiry time in whole seconds) is at or after `now`,
    expired when it is before. Nine commands, each O(log N).
    """
    pipe = redis.pipeline(transaction=False)
    for key in asynq.SETS.values():
        pipe.zcount(key, now, "+inf")
        pipe.zcount(key, "-inf", f"({now}")
        pipe.zrange(key, 0, 0, withscores=True)  # lowest score: the oldest expiry
    replies = await pipe.execute()
    sets: dict[str, SetCounts] = {}
    for i, name in enumerate(asynq.SETS):
        live, expired, lowest = replies[3 * i : 3 * i + 3]
        oldest_age = 0.0
        if expired and lowest:
            oldest_age = max(0.0, now - float(lowest[0][1]))
        sets[name] = SetCounts(live=int(live), expired=int(expired), oldest_expired_age=oldest_age)
    return CountsSnapshot(at=now, sets=sets)


class RegistryCounts:
    """The latest counts, refreshed on demand with concurrent refreshes coalesced into one."""

    def __init__(self, redis: Redis, health: RedisHealth, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._health = health
        self._clock = clock
        self.snapshot: CountsSnapshot | None = None
        self.fresh = False  # False when the last refresh failed: counts are then not exported
        self._inflight: asyncio.Future[None] | None = None

    async def refresh(self) -> None:
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        self._inflight = asyncio.ensure_future(self._refresh())
        try:
            await asyncio.shield(self._inflight)
        finally:
            self._inflight = None

    async def _refresh(self) -> None:
        try:
            with self._health.op("read registration counts"):
                self.snapshot = await read_counts(self._redis, self._clock())
            self.fresh = True
        except REDIS_FAILURES:
            self.fresh = False


@dataclass
class ServerDetails:
    """Aggregates over the live servers, from one full read of their ServerInfo."""

    at: float = 0.0  # wall-clock time the read finished
    duration: float = 0.0
    servers: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    concurrency: int = 0
    active_tasks: int = 0
    missing: int = 0  # live members whose per-server key has already expired


async def read_details(redis: Redis, now: float, on_undecodable: Callable[[str], None],
                       page: int = 1000) -> ServerDetails:
    """Read every live server's ServerInfo, page by page, aggregating as it goes.

    Memory is bounded by the page size, not by the fleet. Pages are ranges by score with
    LIMIT and pipelined GETs (a pipeline of GETs, not MGET, so that it works on a cluster).
    """
    started = time.monotonic()
    details = ServerDetails()
    offset = 0
    while True:
        members = await redis.zrange(asynq.SERVERS, now, "+inf", byscore=True, offset=offset, num=page)
        if not members:
            break
        offset += len(members)
        pipe = redis.pipeline(transaction=False)
        keys = []
        for raw in members:
            try:
                member = asynq.parse_member(raw)
            except asynq.UndecodableError:
                on_undecodable("member")
                continue
            keys.append(member.key)
            pipe.get(member.key)
        values = await pipe.execute() if keys else []
        for value in values:
            if value is None:
                details.missing += 1
                continue
            try:
                info = asynq.decode_server_info(value)
            except asynq.UndecodableError:
                on_undecodable("server_info")
                continue
            details.servers += 1
            # Any other value is folded into "unknown": the label's values stay bounded
            # whatever is written in Redis.
            status = info.status if info.status in asynq.SERVER_STATUSES else "unknown"
            details.by_status[status] += 1
            details.concurrency += info.concurrency
            details.active_tasks += info.active_worker_count
        if len(members) < page:
            break
    details.duration = time.monotonic() - started
    return details


class DetailsWatcher:
    """Reads server details every `interval` seconds; `latest` holds the last good read."""

    def __init__(self, redis: Redis, health: RedisHealth, interval: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._health = health
        self.interval = interval
        self._clock = clock
        self.latest: ServerDetails | None = None
        self.undecodable: Counter[str] = Counter()
        self.updated = asyncio.Event()  # set after every read attempt (tests wait on it)

    def count_undecodable(self, kind: str) -> None:
        self.undecodable[kind] += 1

    async def read_once(self) -> None:
        try:
            with self._health.op("read server details"):
                details = await read_details(self._redis, self._clock(), self.count_undecodable)
            details.at = self._clock()
            self.latest = details
        except REDIS_FAILURES:
            pass  # counted by health; the previous read stays, and its age grows
        finally:
            self.updated.set()

    async def run(self) -> None:
        while True:
            await self.read_once()
            await asyncio.sleep(self.interval)
