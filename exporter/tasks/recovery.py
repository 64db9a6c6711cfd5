"""Handing stale tasks back to asynq's recoverer (`--recover-tasks off|dry-run|on`).

Two cases, each acted on only when nothing alive can be running the task:

- **worker death**: the reaper has proven a worker dead and the registration its own (the
  removal rule's verdict NOW: never a guess, never a lost connection). The tasks that worker's
  workers hash listed at its last beat get a lease expired `EXPIRE_BACK` seconds ago, each only
  if it is still active and its lease score is still the one the dead worker last wrote;
- **orphans**: an active task with no lease entry at all, listed by no live server, at two reads
  at least `ORPHAN_CONFIRM_AFTER` seconds (two heartbeats) apart, gets an expired lease entry.
  The fleet's details leader does it, and `sweep --repair-tasks`.

Either way asynq's own recoverer then retries or archives the task at its next run. With
dry-run, what would be done is counted and logged, and nothing is written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from exporter.asynq import model as asynq
from exporter.metrics.tasks import TaskMetrics
from exporter.redisio.connect import redis_time
from exporter.redisio.health import REDIS_FAILURES, RedisHealth
from exporter.tasks import reader as tasks

log = logging.getLogger("exporter.tasks.recovery")

MODES = ("off", "dry-run", "on")

#: An orphan is repaired only once it was seen at two reads at least this many seconds apart:
#: two heartbeats, so that every live server has rewritten its workers hash in between.
ORPHAN_CONFIRM_AFTER = 10.0


@dataclass
class OrphanSeen:
    first: float  # Redis time of the first read that found it
    counted: bool = False  # dry-run: already counted as would-recover


class TaskRecovery:
    """Acts on stale tasks by `mode`; one per sidecar, shared by the reaper (worker deaths) and
    the details read (orphans)."""

    def __init__(self, redis: Redis, health: RedisHealth, mode: str, *,
                 registry: CollectorRegistry) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.redis = redis
        self.health = health
        self.mode = mode
        self.metrics = TaskMetrics(registry)
        self.orphan_confirm_after = ORPHAN_CONFIRM_AFTER
        self._expire = redis.register_script(tasks.EXPIRE_LEASES)
        self._repair = redis.register_script(tasks.REPAIR_ORPHANS)
        self._orphans: dict[tuple[str, str], OrphanSeen] = {}
        # Told of each workers hash value that is not a WorkerInfo (kind "worker_info", key).
        self.on_undecodable: Callable[[str, bytes], None] = lambda kind, key: None
        self._refused_logged: set[str] = set()

    def _refused(self, what: str, error: ResponseError) -> None:
        """Redis refused a task command (an ACL without asynq's queue keys, a Redis before 6.0.6
        without LPOS): logged once per kind of work, never retried in a loop."""
        if what not in self._refused_logged:
            self._refused_logged.add(what)
            log.warning("Redis refused to %s: %s (docs/redis-topologies.md lists the keys and "
                        "commands to grant; docs/stale-tasks.md the Redis version)", what, error)

    # ------------------------------------------------------------ worker death

    async def last_beat_tasks(self, workers: asynq.Member) -> list[tasks.LeasedTask]:
        """Read what a dead worker's workers hash listed at its last beat, with each task's
        lease score now: before its registration's removal deletes the hash. Nothing to read
        with --recover-tasks off."""
        if self.mode == "off":
            return []
        try:
            found, bad = await tasks.workers_tasks(self.redis, workers.key)
        except ResponseError as e:
            self._refused("read a dead worker's tasks", e)
            return []
        for task_id in bad:
            self.on_undecodable("worker_info", workers.key.encode() + b" " + task_id)
        return [t for t in found if t.lease is not None]  # no lease: nothing to expire

    async def worker_died(self, found: list[tasks.LeasedTask], who: str) -> int:
        """Expire the leases of a proven-dead worker's tasks (on) or count them (dry-run);
        the number handed, or that would be handed, to asynq's recoverer."""
        if not found or self.mode == "off":
            return 0
        try:
            return await self._worker_died(found, who)
        except ResponseError as e:
            self._refused("expire a dead worker's task leases", e)
            return 0

    async def _worker_died(self, found: list[tasks.LeasedTask], who: str) -> int:
        if self.mode == "dry-run":
            would = sum(await tasks.still_expirable(self.redis, found))
            self.metrics.would_recover.labels(reason="worker_death").inc(would)
            if would:
                log.warning("%s died with %d task(s) in flight; dry run: would expire their leases so "
                            "that asynq's recoverer retries them", who, would)
            return would
        done = 0
        by_queue: dict[str, list[tasks.LeasedTask]] = {}
        for t in found:
            by_queue.setdefault(t.queue, []).append(t)
        for queue, listed in sorted(by_queue.items()):
            for start in range(0, len(listed), tasks.SCRIPT_BATCH):
                args: list[str | int] = [tasks.EXPIRE_BACK]
                for t in listed[start:start + tasks.SCRIPT_BATCH]:
                    args += [t.id, repr(t.lease)]
                replies = await self._expire(keys=[tasks.active_key(queue), tasks.lease_key(queue)],
                                             args=args)
                done += sum(int(r) for r in replies)
        self.metrics.recovered.labels(reason="worker_death").inc(done)
        log.warning("%s died with %d task(s) in flight: expired the lease of %d (the others moved "
                    "since its last beat) for asynq's recoverer to retry them", who, len(found), done)
        return done

    # ------------------------------------------------------------ orphans (the details leader)

    async def read(self, now: float, turn: Callable[[], Awaitable[None]]) -> dict[str, int] | None:
        """One full read of the queues' tasks: orphans per queue (the gauge), and the repair of
        those seen long enough. A failed repair is logged; the read's counts still stand. None
        when Redis refuses the read (the server details stand without it)."""
        try:
            stale = await tasks.read_stale(self.redis, now, turn=turn)
        except ResponseError as e:
            self._refused("read asynq's queues", e)
            return None
        orphans = {q: qt.orphaned for q, qt in stale.items()}
        if self.mode != "off":
            try:
                await self.repair(orphans, now)
            except ResponseError as e:
                self._refused("repair orphaned tasks", e)
            except REDIS_FAILURES as e:
                log.warning("orphaned task repair failed (retried at the next read): %s: %s",
                            type(e).__name__, e)
        return {q: len(ids) for q, ids in orphans.items()}

    def confirmed(self, orphans: dict[str, list[str]], now: float) -> dict[str, list[str]]:
        """Remember when each orphan was first seen (forgetting those no longer orphaned) and
        return those first seen at least `orphan_confirm_after` seconds before `now`."""
        current = {(q, i) for q, ids in orphans.items() for i in ids}
        for gone in set(self._orphans) - current:
            del self._orphans[gone]
        ready: dict[str, list[str]] = {}
        for q, i in sorted(current):
            seen = self._orphans.setdefault((q, i), OrphanSeen(now))
            if now - seen.first >= self.orphan_confirm_after and not seen.counted:
                ready.setdefault(q, []).append(i)
        return ready

    async def repair(self, orphans: dict[str, list[str]], now: float) -> int:
        ready = self.confirmed(orphans, now)
        done = await repair_orphans(self.redis, ready, dry_run=self.mode == "dry-run",
                                    script=self._repair)
        for q, ids in done.items():
            for i in ids:
                seen = self._orphans.get((q, i))
                if seen is not None and self.mode == "dry-run":
                    seen.counted = True  # counted once; on, a repaired task is no orphan any more
        total = sum(len(ids) for ids in done.values())
        counter = self.metrics.would_recover if self.mode == "dry-run" else self.metrics.recovered
        counter.labels(reason="orphan").inc(total)
        return total


async def repair_orphans(redis: Redis, ready: dict[str, list[str]], *, dry_run: bool,
                         script: Callable[..., Awaitable[list[int]]] | None = None) -> dict[str, list[str]]:
    """Give each listed orphan an expired lease entry (or, with `dry_run`, only check that it is
    still active with no lease); the ids, per queue, that were (or would be) repaired."""
    if script is None and not dry_run:
        script = redis.register_script(tasks.REPAIR_ORPHANS)
    out: dict[str, list[str]] = {}
    for queue, ids in sorted(ready.items()):
        if not ids:
            continue
        if dry_run:
            flags = await tasks.still_orphaned(redis, queue, ids)
        else:
            assert script is not None
            flags = []
            for start in range(0, len(ids), tasks.SCRIPT_BATCH):
                flags += [bool(int(r)) for r in await script(
                    keys=[tasks.active_key(queue), tasks.lease_key(queue)],
                    args=[tasks.EXPIRE_BACK, *ids[start:start + tasks.SCRIPT_BATCH]])]
        repaired = [i for i, ok in zip(ids, flags, strict=False) if ok]
        if repaired:
            out[queue] = repaired
            log.warning("%s %d orphaned task(s) of queue %r (active, no lease, run by no live server) "
                        "an expired lease for asynq's recoverer: %s", "dry run: would give" if dry_run
                        else "gave", len(repaired), queue, ", ".join(repaired[:10]))
    return out


async def repair_after_two_looks(redis: Redis, *, dry_run: bool, gap: float | None = None,
                                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
                                 ) -> tuple[dict[str, list[str]], int]:
    """`sweep --repair-tasks`: look, wait `gap` seconds (two heartbeats), look again; repair the
    orphans found both times. Returns (repaired ids per queue, orphans found at the second look)."""

    gap = ORPHAN_CONFIRM_AFTER if gap is None else gap
    first = await tasks.read_stale(redis, await redis_time(redis))
    seen = {(q, i) for q, qt in first.items() for i in qt.orphaned}
    if not seen:
        return {}, 0
    await sleep(gap)
    second = await tasks.read_stale(redis, await redis_time(redis))
    ready = {q: [i for i in qt.orphaned if (q, i) in seen] for q, qt in second.items()}
    found = sum(len(qt.orphaned) for qt in second.values())
    return await repair_orphans(redis, ready, dry_run=dry_run), found
