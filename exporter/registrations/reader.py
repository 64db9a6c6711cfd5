"""Reading asynq's registration sets: counts per scrape (O(1) commands) and a details watcher.

`RegistryCounts` is refreshed by the /metrics handler in one pipelined round trip of
ZCOUNT/ZRANGE commands (each O(log N)), so a scrape costs the same at 10 or 100,000
registrations. `DetailsWatcher` reads every live server's ServerInfo on its own interval,
aggregating as it goes, and never inside a scrape. With sharing on (the default) only one
sidecar of the fleet, the holder of a lease in Redis, makes that full read and publishes the
aggregate; the others read the aggregate (one small hash), so the fleet's Redis load does not
grow with pods x servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from exporter.asynq import model as asynq
from exporter.redisio.health import REDIS_FAILURES, RedisHealth
from exporter.tasks import reader as tasks

log = logging.getLogger("exporter.registrations.reader")


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


class RegistryCounts:
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


class ScrapesFirst:
    """Background bulk reads step aside while a scrape is in flight.

    A scrape holds `scraping()` around its Redis round trip; the details read calls `turn()`
    between its steps, which returns at once when no scrape is in flight and otherwise waits
    for the scrapes to finish, at most `limit` seconds a step, so that a client that never
    stops scraping slows the read down but cannot stop it. Without this, every await of a
    scrape lets the read run a step (about a millisecond of decoding) in between.
    """

    def __init__(self, limit: float = 0.05) -> None:
        self.limit = limit
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def scraping(self) -> Iterator[None]:
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def turn(self) -> None:
        if self._idle.is_set():
            await asyncio.sleep(0)  # still let a scrape that is waiting for the loop go first
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.limit)


async def _next_tick() -> None:
    await asyncio.sleep(0)


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
    orphaned: dict[str, int] | None = None  # per queue, when the read covered tasks


async def read_details(redis: Redis, now: float, on_undecodable: Callable[[str, bytes], None],
                       page: int = 250, chunk: int = 250,
                       turn: Callable[[], Awaitable[None]] = _next_tick) -> ServerDetails:
    """Read every live server's ServerInfo, page by page, aggregating as it goes.

    Memory is bounded by the page size, not by the fleet. Members come in pages of `page`
    (ranges by score with LIMIT); their ServerInfo in `chunk`s. After each reply, before the
    work on it, `turn` is awaited: it yields the event loop (the sidecar's also waits out the
    scrapes in flight: see ScrapesFirst), so that a scrape waits behind one step at most. A
    chunk is one MGET; on a Redis Cluster, where every server's key has a hash tag of its own
    (so an MGET of two would be CROSSSLOT), a pipeline of GETs that the client routes by slot.

    Only one sidecar per fleet makes this read, but it makes it every interval, so its cost is
    measured (bench/watcher.py, and the leader's scrape latency in bench/scrape.py). At
    100,000 live servers, with hiredis, pages of 250 and one MGET per page: about 0.7 s of CPU
    and a longest event-loop stall of about 1.5 ms. Pipelined GETs cost 3.2 s and stalled
    3.6 ms (redis-py packs and parses each command of a pipeline on its own), and without
    hiredis the read cost 3.7 s. Chunks of 50 cost 1.2 s for no shorter stall; pages of 500
    stall longer (up to 9 ms once: a page's members are validated in one go). Smaller pages
    cost Redis more (each walks its offset).
    """
    started = time.monotonic()
    details = ServerDetails()
    cluster = isinstance(redis, RedisCluster)
    offset = 0
    while True:
        members: list[bytes] = await redis.zrange(  # type: ignore[assignment]
            asynq.SERVERS, now, "+inf", byscore=True, offset=offset, num=page)
        if not members:
            break
        await turn()
        offset += len(members)
        keys = []
        for raw in members:
            try:
                asynq.parse_member(raw)  # the member is the per-server key's name
            except asynq.UndecodableError:
                on_undecodable("member", raw)
            else:
                keys.append(raw)
        for i in range(0, len(keys), chunk):
            if cluster:
                pipe = redis.pipeline(transaction=False)
                for key in keys[i : i + chunk]:
                    pipe.get(key)
                values = await pipe.execute()
            else:
                values = await redis.mget(keys[i : i + chunk])
            await turn()
            for key, value in zip(keys[i : i + chunk], values, strict=False):
                _add_server(details, key, value, on_undecodable)
        if len(members) < page:
            break
    details.duration = time.monotonic() - started
    return details


def _add_server(details: ServerDetails, key: bytes, value: bytes | None,
                on_undecodable: Callable[[str, bytes], None]) -> None:
    if value is None:
        details.missing += 1
        return
    try:
        status, concurrency, active = asynq.decode_server_load(value)
    except asynq.UndecodableError:
        on_undecodable("server_info", key)
        return
    details.servers += 1
    # Any other value is folded into "unknown": the label's values stay bounded whatever is
    # written in Redis.
    details.by_status[status if status in asynq.SERVER_STATUSES else "unknown"] += 1
    details.concurrency += concurrency
    details.active_tasks += active


#: Undecodable values remembered so that each is counted once (the oldest are forgotten).
UNDECODABLE_REMEMBERED = 10_000

#: The fleet's shared details: a HASH written by the lease holder, read by every other sidecar.
SHARED_DETAILS = "asynq-sidecar:details"
#: Who makes the full read: a STRING holding the leader's identity, with a TTL.
DETAILS_LEASE = "asynq-sidecar:details:lease"

# KEYS[1] = the lease, ARGV[1] = this sidecar's identity, ARGV[2] = TTL in ms.
# Returns 1 when this sidecar holds the lease (taken or extended), 0 when another does.
_TAKE_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

# KEYS[1] = the lease, ARGV[1] = this sidecar's identity: give it up if it is still ours.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def details_to_hash(d: ServerDetails, by: str) -> dict[str, str]:
    out = {"at": repr(d.at), "duration": repr(d.duration), "servers": str(d.servers),
           "concurrency": str(d.concurrency), "active_tasks": str(d.active_tasks),
           "missing": str(d.missing), "by": by}
    for status in (*asynq.SERVER_STATUSES, "unknown"):  # all of them: a zero overwrites a count
        out[f"status:{status}"] = str(d.by_status.get(status, 0))
    if d.orphaned is not None:  # one field: a queue that is gone does not linger
        out["orphaned_tasks"] = json.dumps(d.orphaned, sort_keys=True)
    return out


def details_from_hash(h: dict[bytes, bytes]) -> ServerDetails | None:
    """The published aggregate, or None when it is absent or not ours to read."""
    try:
        text = {k.decode(): v.decode() for k, v in h.items()}
        d = ServerDetails(at=float(text["at"]), duration=float(text["duration"]),
                          servers=int(text["servers"]), concurrency=int(text["concurrency"]),
                          active_tasks=int(text["active_tasks"]), missing=int(text["missing"]))
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    for key, value in text.items():
        if key.startswith("status:") and value.isdigit():
            d.by_status[key[len("status:"):]] = int(value)
    try:
        orphaned = json.loads(text.get("orphaned_tasks", "null"))
        if isinstance(orphaned, dict):
            d.orphaned = {str(q): int(n) for q, n in orphaned.items()}
    except (ValueError, TypeError):
        pass  # not ours: no orphan counts
    return d


class TaskReader(Protocol):
    """Reads asynq's tasks along with the server details (exporter.taskrecovery.TaskRecovery)."""

    async def read(self, now: float, turn: Callable[[], Awaitable[None]]) -> dict[str, int] | None: ...


class DetailsWatcher:
    """Reads server details every `interval` seconds; `latest` holds the last good read.

    With `shared`, each tick first takes or extends the fleet's lease (one single-key script):
    the holder makes the full read and publishes the aggregate in SHARED_DETAILS (with a TTL,
    so a dead leader's numbers vanish); every other sidecar reads that hash instead. A leader
    that dies is replaced within the lease's TTL (2.5 intervals). `latest.at` is always the time
    of the full read behind the numbers, so asynq_registry_snapshot_age_seconds stays honest.
    """

    def __init__(self, redis: Redis, health: RedisHealth, interval: float, *,
                 shared: bool = False, identity: str = "", scrapes_first: ScrapesFirst | None = None,
                 clock: Callable[[], float] = time.time, task_reader: TaskReader | None = None) -> None:
        self._redis = redis
        self._health = health
        self.interval = interval
        self.shared = shared
        self.identity = identity
        self._clock = clock
        self._turn = scrapes_first.turn if scrapes_first is not None else _next_tick
        self._tasks = task_reader  # the full read of asynq's tasks (orphans), made with the details
        self.latest: ServerDetails | None = None
        self.undecodable: Counter[str] = Counter()
        # The bad values already counted (each read meets them again), oldest first; bounded.
        self._undecodable_seen: dict[tuple[str, bytes], None] = {}
        self.leader = False
        self.full_reads = 0
        self.updated = asyncio.Event()  # set after every read attempt (tests wait on it)
        self._take_lease = redis.register_script(_TAKE_LEASE)
        self._release_lease = redis.register_script(_RELEASE_LEASE)

    def count_undecodable(self, kind: str, key: bytes) -> None:
        """Count a bad value once, however many reads meet it."""
        seen = (kind, key)
        if seen in self._undecodable_seen:
            return
        if len(self._undecodable_seen) >= UNDECODABLE_REMEMBERED:
            del self._undecodable_seen[next(iter(self._undecodable_seen))]
        self._undecodable_seen[seen] = None
        self.undecodable[kind] += 1

    async def read_once(self) -> None:
        try:
            with self._health.op("read server details"):
                if self.shared:
                    ttl_ms = int(self.interval * 2500)
                    self.leader = bool(await self._take_lease(keys=[DETAILS_LEASE],
                                                              args=[self.identity, ttl_ms]))
                    if not self.leader:
                        published = details_from_hash(await self._redis.hgetall(SHARED_DETAILS))  # type: ignore[arg-type]
                        if published is not None:
                            self.latest = published
                        return  # none yet (a new leader is reading): the last one stays, aging
                details = await read_details(self._redis, self._clock(), self.count_undecodable,
                                             turn=self._turn)
                if self._tasks is not None:
                    details.orphaned = await self._tasks.read(self._clock(), self._turn)
                details.at = self._clock()
                self.full_reads += 1
                self.latest = details
                if self.shared:
                    pipe = self._redis.pipeline(transaction=False)
                    pipe.hset(SHARED_DETAILS, mapping=details_to_hash(details, self.identity))  # type: ignore[arg-type]
                    pipe.pexpire(SHARED_DETAILS, int(self.interval * 3000))
                    await pipe.execute()
        except REDIS_FAILURES:
            pass  # counted by health; the previous read stays, and its age grows
        finally:
            self.updated.set()

    async def release(self) -> None:
        """On a clean stop: hand the lease back at once, so another sidecar takes over the full
        read at its next tick rather than when the lease expires."""
        if not (self.shared and self.leader):
            return
        try:
            with self._health.op("release the details lease"):
                await asyncio.wait_for(self._release_lease(keys=[DETAILS_LEASE], args=[self.identity]),
                                       1.0)
        except REDIS_FAILURES:  # TimeoutError among them
            pass  # it expires by itself
        self.leader = False

    async def run(self) -> None:
        while True:
            await self.read_once()
            await asyncio.sleep(self.interval)
