"""The exit reaper: a sink of `WorkerExited`. It watches what a departed worker left in Redis until
it is gone, by the one rule (`exporter.cleanup.rule`): a registration proven the dead worker's
goes at once; any other goes once Redis's clock is past its expiry by more than `--settle`; one
still beating is looked at again when it would expire; one written again after the exit
(asynq's late heartbeat, #979) is found by looks that go on for a while after the exit, and is
removed and counted as a leak. Work that cannot reach Redis is retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exporter.asynq import model as asynq
from exporter.cleanup.confirm import Confirmations
from exporter.cleanup.observer import Owned, RegistrationObserver, Watch
from exporter.cleanup.rule import KEPT, REMOVED, Verdict, judged, step
from exporter.cleanup.store import RegistrationStore, Seen, present_score
from exporter.lifecycle.tracker import WorkerExited
from exporter.metrics.cleanup import CleanupMetrics
from exporter.redisio.health import RedisHealth
from exporter.redisio.retry import retry_with_backoff
from exporter.settings import CleanupConfig
from exporter.tasks.recovery import TaskRecovery

log = logging.getLogger("exporter.cleanup.reaper")

#: Seconds to look for a registration written after the process is gone (writes in flight).
LOOK_AFTER_EXIT = 1.0


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


class ExitReaper:
    def __init__(self, store: RegistrationStore, observer: RegistrationObserver, health: RedisHealth,
                 cfg: CleanupConfig, metrics: CleanupMetrics, confirmations: Confirmations, *,
                 spawn: Callable[[Any, str], asyncio.Task[Any]], poll_interval: float,
                 tasks: TaskRecovery | None = None, on_settled: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.observer = observer
        self.health = health
        self.cfg = cfg
        self.metrics = metrics
        self.confirmations = confirmations
        self._spawn = spawn
        self.poll_interval = poll_interval
        self.tasks = tasks  # --recover-tasks: a proven-dead worker's tasks go to asynq's recoverer
        self._on_settled = on_settled
        self._departures: dict[int, Departure] = {}  # by conn: departed workers still watched
        self._busy: set[asyncio.Task[Any]] = set()  # reapers not yet settled
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_counted_at = 0.0  # time.monotonic() when a reaper last changed a metric

    @property
    def idle(self) -> bool:
        """No departed worker's registration is still watched."""
        return self._idle.is_set()

    def depart(self, watch: Watch, exited: WorkerExited) -> None:
        w = watch.worker
        # How long to look for a registration written after the exit. A launcher reports the
        # exit after waitpid, and a closed connection means the process is gone: only writes
        # already on their way can land, so a second will do. After bye the process still runs
        # (and may beat once more, as in asynq #979) until its connection closes: at most a
        # registration TTL.
        after = asynq.REGISTRATION_TTL + 1 if exited.via == "bye" else LOOK_AFTER_EXIT
        # Exit times are the pod's clock; Redis's is the local one plus the offset measured.
        dep = Departure(watch, exited, done=exited.reported,
                        look_until=(w.exited_at or time.time()) + self.store.clock.offset + after)
        task = self._spawn(self._reap(dep), f"cleanup-{w.conn}")
        self._departures[w.conn] = dep
        self._busy.add(task)
        self._idle.clear()
        task.add_done_callback(self._settled)
        task.add_done_callback(lambda _: self._departures.pop(w.conn, None))

    def connection_closed(self, conn: int) -> None:
        """The departed worker's connection closed: the process is gone, or going."""
        dep = self._departures.get(conn)
        if dep is not None:
            dep.look_until = min(dep.look_until, self.store.clock.now() + LOOK_AFTER_EXIT)

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._busy.discard(task)
        self._on_settled()
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
        now = await self.store.now()
        # What is known first (a worker that lived a tick or two: this is the kill's fast path),
        # then a look for what is not.
        next_look = await self._settle_owned(dep, now)
        if now <= dep.look_until:
            # Its registration may have appeared after the last tick, or be written again by a
            # heartbeat that raced the shutdown (asynq #979): look on for a while after the exit.
            before = {k: o.score for k, o in watch.owned.items()}
            await self.observer.discover(watch, since=min(w.born_at + self.store.clock.offset, now) - 1)
            # A new member, or one that was gone and is back: act on it now.
            if any(o.score is not None and before.get(k) is None for k, o in watch.owned.items()):
                next_look = _sooner(next_look, await self._settle_owned(dep, now))
            next_look = _sooner(next_look, min(self.poll_interval, dep.look_until - now + 0.05))
        return next_look

    async def _settle_owned(self, dep: Departure, now: float) -> float | None:
        """Act on each registration of the departed worker by the rule; the seconds until one
        that is not yet expired would be, or None when none waits."""
        watch, w = dep.watch, dep.watch.worker
        next_look: float | None = None
        for key, o in list(watch.owned.items()):
            how = judged(o.claim, doubted=o.doubted, done=dep.done)
            if how is Verdict.LEAVE or key in dep.noted:
                continue
            seen = await self.store.scores(o.member)
            o.score = present_score(seen)
            todo = step(how, o.score, now, self.cfg.settle)
            if todo.remove is None:
                next_look = _sooner(next_look, todo.wake)
                continue
            result = await self._settle_member(dep, o, seen, todo.remove, now)
            if result == KEPT:
                if how is Verdict.NOW:
                    o.doubted = True
                    log.warning("%s moved after worker pid %d on %s %s: a live server owns it; "
                                "it is removed only once expired", key, w.pid, w.host,
                                "exited" if dep.done else "went away")
                next_look = _sooner(next_look, self.poll_interval)
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
        if last_beat and self.tasks is not None:
            await self.tasks.worker_died(last_beat, f"worker pid {w.pid} on {w.host}")
        self.last_counted_at = time.monotonic()  # a metric changes below: the linger waits for a scrape
        if o.claim.workers:
            self._count_leak(dep, in_flight)
        score = present_score(seen) or now
        if self.cfg.mode == "off":
            log.warning("worker pid %d on %s exited (%s) leaving %s; cleanup is off",
                        w.pid, w.host, dep.exited.outcome, o.member.key)
        elif self.cfg.mode == "dry-run":
            self.metrics.would_remove.labels(reason=reason).inc()
            log.warning("worker pid %d on %s exited (%s) leaving %s; dry run: would remove it",
                        w.pid, w.host, dep.exited.outcome, o.member.key)
        elif result == REMOVED:
            self.metrics.removed.labels(reason=reason).inc()
            self.confirmations.later(o.member, seen, how)
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


def _sooner(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)
