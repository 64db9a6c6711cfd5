"""Per-scrape registration counts: one pipelined round trip of ZCOUNT/ZRANGE commands (each
O(log N)) refreshed by the /metrics handler, so that a scrape costs the same at 10 or 100,000
registrations; the per-queue task counts ride in the same round trip."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from exporter.asynq import model as asynq
from exporter.redisio.health import REDIS_FAILURES, RedisHealth
from exporter.tasks import reader as tasks

log = logging.getLogger("exporter.registrations.details")


@dataclass(frozen=True)
class SetCounts:
    live: int
    expired: int
    oldest_expired_age: float  # seconds; 0 when nothing is expired


@dataclass(frozen=True)
class CountsSnapshot:
    at: float
    sets: dict[str, SetCounts]
    # asynq's queues (asynq:queues) and each one's task counts, when read with the sets.
    queue_names: list[str] = field(default_factory=list)
    queues: dict[str, tasks.QueueCounts] = field(default_factory=dict)
    tasks_refused: str | None = None  # why the task counts could not be read (Redis's error)


async def read_counts(redis: Redis, now: float, queues: Sequence[str] | None = None) -> CountsSnapshot:
    """Live/expired counts and the oldest expired score of each set, in one round trip.

    A member is live when its score (an expiry time in whole seconds) is at or after `now`,
    expired when it is before. Nine commands, each O(log N). With `queues` (the queue names
    known from the previous read), the same round trip also reads asynq:queues (SMEMBERS) and
    three O(1)/O(log N) commands per known queue (exporter.tasks.add_count_commands): 9 + 1 +
    3 x queues commands, whatever the number of tasks.
    """
    pipe = redis.pipeline(transaction=False)
    for key in asynq.SETS.values():
        pipe.zcount(key, now, "+inf")
        pipe.zcount(key, "-inf", f"({now}")
        pipe.zrange(key, 0, 0, withscores=True)  # lowest score: the oldest expiry
    if queues is None:
        return CountsSnapshot(at=now, sets=_set_counts(await pipe.execute(), now))
    pipe.smembers(tasks.QUEUES)
    tasks.add_count_commands(pipe, queues, now)
    # A refused task command (an ACL that grants only the registration keys) must not cost the
    # registration counts: errors come back as replies, and only the sets' are raised.
    replies = await pipe.execute(raise_on_error=False)
    for reply in replies[:9]:
        if isinstance(reply, Exception):
            raise reply
    refused = next((r for r in replies[9:] if isinstance(r, Exception)), None)
    if refused is not None:
        return CountsSnapshot(at=now, sets=_set_counts(replies, now), tasks_refused=str(refused))
    return CountsSnapshot(at=now, sets=_set_counts(replies, now), queue_names=tasks.queue_names(replies[9]),
                          queues=tasks.parse_counts(replies[10:], queues, now))


def _set_counts(replies: Sequence[Any], now: float) -> dict[str, SetCounts]:
    sets: dict[str, SetCounts] = {}
    for i, name in enumerate(asynq.SETS):
        live, expired, lowest = replies[3 * i : 3 * i + 3]
        oldest_age = 0.0
        if expired and lowest:
            oldest_age = max(0.0, now - float(lowest[0][1]))
        sets[name] = SetCounts(live=int(live), expired=int(expired), oldest_expired_age=oldest_age)
    return sets


class RegistrationCounts:
    """The latest counts, refreshed on demand with concurrent refreshes coalesced into one."""

    def __init__(self, redis: Redis, health: RedisHealth, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._health = health
        self._clock = clock
        self.snapshot: CountsSnapshot | None = None
        self.fresh = False  # False when the last refresh failed: counts are then not exported
        self._inflight: asyncio.Future[None] | None = None
        self._queues: list[str] = []  # asynq's queues as of the last refresh
        self._refused_logged = False

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
                now = self._clock()
                snapshot = await read_counts(self._redis, now, self._queues)
                if snapshot.tasks_refused and not self._refused_logged:
                    self._refused_logged = True
                    log.warning("cannot read asynq's queues (%s): the asynq_queue_* gauges are left "
                                "out; docs/redis-topologies.md lists the keys to grant",
                                snapshot.tasks_refused)
                # A queue that appeared since the last refresh: its counts in a second round
                # trip, this once; a queue that is gone is left out.
                new = [q for q in snapshot.queue_names if q not in snapshot.queues]
                if new:
                    snapshot.queues.update(await tasks.read_counts(self._redis, new, now))
                self._queues = snapshot.queue_names
                self.snapshot = dataclasses.replace(
                    snapshot, queues={q: snapshot.queues[q] for q in snapshot.queue_names})
            self.fresh = True
        except REDIS_FAILURES:
            self.fresh = False
