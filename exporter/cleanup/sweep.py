"""`asynq-sidecar sweep`: remove registrations expired for longer than a grace, fleet-wide.

Works in short batches under a Redis lock so that no command blocks Redis and two sweepers never
run at once. `Sweeper.sweep_once()` is the API that `serve --sweep-interval` calls periodically.

"Expired" is decided by Redis's clock, never the sweeping machine's: a machine whose clock runs
ahead would otherwise take a live server's registration for a dead one.

How one set is swept, batch after batch (nothing ever spans two keys' hash slots):
1. One script on that sorted set reads Redis's `TIME`, selects the next batch of members whose
   score (their expiry) is below `TIME - grace` (`ZRANGEBYSCORE ... LIMIT`), removes them with
   one `ZREM` and returns them. Selection and removal are atomic, so a server that beat again
   can never be removed.
2. One `UNLINK` of the removed members' per-server keys (each key is named as its member).
   A sorted set and a per-server key are in different Redis Cluster slots, so this is a command
   of its own; on a Cluster, redis-py splits it by slot.
asynq's own listing runs `ZREMRANGEBYSCORE <set> -inf <now-1>` in one command; we never do.

Members whose name is not asynq's (`asynq:<set>:{host:pid:id}` of that set) are removed too
when expired past the grace (the score is the expiry, whatever the name), and counted apart;
a key named like such a member is left alone, since nothing says that it is a per-server key.

The report counts what was removed. It lists every member and every deleted key only when asked
(`list_members`, as `--json` does); otherwise it keeps the first few members of each set, as many
as the human report prints, so that a sweep of a large backlog builds no object per member.

`--dry-run` sends read commands only (it does not even take the lock). Exit status: 0 when the
sweep ran or when another sweeper held the lock (nothing was done: the other one sweeps);
1 when the lock was lost mid-sweep (the sweep stopped early); 2 when Redis cannot be reached or
failed mid-sweep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from exporter.asynq import model as asynq
from exporter.cleanup.sweep_report import (
    EXIT_REDIS,
    LIST_AT_MOST,
    LOCK_KEY,
    Removed,
    SetSweep,
    SweepFailed,
    SweepReport,
    json_document,
    print_report,
    registrations_removed,
)
from exporter.redisio.connect import connect, redis_time
from exporter.redisio.health import REDIS_FAILURES, RedisHealth
from exporter.settings import RedisConfig, SweepConfig
from exporter.tasks.repair import repair_tasks
from exporter.text import as_bytes, as_text

try:
    from hiredis import pack_command as _pack_command
except ImportError:  # redis-py works without it (slower)
    _pack_command = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("exporter.cleanup.sweep")

#: The lock expires this long after its last refresh; a running sweep refreshes it every third.
LOCK_TTL = 30.0
#: Members per batch: each command then takes about a millisecond at 100,000 members.
DEFAULT_BATCH = SweepConfig.batch


# KEYS[1] = one sorted set; ARGV[1] = grace in seconds; ARGV[2] = batch size; ARGV[3] = "1" to
# return each member's score after it. Removes up to a batch of the members whose score is below
# Redis's TIME minus the grace, lowest scores first, and returns them. TIME before a write is
# allowed since scripts replicate their effects (the default from Redis 5; asked for explicitly
# before that).
_SELECT_AND_REMOVE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local cutoff = '(' .. string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000 - tonumber(ARGV[1]))
local limit = tonumber(ARGV[2])
if ARGV[3] ~= '1' then
  local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, limit)
  if #members > 0 then redis.call('ZREM', KEYS[1], unpack(members)) end
  return members
end
local pairs = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'WITHSCORES', 'LIMIT', 0, limit)
local members = {}
for i = 1, #pairs, 2 do members[#members + 1] = pairs[i] end
if #members > 0 then redis.call('ZREM', KEYS[1], unpack(members)) end
return pairs
"""

# KEYS[1] = the lock; ARGV[1] = our token; ARGV[2] = new TTL in ms. 1 if still ours, else 0.
_REFRESH_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] = the lock; ARGV[1] = our token. Deletes it only if it is still ours.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class _LockLost(Exception):
    pass


# ---------------------------------------------------------------- the sweeper

#: Test seam: awaited with (set name, members removed) after each batch's removal script and
#: before its per-server keys are deleted.
AfterBatch = Callable[[str, list[bytes]], Awaitable[None]]


def _own_key(set_name: str, raw: bytes) -> bool:
    """True when `raw` is asynq's name for a member of `set_name`, so a key of that name is its
    per-server key."""
    try:
        return asynq.parse_member(raw).set == set_name
    except asynq.UndecodableError:
        return False


#: set name -> a test that accepts only names `_own_key` accepts, and most of them: an ASCII pid
#: and an id without ':'. A name it refuses gets `_own_key`'s full parse.
_SURELY_OWN = {name: re.compile(rb"asynq:" + name.encode() + rb":\{.*:[0-9]+:[^:]+\}", re.DOTALL).fullmatch
               for name in asynq.SETS}


def _not_own(set_name: str, members: Sequence[bytes]) -> set[bytes]:
    """The members that are not asynq's names for members of `set_name`: usually none."""
    surely = _SURELY_OWN[set_name]
    return {m for m in members if not surely(m) and not _own_key(set_name, m)}


class Sweeper:
    """Removes registrations expired for longer than `grace` seconds from asynq's three sets.

    Call `sweep_once()` from one task at a time; each call takes the lock afresh (a dry run
    takes none). Redis failures raise `SweepFailed` (after `health` recorded them).
    `list_members` makes the report list every member removed and every key deleted.
    """

    def __init__(self, redis: Redis, health: RedisHealth, *, grace: float, batch: int = DEFAULT_BATCH,
                 dry_run: bool = False, list_members: bool = False,
                 monotonic: Callable[[], float] = time.monotonic, lock_ttl: float = LOCK_TTL,
                 after_batch: AfterBatch | None = None) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._redis = redis
        self._health = health
        self.grace = grace
        self.batch = batch
        self.dry_run = dry_run
        self.list_members = list_members
        self._monotonic = monotonic
        self._lock_ttl_ms = max(1, int(lock_ttl * 1000))
        self._after_batch = after_batch
        self._remove_script = redis.register_script(_SELECT_AND_REMOVE)
        self._refresh_script = redis.register_script(_REFRESH_LOCK)
        self._release_script = redis.register_script(_RELEASE_LOCK)
        self._token = ""
        self._refreshed_at = 0.0

    async def sweep_once(self) -> SweepReport:
        """One sweep of the three sets. Returns the report; raises SweepFailed on a Redis failure."""
        started = self._monotonic()
        now = time.time()
        report = SweepReport(redis_url=self._health.display_url, time=now, grace=self.grace,
                             cutoff=now - self.grace, dry_run=self.dry_run,
                             sets={name: SetSweep(name, key) for name, key in asynq.SETS.items()})
        try:
            with self._health.op("sweep time"):
                report.time = await redis_time(self._redis)
            report.cutoff = report.time - self.grace
            if self.dry_run:
                for set_sweep in report.sets.values():
                    await self._preview_set(set_sweep, report)
            elif await self._acquire(report):
                try:
                    for set_sweep in report.sets.values():
                        await self._sweep_set(set_sweep, report)
                except _LockLost:
                    report.lock_lost = True
                    log.warning("sweep stopped early: the lock %s expired or was taken by another "
                                "sweeper", LOCK_KEY)
                finally:
                    await self._release()
        except REDIS_FAILURES as e:
            report.error = f"{type(e).__name__}: {e}"
            report.duration = self._monotonic() - started
            log.warning("sweep failed after removing %d registration(s): %s", report.removed, report.error)
            raise SweepFailed(report) from e
        report.duration = self._monotonic() - started
        self._log(report)
        return report

    # -- the lock

    async def _acquire(self, report: SweepReport) -> bool:
        token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(16)}"
        with self._health.op("sweep lock"):
            got = await self._redis.set(LOCK_KEY, token, nx=True, px=self._lock_ttl_ms)
            if not got:
                holder = await self._redis.get(LOCK_KEY)
        if not got:
            report.lock_busy = True
            report.lock_holder = as_text(holder) if holder is not None else None
            return False
        self._token = token
        self._refreshed_at = self._monotonic()
        return True

    async def _keep_lock(self) -> None:
        """Refresh the lock when a third of its TTL has passed; raise _LockLost if not ours."""
        if (self._monotonic() - self._refreshed_at) * 1000 < self._lock_ttl_ms / 3:
            return
        with self._health.op("sweep lock"):
            ours = await self._refresh_script(keys=[LOCK_KEY], args=[self._token, self._lock_ttl_ms])
        if not ours:
            raise _LockLost
        self._refreshed_at = self._monotonic()

    async def _release(self) -> None:
        try:
            with self._health.op("sweep unlock"):
                await self._release_script(keys=[LOCK_KEY], args=[self._token])
        except REDIS_FAILURES as e:
            log.warning("could not release the sweep lock (it expires in %.0f s): %s: %s",
                        self._lock_ttl_ms / 1000, type(e).__name__, e)
        self._token = ""

    # -- sweeping

    def _record(self, result: SetSweep, members: Sequence[bytes], scores: Sequence[Any] | None,
                not_own: set[bytes]) -> None:
        """Count a batch of removed members; keep them as `Removed` when the report lists them."""
        result.removed += len(members)
        result.undecodable += len(not_own)
        if scores is None:
            return
        room = len(members) if self.list_members else LIST_AT_MOST - len(result.members)
        for raw, score in zip(members[:room], scores[:room], strict=True):
            result.members.append(Removed(as_text(raw), float(score), undecodable=raw in not_own))

    async def _remove_batch(self, result: SetSweep, grace: str, with_scores: bool
                            ) -> tuple[list[bytes], Sequence[Any] | None]:
        """Run the removal script for the next batch of `result`'s set: (members, scores or None)."""
        with self._health.op(f"sweep {result.key}"):
            reply = await self._remove_script(keys=[result.key],
                                              args=[grace, self.batch, 1 if with_scores else 0])
        members = reply[0::2] if with_scores else reply
        if members and not isinstance(members[0], bytes):
            members = [as_bytes(m) for m in members]
        return members, reply[1::2] if with_scores else None

    async def _sweep_set(self, result: SetSweep, report: SweepReport) -> None:
        """Batch after batch until one comes back short. The next batch's script is sent before
        this batch's keys are deleted and its members counted, so that Redis removes while this
        process works: one is idle while the other works otherwise."""
        grace = repr(float(self.grace))
        await self._keep_lock()
        batch: asyncio.Future[tuple[list[bytes], Sequence[Any] | None]] | None = asyncio.ensure_future(
            self._remove_batch(result, grace, self._with_scores(result)))
        try:
            while batch is not None:
                members, scores = await batch
                batch = None
                if not members:
                    return
                report.batches += 1
                if self._after_batch is not None:
                    await self._after_batch(result.set, members)
                lock_lost = False
                if len(members) == self.batch:  # there may be more
                    try:
                        await self._keep_lock()
                    except _LockLost:
                        lock_lost = True  # finish this batch, then stop
                    else:
                        batch = asyncio.ensure_future(self._remove_batch(
                            result, grace, self.list_members or result.removed + len(members) < LIST_AT_MOST))
                not_own = _not_own(result.set, members)
                self._record(result, members, scores, not_own)
                owned = [m for m in members if m not in not_own] if not_own else members
                if owned:
                    await self._delete_keys(result, owned)
                if lock_lost:
                    raise _LockLost
        finally:
            if batch is not None:  # failed mid-way: count what the batch in flight removed
                try:
                    members, scores = await batch
                except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the first failure is reported
                    pass
                else:
                    self._record(result, members, scores, _not_own(result.set, members))

    def _with_scores(self, result: SetSweep) -> bool:
        """Whether the next batch must come with scores: the report keeps its members."""
        return self.list_members or result.removed < LIST_AT_MOST

    async def _delete_keys(self, result: SetSweep, keys: Sequence[bytes]) -> None:
        """UNLINK the per-server keys: one command (split by slot on a Cluster); when the report
        lists them, one command per key, pipelined, to learn which existed."""
        if not self.list_members:
            with self._health.op("sweep per-server keys"):
                replies = await self._packed([(b"UNLINK", *keys)])
                result.keys_deleted += replies[0] if replies is not None else await self._redis.unlink(*keys)
            return
        with self._health.op("sweep per-server keys"):
            replies = await self._packed([(b"UNLINK", key) for key in keys])
            if replies is None:
                pipe = self._redis.pipeline(transaction=False)
                for key in keys:  # (a Cluster pipeline's unlink() is a coroutine: the generic form)
                    pipe.execute_command("UNLINK", key)
                replies = await pipe.execute()
        existed = [as_text(k) for k, n in zip(keys, replies, strict=True) if n]
        result.keys_deleted += len(existed)
        result.deleted_keys.extend(existed)

    async def _packed(self, commands: Sequence[tuple[bytes, ...]]) -> list[Any] | None:
        """Send `commands` packed by hiredis in one write on a pooled connection and read their
        replies; None when this client cannot (a Cluster client, or no hiredis): the caller
        sends them the usual way. redis-py's asyncio client packs each argument in Python (its
        synchronous client uses hiredis), which for a batch of 500 keys costs this process more
        time than Redis spends on the commands."""
        pool = getattr(self._redis, "connection_pool", None)
        if _pack_command is None or pool is None:
            return None
        try:
            acquire = pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants a command's name
            acquire = pool.get_connection(commands[0][0].decode())
        conn = await acquire
        try:
            await conn.send_packed_command(b"".join([_pack_command(c) for c in commands]))  # type: ignore[arg-type]
            return [await conn.read_response() for _ in commands]
        except BaseException:
            await conn.disconnect(nowait=True)  # replies may still be on their way: not reusable
            raise
        finally:
            await pool.release(conn)

    async def _preview_set(self, result: SetSweep, report: SweepReport) -> None:
        """Dry run: page through the set by rank (O(log N) per page) with read commands only,
        against the cutoff of the sweep's start."""
        seen: set[bytes] = set()
        start = 0
        while True:
            with self._health.op(f"sweep {result.key}"):
                page: list[tuple[bytes, float]] = await self._redis.zrange(  # type: ignore[assignment]
                    result.key, start, start + self.batch - 1, withscores=True)
            report.batches += 1
            members, scores = [], []
            for member, score in page:
                raw = as_bytes(member)
                if float(score) >= report.cutoff:
                    page = []  # sorted by score: nothing further is expired long enough
                    break
                if raw in seen:  # ranks shifted under us
                    continue
                seen.add(raw)
                members.append(raw)
                scores.append(score)
            not_own = _not_own(result.set, members)
            self._record(result, members, scores, not_own)
            owned = [m for m in members if m not in not_own]
            if owned:
                await self._count_keys(result, owned)
            if len(page) < self.batch:
                return
            start += self.batch

    async def _count_keys(self, result: SetSweep, keys: Sequence[bytes]) -> None:
        """Dry run: which per-server keys exist (EXISTS, one per key when the report lists them)."""
        if not self.list_members:
            with self._health.op("sweep per-server keys"):
                result.keys_deleted += await self._redis.exists(*keys)
            return
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        with self._health.op("sweep per-server keys"):
            replies = await pipe.execute()
        existed = [as_text(k) for k, n in zip(keys, replies, strict=True) if n]
        result.keys_deleted += len(existed)
        result.deleted_keys.extend(existed)

    def _log(self, report: SweepReport) -> None:
        if report.lock_busy:
            log.info("sweep skipped: another sweeper holds the lock (%s)", report.lock_holder)
            return
        verb = "would remove" if report.dry_run else "removed"
        per_set = ", ".join(f"{name} {s.removed}" for name, s in report.sets.items())
        log.info("sweep %s %d expired registration(s) (%s; %d undecodable) and %d per-server key(s) "
                 "in %.3f s", verb, report.removed, per_set, report.undecodable, report.keys_deleted,
                 report.duration)


# ---------------------------------------------------------------- command


def run(cfg: SweepConfig) -> int:
    try:
        report = asyncio.run(_sweep(cfg.redis, grace=cfg.grace, dry_run=cfg.dry_run, batch=cfg.batch,
                                    list_members=cfg.json))
    except SweepFailed as e:
        report = e.report
        done = f" after removing {report.removed} registration(s)" if report.removed else ""
        sys.stderr.write(f"asynq-sidecar sweep: Redis at {cfg.redis.display_url} failed{done}: "
                         f"{report.error}\n")
    repair = None
    if cfg.repair_tasks and not report.error:
        repair = repair_tasks(cfg.redis, dry_run=cfg.dry_run)
    if cfg.json:
        doc = report.to_json()
        if repair is not None:
            doc["tasks"] = repair.to_json()
        sys.stdout.write(json_document(doc) + "\n")
    elif not report.error or report.removed:
        print_report(report, sys.stdout)
        if repair is not None:
            repair.print(sys.stdout)
    if repair is not None and repair.error and not report.error:
        return EXIT_REDIS
    return report.exit_code()


async def _sweep(cfg: RedisConfig, *, grace: float, dry_run: bool, batch: int,
                 list_members: bool) -> SweepReport:
    redis = connect(cfg)
    try:
        sweeper = Sweeper(redis, RedisHealth(cfg.display_url), grace=grace, batch=batch, dry_run=dry_run,
                          list_members=list_members)
        return await sweeper.sweep_once()
    finally:
        await redis.aclose()


async def sweep_periodically(sweeper: Sweeper, interval: float,
                             on_removed: Callable[[int], None]) -> None:
    """`serve --sweep-interval`: sweep every `interval` seconds, forever.

    `on_removed` gets the number of registrations each sweep removed: server members plus
    scheduler members (a server's workers member is part of the same registration), also
    for a sweep that Redis cut short. A failure is counted by the sweeper's health and
    retried at the next interval.
    """
    while True:
        await asyncio.sleep(interval)
        try:
            report = await sweeper.sweep_once()
        except SweepFailed as e:
            report = e.report
        on_removed(registrations_removed(report))
