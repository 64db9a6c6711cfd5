"""The safety net's metric families: removals by reason, leaks, abandoned tasks, failures."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

#: Reasons of asynq_sidecar_registrations_removed_total.
REMOVAL_REASONS = ("worker_exit", "previous_incarnation", "sweep")


class CleanupMetrics:
    """The cleanup's metrics, on an injected collector registry."""

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
