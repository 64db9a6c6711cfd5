"""Reading asynq's registration sets for /metrics and audit: the per-scrape counts (one round
trip of O(log N) commands), the details read of every live server (one sidecar per fleet, under a
lease), and the read-only `audit` command.

Imports asynq/, redisio/ and the settings; never writes to asynq's keys.
"""
