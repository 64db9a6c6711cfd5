"""`asynq-sidecar emulate`: an emulated Asynq server that registers in Redis as asynq's heartbeater does.

It is the worker the demo bundles and the tests drive: it beats, drains with status `closed` on
SIGTERM/SIGINT, then clears its registration like `ClearServerState` or, with `--on-exit leak`,
exits 0 without clearing (the asynq #979 symptom).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# Only the standard library at module level: cli.py imports this module to build its parser,
# so a heavy import here would slow down every command. Redis and protobuf load in `run`.
if TYPE_CHECKING:
    from redis.asyncio import Redis

    from exporter.asynq import Member

log = logging.getLogger("exporter.emulator")

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
class EmulatorConfig:
    """Who the emulated server is and how it behaves; the defaults are asynq's."""

    host: str
    pid: int
    server_id: str
    concurrency: int = 10
    queues: dict[str, int] = field(default_factory=lambda: {"default": 1})
    strict_priority: bool = False
    heartbeat: float = 5.0  # seconds between beats (fixed at 5 s in asynq)
    ttl: int = 10  # seconds: score = now + ttl, and the per-server keys' TTL
    tasks: int = 0  # emulated in-flight tasks while running
    drain: float = 0.5  # seconds spent draining after SIGTERM/SIGINT
    on_exit: str = "clear"  # clear | leak | late-beat
    leases: bool = False  # also write the tasks' queue keys: active list, lease, task hash


@dataclass(frozen=True)
class EmulatedTask:
    task_id: str
    queue: str
    start_time: float


class Emulator:
    """One emulated Asynq server. Each step is a method so tests can drive it one at a time:

    `start()` (status active, first beat), `beat()`, `shutdown()` (status closed, beat, drain,
    then `clear()` or leak), or `run_until(stop)` for the whole life.
    """

    def __init__(self, redis: Redis, config: EmulatorConfig, *,
                 clock: Callable[[], float] = time.time) -> None:
        from exporter import asynq

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
        from exporter import asynq

        c = self.config
        return asynq.encode_server_info(asynq.ServerInfo(
            host=c.host, pid=c.pid, server_id=c.server_id, concurrency=c.concurrency,
            queues=dict(c.queues), strict_priority=c.strict_priority, status=self.status,
            start_time=self.started, active_worker_count=len(self.tasks),
        ))

    def worker_info_bytes(self, task: EmulatedTask) -> bytes:
        from exporter import asynq

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
        from exporter import tasks

        lease = math.floor(self._clock()) + LEASE_DURATION
        await self.redis.sadd(tasks.QUEUES, task.queue)
        await self._dequeued(keys=[tasks.active_key(task.queue), tasks.lease_key(task.queue),
                                   task_key(task.queue, task.task_id)], args=[task.task_id, lease])
        self.leases[task.task_id] = lease

    async def extend_leases(self) -> None:
        """The heartbeat's ExtendLease: ZADD XX now + 30 for every task whose lease, as this
        server knows it, has not run out (asynq never extends an expired lease)."""
        from exporter import tasks

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
        from exporter import tasks

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
        from exporter.health import REDIS_FAILURES

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
        from exporter.health import REDIS_FAILURES

        try:
            await self.clear()
        except REDIS_FAILURES as e:  # asynq logs it and exits all the same
            log.error("failed to clear server state: %s: %s", type(e).__name__, e)
            return False
        log.info("registration cleared")
        return True

    async def run_until(self, stop: asyncio.Event) -> None:
        """The whole life of a server: start, beat until `stop`, shut down."""
        await self.start()
        await self.serve(stop)
        await self.shutdown()


# ---------------------------------------------------------------- command line


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Adapt a config parser to argparse, which then names the flag and the bad value."""

    def convert(text: str) -> Any:
        from exporter.config import ConfigError

        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def parse_queues(text: str) -> dict[str, int]:
    """`default=1,critical=6` -> {"default": 1, "critical": 6} (asynq's Config.Queues)."""
    from exporter.config import ConfigError

    queues: dict[str, int] = {}
    for part in text.split(","):
        name, sep, priority = part.strip().partition("=")
        if not name or not sep or not priority.strip().isdigit() or int(priority) < 1:
            raise ConfigError("expected NAME=PRIORITY pairs separated by commas, e.g. default=1,critical=6")
        queues[name] = int(priority)
    return queues


def _whole_seconds(text: str) -> int:
    from exporter.config import ConfigError, positive_int

    try:
        return positive_int(text)
    except ConfigError:
        raise ConfigError("expected a whole number of seconds, 1 or more") from None


def _count(text: str) -> int:
    from exporter.config import ConfigError

    if not text.strip().isdigit():
        raise ConfigError("expected a whole number, 0 or more")
    return int(text)


def _pid(text: str) -> int:
    from exporter.config import ConfigError, positive_int

    value = positive_int(text)
    if value > 2**31 - 1:
        raise ConfigError("expected a pid that fits in an int32")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's own flags (the Redis and log flags come from the option table)."""
    from exporter.config import nonempty, one_of, positive_int, positive_seconds, seconds_or_zero

    g = parser.add_argument_group("emulated server")
    g.add_argument("--host", type=_arg(nonempty), default=None, metavar="NAME",
                   help="Host name to register under [default: this machine's host name]")
    g.add_argument("--pid", type=_arg(_pid), default=None, metavar="PID",
                   help="PID to register under [default: this process's pid]")
    g.add_argument("--server-id", type=_arg(nonempty), default=None, metavar="ID",
                   help="Server id [default: a new random UUID]")
    g.add_argument("--concurrency", type=_arg(positive_int), default=10, metavar="N",
                   help="Concurrency written in ServerInfo [default: 10]")
    g.add_argument("--queues", type=_arg(parse_queues), default={"default": 1}, metavar="Q=P,...",
                   help="Queues and priorities, e.g. default=1,critical=6 [default: default=1]")
    g.add_argument("--strict-priority", action="store_true", help="Set strict_priority in ServerInfo")
    g.add_argument("--heartbeat", type=_arg(positive_seconds), default=5.0, metavar="SECONDS",
                   help="Seconds between beats [default: 5, as asynq]")
    g.add_argument("--ttl", type=_arg(_whole_seconds), default=10, metavar="SECONDS",
                   help="Registration lifetime: score = now + TTL, key TTLs [default: 10, as asynq]")
    g.add_argument("--tasks", type=_arg(_count), default=0, metavar="N",
                   help="In-flight tasks to keep in the workers hash while running [default: 0]")
    g.add_argument("--leases", action="store_true",
                   help="Also write the in-flight tasks' queue keys as asynq's dequeue does (asynq:queues, "
                        "the active list, the lease, extended at every beat, and the task hash state); "
                        "a graceful shutdown requeues them to pending")
    g.add_argument("--drain", type=_arg(seconds_or_zero), default=0.5, metavar="SECONDS",
                   help="Seconds to drain after SIGTERM/SIGINT, with status closed [default: 0.5]")
    g.add_argument("--on-exit", type=_arg(one_of("clear", "leak", "late-beat")), default="clear",
                   metavar="MODE",
                   help="After draining: clear the registration like ClearServerState; leak it and "
                        "exit 0; or late-beat: clear it, then beat once more 50 ms later and exit 0 "
                        "(the heartbeat that races Shutdown in asynq #979) [default: clear]")
    g.add_argument("--socket", default=None, metavar="PATH",
                   help="Also report this server's life to a sidecar's lifecycle socket, as a worker "
                        "speaking the protocol does: hello, registered (its server id), ready, "
                        "stopping, and bye once Shutdown returned [default: do not report]")
    g.add_argument("--no-report-id", action="store_true",
                   help="With --socket, do not send the server id (as a worker that cannot know it)")


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    return EmulatorConfig(
        host=args.host or socket.gethostname(),
        pid=args.pid or os.getpid(),
        server_id=args.server_id or str(uuid.uuid4()),
        concurrency=args.concurrency,
        queues=args.queues,
        strict_priority=args.strict_priority,
        heartbeat=args.heartbeat,
        ttl=args.ttl,
        tasks=args.tasks,
        drain=args.drain,
        on_exit=args.on_exit,
        leases=args.leases,
    )


#: The late beat of --on-exit late-beat comes this long after the clear (asynq #979's race).
LATE_BEAT_AFTER = 0.05


def run(values: dict[str, Any], args: argparse.Namespace) -> int:
    """Exit 0 after a graceful or leaking shutdown, 1 when Redis fails at start, 2 on bad flags."""
    from exporter import logs
    from exporter.config import LogConfig

    log_cfg = LogConfig.from_values(values)
    logs.setup(log_cfg.level, log_cfg.format)
    config = config_from_args(args)
    if config.tasks > config.concurrency:
        log.error("--tasks %d is more than --concurrency %d: asynq never runs more tasks than its "
                  "concurrency", config.tasks, config.concurrency)
        return 2
    return asyncio.run(_main(values, config, socket_path=args.socket, report_id=not args.no_report_id))


async def _main(values: dict[str, Any], config: EmulatorConfig, *, socket_path: str | None = None,
                report_id: bool = True) -> int:
    from exporter.config import RedisConfig
    from exporter.health import REDIS_FAILURES
    from exporter.redisconn import connect

    redis_cfg = RedisConfig.from_values(values)
    redis = connect(redis_cfg)
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
    if socket_path is not None:
        from exporter.client import LifecycleClient

        client = LifecycleClient(socket_path, host=config.host, pid=config.pid, started_at=time.time(),
                                 shutdown_timeout=config.drain)
        await client.start()
    try:
        emulator = Emulator(redis, config)
        try:
            await emulator.start()
        except REDIS_FAILURES as e:
            log.error("cannot register in Redis at %s: %s: %s", redis_cfg.display_url, type(e).__name__, e)
            return 1
        if client is not None:
            if report_id:
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
