"""The safety net: find each watched worker's registration, and remove it once the worker is gone.

Three jobs, one rule (`exporter/removal.py`):

- **Observer** (a source): follows every live worker, finds the `asynq:servers` members of its
  host and pid, classifies them (`removal.claim`), reports the worker's to the tracker (a worker
  becomes running when its registration appears) and snapshots its in-flight task count.
- **Reaper** (a sink of `WorkerExited`): watches what the departed worker left to the end. A
  registration proven the dead worker's goes at once; any other goes once Redis's clock is past
  its expiry by more than `--settle`; one still beating is looked at again when it would expire;
  one written again after the exit (asynq's late heartbeat, #979) is found by the looks that go
  on for a registration TTL after the exit, and removed and counted as a leak.
- **Orphans**: expired registrations of earlier lives of a watched host and pid, and of this
  host at start-up, removed by the same rule (reason `previous_incarnation`).

Every removal is one script per sorted set, conditional on what was seen (see removal.py); the
per-server STRING and HASH (one hash tag, one slot) are deleted after their members went, so
all of it works on Redis Cluster. Each removal is read back `CONFIRM_AFTER` seconds later and
redone if a failover undid it. Work that cannot reach Redis is retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis

from exporter import asynq
from exporter.config import CleanupConfig
from exporter.health import REDIS_FAILURES, RedisHealth
from exporter.lifecycle import (Decision, RegistrationSeen, ServerIdReported, Worker, WorkerExited,
                                WorkerForgotten, WorkerStarted)
from exporter.redisclock import RedisClock
from exporter.taskrecovery import TaskRecovery
from exporter.removal import (ABSENT, KEPT, REMOVE_IF_UNCHANGED, REMOVED, Claim, Verdict, claim,
                              verdict)

log = logging.getLogger("exporter.cleanup")

#: Reasons of asynq_sidecar_registrations_removed_total.
REMOVAL_REASONS = ("worker_exit", "previous_incarnation", "sweep")

#: Redis operations of the cleanup and the observer in flight at once (see RegistrationStore).
STORE_CONCURRENCY = 16

#: Seconds between discovery looks once the quick first looks are over.
DISCOVERY_BACKOFF = 10.0

#: A worker with no registration found this long after its hello is worth a warning.
UNREGISTERED_WARNING = 30.0

#: A removal is read back this many seconds after Redis acknowledged it, from whichever server
#: is the master by then, and redone if it was undone: replication is asynchronous, so a master
#: replaced by a replica (Sentinel or Cluster failover) may have taken the write with it.
CONFIRM_AFTER = 10.0

#: Background work (orphan removals, read-backs, the full look for earlier lives) runs at most
#: this many at once: a crash loop leaves hundreds of expired registrations of one host and pid,
#: and redis-py's pool refuses, rather than queues, an operation beyond its 100 connections.
BACKGROUND_CONCURRENCY = 8

#: A discovery reads members by score (O(log N + live)) while the live part of the set is at
#: most this share of it, so that a backlog of leaked entries costs nothing; otherwise it scans.
RANGE_READ_SHARE = 0.5
RANGE_PAGE = 1000

#: Seconds to look for a registration written after the process is gone (writes in flight).
LOOK_AFTER_EXIT = 1.0

#: At start, this host's registrations that expired at most this long ago are looked for (a
#: worker that died while the sidecar was down); older leftovers are the fleet sweep's.
HOST_SCAN_WINDOW = 3600.0

#: Redis's clock is measured again when it was last measured this long ago (seconds).
CLOCK_RESYNC = 30.0

Seen = tuple[float | None, float | None]  # scores in asynq:servers and asynq:workers


async def retry_with_backoff(what: Callable[[], Awaitable[Any]], *, on_failure: Callable[[BaseException, float], None],
                             first: float = 0.1, cap: float = 5.0) -> Any:
    """Call `what` until it does not fail with a Redis failure, waiting a jittered, doubling
    delay (from `first` to `cap` seconds) between attempts; `on_failure(error, delay)` first."""
    delay = first
    while True:
        try:
            return await what()
        except REDIS_FAILURES as e:
            on_failure(e, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, cap)


class CleanupMetrics:
    """The cleanup's metrics, on an injected registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.leaked = Counter("asynq_sidecar_leaked_registrations",
                              "Worker exits that left the worker's registration behind in Redis.",
                              registry=registry)
        self.removed = Counter("asynq_sidecar_registrations_removed",
                               "Registrations removed by the sidecar, by reason.", ["reason"],
                               registry=registry)
        self.would_remove = Counter("asynq_sidecar_registrations_would_remove",
                                    "Registrations that --cleanup dry-run would have removed, by reason.",
                                    ["reason"], registry=registry)
        self.errors = Counter("asynq_sidecar_cleanup_errors", "Failed cleanup attempts.",
                              registry=registry)
        self.pending = Gauge("asynq_sidecar_cleanups_pending",
                             "Cleanups waiting for Redis (retried with backoff).", registry=registry)
        self.abandoned = Counter("asynq_sidecar_abandoned_tasks",
                                 "In-flight tasks of workers that exited uncleanly, left to asynq's "
                                 "lease recovery.", registry=registry)
        for reason in REMOVAL_REASONS:
            self.removed.labels(reason=reason)
            self.would_remove.labels(reason=reason)


@dataclass
class Owned:
    """A `{host:pid:*}` registration found for a worker: whose it is, and its score last seen."""

    member: asynq.Member
    claim: Claim
    score: float | None = None
    doubted: bool = False  # moved after being taken for a dead worker's: only expiry removes it


@dataclass
class Watch:
    """What the observer knows about one worker. Touched only from the one event loop."""

    worker: Worker
    owned: dict[str, Owned] = field(default_factory=dict)  # member key -> Owned
    in_flight: int = 0  # in-flight tasks of its live registrations at the last tick
    reported: set[str] = field(default_factory=set)  # members already sent to the tracker
    next_discovery: float = 0.0
    discoveries: int = 0
    warned_unregistered: bool = False


@dataclass
class Departure:
    """A worker that is gone, and what the reaper still watches of it."""

    watch: Watch
    exited: WorkerExited
    done: bool  # its exit was reported (exited) or it deregistered (bye)
    look_until: float  # Redis time until which new registrations of it are looked for
    noted: set[str] = field(default_factory=set)  # left in place by --cleanup off/dry-run, counted
    leak_counted: bool = False
    tasks_counted: bool = False


class RegistrationStore:
    """The Redis operations of ownership and cleanup: each a few O(1)/O(log N) commands, except
    discovery, whose cost follows the live part of the servers set (see `find`)."""

    def __init__(self, redis: Redis, concurrency: int = STORE_CONCURRENCY) -> None:
        self.redis = redis
        self._remove_if = redis.register_script(REMOVE_IF_UNCHANGED)
        # At most this many operations at once: a crash loop's hundreds of cleanups would
        # otherwise take every connection of the pool (redis-py refuses the 101st), leaving
        # none for scrapes; the others wait their turn.
        self._slots = asyncio.Semaphore(concurrency)

    def slot(self) -> asyncio.Semaphore:
        """One of the store's places in the connection pool, for an operation of a caller's own."""
        return self._slots

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
                page = await self.redis.zrangebyscore(asynq.SERVERS, low, high, start=start,
                                                      num=RANGE_PAGE, withscores=True)
            for raw, score in page:
                raw = raw if isinstance(raw, bytes) else raw.encode()
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


def _decode_member(key: str) -> asynq.Member | None:
    try:
        return asynq.parse_member(key)
    except asynq.UndecodableError:
        return None


def _present_score(seen: Seen) -> float | None:
    return seen[0] if seen[0] is not None else seen[1]


class Cleanup:
    """Observer (source of RegistrationSeen), reaper (sink of WorkerExited) and orphan removal;
    see the module docstring."""

    def __init__(self, redis: Redis, health: RedisHealth, cfg: CleanupConfig, *,
                 registry: CollectorRegistry, submit: Callable[[Any], None],
                 spawn: Callable[[Any, str], asyncio.Task[Any]], poll_interval: float = 1.0,
                 hostname: str | None = None, clock: RedisClock | None = None,
                 tasks: TaskRecovery | None = None) -> None:
        self.store = RegistrationStore(redis)
        self.tasks = tasks  # --recover-tasks: a proven-dead worker's tasks go to asynq's recoverer
        self.redis = redis
        self.health = health
        self.cfg = cfg
        self.metrics = CleanupMetrics(registry)
        self._submit = submit
        self._spawn = spawn
        self.poll_interval = poll_interval
        self.hostname = hostname
        self.clock = clock or RedisClock()
        self._synced_at = -CLOCK_RESYNC
        self._syncing: asyncio.Future[None] | None = None
        self.watches: dict[int, Watch] = {}
        self._departures: dict[int, Departure] = {}  # by conn: departed workers still watched
        self._busy: set[asyncio.Task[Any]] = set()  # exit cleanups not yet settled
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_counted_at = 0.0  # time.monotonic() when an exit cleanup last changed a metric
        self.done = asyncio.Event()  # set whenever an exit cleanup settles (tests wait on it)
        self.confirm_after = CONFIRM_AFTER
        self._background = asyncio.Semaphore(BACKGROUND_CONCURRENCY)
        self._orphans: set[str] = set()  # members whose removal is queued or running

    # ------------------------------------------------------------ sink

    def handle(self, decision: Decision, now: float) -> None:
        if isinstance(decision, WorkerStarted):
            w = decision.worker
            if self.hostname and w.host != self.hostname:
                # A peer must not be able to have another pod's registrations removed by
                # naming its host: such a worker is tracked, but nothing is cleaned up for it.
                log.warning("worker pid %d says it runs on %r, not on this sidecar's host %r "
                            "(--hostname): its registration will not be cleaned up",
                            w.pid, w.host, self.hostname)
                return
            watch = Watch(w)
            for sid in w.server_ids:
                self._own_reported(watch, sid)
            self.watches[w.conn] = watch
        elif isinstance(decision, ServerIdReported):
            watch = self.watches.get(decision.worker.conn)
            if watch is not None:
                self._own_reported(watch, decision.server_id)
        elif isinstance(decision, WorkerExited):
            watch = self.watches.pop(decision.worker.conn, None)
            if watch is not None:
                self._depart(watch, decision)
        elif isinstance(decision, WorkerForgotten):
            dep = self._departures.get(decision.worker.conn)
            if dep is not None:  # the connection closed: the process is gone, or going
                dep.look_until = min(dep.look_until, self.clock.now() + LOOK_AFTER_EXIT)

    @staticmethod
    def _own_reported(watch: Watch, server_id: str) -> None:
        """The worker told us its server id: checked with O(1) commands from the next tick."""
        m = asynq.server_member(watch.worker.host, watch.worker.pid, server_id)
        known = watch.owned.get(m.key)
        if known is None:
            watch.owned[m.key] = Owned(m, Claim.SURE)
        else:
            known.claim = Claim.SURE

    @property
    def idle(self) -> bool:
        """No departed worker's registration is still watched."""
        return self._idle.is_set()

    # ------------------------------------------------------------ Redis's clock

    async def redis_now(self, *, fresh: bool = False) -> float:
        """Redis's time: measured now when `fresh` or when the last measure is old. Concurrent
        callers (hundreds of exits at once) share one TIME round trip."""
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
        async with self.store.slot():
            await self.clock.sync(self.redis)
        self._synced_at = time.monotonic()

    # ------------------------------------------------------------ observer (a source)

    async def observe_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                with self.health.op("observe worker registrations"):
                    now = await self.redis_now()  # measured again every CLOCK_RESYNC seconds
                    for watch in list(self.watches.values()):
                        try:
                            await self.observe(watch, now)
                        except REDIS_FAILURES:
                            raise
                        except Exception:  # a bug or odd data must not end the observation of all
                            log.exception("observing worker pid %d failed", watch.worker.pid)
            except REDIS_FAILURES:
                pass  # counted by health; try again next tick
            await asyncio.sleep(max(0.0, self.poll_interval - (time.monotonic() - started)))

    async def observe(self, watch: Watch, now: float) -> None:
        """One tick for one live worker: discover its registration, or check it with O(1) commands."""
        w = watch.worker
        known_live = any(o.score is not None and o.score >= now for o in watch.owned.values())
        if not known_live and now >= watch.next_discovery:
            # Every tick at first (asynq registers as it starts), then every DISCOVERY_BACKOFF
            # seconds while nothing live is known.
            watch.discoveries += 1
            watch.next_discovery = now + (self.poll_interval if watch.discoveries < 10 else DISCOVERY_BACKOFF)
            await self._discover(watch, since=now)
        if not watch.owned:
            if not watch.warned_unregistered and time.time() - w.hello_at > UNREGISTERED_WARNING:
                watch.warned_unregistered = True
                log.warning("no registration of %s pid %d found %.0fs after its hello: is it an "
                            "asynq server, and is that pid the asynq process (a launcher running a "
                            "shell must `exec` the worker)?", w.host, w.pid, time.time() - w.hello_at)
            return
        owned = [o for o in watch.owned.values() if o.claim.workers]
        results = await self.store.tick([o.member for o in owned])
        in_flight = 0
        for o, (score, count) in zip(owned, results):
            o.score = score
            if score is not None and score >= now:
                in_flight += count
                if o.member.key not in watch.reported:
                    watch.reported.add(o.member.key)
                    self._submit(RegistrationSeen(w.conn, o.member.key))
        watch.in_flight = in_flight

    async def _discover(self, watch: Watch, since: float | None) -> None:
        """Find and classify the `{host:pid:*}` members with a score of at least `since`."""
        w = watch.worker
        found = await self.store.find(w.host, w.pid, since)
        # New members, and those whose ServerInfo was not there yet when first seen (asynq's
        # beat adds the members before it writes the ServerInfo) or has expired since.
        new = [m for m in (_decode_member(k) for k in found
                           if k not in watch.owned or watch.owned[k].claim is Claim.UNKNOWN) if m is not None]
        if not new:
            for key, score in found.items():
                if key in watch.owned:
                    watch.owned[key].score = score
            return
        infos = await self.store.server_infos(new)
        for m, raw in zip(new, infos):
            start_time = None
            if raw is not None:
                try:
                    start_time = asynq.decode_server_info(raw).start_time
                except asynq.UndecodableError:
                    pass
            found_claim = claim(w, m.ident, start_time, host_pids_unique=self.cfg.host_pids_unique)
            known = watch.owned.get(m.key)
            if known is None:
                watch.owned[m.key] = Owned(m, found_claim, found[m.key])
            elif found_claim is not Claim.UNKNOWN:
                known.claim = found_claim
        for key, score in found.items():
            if key in watch.owned:
                watch.owned[key].score = score

    # ------------------------------------------------------------ reaper (a sink)

    def _depart(self, watch: Watch, exited: WorkerExited) -> None:
        w = watch.worker
        # How long to look for a registration written after the exit. A launcher reports the
        # exit after waitpid, and a closed connection means the process is gone: only writes
        # already on their way can land, so a second will do. After bye the process still runs
        # (and may beat once more, as in asynq #979) until its connection closes: at most a
        # registration TTL.
        after = asynq.REGISTRATION_TTL + 1 if exited.via == "bye" else LOOK_AFTER_EXIT
        # Exit times are the pod's clock; Redis's is the local one plus the offset measured.
        dep = Departure(watch, exited, done=exited.reported,
                        look_until=(w.exited_at or time.time()) + self.clock.offset + after)
        task = self._spawn(self._reap(dep), f"cleanup-{w.conn}")
        self._departures[w.conn] = dep
        self._busy.add(task)
        self._idle.clear()
        task.add_done_callback(self._settled)
        task.add_done_callback(lambda _: self._departures.pop(w.conn, None))

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._busy.discard(task)
        self.done.set()
        if not self._busy:
            self._idle.set()

    async def _reap(self, dep: Departure) -> None:
        """Watch the departed worker's registrations until each is gone or left alone, and no
        new one can appear any more; retried with backoff while Redis is unreachable."""
        w = dep.watch.worker
        pending = False

        def waiting_for_redis(error: BaseException, delay: float) -> None:
            nonlocal pending
            self.metrics.errors.inc()
            self.last_counted_at = time.monotonic()
            if not pending:
                pending = True
                self.metrics.pending.inc()
            log.warning("cleanup of worker pid %d on %s waits for Redis (retry in %.1fs): %s",
                        w.pid, w.host, delay, error)

        async def one_pass() -> float | None:
            with self.health.op("clean up after worker exit"):
                return await self._reap_once(dep)

        try:
            while True:
                wait = await retry_with_backoff(one_pass, on_failure=waiting_for_redis)
                if pending:
                    pending = False
                    self.metrics.pending.dec()
                    self.last_counted_at = time.monotonic()
                if wait is None:
                    return
                await asyncio.sleep(wait)
        except Exception:
            log.exception("cleanup of worker pid %d on %s failed", w.pid, w.host)
        finally:
            if pending:
                self.metrics.pending.dec()

    async def _reap_once(self, dep: Departure) -> float | None:
        """One look at what the departed worker left; the seconds until the next look, or None
        when there is nothing left to watch."""
        watch, w = dep.watch, dep.watch.worker
        now = await self.redis_now()
        looking = now <= dep.look_until
        # What is known first (a worker that lived a tick or two: this is the kill's fast path),
        # then a look for what is not.
        next_look = await self._settle_owned(dep, now)
        if looking:
            # Its registration may have appeared after the last tick, or be written again by a
            # heartbeat that raced the shutdown (asynq #979): look on for a while after the exit.
            before = {k: o.score for k, o in watch.owned.items()}
            await self._discover(watch, since=min(w.born_at + self.clock.offset, now) - 1)
            # A new member, or one that was gone and is back: act on it now.
            if any(o.score is not None and before.get(k) is None for k, o in watch.owned.items()):
                later = await self._settle_owned(dep, now)
                if later is not None:
                    next_look = later if next_look is None else min(next_look, later)
            wake = min(self.poll_interval, dep.look_until - now + 0.05)
            next_look = wake if next_look is None else min(next_look, wake)
        return next_look

    async def _settle_owned(self, dep: Departure, now: float) -> float | None:
        """Act on each registration of the departed worker by the rule; the seconds until one
        that is not yet expired would be, or None when none waits."""
        watch, w = dep.watch, dep.watch.worker
        next_look: float | None = None
        for key, o in list(watch.owned.items()):
            how = Verdict.WHEN_EXPIRED if o.doubted else verdict(o.claim, done=dep.done)
            if how is Verdict.LEAVE or key in dep.noted:
                continue
            seen = await self.store.scores(o.member)
            score = _present_score(seen)
            o.score = score
            if score is None:
                continue  # gone: deregistered, or removed
            if how is Verdict.WHEN_EXPIRED and score + self.cfg.settle >= now:
                wake = score + self.cfg.settle - now + 0.05
                next_look = wake if next_look is None else min(next_look, wake)
                continue
            result = await self._settle_member(dep, o, seen, how, now)
            if result == KEPT:
                if how is Verdict.NOW:
                    o.doubted = True
                    log.warning("%s moved after worker pid %d on %s %s: a live server owns it; "
                                "it is removed only once expired", key, w.pid, w.host,
                                "exited" if dep.done else "went away")
                next_look = self.poll_interval if next_look is None else min(next_look, self.poll_interval)
            elif self.cfg.mode != "on":
                dep.noted.add(key)
            else:
                o.score = None  # removed (or found gone by the script)
        return next_look

    async def _settle_member(self, dep: Departure, o: Owned, seen: Seen, how: Verdict, now: float) -> int:
        """Remove (or, by --cleanup, count or only log) one registration the departed worker
        left; the leak and its in-flight tasks are counted once per exit."""
        w = dep.watch.worker
        reason = "worker_exit" if o.claim.workers else "previous_incarnation"
        # The workers hash goes with the removal: read its task count first.
        in_flight = await self.store.in_flight(o.member) if o.claim.workers and not dep.tasks_counted else 0
        # Only a death proven (verdict NOW) hands the worker's tasks to asynq's recoverer: what
        # its last beat listed is read before the removal deletes the hash, acted on after it.
        last_beat = []
        if self.tasks is not None and how is Verdict.NOW and o.claim.workers:
            last_beat = await self.tasks.last_beat_tasks(o.member.sibling("workers"))
        if self.cfg.mode == "on":
            result = await self.store.remove(o.member, seen, how, self.cfg.settle)
            if result == KEPT:
                return KEPT
        else:
            result = REMOVED
        if last_beat:
            await self.tasks.worker_died(last_beat, f"worker pid {w.pid} on {w.host}")
        self.last_counted_at = time.monotonic()  # a metric changes below: the linger waits for a scrape
        if o.claim.workers:
            self._count_leak(dep, in_flight)
        score = _present_score(seen) or now
        if self.cfg.mode == "off":
            log.warning("worker pid %d on %s exited (%s) leaving %s; cleanup is off",
                        w.pid, w.host, dep.exited.outcome, o.member.key)
        elif self.cfg.mode == "dry-run":
            self.metrics.would_remove.labels(reason=reason).inc()
            log.warning("worker pid %d on %s exited (%s) leaving %s; dry run: would remove it",
                        w.pid, w.host, dep.exited.outcome, o.member.key)
        elif result == REMOVED:
            self.metrics.removed.labels(reason=reason).inc()
            self._confirm_later(o.member, seen, how)
            log.info("worker pid %d on %s exited (%s) leaving its registration: removed %s (%s)",
                     w.pid, w.host, dep.exited.outcome, o.member.key,
                     "proven its" if how is Verdict.NOW else f"expired {now - score:.1f}s ago")
        return result

    def _count_leak(self, dep: Departure, in_flight: int) -> None:
        """The registration outlived the worker: a leak, whatever the exit code (asynq #979 is a
        clean exit 0 that leaves it), counted once per exit. Its in-flight tasks were never
        finished or requeued by a Shutdown: they wait for asynq's lease recovery. The workers
        hash (TTL 10 s) holds the last beat's view; the observer's last count stands in once
        it has expired."""
        if not dep.leak_counted:
            dep.leak_counted = True
            self.metrics.leaked.inc()
        if not dep.tasks_counted:
            dep.tasks_counted = True
            self.metrics.abandoned.inc(in_flight or dep.watch.in_flight)

    # ------------------------------------------------------------ orphans

    def _remove_expired_orphans(self, found: dict[str, float], now: float) -> None:
        for key, score in found.items():
            m = _decode_member(key)
            if m is not None and score + self.cfg.settle < now:
                self._start_orphan_cleanup(m, score)

    def _start_orphan_cleanup(self, member: asynq.Member, score: float) -> None:
        """Remove an expired registration that no live worker owns (reason previous_incarnation)."""
        if member.key in self._orphans:
            return  # found again by another look while its removal waits
        self._orphans.add(member.key)
        self._spawn(self._remove_orphan(member, score), f"orphan-{member.ident}")

    async def _remove_orphan(self, member: asynq.Member, score: float) -> None:
        try:
            async with self._background:
                await self._remove_orphan_now(member, score)
        finally:
            self._orphans.discard(member.key)

    async def _remove_orphan_now(self, member: asynq.Member, score: float) -> None:
        try:
            with self.health.op("remove previous incarnation"):
                seen = await self.store.scores(member)
                if seen[0] is None or seen[0] > score:
                    return
                if self.cfg.mode == "dry-run":
                    self.metrics.would_remove.labels(reason="previous_incarnation").inc()
                    log.info("dry run: would remove %s, expired %.0fs ago", member.key, self.clock.now() - score)
                    return
                if self.cfg.mode == "off":
                    return
                if await self.store.remove(member, seen, Verdict.WHEN_EXPIRED, self.cfg.settle) == REMOVED:
                    self._confirm_later(member, seen, Verdict.WHEN_EXPIRED)
                    self.metrics.removed.labels(reason="previous_incarnation").inc()
                    log.info("removed %s of an earlier incarnation, expired %.0fs ago",
                             member.key, self.clock.now() - score)
        except REDIS_FAILURES:
            self.metrics.errors.inc()  # the next look or start-up scan will find it again

    def _confirm_later(self, member: asynq.Member, seen: Seen, how: Verdict) -> None:
        self._spawn(self._confirm_removed(member, seen, how), f"confirm-{member.ident}")

    async def _confirm_removed(self, member: asynq.Member, seen: Seen, how: Verdict) -> None:
        """After `confirm_after` seconds, read the removal back and redo it if a failover undid
        it; a read that fails is retried with backoff until Redis answers."""
        await asyncio.sleep(self.confirm_after)

        async def confirm() -> None:
            async with self._background:
                with self.health.op("confirm a removal"):
                    if _undone(seen, await self.store.scores(member)):
                        log.warning("%s is back after its removal (a Redis failover lost the "
                                    "write): removing it again", member.key)
                        await self.store.remove(member, seen, how, self.cfg.settle)

        await retry_with_backoff(confirm, on_failure=lambda e, d: self.metrics.errors.inc())

    async def remove_host_orphans(self) -> None:
        """At start: registrations of this host that expired within the last HOST_SCAN_WINDOW
        (a worker that died while the sidecar was down) are removed by the expiry rule; older
        ones are the sweep's. A second look once a registration left by a worker that died just
        before the start would have expired (its TTL plus settle)."""
        await self._scan_host_once()
        await asyncio.sleep(asynq.REGISTRATION_TTL + self.cfg.settle + 1)
        await self._scan_host_once()

    async def _scan_host_once(self) -> None:
        if not self.hostname:
            return
        hostname = self.hostname

        async def look() -> tuple[dict[str, float], float]:
            with self.health.op("look for this host's expired registrations"):
                now = await self.redis_now(fresh=True)
                return await self.store.host_members(hostname, now - HOST_SCAN_WINDOW, now - self.cfg.settle), now

        # Redis may be down at start: keep trying, with backoff.
        found, now = await retry_with_backoff(look, on_failure=lambda e, d: None, first=0.5)
        self._remove_expired_orphans(found, now)


def _undone(seen: Seen, now_seen: Seen) -> bool:
    """A removed registration that is back as it was (not beating since): a lost write."""
    return now_seen != (None, None) and not _advanced(seen, now_seen)


def _advanced(before: Seen, after: Seen) -> bool:
    return any(a is not None and (b is None or a > b) for b, a in zip(before, after))
