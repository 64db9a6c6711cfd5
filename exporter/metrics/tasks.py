"""The stale-task metric families: per-queue gauges, and the recovery counters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: Why a task was handed back to asynq's recoverer.
RECOVERY_REASONS = ("worker_death", "orphan")


class TaskMetrics:
    """The recovery counters, on an injected registry; both reasons exported from the start."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.recovered = Counter("asynq_sidecar_tasks_recovered",
                                 "Stale tasks whose lease the sidecar expired so that asynq's recoverer "
                                 "retries them (--recover-tasks on), by reason.", ["reason"],
                                 registry=registry)
        self.would_recover = Counter("asynq_sidecar_tasks_would_recover",
                                     "Stale tasks that --recover-tasks dry-run would have handed to "
                                     "asynq's recoverer, by reason.", ["reason"], registry=registry)
        for reason in RECOVERY_REASONS:
            self.recovered.labels(reason=reason)
            self.would_recover.labels(reason=reason)


class QueueTasksCollector(Collector):
    """The per-queue task gauges: counts from the scrape's own round trip (`counts`), orphans
    from the last details read (`watcher`), which every sidecar has (read or shared)."""

    def __init__(self, counts: Any, watcher: Any) -> None:
        self._counts = counts
        self._watcher = watcher

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snap = self._counts.snapshot
        if snap is not None and self._counts.fresh and snap.queues:
            active = GaugeMetricFamily("asynq_queue_active_tasks",
                                       "Tasks in asynq:{queue}:active (being processed, or stale).",
                                       labels=["queue"])
            expired = GaugeMetricFamily(
                "asynq_queue_lease_expired_tasks",
                "Active tasks whose lease has expired (by Redis's clock): their server stopped "
                "extending it; asynq's recoverer retries them once expired for 30 s.", labels=["queue"])
            oldest = GaugeMetricFamily("asynq_queue_oldest_lease_expired_seconds",
                                       "Age of the oldest expired lease of each queue, 0 when none.",
                                       labels=["queue"])
            for q, c in snap.queues.items():
                active.add_metric([q], c.active)
                expired.add_metric([q], c.lease_expired)
                oldest.add_metric([q], c.oldest_lease_expired_age)
            yield active
            yield expired
            yield oldest
        d = self._watcher.latest
        orphaned = getattr(d, "orphaned", None)
        if orphaned:
            family = GaugeMetricFamily(
                "asynq_queue_orphaned_tasks",
                "Active tasks with no lease entry that no live server lists as running: asynq "
                "never recovers them by itself (from the last details read).", labels=["queue"])
            for q, n in sorted(orphaned.items()):
                family.add_metric([q], n)
            yield family

