"""`asynq-sidecar emulate`: an emulated Asynq server that registers in Redis as asynq's heartbeater does.

It is the worker the demo bundles and the tests drive: it beats, drains with status `closed` on
SIGTERM/SIGINT, then clears its registration like `ClearServerState` or, with `--on-exit leak`,
exits 0 without clearing (the asynq #979 symptom).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from exporter.asynq import model as asynq
from exporter.asynq.model import Member
from exporter.lifecycle.client import LifecycleClient
from exporter.redisio.connect import connect
from exporter.redisio.health import REDIS_FAILURES
from exporter.settings import EmulateConfig, EmulatorConfig
from exporter.tasks import reader as tasks

log = logging.getLogger("exporter.devtools.emulator")

#: The task type of the emulated in-flight tasks.
TASK_TYPE = "emulator:task"
#: asynq's default task timeout; an in-flight task's deadline is its start time plus this.
TASK_TIMEOUT = 30 * 60.0
#: asynq's rdb.LeaseDuration: a lease is created, and extended, for this many seconds.
LEASE_DURATION = 30


def task_key(queue: str, task_id: str) -> str:
    """asynq's task hash, `asynq:{<q>}:t:<id>` (base.TaskKey)."""
    return f"asynq:{{{queue}}}:t:{task_id}"

# The beat script, with the semantics of asynq's writeServerStateCmd (internal/rdb/rdb.go):
# KEYS[1] = server key, KEYS[2] = workers key (one hash tag, so one slot on a cluster);
# ARGV[1] = TTL in whole seconds, ARGV[2] = ServerInfo bytes, then task id / WorkerInfo pairs.
WRITE_SERVER_STATE = """
redis.call("SETEX", KEYS[1], ARGV[1], ARGV[2])
redis.call("DEL", KEYS[2])
local i = 3
while i < #ARGV do
    redis.call("HSET", KEYS[2], ARGV[i], ARGV[i + 1])
    i = i + 2
end
redis.call("EXPIRE", KEYS[2], ARGV[1])
return redis.status_reply("OK")
"""

# With --leases, a task's dequeue as asynq's dequeueCmd leaves it (the task moved from pending
# to active, state active, a lease of now + 30 s), one queue's keys only (one slot on a cluster):
# KEYS[1] = asynq:{q}:active, KEYS[2] = asynq:{q}:lease, KEYS[3] = asynq:{q}:t:<id>;
# ARGV[1] = task id, ARGV[2] = lease expiry (whole Unix seconds).
DEQUEUED = """
redis.call("HSET", KEYS[3], "state", "active")
redis.call("LPUSH", KEYS[1], ARGV[1])
redis.call("ZADD", KEYS[2], ARGV[2], ARGV[1])
return redis.status_reply("OK")
"""

# asynq's requeueCmd (a graceful Shutdown hands an unfinished task back to pending):
# KEYS[1] = active, KEYS[2] = lease, KEYS[3] = pending, KEYS[4] = the task hash; ARGV[1] = id.
REQUEUE = """
if redis.call("LREM", KEYS[1], 0, ARGV[1]) == 0 then return 0 end
redis.call("ZREM", KEYS[2], ARGV[1])
redis.call("RPUSH", KEYS[3], ARGV[1])
redis.call("HSET", KEYS[4], "state", "pending")
return 1
"""

# The last step of ClearServerState (clearServerStateCmd): both per-server keys, one slot.
CLEAR_SERVER_STATE = """
redis.call("DEL", KEYS[1])
redis.call("DEL", KEYS[2])
return redis.status_reply("OK")
"""


@dataclass(frozen=True)
class EmulatedTask:
    task_id: str
    queue: str
    start_time: float


class Emulator:
    """One emulated Asynq server. Each step is a method so tests can drive it one at a time:

    `start()` (status active, first beat), `beat()`, `shutdown()` (status closed, beat, drain,
    then `clear()` or leak).
    """

    def __init__(self, redis: Redis, config: EmulatorConfig, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.config = config
        self._clock = clock
        self.status = "new"
        self.started: float | None = None
        self.tasks: list[EmulatedTask] = []
        self.server_member: Member = asynq.Member("servers", config.host, config.pid, config.server_id)
        self.workers_member: Member = self.server_member.sibling("workers")
        self._servers_set, self._workers_set = asynq.SERVERS, asynq.WORKERS
        self._write_state = redis.register_script(WRITE_SERVER_STATE)
        self._clear_state = redis.register_script(CLEAR_SERVER_STATE)
        self._dequeued = redis.register_script(DEQUEUED)
        self._requeue = redis.register_script(REQUEUE)
        self.leases: dict[str, float] = {}  # task id -> its lease expiry, as this server knows it

    # ------------------------------------------------------------ what a beat writes

    def server_info_bytes(self) -> bytes:
        c = self.config
        return asynq.encode_server_info(asynq.ServerInfo(
            host=c.host, pid=c.pid, server_id=c.server_id, concurrency=c.concurrency,
            queues=dict(c.queues), strict_priority=c.strict_priority, status=self.status,
            start_time=self.started, active_worker_count=len(self.tasks),
        ))

    def worker_info_bytes(self, task: EmulatedTask) -> bytes:
        c = self.config
        return asynq.encode_worker_info(asynq.WorkerInfo(
            host=c.host, pid=c.pid, server_id=c.server_id, task_id=task.task_id,
            task_type=TASK_TYPE, queue=task.queue, start_time=task.start_time,
            deadline=task.start_time + TASK_TIMEOUT,
        ))

    def expiry_score(self, now: float) -> int:
        """The score asynq writes: (now + TTL) in whole Unix seconds, as Go's `exp.Unix()`."""
        return math.floor(now + self.config.ttl)

    # ------------------------------------------------------------ Redis operations

    async def beat(self) -> None:
        """One heartbeat, in asynq's order: ZADD servers, ZADD workers, then the state script."""
        score = self.expiry_score(self._clock())
        args: list[Any] = [self.config.ttl, self.server_info_bytes()]  # encoded first: no gap between the writes
        for task in self.tasks:
            args += [task.task_id, self.worker_info_bytes(task)]
        await self.redis.zadd(self._servers_set, {self.server_member.key: score})
        await self.redis.zadd(self._workers_set, {self.workers_member.key: score})
        await self._write_state(keys=[self.server_member.key, self.workers_member.key], args=args)
        if self.config.leases:
            await self.extend_leases()

    # ------------------------------------------------------------ --leases: the tasks' queue keys

    async def dequeue(self, task: EmulatedTask) -> None:
        """Write what asynq's dequeue leaves for `task`: queue known, task active, leased 30 s."""
        lease = math.floor(self._clock()) + LEASE_DURATION
        await self.redis.sadd(tasks.QUEUES, task.queue)
        await self._dequeued(keys=[tasks.active_key(task.queue), tasks.lease_key(task.queue),
                                   task_key(task.queue, task.task_id)], args=[task.task_id, lease])
        self.leases[task.task_id] = lease

    async def extend_leases(self) -> None:
        """The heartbeat's ExtendLease: ZADD XX now + 30 for every task whose lease, as this
        server knows it, has not run out (asynq never extends an expired lease)."""
        now = self._clock()
        lease = math.floor(now) + LEASE_DURATION
        for queue in sorted({t.queue for t in self.tasks}):
            valid = [t for t in self.tasks if t.queue == queue and self.leases.get(t.task_id, 0) >= now]
            if valid:
                await self.redis.zadd(tasks.lease_key(queue), {t.task_id: lease for t in valid}, xx=True)
                for t in valid:
                    self.leases[t.task_id] = lease

    async def requeue(self) -> None:
        """A graceful Shutdown's requeue of every unfinished task to pending."""
        for t in self.tasks:
            await self._requeue(keys=[tasks.active_key(t.queue), tasks.lease_key(t.queue),
                                      f"asynq:{{{t.queue}}}:pending", task_key(t.queue, t.task_id)],
                                args=[t.task_id])

    async def clear(self) -> None:
        """ClearServerState: ZREM servers, ZREM workers, then DEL both keys; a failure skips the rest."""
        await self.redis.zrem(self._servers_set, self.server_member.key)
        await self.redis.zrem(self._workers_set, self.workers_member.key)
        await self._clear_state(keys=[self.server_member.key, self.workers_member.key], args=[])

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Become active with the configured in-flight tasks and beat once; Redis errors propagate."""
        self.status = "active"
        self.started = self._clock()
        queues = sorted(self.config.queues) or ["default"]
        self.tasks = [EmulatedTask(str(uuid.uuid4()), queues[i % len(queues)], self.started)
                      for i in range(self.config.tasks)]
        if self.config.leases:
            for task in self.tasks:
                await self.dequeue(task)
        await self.beat()
        log.info("emulated server active: %s (concurrency %d, %d in-flight task(s))",
                 self.server_member.tag, self.config.concurrency, len(self.tasks))

    async def _beat_logged(self) -> None:
        try:
            await self.beat()
        except REDIS_FAILURES as e:  # asynq logs a failed beat and carries on
            log.warning("heartbeat failed: %s: %s", type(e).__name__, e)

    async def _beat_until(self, stop: asyncio.Event | None, deadline: float | None = None) -> None:
        """Beat every `heartbeat` seconds until `stop` is set or the monotonic `deadline` passes."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self.config.heartbeat
        while True:
            wake = next_beat if deadline is None else min(next_beat, deadline)
            timeout = max(0.0, wake - loop.time())
            if stop is not None:
                try:
                    await asyncio.wait_for(stop.wait(), timeout)
                    return
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(timeout)
            if deadline is not None and loop.time() >= deadline:
                return
            await self._beat_logged()
            next_beat += self.config.heartbeat
            next_beat = max(next_beat, loop.time())

    async def serve(self, stop: asyncio.Event) -> None:
        """Beat every `heartbeat` seconds until `stop` is set."""
        await self._beat_until(stop)

    async def shutdown(self) -> bool:
        """Drain with status closed (beating on), then clear or leak. True when cleared.

        asynq writes `closed` at its next timer beat; this beats at once so the status is seen.
        """
        self.status = "closed"
        log.info("draining %d in-flight task(s) for %.3gs (status closed)", len(self.tasks), self.config.drain)
        await self._beat_logged()
        loop = asyncio.get_running_loop()
        await self._beat_until(None, deadline=loop.time() + self.config.drain)
        if self.config.leases:
            await self.requeue()
        self.tasks = []  # every in-flight task has finished or been requeued by now
        if self.config.on_exit == "leak":
            log.info("exiting without clearing the registration (leak mode, as in asynq #979)")
            return False
        try:
            await self.clear()
        except REDIS_FAILURES as e:  # asynq logs it and exits all the same
            log.error("failed to clear server state: %s: %s", type(e).__name__, e)
            return False
        log.info("registration cleared")
        return True

#: The late beat of --on-exit late-beat comes this long after the clear (asynq #979's race).
LATE_BEAT_AFTER = 0.05


def run(cfg: EmulateConfig) -> int:
    """Exit 0 after a graceful or leaking shutdown, 1 when Redis fails at start, 2 on bad flags."""
    if cfg.server.tasks > cfg.server.concurrency:
        log.error("--tasks %d is more than --concurrency %d: asynq never runs more tasks than its "
                  "concurrency", cfg.server.tasks, cfg.server.concurrency)
        return 2
    return asyncio.run(_main(cfg))


async def _main(cfg: EmulateConfig) -> int:
    config = cfg.server
    redis = connect(cfg.redis)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    stopped_by: list[tuple[str, float]] = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # asynq ignores a second SIGTERM; only SIGKILL forces an exit
            log.info("%s ignored: already shutting down", sig.name)
            return
        log.info("%s received: shutting down", sig.name)
        stopped_by.append((sig.name, time.time()))
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    client = None
    if cfg.socket is not None:
        client = LifecycleClient(cfg.socket, host=config.host, pid=config.pid, started_at=time.time(),
                                 shutdown_timeout=config.drain)
        await client.start()
    try:
        emulator = Emulator(redis, config)
        try:
            await emulator.start()
        except REDIS_FAILURES as e:
            log.error("cannot register in Redis at %s: %s: %s", cfg.redis.display_url, type(e).__name__, e)
            return 1
        if client is not None:
            if cfg.report_id:
                await client.registered(config.server_id)
            await client.ready()
        await emulator.serve(stop)
        if client is not None and stopped_by:
            await client.stopping(stopped_by[0][0], at=stopped_by[0][1])
        await emulator.shutdown()
        if client is not None:
            await client.bye()  # Shutdown returned: the worker believes it deregistered
            await client.flush()
        if config.on_exit == "late-beat":
            await asyncio.sleep(LATE_BEAT_AFTER)
            await emulator.beat()
            log.info("beat once more after the clear (asynq #979): the registration is back")
        return 0
    finally:
        if client is not None:
            await client.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
        await redis.aclose()
