"""asynq's in-flight tasks in Redis: the per-queue counts a scrape reads, the full read that finds
stale tasks, and the conditional scripts that hand a stale task back to asynq's own recoverer.

The facts come from hibiken/asynq v0.26.0 (internal/base/base.go for the key names,
internal/rdb/rdb.go for the dequeue, ExtendLease and ListLeaseExpired scripts, recoverer.go,
heartbeat.go):

- queue names are the members of the SET `asynq:queues`;
- a queue's in-flight task ids are in the LIST `asynq:{<q>}:active`, and their lease expiries
  (whole Unix seconds) in the ZSET `asynq:{<q>}:lease`; the dequeue script adds both at once
  (lease = now + 30 s), and a live server's heartbeat extends the leases of the tasks it runs
  (`ZADD XX`) as long as its own copy of the lease has not run out;
- every live server lists the tasks it runs in its `asynq:workers:{host:pid:id}` HASH: field =
  task id, value = a WorkerInfo protobuf (field 7: the queue), rewritten at every beat;
- the recoverer of every live server, at start and then once a minute, retries (or archives)
  every task of its queues whose lease score is more than 30 s in the past. It never looks at
  the active list: an active task with no lease entry is never recovered.

The sidecar never moves a task: a stale one is only given a lease score far enough in the past
(`EXPIRE_BACK` seconds before Redis's TIME) for the next recoverer run of any live server to
take it, with asynq's own retry count, delay, archive rule and error message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from exporter.asynq import model as asynq
from exporter.asynq import pbwire
from exporter.redisio.connect import redis_time
from exporter.text import as_bytes, as_text

QUEUES = "asynq:queues"

#: asynq's recoverer takes a task whose lease expired more than this many seconds ago.
RECOVERER_SKEW = 30
#: A stale task's lease is set to Redis's TIME minus this: past the recoverer's 30 s allowance,
#: with 60 s to spare for a recoverer whose server's clock runs behind Redis's.
EXPIRE_BACK = 90

#: Ids read per LRANGE/ZRANGE page, and workers hashes read per pipeline, in the full read.
PAGE = 1000
HASHES_PER_PIPELINE = 250


def active_key(queue: str) -> str:
    return f"asynq:{{{queue}}}:active"


def lease_key(queue: str) -> str:
    return f"asynq:{{{queue}}}:lease"


def queue_names(raw: Any) -> list[str]:
    """The members of asynq:queues as text, sorted (labels in a stable order)."""
    return sorted(as_text(q) for q in raw or ())


# ---------------------------------------------------------------- per scrape: O(1) per queue


@dataclass(frozen=True)
class QueueCounts:
    active: int
    lease_expired: int  # lease score before Redis's now: waiting for asynq's recoverer
    oldest_lease_expired_age: float  # seconds; 0 when no lease is expired


def add_count_commands(pipe: Any, queues: Sequence[str], now: float) -> None:
    """Three commands per queue, each O(1) or O(log N): LLEN active, ZCOUNT of the leases
    before `now`, and the lowest lease score."""
    for q in queues:
        pipe.llen(active_key(q))
        pipe.zcount(lease_key(q), "-inf", f"({now!r}")
        pipe.zrange(lease_key(q), 0, 0, withscores=True)


def parse_counts(replies: Sequence[Any], queues: Sequence[str], now: float) -> dict[str, QueueCounts]:
    out = {}
    for i, q in enumerate(queues):
        active, expired, lowest = replies[3 * i: 3 * i + 3]
        oldest = 0.0
        if expired and lowest:
            oldest = max(0.0, now - float(lowest[0][1]))
        out[q] = QueueCounts(int(active), int(expired), oldest)
    return out


async def read_counts(redis: Redis, queues: Sequence[str], now: float) -> dict[str, QueueCounts]:
    """The counts of `queues` in one round trip (a scrape that meets a new queue)."""
    if not queues:
        return {}
    pipe = redis.pipeline(transaction=False)
    add_count_commands(pipe, queues, now)
    return parse_counts(await pipe.execute(), queues, now)


# ---------------------------------------------------------------- WorkerInfo


def worker_queue(data: bytes) -> str:
    """WorkerInfo.queue (field 7) straight from the wire format, without the protobuf runtime;
    raises asynq.UndecodableError when the bytes are not a WorkerInfo."""
    queue = ""
    end = len(data)
    pos = 0
    try:
        while pos < end:
            number, wire, pos = pbwire._tag(data, pos, end)
            if number == 7 and wire == 2:
                start, stop = pbwire._bytes(data, pos, end)
                queue, pos = pbwire._text(data, start, stop), stop
            else:
                pos = pbwire._skip(data, pos, end, number, wire)
    except (pbwire.WireError, IndexError) as e:
        raise asynq.UndecodableError(f"cannot decode WorkerInfo: {e}") from None
    return queue


@dataclass(frozen=True)
class LeasedTask:
    """A task a server listed in its workers hash, with the lease score read for it (None: no
    lease entry)."""

    queue: str
    id: str
    lease: float | None


async def workers_tasks(redis: Redis, workers_key: str) -> tuple[list[LeasedTask], list[bytes]]:
    """The tasks listed in one workers hash (its server's last beat), each with its lease score
    now; and the task ids whose value could not be decoded (skipped)."""
    listed: dict[bytes, bytes] = await redis.hgetall(workers_key)  # type: ignore[assignment]
    by_queue: dict[str, list[str]] = {}
    bad: list[bytes] = []
    for task_id, value in listed.items():
        try:
            queue = worker_queue(value)
        except asynq.UndecodableError:
            bad.append(as_bytes(task_id))
            continue
        if queue:
            by_queue.setdefault(queue, []).append(as_text(task_id))
    if not by_queue:
        return [], bad
    pipe = redis.pipeline(transaction=False)
    order = [(q, i) for q, ids in sorted(by_queue.items()) for i in ids]
    for q, i in order:
        pipe.zscore(lease_key(q), i)
    scores = await pipe.execute()
    return [LeasedTask(q, i, None if s is None else float(s)) for (q, i), s in zip(order, scores, strict=False)], bad


# ---------------------------------------------------------------- the full read: O(active)


async def _next_tick() -> None:
    await asyncio.sleep(0)


@dataclass
class QueueTasks:
    """One queue's stale tasks, from a full read."""

    active: int = 0
    orphaned: list[str] = field(default_factory=list)  # active, no lease, in no live workers hash
    lease_expired: list[tuple[str, float]] = field(default_factory=list)  # (id, lease score), oldest first
    lease_expired_total: int = 0  # lease_expired holds at most the read's `keep` of them


async def _list_all(redis: Redis, key: str) -> list[bytes]:
    out: list[bytes] = []
    start = 0
    while True:
        page: list[bytes] = await redis.lrange(key, start, start + PAGE - 1)  # type: ignore[assignment]
        out += page
        if len(page) < PAGE:
            return out
        start += PAGE


async def _zset_all(redis: Redis, key: str) -> set[bytes]:
    out: set[bytes] = set()
    start = 0
    while True:
        page: list[bytes] = await redis.zrange(key, start, start + PAGE - 1)  # type: ignore[assignment]
        out.update(page)
        if len(page) < PAGE:
            return out
        start += PAGE


async def _unleased_and_active(redis: Redis, queue: str, ids: Sequence[bytes | str]) -> list[bool]:
    """For each id: no lease entry (ZSCORE, pipelined) and in the active list (read whole)."""
    pipe = redis.pipeline(transaction=False)
    for i in ids:
        pipe.zscore(lease_key(queue), i)
    scores = await pipe.execute()
    present = set(await _list_all(redis, active_key(queue)))
    return [s is None and as_bytes(i) in present for i, s in zip(ids, scores, strict=False)]


async def live_task_ids(redis: Redis, now: float,
                        turn: Callable[[], Awaitable[None]] = _next_tick) -> set[bytes]:
    """Every task id listed in the workers hash of a live server (a member of asynq:workers
    whose expiry score is at or after `now`). One HKEYS per live server: read only when some
    task has no lease."""
    ids: set[bytes] = set()
    offset = 0
    while True:
        members = await redis.zrange(asynq.WORKERS, now, "+inf", byscore=True, offset=offset,
                                     num=HASHES_PER_PIPELINE)
        if not members:
            return ids
        offset += len(members)
        pipe = redis.pipeline(transaction=False)
        for m in members:
            pipe.hkeys(m)  # type: ignore[arg-type]  # the member is the workers hash's own name
        for keys in await pipe.execute():
            ids.update(as_bytes(k) for k in keys)
        await turn()
        if len(members) < HASHES_PER_PIPELINE:
            return ids


async def read_stale(redis: Redis, now: float, *, keep: int = 0,
                     turn: Callable[[], Awaitable[None]] = _next_tick) -> dict[str, QueueTasks]:
    """Every queue's active count and orphaned task ids, and (with `keep`) up to `keep` of its
    lease-expired tasks. Read commands only.

    A candidate orphan (an id of the active list missing from the lease set) is checked again
    before it counts (its ZSCORE, and the active list read once more): the two lists are read
    one after the other, and a task that finished, or was dequeued, in between must not look
    orphaned. No command is O(active) per task: an active list is only ever read whole, in pages.
    """
    queues = queue_names(await redis.smembers(QUEUES))
    out: dict[str, QueueTasks] = {}
    candidates: dict[str, list[str]] = {}
    for q in queues:
        qt = out[q] = QueueTasks()
        active = await _list_all(redis, active_key(q))
        qt.active = len(active)
        if keep:
            pipe = redis.pipeline(transaction=False)
            pipe.zcount(lease_key(q), "-inf", f"({now!r}")
            pipe.zrangebyscore(lease_key(q), "-inf", f"({now!r}", start=0, num=keep, withscores=True)
            total, expired = await pipe.execute()
            qt.lease_expired_total = int(total)
            qt.lease_expired = [(as_text(i), float(s)) for i, s in expired]
        if not active:
            continue
        leased = await _zset_all(redis, lease_key(q))
        missing = list(dict.fromkeys(i for i in active if i not in leased))
        await turn()
        if missing:
            still = [as_text(i) for i, ok in zip(missing, await _unleased_and_active(redis, q, missing), strict=False) if ok]
            if still:
                candidates[q] = still
    if candidates:
        listed = {as_text(i) for i in await live_task_ids(redis, now, turn)}
        for q, ids in candidates.items():
            out[q].orphaned = [i for i in ids if i not in listed]
    return out


# ---------------------------------------------------------------- the scripts (one queue each)

#: Ids per script call: each call reads the active list at most once (LRANGE, O(active)) and
#: then looks each id up in a Lua table, so one call's work in Redis stays bounded.
SCRIPT_BATCH = 500

# Is ARGV's task in KEYS[1] (the active list)? With a few ids, LPOS each (O(active) per id);
# with more, the list read once into a table. `count` = the number of ids of the call.
_IS_ACTIVE = """
local present
local function is_active(id, count)
  if count <= 8 then return redis.call('LPOS', KEYS[1], id) ~= false end
  if present == nil then
    present = {}
    for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do present[v] = true end
  end
  return present[id] == true
end
"""

# KEYS[1] = asynq:{q}:active, KEYS[2] = asynq:{q}:lease (one hash tag: one slot); ARGV[1] =
# seconds before TIME to set the lease to; then pairs of task id and the lease score seen.
# A task's lease is set to TIME - ARGV[1] only if the task is still active and its lease score
# is still the one seen (a live server's beat since would have moved it) and later than that.
# Returns one 1 (expired) or 0 (skipped) per task.
EXPIRE_LEASES = _IS_ACTIVE + """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local expired = tonumber(t[1]) - tonumber(ARGV[1])
local count = (#ARGV - 1) / 2
local out = {}
for i = 2, #ARGV, 2 do
  local done = 0
  local s = redis.call('ZSCORE', KEYS[2], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) and tonumber(s) > expired
     and is_active(ARGV[i], count) then
    redis.call('ZADD', KEYS[2], 'XX', expired, ARGV[i])
    done = 1
  end
  out[#out + 1] = done
end
return out
"""

# KEYS as above; ARGV[1] = seconds before TIME; then task ids. A task gets a lease entry of
# TIME - ARGV[1] only if it is still active and still has no lease entry at all.
# Returns one 1 (given an expired lease) or 0 (skipped) per task.
REPAIR_ORPHANS = _IS_ACTIVE + """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local expired = tonumber(t[1]) - tonumber(ARGV[1])
local count = #ARGV - 1
local out = {}
for i = 2, #ARGV do
  local done = 0
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) and is_active(ARGV[i], count) then
    redis.call('ZADD', KEYS[2], 'NX', expired, ARGV[i])
    done = 1
  end
  out[#out + 1] = done
end
return out
"""


async def still_expirable(redis: Redis, tasks: Sequence[LeasedTask]) -> list[bool]:
    """Dry run of EXPIRE_LEASES with read commands: would each task's lease be expired now?"""
    if not tasks:
        return []
    expired = int(await redis_time(redis)) - EXPIRE_BACK
    pipe = redis.pipeline(transaction=False)
    for t in tasks:
        pipe.zscore(lease_key(t.queue), t.id)
    scores = await pipe.execute()
    present = {q: set(await _list_all(redis, active_key(q))) for q in sorted({t.queue for t in tasks})}
    return [s is not None and float(s) == t.lease and float(s) > expired and as_bytes(t.id) in present[t.queue]
            for t, s in zip(tasks, scores, strict=False)]


async def still_orphaned(redis: Redis, queue: str, ids: Sequence[str]) -> list[bool]:
    """Dry run of REPAIR_ORPHANS with read commands: is each task still active with no lease?"""
    return await _unleased_and_active(redis, queue, ids)
