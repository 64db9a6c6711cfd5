"""Expired registrations of this host that no watched worker owns: a worker that died while the
sidecar was down. Removed by the expiry rule only (reason `previous_incarnation`); older
leftovers than HOST_SCAN_WINDOW are the fleet sweep's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from exporter.asynq import model as asynq
from exporter.cleanup.confirm import Confirmations
from exporter.cleanup.rule import REMOVED, Verdict
from exporter.cleanup.store import RegistrationStore, decode_member
from exporter.metrics.cleanup import CleanupMetrics
from exporter.redisio.health import REDIS_FAILURES, RedisHealth
from exporter.redisio.retry import retry_with_backoff
from exporter.settings import CleanupConfig

log = logging.getLogger("exporter.cleanup.orphans")

#: At start, this host's registrations that expired at most this long ago are looked for.
HOST_SCAN_WINDOW = 3600.0


class OrphanRemover:
    def __init__(self, store: RegistrationStore, health: RedisHealth, cfg: CleanupConfig,
                 metrics: CleanupMetrics, confirmations: Confirmations, *,
                 spawn: Callable[[Any, str], asyncio.Task[Any]], hostname: str | None) -> None:
        self.store = store
        self.health = health
        self.cfg = cfg
        self.metrics = metrics
        self.confirmations = confirmations
        self._spawn = spawn
        self.hostname = hostname
        self._queued: set[str] = set()  # members whose removal is queued or running

    async def remove_host_orphans(self) -> None:
        """At start, and once more when a registration left by a worker that died just before
        the start would have expired (its TTL plus settle)."""
        await self._scan_host_once()
        await asyncio.sleep(asynq.REGISTRATION_TTL + self.cfg.settle + 1)
        await self._scan_host_once()

    async def _scan_host_once(self) -> None:
        if not self.hostname:
            return
        hostname = self.hostname

        async def look() -> tuple[dict[str, float], float]:
            with self.health.op("look for this host's expired registrations"):
                now = await self.store.now(fresh=True)
                return await self.store.host_members(hostname, now - HOST_SCAN_WINDOW, now - self.cfg.settle), now

        # Redis may be down at start: keep trying, with backoff.
        found, now = await retry_with_backoff(look, on_failure=lambda e, d: None, first=0.5)
        for key, score in found.items():
            m = decode_member(key)
            if m is not None and score + self.cfg.settle < now:
                self._start(m, score)

    def _start(self, member: asynq.Member, score: float) -> None:
        if member.key in self._queued:
            return  # found again by another look while its removal waits
        self._queued.add(member.key)
        self._spawn(self._remove(member, score), f"orphan-{member.ident}")

    async def _remove(self, member: asynq.Member, score: float) -> None:
        try:
            async with self.confirmations.background:
                await self._remove_now(member, score)
        finally:
            self._queued.discard(member.key)

    async def _remove_now(self, member: asynq.Member, score: float) -> None:
        try:
            with self.health.op("remove previous incarnation"):
                seen = await self.store.scores(member)
                if seen[0] is None or seen[0] > score:
                    return
                if self.cfg.mode == "dry-run":
                    self.metrics.would_remove.labels(reason="previous_incarnation").inc()
                    log.info("dry run: would remove %s, expired %.0fs ago", member.key, self.store.clock.now() - score)
                    return
                if self.cfg.mode == "off":
                    return
                if await self.store.remove(member, seen, Verdict.WHEN_EXPIRED, self.cfg.settle) == REMOVED:
                    self.confirmations.later(member, seen, Verdict.WHEN_EXPIRED)
                    self.metrics.removed.labels(reason="previous_incarnation").inc()
                    log.info("removed %s of an earlier incarnation, expired %.0fs ago",
                             member.key, self.store.clock.now() - score)
        except REDIS_FAILURES:
            self.metrics.errors.inc()  # the next look or start-up scan will find it again
