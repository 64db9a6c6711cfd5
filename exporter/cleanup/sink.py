"""The safety net as the sidecar sees it: one sink of the tracker's decisions that routes each to
its job. A started worker is watched by the observer; its reported server ids make its
registrations proven; its exit hands it to the reaper; the host's own leftovers from before the
start are the orphan remover's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from exporter.cleanup.confirm import Confirmations
from exporter.cleanup.observer import RegistrationObserver, Watch
from exporter.cleanup.orphans import OrphanRemover
from exporter.cleanup.reaper import ExitReaper
from exporter.cleanup.store import RegistrationStore
from exporter.lifecycle.tracker import Decision, ServerIdReported, WorkerExited, WorkerForgotten, WorkerStarted
from exporter.metrics.cleanup import CleanupMetrics
from exporter.redisio.clock import RedisClock
from exporter.redisio.health import RedisHealth
from exporter.settings import CleanupConfig
from exporter.tasks.recovery import TaskRecovery

log = logging.getLogger("exporter.cleanup.sink")


class Cleanup:
    def __init__(self, redis: Redis, health: RedisHealth, cfg: CleanupConfig, *,
                 registry: CollectorRegistry, submit: Callable[[Any], None],
                 spawn: Callable[[Any, str], asyncio.Task[Any]], poll_interval: float = 1.0,
                 hostname: str | None = None, clock: RedisClock | None = None,
                 tasks: TaskRecovery | None = None, on_settled: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.hostname = hostname
        self.metrics = CleanupMetrics(registry)
        self.store = RegistrationStore(redis, clock or RedisClock(), spawn)
        self.confirmations = Confirmations(self.store, health, self.metrics, spawn=spawn, settle=cfg.settle)
        self.observer = RegistrationObserver(self.store, health, submit=submit, poll_interval=poll_interval,
                                             host_pids_unique=cfg.host_pids_unique)
        self.reaper = ExitReaper(self.store, self.observer, health, cfg, self.metrics, self.confirmations,
                                 spawn=spawn, poll_interval=poll_interval, tasks=tasks, on_settled=on_settled)
        self.orphans = OrphanRemover(self.store, health, cfg, self.metrics, self.confirmations,
                                     spawn=spawn, hostname=hostname)

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
                watch.own_reported(sid)
            self.observer.watches[w.conn] = watch
        elif isinstance(decision, ServerIdReported):
            known = self.observer.watches.get(decision.worker.conn)
            if known is not None:
                known.own_reported(decision.server_id)
        elif isinstance(decision, WorkerExited):
            gone = self.observer.watches.pop(decision.worker.conn, None)
            if gone is not None:
                self.reaper.depart(gone, decision)
        elif isinstance(decision, WorkerForgotten):
            self.reaper.connection_closed(decision.worker.conn)

    @property
    def idle(self) -> bool:
        """No departed worker's registration is still watched."""
        return self.reaper.idle

    @property
    def last_counted_at(self) -> float:
        """time.monotonic() when an exit cleanup last changed a metric (the linger waits for a
        scrape after it)."""
        return self.reaper.last_counted_at
