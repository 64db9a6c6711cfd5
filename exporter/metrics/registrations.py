"""The Prometheus collector of registry state and sidecar health.

State proxied from Redis is exposed by a custom collector that builds fresh metric families on
every collect() from what is already in memory, so a scrape does no I/O here (the /metrics
handler refreshes the O(1) counts before it renders). The registry is injected, never global.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.asynq import model as asynq
from exporter.redisio.health import RedisHealth
from exporter.registrations.counts import RegistrationCounts
from exporter.registrations.details import DetailsWatcher

# `_created` series double the series count and are not used by the dashboards or alerts.
prometheus_client.disable_created_metrics()

#: Statuses always exported (at 0 when absent) so that series do not appear and vanish with the
#: fleet; "unknown" stands for any value asynq does not write.
KNOWN_STATUSES = (*asynq.SERVER_STATUSES, "unknown")


class RegistrationCollector(Collector):
    def __init__(self, counts: RegistrationCounts, watcher: DetailsWatcher, health: RedisHealth,
                 clock: Callable[[], float] = time.time) -> None:
        self._counts = counts
        self._watcher = watcher
        self._health = health
        self._clock = clock

    def collect(self) -> Iterable[prometheus_client.Metric]:
        yield from self._registry_counts()
        yield from self._server_details()
        up = GaugeMetricFamily("asynq_sidecar_redis_up",
                               "1 when the last Redis operation of the sidecar succeeded, else 0.")
        up.add_metric([], 1.0 if self._health.up else 0.0)
        yield up
        yield CounterMetricFamily("asynq_sidecar_redis_errors", "Failed Redis operations.",
                                  value=self._health.errors)
        undecodable = CounterMetricFamily(
            "asynq_sidecar_undecodable_values",
            "Values in Redis that are not what asynq writes (skipped), by kind.", labels=["kind"])
        for kind in ("member", "server_info", "worker_info"):
            undecodable.add_metric([kind], self._watcher.undecodable.get(kind, 0))
        yield undecodable
        info = GaugeMetricFamily("asynq_sidecar_build_info", "Always 1; the version as a label.",
                                 labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info

    def _registry_counts(self) -> Iterable[prometheus_client.Metric]:
        snap = self._counts.snapshot
        if snap is None or not self._counts.fresh:
            return  # Redis unreadable at this scrape: no stale counts; redis_up says why
        entries = GaugeMetricFamily(
            "asynq_registry_entries",
            "Members of asynq:servers/workers/schedulers whose expiry score is in the future "
            "(state=live) or the past (state=expired).", labels=["set", "state"])
        oldest = GaugeMetricFamily(
            "asynq_registry_oldest_expired_seconds",
            "Age of the oldest expired member of each set, 0 when none.", labels=["set"], unit="")
        for name, c in snap.sets.items():
            entries.add_metric([name, "live"], c.live)
            entries.add_metric([name, "expired"], c.expired)
            oldest.add_metric([name], c.oldest_expired_age)
        yield entries
        yield oldest

    def _server_details(self) -> Iterable[prometheus_client.Metric]:
        d = self._watcher.latest
        if d is None:
            return
        servers = GaugeMetricFamily("asynq_registry_servers",
                                    "Live servers by ServerInfo.status.", labels=["status"])
        for status in KNOWN_STATUSES:
            servers.add_metric([status], d.by_status.get(status, 0))
        yield servers
        yield GaugeMetricFamily("asynq_registry_concurrency",
                                "Sum of concurrency over live servers.", value=d.concurrency)
        yield GaugeMetricFamily("asynq_registry_active_tasks",
                                "Sum of active_worker_count over live servers.", value=d.active_tasks)
        yield GaugeMetricFamily("asynq_sidecar_details_leader",
                                "1 when this sidecar makes the fleet's full read of server details "
                                "(--details-sharing on: one lease holder per fleet), else 0.",
                                value=1.0 if (self._watcher.leader or not self._watcher.shared) else 0.0)
        yield GaugeMetricFamily("asynq_registry_snapshot_age_seconds",
                                "Age of the last full read of server details.",
                                value=max(0.0, self._clock() - d.at))


def new_collector_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)
