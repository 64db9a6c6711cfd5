"""Every metric family the sidecar exports, in one place: registration counts and details
(collectors that read memory at scrape time), the lifecycle's counters and histograms, the
cleanup's counters.

Imports prometheus_client and the readers whose memory it exports; no Redis or HTTP calls.
"""
