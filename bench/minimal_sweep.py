"""The yardstick for `asynq-sidecar sweep`: the same removal done with as little code as possible.

`python -m bench.minimal_sweep REDIS_URL GRACE BATCH` removes from asynq:servers, asynq:workers
and asynq:schedulers every member expired for longer than GRACE seconds by Redis's clock, in
batches of BATCH: one short script per batch selects and removes atomically and returns the
members, then one UNLINK deletes their per-server keys (all the batch's keys in one command, so
not Redis Cluster safe). redis-py with hiredis, synchronous: no lock, no report, no checks of
member names, no event loop. It prints the number of members removed.

bench/sweep.py runs it beside the real command on the same data in the same run, so that the
ratio between the two does not depend on how busy the machine is that day.
"""

from __future__ import annotations

import sys

from redis import Redis

SETS = ("asynq:servers", "asynq:workers", "asynq:schedulers")

SELECT_AND_REMOVE = """
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) - tonumber(ARGV[1])
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff, 'LIMIT', 0, tonumber(ARGV[2]))
if #members > 0 then
  redis.call('ZREM', KEYS[1], unpack(members))
end
return members
"""


def main(url: str, grace: float, batch: int) -> int:
    client = Redis.from_url(url)
    script = client.register_script(SELECT_AND_REMOVE)
    removed = 0
    for key in SETS:
        while True:
            members = script(keys=[key], args=[grace, batch])
            if members:
                client.unlink(*members)
                removed += len(members)
            if len(members) < batch:
                break
    client.close()
    return removed


if __name__ == "__main__":
    print(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
