"""The HTTP server's metric families."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

#: Why basic auth refused a request.
REFUSAL_REASONS = ("missing", "malformed", "denied")


def refused_requests(registry: CollectorRegistry) -> Callable[[str], None]:
    """asynq_sidecar_http_requests_refused_total{reason}, each reason at 0 from the start; returns
    the function that counts one refusal."""
    refused = Counter("asynq_sidecar_http_requests_refused",
                      "HTTP requests refused by basic auth, by reason: missing, "
                      "malformed or denied credentials.", ["reason"], registry=registry)
    for reason in REFUSAL_REASONS:
        refused.labels(reason=reason)
    return lambda reason: refused.labels(reason=reason).inc()
