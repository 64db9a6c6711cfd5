"""asynq-sidecar: an observability sidecar and Prometheus exporter for Asynq workers."""

__version__ = "0.1.0"
