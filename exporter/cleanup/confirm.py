"""Read each removal back once replication has had time to lose it, and redo it if it was lost.

Replication is asynchronous: a master replaced by a replica (Sentinel or Cluster failover) may
have taken a removal with it. Read-backs, like every other background removal, run at most
BACKGROUND_CONCURRENCY at once: a crash loop leaves hundreds of expired registrations of one
host and pid, and redis-py's pool refuses, rather than queues, an operation beyond its 100
connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from exporter.asynq import model as asynq
from exporter.cleanup.rule import Verdict
from exporter.cleanup.store import RegistrationStore, Seen, undone
from exporter.metrics.cleanup import CleanupMetrics
from exporter.redisio.health import RedisHealth
from exporter.redisio.retry import retry_with_backoff

log = logging.getLogger("exporter.cleanup.confirm")

#: A removal is read back this many seconds after Redis acknowledged it, from whichever server
#: is the master by then.
CONFIRM_AFTER = 10.0

#: Background removals and read-backs running at once.
BACKGROUND_CONCURRENCY = 8


class Confirmations:
    def __init__(self, store: RegistrationStore, health: RedisHealth, metrics: CleanupMetrics, *,
                 spawn: Callable[[Any, str], asyncio.Task[Any]], settle: float,
                 after: float = CONFIRM_AFTER) -> None:
        self.store = store
        self.health = health
        self.metrics = metrics
        self._spawn = spawn
        self.settle = settle
        self.after = after
        self.background = asyncio.Semaphore(BACKGROUND_CONCURRENCY)

    def later(self, member: asynq.Member, seen: Seen, how: Verdict) -> None:
        """Read the removal of `member` (seen with scores `seen`, removed by `how`) back later."""
        self._spawn(self._confirm(member, seen, how), f"confirm-{member.ident}")

    async def _confirm(self, member: asynq.Member, seen: Seen, how: Verdict) -> None:
        """After `after` seconds, read the removal back and redo it if a failover undid it; a
        read that fails is retried with backoff until Redis answers."""
        await asyncio.sleep(self.after)

        async def confirm() -> None:
            async with self.background:
                with self.health.op("confirm a removal"):
                    if undone(seen, await self.store.scores(member)):
                        log.warning("%s is back after its removal (a Redis failover lost the "
                                    "write): removing it again", member.key)
                        await self.store.remove(member, seen, how, self.settle)

        await retry_with_backoff(confirm, on_failure=lambda e, d: self.metrics.errors.inc())
