"""Stale tasks: what a dead worker leaves in the queues. Reading them (per-queue counts in the
scrape's round trip, orphans in the details read), handing them back to asynq's own recoverer by
expiring leases with conditional scripts (`--recover-tasks`, `sweep --repair-tasks`), and listing
them in `audit`. The sidecar never retries, requeues or archives a task itself.

Imports asynq/, redisio/ and the settings; metric families are in metrics/tasks.py.
"""
