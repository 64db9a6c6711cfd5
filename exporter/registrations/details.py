"""The details read: every live server's ServerInfo, read on its own interval and aggregated as it
goes, never inside a scrape. With sharing on (the default) only one sidecar of the fleet, the
holder of a lease in Redis, makes that full read and publishes the aggregate; the others read the
aggregate (one small hash), so the fleet's Redis load does not grow with pods x servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from exporter.asynq import model as asynq
from exporter.redisio.health import REDIS_FAILURES, RedisHealth

log = logging.getLogger("exporter.registrations.details")


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

    Only one sidecar per fleet makes this read, but it makes it every interval: pages of 250
    and one MGET per chunk are the cheapest and shortest-stalling of the shapes measured
    (bench/watcher.py; the figures, and the shapes that lost, are in docs/performance.md).
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
                 clock: Callable[[], float] = time.time, task_reader: TaskReader | None = None,
                 on_full_read: Callable[[], None] = lambda: None) -> None:
        """`on_full_read` is called after each full read this sidecar made itself."""
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
        self._on_full_read = on_full_read
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
                self.latest = details
                self._on_full_read()
                if self.shared:
                    pipe = self._redis.pipeline(transaction=False)
                    pipe.hset(SHARED_DETAILS, mapping=details_to_hash(details, self.identity))  # type: ignore[arg-type]
                    pipe.pexpire(SHARED_DETAILS, int(self.interval * 3000))
                    await pipe.execute()
        except REDIS_FAILURES:
            pass  # counted by health; the previous read stays, and its age grows

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
