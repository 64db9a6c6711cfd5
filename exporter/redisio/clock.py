"""Redis's clock, as the sidecar's time decisions use it.

asynq writes expiry scores on the worker's clock, and asynq's own listing calls a server dead
against the clock of whoever lists. The sidecar judges every score against Redis's `TIME`, the one
clock every pod of the fleet shares, so that a sidecar or sweeper whose own clock is off can
neither remove a live registration nor miss an expired one. The removal script reads `TIME`
itself; everything else (scheduling, the registry gauges, the observer's view of what is live)
uses this estimate: the local clock plus the offset measured at the last `sync()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.asyncio import Redis

from exporter.redisio.connect import redis_time


class RedisClock:
    """`now()` is Redis's time as last measured; 0 offset until the first `sync()`."""

    def __init__(self, local: Callable[[], float] = time.time) -> None:
        self._local = local
        self.offset = 0.0  # Redis's clock minus the local one, in seconds
        self.synced = False

    def now(self) -> float:
        return self._local() + self.offset

    async def sync(self, redis: Redis) -> float:
        """Measure the offset with one TIME (taken as read halfway through the round trip);
        returns Redis's time now."""
        before = self._local()
        redis_now = await redis_time(redis)
        after = self._local()
        self.offset = redis_now - (before + after) / 2
        self.synced = True
        return redis_now
