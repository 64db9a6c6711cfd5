"""The Redis side of the safety net: every read and conditional removal of registrations,
and Redis's time, with a bound on how many of them run at once.

Every removal is one script per sorted set, conditional in Redis on what was seen
(`exporter.cleanup.rule.REMOVE_IF_UNCHANGED`); the per-server STRING and HASH (one hash tag, one
slot) are deleted after their members went, so all of it works on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from exporter.asynq import model as asynq
from exporter.cleanup.rule import ABSENT, KEPT, REMOVE_IF_UNCHANGED, Verdict
from exporter.redisio.clock import RedisClock
from exporter.text import as_bytes

#: Redis operations of the cleanup and the observer in flight at once (see RegistrationStore).
STORE_CONCURRENCY = 16

#: A discovery reads members by score (O(log N + live)) while the live part of the set is at
#: most this share of it, so that a backlog of leaked entries costs nothing; otherwise it scans.
RANGE_READ_SHARE = 0.5
RANGE_PAGE = 1000

#: Redis's clock is measured again when it was last measured this long ago (seconds).
CLOCK_RESYNC = 30.0

Seen = tuple[float | None, float | None]  # scores in asynq:servers and asynq:workers


class RegistrationStore:
    """The Redis operations of ownership and cleanup: each a few O(1)/O(log N) commands, except
    discovery, whose cost follows the live part of the servers set (see `find`)."""

    def __init__(self, redis: Redis, clock: RedisClock, spawn: Callable[[Any, str], asyncio.Task[Any]],
                 concurrency: int = STORE_CONCURRENCY) -> None:
        self.redis = redis
        self.clock = clock
        self._spawn = spawn
        self._synced_at = -CLOCK_RESYNC
        self._syncing: asyncio.Future[None] | None = None
        self._remove_if = redis.register_script(REMOVE_IF_UNCHANGED)
        # At most this many operations at once: a crash loop's hundreds of cleanups would
        # otherwise take every connection of the pool (redis-py refuses the 101st), leaving
        # none for scrapes; the others wait their turn.
        self._slots = asyncio.Semaphore(concurrency)

    def slot(self) -> asyncio.Semaphore:
        """One of the store's places in the connection pool, for an operation of a caller's own."""
        return self._slots

    async def now(self, *, fresh: bool = False) -> float:
        """Redis's time: measured now when `fresh` or when the last measure is older than
        CLOCK_RESYNC. Concurrent callers (hundreds of exits at once) share one TIME round trip."""
        if fresh or time.monotonic() - self._synced_at > CLOCK_RESYNC:
            if self._syncing is None:
                self._syncing = self._spawn(self._sync(), "redis-clock-sync")
            syncing = self._syncing
            try:
                await asyncio.shield(syncing)
            finally:
                if self._syncing is syncing and syncing.done():
                    self._syncing = None
        return self.clock.now()

    async def _sync(self) -> None:
        async with self._slots:
            await self.clock.sync(self.redis)
        self._synced_at = time.monotonic()

    async def find(self, host: str, pid: int, since: float) -> dict[str, float]:
        """Every asynq:servers member of `{host:pid:*}` with a score of at least `since`."""
        return await self._members(f"asynq:servers:{{{host}:{pid}:", since, "+inf")

    async def host_members(self, host: str, since: float, until: float) -> dict[str, float]:
        """Every asynq:servers member of `{host:*}` with a score from `since` to `until`."""
        return await self._members(f"asynq:servers:{{{host}:", since, until)

    async def _members(self, prefix: str, low: float, high: float | str) -> dict[str, float]:
        """The members starting with `prefix` whose score is in [low, high], with their scores.
        While that score range holds at most RANGE_READ_SHARE of the set, they are read by
        score (O(log N + range)), so a backlog of long-expired entries costs nothing; otherwise
        the set is scanned with a MATCH pattern."""
        async with self._slots:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcount(asynq.SERVERS, low, high)
            pipe.zcard(asynq.SERVERS)
            window, total = await pipe.execute()
        if window <= RANGE_READ_SHARE * total:
            found = await self._range(low, high, prefix.encode())
        else:
            found = await self._scan(asynq.glob_escape(prefix) + "*}")
        top = float("inf") if high == "+inf" else float(high)
        return {k: score for k, score in found.items() if low <= score <= top}

    async def _range(self, low: float, high: float | str, prefix: bytes) -> dict[str, float]:
        found: dict[str, float] = {}
        start = 0
        while True:
            async with self._slots:
                page: list[tuple[bytes, float]] = await self.redis.zrangebyscore(  # type: ignore[assignment]
                    asynq.SERVERS, low, high, start=start, num=RANGE_PAGE, withscores=True)
            for member, score in page:
                raw = as_bytes(member)
                if raw.startswith(prefix) and raw.endswith(b"}"):
                    _add_text(found, raw, score)
            if len(page) < RANGE_PAGE:
                return found
            start += RANGE_PAGE

    async def _scan(self, pattern: str) -> dict[str, float]:
        async with self._slots:
            found: dict[str, float] = {}
            async for raw, score in self.redis.zscan_iter(asynq.SERVERS, match=pattern, count=1000):
                _add_text(found, raw, score)
            return found

    async def server_infos(self, members: list[asynq.Member]) -> list[bytes | None]:
        async with self._slots:
            pipe = self.redis.pipeline(transaction=False)
            for m in members:
                pipe.get(m.key)
            return await pipe.execute()

    async def tick(self, members: list[asynq.Member]) -> list[tuple[float | None, int]]:
        """(score, in-flight task count) of each member: ZSCORE + HLEN, one round trip."""
        async with self._slots:
            pipe = self.redis.pipeline(transaction=False)
            for m in members:
                pipe.zscore(asynq.SERVERS, m.key)
                pipe.hlen(m.sibling("workers").key)
            replies = await pipe.execute()
            return [(None if replies[i] is None else float(replies[i]), int(replies[i + 1]))
                    for i in range(0, len(replies), 2)]

    async def scores(self, member: asynq.Member) -> Seen:
        """Scores of the server's member in asynq:servers and in asynq:workers."""
        async with self._slots:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zscore(asynq.SERVERS, member.key)
            pipe.zscore(asynq.WORKERS, member.sibling("workers").key)
            s, w = await pipe.execute()
            return (None if s is None else float(s)), (None if w is None else float(w))

    async def in_flight(self, member: asynq.Member) -> int:
        async with self._slots:
            return int(await self.redis.hlen(member.sibling("workers").key))

    async def remove(self, member: asynq.Member, seen: Seen, how: Verdict, settle: float) -> int:
        """Mirror asynq's ClearServerState for one server, conditional in Redis on the scores
        seen and, for Verdict.WHEN_EXPIRED, on Redis's clock being past the expiry by `settle`.

        Returns REMOVED when the servers member went, KEPT when a heartbeat moved it or it is
        not expired (nothing is touched then), ABSENT when it was already gone.
        """
        assert how is not Verdict.LEAVE
        mode = "now" if how is Verdict.NOW else "expired"
        async with self._slots:
            servers_seen, workers_seen = seen
            # One script call per sorted set, not a pipeline: redis-py refuses EVALSHA in a Redis
            # Cluster pipeline (and the two sets live on different nodes anyway). A direct call
            # also reloads the script after NOSCRIPT, as on a master just promoted by Sentinel.
            servers = ABSENT
            if servers_seen is not None:
                servers = int(await self._remove_if(keys=[asynq.SERVERS],
                                                    args=[member.key, repr(servers_seen), mode, repr(settle)]))
                if servers == KEPT:
                    return KEPT
            if workers_seen is not None:
                workers = int(await self._remove_if(keys=[asynq.WORKERS],
                                                    args=[member.sibling("workers").key, repr(workers_seen),
                                                          mode, repr(settle)]))
                if workers == KEPT:
                    return KEPT
            # Both members are gone (or were): the per-server keys go too. One hash tag: one slot.
            await self.redis.delete(member.key, member.sibling("workers").key)
            return servers


def _add_text(found: dict[str, float], raw: bytes | str, score: float) -> None:
    """Keep a member that is text: one that is not UTF-8 cannot be asynq's."""
    try:
        found[raw.decode() if isinstance(raw, bytes) else raw] = float(score)
    except UnicodeDecodeError:
        pass


def decode_member(key: str) -> asynq.Member | None:
    try:
        return asynq.parse_member(key)
    except asynq.UndecodableError:
        return None


def present_score(seen: Seen) -> float | None:
    return seen[0] if seen[0] is not None else seen[1]


def undone(seen: Seen, now_seen: Seen) -> bool:
    """A removed registration that is back as it was (not beating since): a lost write."""
    return now_seen != (None, None) and not _advanced(seen, now_seen)


def _advanced(before: Seen, after: Seen) -> bool:
    return any(a is not None and (b is None or a > b) for b, a in zip(before, after, strict=False))
