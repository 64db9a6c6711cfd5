"""The safety net: find each watched worker's registration, and remove it when the worker dies.

`RegistrationObserver` follows every live worker: it discovers the `asynq:servers` members the
worker owns (ZSCAN MATCH `{host:pid:*}` until found, then O(1) ZSCORE/HLEN per tick), reports
them to the tracker (a worker becomes running when its registration appears), and snapshots
its in-flight task count. `Cleanup` (a sink) acts on `WorkerExited`: it removes what the dead
worker still owns, exactly as asynq's ClearServerState would have, and never anything live:

- every ZREM is a script on that one sorted set that removes the member only if its score has
  not advanced past the score seen when the decision was made (a heartbeat since = alive);
- after a lost connection (no exit report), it first waits `--settle` (> one 5 s heartbeat)
  and proceeds only if the score did not move meanwhile;
- scripts touch one key each, and the per-server STRING and HASH (one hash tag, one slot) are
  deleted together only after their sorted-set members went: safe on Redis Cluster.

A cleanup that cannot reach Redis stays pending and is retried with backoff until it succeeds.
Each removal is read back `CONFIRM_AFTER` seconds later and redone if a failover undid it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis

from exporter import asynq
from exporter.config import CleanupConfig
from exporter.health import REDIS_FAILURES, RedisHealth
from exporter.lifecycle import Decision, RegistrationSeen, Worker, WorkerExited, WorkerStarted

log = logging.getLogger("exporter.cleanup")

#: A registration counts as the worker's when its ServerInfo.start_time is no earlier than the
#: worker's start less this many seconds. The worker, the launcher and the sidecar of a pod read
#: one kernel clock; asynq stamps start_time after the process started, so a small allowance
#: (for a hello sent late, without started_at) does; a large one would let a life claim the
#: registration of the life just before it when a crash loop restarts within it.
OWNERSHIP_SKEW = 0.5

#: Reasons of asynq_sidecar_registrations_removed_total.
REASONS = ("worker_exit", "previous_incarnation", "sweep")

# KEYS[1] = a sorted set, ARGV[1] = member, ARGV[2] = the score seen when deciding.
# Returns 1 removed, 0 kept (the score advanced: a heartbeat since the decision), -1 absent.
_ZREM_IF_NOT_ADVANCED = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s then return -1 end
if tonumber(s) > tonumber(ARGV[2]) then return 0 end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

REMOVED, KEPT, ABSENT = 1, 0, -1

#: Redis operations of the cleanup and the observer in flight at once (see RegistrationStore).
STORE_CONCURRENCY = 16

#: Seconds between discovery scans once the quick first looks are over.
DISCOVERY_BACKOFF = 10.0

#: A worker with no registration found this long after its hello is worth a warning.
UNREGISTERED_WARNING = 30.0

#: A removal is read back this many seconds after Redis acknowledged it, from whichever server
#: is the master by then, and redone if it was undone: replication is asynchronous, so a master
#: replaced by a replica (Sentinel or Cluster failover) may have taken the write with it.
CONFIRM_AFTER = 10.0

#: Background removals (earlier incarnations, the start-up scan) and read-backs run at most this
#: many at once. A crash loop leaves hundreds of expired registrations of one host and pid, and
#: redis-py's pool refuses, rather than queues, an operation beyond its 100 connections.
BACKGROUND_CONCURRENCY = 8


class CleanupMetrics:
    """The cleanup's contract metrics, on an injected registry."""

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
        for reason in REASONS:
            self.removed.labels(reason=reason)
            self.would_remove.labels(reason=reason)


@dataclass
class Owned:
    """A registration taken to be the worker's, with the score last seen. `sure` when it carries
    the server id the worker reported; otherwise it is only probable (it started within the
    worker's life), and a removal needs more evidence when there is more than one."""

    member: asynq.Member
    score: float | None = None
    sure: bool = False
    changed_at: float | None = None  # time.monotonic() when the observer last saw the score move


@dataclass
class Watch:
    """What the observer knows about one live worker. Touched only by the event task (creation,
    removal) and the observer (its fields): both run on the one event loop."""

    worker: Worker
    owned: dict[str, Owned] = field(default_factory=dict)  # member key -> Owned
    in_flight: int = 0  # size of the workers hash at the last tick
    reported: set[str] = field(default_factory=set)  # members already sent to the tracker
    next_discovery: float = 0.0
    discoveries: int = 0
    max_gap: float = 0.0  # longest time the observer saw between two heartbeats
    warned_unregistered: bool = False
    leak_counted: bool = False  # the cleanup counted the leak (a retry must not count it again)
    # What the cleanup has finished with, so that a retry after a Redis failure repeats nothing:
    done: set[str] = field(default_factory=set)  # members removed, left alone or found gone
    tasks_counted: set[str] = field(default_factory=set)  # members whose tasks were counted
    fallback_tasks_counted: bool = False


@dataclass(frozen=True)
class RemovalResult:
    removed: int  # servers members removed
    kept_alive: int  # members whose score advanced since the decision


class RegistrationStore:
    """The Redis operations of ownership and cleanup; each is a few O(1)/O(log N) commands,
    except discovery, which scans the servers set with a MATCH pattern."""

    def __init__(self, redis: Redis, concurrency: int = STORE_CONCURRENCY) -> None:
        self.redis = redis
        self._zrem_if = redis.register_script(_ZREM_IF_NOT_ADVANCED)
        # At most this many operations at once: a crash loop's hundreds of cleanups would
        # otherwise take every connection of the pool (redis-py refuses the 101st), leaving
        # none for scrapes; the others wait their turn.
        self._slots = asyncio.Semaphore(concurrency)

    async def scan(self, pattern: str) -> dict[str, float]:
        """Every asynq:servers member matching `pattern`, with its score. A member that is not
        UTF-8 cannot be asynq's (host names and UUIDs are text): it is skipped."""
        async with self._slots:
            found: dict[str, float] = {}
            async for raw, score in self.redis.zscan_iter(asynq.SERVERS, match=pattern, count=1000):
                try:
                    found[raw.decode() if isinstance(raw, bytes) else raw] = float(score)
                except UnicodeDecodeError:
                    continue
            return found

    async def candidates(self, host: str, pid: int) -> dict[str, float]:
        """Every asynq:servers member of `{host:pid:*}` with its score."""
        return await self.scan(asynq.member_pattern("servers", host, pid))

    async def host_candidates(self, host: str) -> dict[str, float]:
        """Every asynq:servers member of `{host:*}` with its score."""
        return await self.scan(f"asynq:servers:{{{asynq.glob_escape(host)}:*}}")

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

    async def scores(self, member: asynq.Member) -> tuple[float | None, float | None]:
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

    async def remove(self, member: asynq.Member, seen: tuple[float | None, float | None]) -> int:
        """Mirror ClearServerState for one server, conditional on the scores seen.

        Returns REMOVED when the servers member went, KEPT when a heartbeat moved it since the
        decision (nothing is touched then), ABSENT when it was already gone.
        """
        async with self._slots:
            servers_seen, workers_seen = seen
            # One script call per sorted set, not a pipeline: redis-py refuses EVALSHA in a Redis
            # Cluster pipeline (and the two sets live on different nodes anyway). A direct call
            # also reloads the script after NOSCRIPT, as on a master just promoted by Sentinel.
            results = []
            if servers_seen is not None:
                results.append(int(await self._zrem_if(keys=[asynq.SERVERS],
                                                       args=[member.key, repr(servers_seen)])))
            if workers_seen is not None:
                results.append(int(await self._zrem_if(keys=[asynq.WORKERS],
                                                       args=[member.sibling("workers").key, repr(workers_seen)])))
            if KEPT in results:
                return KEPT
            # Both members are gone (or were): the per-server keys go too. One hash tag: one slot.
            await self.redis.delete(member.key, member.sibling("workers").key)
            return REMOVED if servers_seen is not None and results and results[0] == REMOVED else ABSENT


def _decode_member(key: str) -> asynq.Member | None:
    try:
        return asynq.parse_member(key)
    except asynq.UndecodableError:
        return None


class Cleanup:
    """Sink of lifecycle decisions + source of RegistrationSeen. See the module docstring."""

    def __init__(self, redis: Redis, health: RedisHealth, cfg: CleanupConfig, *,
                 registry: CollectorRegistry, submit: Callable[[Any], None],
                 spawn: Callable[[Any, str], asyncio.Task[Any]], poll_interval: float = 1.0,
                 hostname: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = RegistrationStore(redis)
        self.health = health
        self.cfg = cfg
        self.metrics = CleanupMetrics(registry)
        self._submit = submit
        self._spawn = spawn
        self.poll_interval = poll_interval
        self.hostname = hostname
        self._clock = clock
        self.watches: dict[int, Watch] = {}
        self._pending: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.done = asyncio.Event()  # set after every finished cleanup (tests wait on it)
        self.last_finished_at = 0.0  # time.monotonic() when the last cleanup ended
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
            if w.server_id:  # the worker told us: checked with O(1) commands from the first tick
                m = asynq.server_member(w.host, w.pid, w.server_id)
                watch.owned[m.key] = Owned(m, sure=True)
            self.watches[w.conn] = watch
        elif isinstance(decision, WorkerExited):
            watch = self.watches.pop(decision.worker.conn, None)
            if watch is not None:
                self._start_cleanup(watch, decision)

    def _start_cleanup(self, watch: Watch, exited: WorkerExited) -> None:
        task = self._spawn(self._cleanup_until_done(watch, exited), f"cleanup-{watch.worker.conn}")
        self._pending.add(task)
        self._idle.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not self._pending:
            self._idle.set()

    @property
    def idle(self) -> bool:
        return self._idle.is_set()

    # ------------------------------------------------------------ observer (a source)

    async def observe_forever(self) -> None:
        while True:
            started = time.monotonic()
            for watch in list(self.watches.values()):
                try:
                    with self.health.op("observe worker registration"):
                        await self.observe(watch)
                except REDIS_FAILURES:
                    break  # counted by health; try again next tick
                except Exception:  # a bug or odd data must not end the observation of all
                    log.exception("observing worker pid %d failed", watch.worker.pid)
            await asyncio.sleep(max(0.0, self.poll_interval - (time.monotonic() - started)))

    async def observe(self, watch: Watch) -> None:
        """One tick for one worker: discover its registration, or check it with O(1) commands."""
        now = self._clock()
        w = watch.worker
        known_live = any(o.score is not None and o.score >= now for o in watch.owned.values())
        if not known_live and now >= watch.next_discovery:
            await self._discover(watch, now)
        if not watch.owned:
            if not watch.warned_unregistered and now - w.hello_at > UNREGISTERED_WARNING:
                watch.warned_unregistered = True
                log.warning("no registration of %s pid %d found %.0fs after its hello: is it an "
                            "asynq server, and is that pid the asynq process (a launcher running a "
                            "shell must `exec` the worker)?", w.host, w.pid, now - w.hello_at)
            return
        owned = list(watch.owned.values())
        results = await self.store.tick([o.member for o in owned])
        in_flight = 0
        ticked = time.monotonic()
        for o, (score, count) in zip(owned, results):
            if score is not None and o.score is not None and score > o.score:
                if o.changed_at is not None:  # the time between two heartbeats, as seen here
                    watch.max_gap = max(watch.max_gap, ticked - o.changed_at)
                o.changed_at = ticked
            o.score = score
            if score is not None and score >= now:
                in_flight += count
                if o.member.key not in watch.reported:
                    watch.reported.add(o.member.key)
                    self._submit(RegistrationSeen(w.conn, o.member.key))
        watch.in_flight = in_flight

    async def _discover(self, watch: Watch, now: float) -> None:
        """Find `{host:pid:*}` members that are the worker's: started after it (less a skew)
        or carrying the server id it reported. Others that are long expired are earlier
        incarnations of the same host and pid (a restarted container): removed."""
        w = watch.worker
        # Look every tick at first (asynq registers as it starts), then every DISCOVERY_BACKOFF
        # seconds while nothing live is known. Once a live registration is known it is checked
        # with O(1) commands only: a scan of a large set (100,000 leaked entries) is paid at
        # the start and at the exit, where a last look finds a second server or another
        # process's registration before anything is removed.
        watch.discoveries += 1
        watch.next_discovery = now + (self.poll_interval if watch.discoveries < 10 else DISCOVERY_BACKOFF)
        candidates = await self.store.candidates(w.host, w.pid)
        members = [m for m in (_decode_member(k) for k in candidates) if m is not None]
        if not members:
            return
        infos = await self.store.server_infos(members)
        for m, raw in zip(members, infos):
            score = candidates[m.key]
            info = None
            if raw is not None:
                try:
                    info = asynq.decode_server_info(raw)
                except asynq.UndecodableError:
                    pass
            if self._owns(w, m, info):
                watch.owned.setdefault(m.key, Owned(m, score, sure=m.ident == w.server_id))
            elif score < now - self.cfg.settle and m.key not in watch.owned:
                self._start_orphan_cleanup(m, score)

    @staticmethod
    def _owns(w: Worker, m: asynq.Member, info: asynq.ServerInfo | None) -> bool:
        """The worker's own server id, or a server started within the worker's life: not
        before it started (less a skew) and not after it exited (a newer incarnation of the
        same host and pid, such as a restarted container, is not the dead worker's)."""
        if w.server_id and m.ident == w.server_id:
            return True
        # Without a server id, or with one that is not this member's (a wrong id, or a second
        # server of the same process), the start time decides.
        if info is None or info.start_time is None:
            return False
        if info.start_time < w.born_at - OWNERSHIP_SKEW:
            return False
        return w.exited_at is None or info.start_time <= w.exited_at

    def _ambiguous(self, w: Worker) -> bool:
        """Another live worker with the same host and pid (two PID-1 containers of one pod)
        could own the same registrations unless server ids were reported."""
        return not w.server_id and any(
            o.worker.host == w.host and o.worker.pid == w.pid and o.worker.conn != w.conn
            for o in self.watches.values())

    # ------------------------------------------------------------ cleanup

    async def _cleanup_until_done(self, watch: Watch, exited: WorkerExited) -> None:
        """Retry the cleanup with capped exponential backoff until it completes."""
        delay = 0.1
        pending_counted = False
        try:
            while True:
                try:
                    with self.health.op("clean up after worker exit"):
                        await self._cleanup_once(watch, exited)
                    return
                except REDIS_FAILURES as e:
                    self.metrics.errors.inc()
                    if not pending_counted:
                        pending_counted = True
                        self.metrics.pending.inc()
                    log.warning("cleanup of worker pid %d on %s waits for Redis (retry in %.1fs): %s",
                                watch.worker.pid, watch.worker.host, delay, e)
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, 5.0)
        except Exception:
            log.exception("cleanup of worker pid %d on %s failed", watch.worker.pid, watch.worker.host)
        finally:
            if pending_counted:
                self.metrics.pending.dec()
            self.last_finished_at = time.monotonic()
            self.done.set()

    async def _cleanup_once(self, watch: Watch, exited: WorkerExited) -> None:
        """Remove what the dead worker still owns. Idempotent: a retry after a Redis failure
        repeats only what is not done (`watch.done`)."""
        w = watch.worker
        fast = exited.reported and not self._ambiguous(w)
        if fast:
            # The registration with the server id the worker reported is exactly its own: at
            # once, before the scan below.
            await self._remove_owned(watch, exited, [o for o in watch.owned.values() if o.sure],
                                     prove=False)
        # A last look at {host:pid:*} (one scan): the worker may have died before a tick found
        # its registration, or have had more than one server, or share its host and pid.
        await self._discover(watch, self._clock())
        rest = [o for o in watch.owned.values() if o.member.key not in watch.done]
        # Also at once after a reported exit: the worker's only probable registration, when it
        # reported no server id. Anything else must first prove itself dead.
        single = fast and len(rest) == 1 and not any(o.sure for o in watch.owned.values())
        await self._remove_owned(watch, exited, rest, prove=not single)

    async def _remove_owned(self, watch: Watch, exited: WorkerExited, owned: list[Owned], *,
                            prove: bool) -> None:
        w = watch.worker
        seen = {o.member.key: await self.store.scores(o.member) for o in owned}
        present = [o.member for o in owned if seen[o.member.key] != (None, None)]
        if present and prove:
            # The proof: no heartbeat moves the score for the settle period (asynq beats every
            # 5 s), or for longer if this worker's beats were seen to come further apart.
            await asyncio.sleep(max(self.cfg.settle, watch.max_gap + self.poll_interval))
            for m in list(present):
                now_seen = await self.store.scores(m)
                if _advanced(seen[m.key], now_seen):
                    log.warning("%s is still beating after worker pid %d on %s %s: a live server "
                                "owns it; left alone", m.key, w.pid, w.host,
                                "lost its connection" if not exited.reported else "exited")
                    present.remove(m)
                    watch.done.add(m.key)
                else:
                    seen[m.key] = now_seen
            present = [m for m in present if seen[m.key] != (None, None)]
        if not present:
            watch.done.update(o.member.key for o in owned)
            return  # deregistered itself (a graceful Shutdown): nothing leaked
        # The registration outlived the worker: a leak, whatever the exit code (asynq #979 is
        # a clean exit 0 that leaves it), counted once per exit. Its in-flight tasks were never
        # finished or requeued by a Shutdown: they wait for asynq's lease recovery. The workers
        # hash (TTL 10 s) holds the last beat's view; the observer's last count stands in once
        # it has expired.
        if not watch.leak_counted:
            self.metrics.leaked.inc()
            watch.leak_counted = True
        in_flight = 0
        for m in present:
            if m.key not in watch.tasks_counted:
                in_flight += await self.store.in_flight(m)
                watch.tasks_counted.add(m.key)
        if in_flight == 0 and not watch.fallback_tasks_counted:
            in_flight = watch.in_flight
        watch.fallback_tasks_counted = True
        self.metrics.abandoned.inc(in_flight)
        names = ", ".join(m.key for m in present)
        if self.cfg.mode == "off":
            log.warning("worker pid %d on %s exited (%s) leaving %s; cleanup is off",
                        w.pid, w.host, exited.outcome, names)
            watch.done.update(o.member.key for o in owned)
            return
        if self.cfg.mode == "dry-run":
            self.metrics.would_remove.labels(reason="worker_exit").inc(len(present))
            log.warning("worker pid %d on %s exited (%s) leaving %s; dry run: would remove it",
                        w.pid, w.host, exited.outcome, names)
            watch.done.update(o.member.key for o in owned)
            return
        for m in present:
            result = await self.store.remove(m, seen[m.key])
            if result == KEPT:
                log.warning("%s moved since the decision: a live server owns it; left alone", m.key)
            elif result == REMOVED:
                self.metrics.removed.labels(reason="worker_exit").inc()
                self._confirm_later(m, seen[m.key])
                log.info("worker pid %d on %s exited (%s) leaving its registration: removed %s",
                         w.pid, w.host, exited.outcome, m.key)
            watch.done.add(m.key)
        watch.done.update(o.member.key for o in owned)

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
                    log.info("dry run: would remove %s, expired %.0fs ago", member.key, self._clock() - score)
                    return
                if self.cfg.mode == "off":
                    return
                if await self.store.remove(member, seen) == REMOVED:
                    self._confirm_later(member, seen)
                    self.metrics.removed.labels(reason="previous_incarnation").inc()
                    log.info("removed %s of an earlier incarnation, expired %.0fs ago",
                             member.key, self._clock() - score)
        except REDIS_FAILURES:
            self.metrics.errors.inc()  # the next hello or start-up scan will find it again

    def _confirm_later(self, member: asynq.Member, seen: tuple[float | None, float | None]) -> None:
        self._spawn(self._confirm_removed(member, seen), f"confirm-{member.ident}")

    async def _confirm_removed(self, member: asynq.Member, seen: tuple[float | None, float | None]) -> None:
        """After `confirm_after` seconds, read the removal back and redo it if a failover undid
        it; a read that fails is retried with backoff until Redis answers."""
        await asyncio.sleep(self.confirm_after)
        delay = 0.1
        while True:
            try:
                async with self._background:
                    with self.health.op("confirm a removal"):
                        if _undone(seen, await self.store.scores(member)):
                            log.warning("%s is back after its removal (a Redis failover lost the "
                                        "write): removing it again", member.key)
                            await self.store.remove(member, seen)
                return
            except REDIS_FAILURES:
                self.metrics.errors.inc()
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 5.0)

    async def remove_host_orphans(self) -> None:
        """At start: expired registrations of this host that no connected worker owns (a worker
        that died while the sidecar was down) are removed, if expired for longer than settle.
        A second look once a registration left by a worker that died just before the start
        would have aged enough (its TTL plus settle)."""
        await self._scan_host_once()
        await asyncio.sleep(asynq.REGISTRATION_TTL + self.cfg.settle + 1)
        await self._scan_host_once()

    async def _scan_host_once(self) -> None:
        if not self.hostname:
            return
        delay = 0.5
        while True:  # Redis may be down at start: keep trying, with backoff
            try:
                with self.health.op("scan this host's registrations"):
                    candidates = await self.store.host_candidates(self.hostname)
                break
            except REDIS_FAILURES:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 5.0)
        now = self._clock()
        for key, score in candidates.items():
            m = _decode_member(key)
            if m is not None and score < now - self.cfg.settle:
                self._start_orphan_cleanup(m, score)


def _undone(seen: tuple[float | None, float | None], now_seen: tuple[float | None, float | None]) -> bool:
    """A removed registration that is back as it was (not beating since): a lost write."""
    return now_seen != (None, None) and not _advanced(seen, now_seen)


def _advanced(before: tuple[float | None, float | None], after: tuple[float | None, float | None]) -> bool:
    return any(a is not None and (b is None or a > b) for b, a in zip(before, after))
