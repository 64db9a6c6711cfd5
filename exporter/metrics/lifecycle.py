"""The lifecycle sinks: workers by state, exits by outcome, shutdown durations and the socket's
counts; and one log line per lifecycle edge.

`LifecycleMetrics` also receives the socket server's counts (connections, rejected input, socket
file recreations), so every lifecycle metric lives in one place, on the sidecar's injected registry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter.lifecycle.protocol import REASONS
from exporter.lifecycle.tracker import (
    OUTCOMES,
    Decision,
    Rejected,
    Tracker,
    Worker,
    WorkerExited,
    WorkerForgotten,
    WorkerRunning,
    WorkerStarted,
    WorkerStopping,
)
from exporter.logs import RateLimiter

log = logging.getLogger("exporter.lifecycle.tracker")

#: Shutdown duration buckets: 0.1 s to 120 s, finest around asynq's 8 s default drain; 25 s
#: (the default budget) and 30 s (Kubernetes' default grace period) are bounds too.
SHUTDOWN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 8.0, 8.5, 9.0, 10.0, 12.0, 15.0,
                    20.0, 25.0, 30.0, 45.0, 60.0, 90.0, 120.0)


class WorkersCollector(Collector):
    """`asynq_sidecar_workers{state}`, read from the tracker at each scrape (memory only)."""

    def __init__(self, tracker: Tracker) -> None:
        self._tracker = tracker

    def collect(self) -> Iterable[prometheus_client.Metric]:
        family = GaugeMetricFamily("asynq_sidecar_workers",
                                   "Watched workers in each state: starting, running, stopping.",
                                   labels=["state"])
        for state, count in self._tracker.counts().items():
            family.add_metric([state], count)
        yield family


class LifecycleMetrics:
    """A sink of tracker decisions, and the socket server's stats (`SocketStats`)."""

    def __init__(self, registry: CollectorRegistry, tracker: Tracker, shutdown_budget: float) -> None:
        registry.register(WorkersCollector(tracker))
        self.starts = Counter("asynq_sidecar_worker_starts_total", "Workers that said hello.",
                              registry=registry)
        self.exits = Counter(
            "asynq_sidecar_worker_exits_total",
            "Worker exits by outcome: graceful (exit code 0 or bye), error (non-zero code), "
            "killed (ended by a signal), lost (connection closed with no exit report).",
            ["outcome"], registry=registry)
        for outcome in OUTCOMES:
            self.exits.labels(outcome)
        self.shutdown = Histogram("asynq_sidecar_shutdown_duration_seconds",
                                  "Time from stopping to the exit of a worker.",
                                  buckets=SHUTDOWN_BUCKETS, registry=registry)
        self.last_shutdown = Gauge("asynq_sidecar_last_shutdown_duration_seconds",
                                   "The most recent shutdown duration (0 before the first).",
                                   registry=registry)
        self.budget = Gauge("asynq_sidecar_shutdown_budget_seconds",
                            "The time a shutdown should fit in (--shutdown-budget).", registry=registry)
        self.budget.set(shutdown_budget)
        self.over_budget = Counter("asynq_sidecar_shutdowns_over_budget_total",
                                   "Shutdowns that took longer than the budget.", registry=registry)
        self.connections = Gauge("asynq_sidecar_socket_connections", "Open lifecycle connections.",
                                 registry=registry)
        self.protocol_errors = Counter("asynq_sidecar_protocol_errors_total",
                                       "Rejected lifecycle input, by reason.", ["reason"],
                                       registry=registry)
        for reason in REASONS:
            self.protocol_errors.labels(reason)
        self.socket_recreated_total = Counter(
            "asynq_sidecar_socket_recreated_total",
            "Times the lifecycle socket file was found deleted or replaced and was bound again.",
            registry=registry)

    # ------------------------------------------------------------ Sink

    def handle(self, decision: Decision, now: float) -> None:
        if isinstance(decision, WorkerStarted):
            self.starts.inc()
        elif isinstance(decision, WorkerExited):
            self.exits.labels(decision.outcome).inc()
            if decision.shutdown_duration is not None:
                self.shutdown.observe(decision.shutdown_duration)
                self.last_shutdown.set(decision.shutdown_duration)
                if decision.over_budget:
                    self.over_budget.inc()
        elif isinstance(decision, Rejected):
            self.protocol_errors.labels(decision.reason).inc()

    # ------------------------------------------------------------ SocketStats

    def connection_opened(self) -> None:
        self.connections.inc()

    def connection_closed(self) -> None:
        self.connections.dec()

    def protocol_error(self, reason: str) -> None:
        self.protocol_errors.labels(reason).inc()

    def socket_recreated(self) -> None:
        self.socket_recreated_total.inc()


def _who(w: Worker) -> str:
    sid = f" server {','.join(sorted(w.server_ids))}" if w.server_ids else ""
    return f"{w.host} pid {w.pid}{sid} (connection {w.conn})"


def _fields(w: Worker) -> dict[str, object]:
    return {"worker_host": w.host, "worker_pid": w.pid, "conn": w.conn}


class LifecycleLog:
    """A sink that writes one line per lifecycle edge; out-of-order events are rate-limited."""

    def __init__(self, shutdown_budget: float, limiter: RateLimiter | None = None) -> None:
        self.budget = shutdown_budget
        self._limiter = limiter or RateLimiter()

    def handle(self, decision: Decision, now: float) -> None:
        if isinstance(decision, WorkerStarted):
            w = decision.worker
            log.info("worker started: %s", _who(w), extra=_fields(w))
        elif isinstance(decision, WorkerRunning):
            w = decision.worker
            log.info("worker running: %s, %.3fs after hello (%s)", _who(w),
                     (w.running_at or w.hello_at) - w.hello_at, decision.via,
                     extra={**_fields(w), "via": decision.via})
        elif isinstance(decision, WorkerStopping):
            w = decision.worker
            log.info("worker stopping: %s on %s", _who(w), w.stop_signal or "request",
                     extra={**_fields(w), "signal": w.stop_signal})
        elif isinstance(decision, WorkerExited):
            self._exited(decision)
        elif isinstance(decision, WorkerForgotten):
            log.debug("worker forgotten: %s", _who(decision.worker), extra=_fields(decision.worker))
        elif isinstance(decision, Rejected):
            suppressed = self._limiter.allow(decision.reason)
            if suppressed is not None:
                log.warning("connection %d: rejected %r in state %s (%s)%s", decision.conn,
                            decision.event, decision.state, decision.reason,
                            f"; {suppressed} similar suppressed" if suppressed else "",
                            extra={"conn": decision.conn, "reason": decision.reason})

    def _exited(self, d: WorkerExited) -> None:
        w = d.worker
        if d.shutdown_duration is None:
            shutdown = "no stopping was reported"
        else:
            shutdown = f"shutdown took {d.shutdown_duration:.3f}s"
            if d.over_budget:
                shutdown += f", over the {self.budget:g}s budget"
        how = {"graceful": "gracefully", "error": "with an error", "killed": "killed by a signal",
               "lost": "lost: connection closed with no exit report"}.get(d.outcome, d.outcome)
        level = logging.INFO if d.outcome == "graceful" and not d.over_budget else logging.WARNING
        log.log(level, "worker exited %s: %s; %s", how, _who(w), shutdown,
                extra={**_fields(w), "outcome": d.outcome, "shutdown_seconds": d.shutdown_duration})
