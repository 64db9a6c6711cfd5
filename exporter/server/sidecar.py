"""`asynq-sidecar serve`: the composition root.

Components are entered in dependency order on one AsyncExitStack and left in reverse:
Redis client -> registry readers -> background tasks -> HTTP server. `Sidecar` is an async
context manager so that `run --serve` can host it in the launcher's own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from exporter import __version__
from exporter.cleanup.sink import Cleanup
from exporter.cleanup.sweep import Sweeper, sweep_periodically
from exporter.lifecycle.listener import LifecycleSocket
from exporter.lifecycle.tracker import Decision, Event, State, Tracker, WorkerForgotten
from exporter.metrics.http import refused_requests
from exporter.metrics.lifecycle import LifecycleLog, LifecycleMetrics
from exporter.metrics.registrations import RegistrationCollector, new_collector_registry
from exporter.metrics.tasks import QueueTasksCollector
from exporter.redisio.clock import RedisClock
from exporter.redisio.connect import SentinelMaster, connect
from exporter.redisio.health import REDIS_FAILURES, RedisHealth
from exporter.registrations.counts import RegistrationCounts
from exporter.registrations.details import DetailsWatcher, ScrapesFirst
from exporter.server.http import build_app
from exporter.settings import ServeConfig
from exporter.tasks.recovery import TaskRecovery

if TYPE_CHECKING:  # loaded only with --web-config-file (YAML, bcrypt)
    from exporter.server.webconfig import WebConfig

log = logging.getLogger("exporter.server.sidecar")

#: The whole of a shutdown (HTTP, tasks, Redis) must end within this many seconds.
SHUTDOWN_DEADLINE = 5.0


class Sink(Protocol):
    """Acts on the tracker's decisions (metrics, cleanup). Called from the one event task;
    must not block: anything slow is started as a task of its own."""

    def handle(self, decision: Decision, now: float) -> None: ...


@dataclass(frozen=True)
class Hooks:
    """Calls out of the sidecar, for tests and embedders that wait on what it did; none of them
    changes what it does."""

    cleanup_settled: Callable[[], None] = lambda: None  # the cleanup after an exit is over
    details_read: Callable[[], None] = lambda: None  # this sidecar made a full details read


class Sidecar:
    """The running sidecar. `async with Sidecar(cfg) as sc:` serves until the block exits.

    Lifecycle sources call `submit(event)`; one task applies events to the tracker in order
    and passes each decision to every sink in `sinks`.
    """

    def __init__(self, cfg: ServeConfig, *, hooks: Hooks | None = None) -> None:
        self.cfg = cfg
        self.hooks = hooks or Hooks()
        self.registry = new_collector_registry()
        self.health = RedisHealth(cfg.redis.display_url)
        self._stack = AsyncExitStack()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.http_address: tuple[str, int] | None = None
        self.tracker = Tracker(cfg.shutdown_budget)
        self.sinks: list[Sink] = []
        self._events: asyncio.Queue[tuple[Event, float]] = asyncio.Queue()
        self._next_conn = 0
        self._changed = asyncio.Event()  # set whenever lifecycle state or a scrape moved
        self._last_change = 0.0  # time.monotonic() of the last applied lifecycle event
        self._last_scrape: float | None = None  # time.monotonic() when the last scrape read memory

    def new_conn_id(self) -> int:
        """A fresh id for a lifecycle connection (socket or in-process launcher)."""
        self._next_conn += 1
        return self._next_conn

    def submit(self, event: Event, at: float | None = None) -> None:
        """Queue a lifecycle event, stamped with the time it was received."""
        self._events.put_nowait((event, time.time() if at is None else at))

    async def _apply_events(self) -> None:
        while True:
            event, at = await self._events.get()
            decisions = self.tracker.apply(event, at)
            for decision in decisions:
                for sink in self.sinks:
                    try:
                        sink.handle(decision, at)
                    except Exception:  # a sink's bug must not stop tracking
                        log.exception("sink %s failed on %s", type(sink).__name__, type(decision).__name__)
            # Forgetting an exited worker (its connection closed) changes no metric: a scrape
            # that read the exit has read the final state.
            if any(not isinstance(d, WorkerForgotten) for d in decisions):
                self._last_change = time.monotonic()
            self._changed.set()

    async def _before_scrape(self) -> None:
        with self.scrapes_first.scraping():  # the details read steps aside meanwhile
            await self.counts.refresh()
        # The collectors read memory right after this, with no await in between: whatever was
        # applied before this moment is in this scrape (an exit applied during the refresh too).
        self._last_scrape = time.monotonic()
        self._changed.set()

    def _settled(self) -> bool:
        """No live worker, no cleanup in progress, and (when anything scrapes this sidecar)
        a scrape has begun since the last change, so Prometheus has read the final state."""
        if any(n for n in self.tracker.counts().values()) or not self.cleanup.idle:
            return False
        if self._last_scrape is None:
            return True  # nobody scrapes: no final scrape to wait for
        return self._last_scrape > max(self._last_change, self.cleanup.last_counted_at)

    async def linger(self, timeout: float) -> bool:
        """Keep running until `_settled()` or `timeout` seconds; True if it settled.

        Called on SIGTERM, and by `run --serve` after the worker exited: the worker's exit is
        cleaned up and its shutdown is scraped before the pod goes away.
        """
        deadline = time.monotonic() + timeout
        if not self._settled():
            log.info("stopping: waiting up to %.0fs for %d worker(s) to exit, cleanups and a final scrape",
                     timeout, sum(self.tracker.counts().values()))
        while not self._settled():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("stop timeout: leaving with %d worker(s) live, cleanup %s",
                            sum(self.tracker.counts().values()),
                            "idle" if self.cleanup.idle else "in progress")
                return False
            self._changed.clear()
            try:
                # Woken by events and scrapes; a cleanup ending is noticed within 0.1 s.
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass
        return True

    @property
    def http_url(self) -> str:
        assert self.http_address is not None
        host, port = self.http_address
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        scheme = self.cfg.web.scheme if self.cfg.web is not None else "http"
        return f"{scheme}://{host}:{port}"

    async def __aenter__(self) -> Sidecar:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Start a background task that the sidecar owns: cancelled and awaited on exit."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)  # finished tasks are not kept
        return task

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # redis-py (8.x, on Python 3.11) can swallow a cancellation that lands while it opens a
        # connection, and the task then runs on: cancel whatever is left until all have ended,
        # for at most SHUTDOWN_DEADLINE seconds.
        deadline = time.monotonic() + SHUTDOWN_DEADLINE
        while tasks:
            if time.monotonic() >= deadline:
                log.warning("stopping without waiting for %s: it did not end within %.0fs",
                            ", ".join(t.get_name() for t in tasks), SHUTDOWN_DEADLINE)
                return
            _, pending = await asyncio.wait(tasks, timeout=0.1)
            for task in pending:
                task.cancel()
            tasks = list(pending)

    async def _start(self) -> None:
        """Enter every component on the exit stack, in dependency order: Redis, the readers and
        the event task, the cleanup, the lifecycle socket, HTTP."""
        self.redis = connect(self.cfg.redis)
        self._stack.push_async_callback(self.redis.aclose)
        # Every time decision is taken on Redis's clock, shared by the whole fleet.
        self.redis_clock = RedisClock()
        self._start_readers()
        self._stack.push_async_callback(self._cancel_tasks)
        self.spawn(self.watcher.run(), "details-watcher")
        self.spawn(self._apply_events(), "lifecycle-events")
        if isinstance(self.redis, SentinelMaster):  # leave a demoted master within a poll
            self.spawn(self.redis.follow_master(self.cfg.poll_interval), "sentinel-master")
        self._start_cleanup()
        # The lifecycle socket: its connections are sources; metrics and edge logs are sinks.
        self.lifecycle_metrics = LifecycleMetrics(self.registry, self.tracker, self.cfg.shutdown_budget)
        self.sinks += [self.lifecycle_metrics, LifecycleLog(self.cfg.shutdown_budget)]
        self.lifesocket = await self._stack.enter_async_context(LifecycleSocket(
            self.cfg.socket, submit=self.submit, new_conn_id=self.new_conn_id, stats=self.lifecycle_metrics,
            proven=self._proven))
        await self._start_http()

    def _start_readers(self) -> None:
        """Registration counts (per scrape), the details watcher (one full read per fleet), the
        stale-task reads, and the collectors that export them."""
        cfg = self.cfg
        self.counts = RegistrationCounts(self.redis, self.health, clock=self.redis_clock.now)
        self.scrapes_first = ScrapesFirst()
        self.task_recovery = TaskRecovery(self.redis, self.health, cfg.cleanup.recover_tasks,
                                          registry=self.registry)
        self.watcher = DetailsWatcher(self.redis, self.health, cfg.watch_interval,
                                      shared=cfg.details_sharing, scrapes_first=self.scrapes_first,
                                      identity=f"{cfg.hostname}:{os.getpid()}:{id(self):x}",
                                      clock=self.redis_clock.now, task_reader=self.task_recovery,
                                      on_full_read=self.hooks.details_read)
        self.registry.register(RegistrationCollector(self.counts, self.watcher, self.health,
                                                     clock=self.redis_clock.now))
        self.task_recovery.on_undecodable = self.watcher.count_undecodable
        self.registry.register(QueueTasksCollector(self.counts, self.watcher))
        self._stack.push_async_callback(self.watcher.release)

    def _start_cleanup(self) -> None:
        """The safety net: the decision sink with its observer and reaper, this host's orphans,
        and the periodic fleet sweep when --sweep-interval asks for it."""
        cfg = self.cfg
        self.cleanup = Cleanup(self.redis, self.health, cfg.cleanup, registry=self.registry,
                               submit=self.submit, spawn=self.spawn, poll_interval=cfg.poll_interval,
                               hostname=cfg.hostname, clock=self.redis_clock,
                               tasks=self.task_recovery, on_settled=self.hooks.cleanup_settled)
        self.sinks.append(self.cleanup)
        self.spawn(self.cleanup.observer.observe_forever(), "registration-observer")
        self.spawn(self.cleanup.orphans.remove_host_orphans(), "host-orphans")
        if cfg.cleanup.sweep_interval > 0:
            sweeper = Sweeper(self.redis, self.health, grace=cfg.cleanup.sweep_grace,
                              batch=cfg.cleanup.sweep_batch, dry_run=cfg.cleanup.mode == "dry-run")
            removed = self.cleanup.metrics.removed.labels(reason="sweep")
            self.spawn(sweep_periodically(sweeper, cfg.cleanup.sweep_interval, removed.inc), "sweep")

    async def _start_http(self) -> None:
        """/metrics, /healthz and /readyz, with --web-config-file's TLS and basic auth."""
        cfg = self.cfg
        web_cfg = cfg.web
        app = build_app(self.registry, before_scrape=self._before_scrape, redis_ready=self._redis_ready,
                        socket_listening=lambda: self.lifesocket.listening,
                        middlewares=self._middlewares(web_cfg))
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               shutdown_timeout=1.0)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        host, port = cfg.listen
        site = web.TCPSite(runner, host, port, reuse_address=True,
                           ssl_context=web_cfg.ssl_context() if web_cfg is not None else None)
        await site.start()
        self.http_address = runner.addresses[0][:2]
        log.info("asynq-sidecar %s serving %s/metrics (redis %s, host %s)", __version__,
                 self.http_url, cfg.redis.display_url, cfg.hostname)
        if web_cfg is not None:
            log.info("web config %s", web_cfg.describe())

    def _middlewares(self, web_cfg: WebConfig | None) -> list[Any]:
        """--web-config-file's headers and basic auth; refusals counted when auth is on."""
        if web_cfg is None:
            return []
        return web_cfg.middlewares(on_reject=refused_requests(self.registry) if web_cfg.users else None)

    def _proven(self, conn: int) -> bool:
        """Whether a live worker on this connection has shown it is an asynq worker: its
        registration was seen in Redis, or it named its server id. The lifecycle socket never
        evicts such a connection to make room for another."""
        w = self.tracker.workers.get(conn)
        return w is not None and w.state is not State.EXITED and bool(w.members or w.server_ids)

    async def _redis_ready(self) -> bool:
        try:
            with self.health.op("ping"):
                return bool(await self.redis.ping())
        except REDIS_FAILURES:
            return False


async def serve_until_signalled(cfg: ServeConfig) -> int:
    """Serve until SIGTERM or SIGINT; the handlers only set the stop event. SIGHUP, which would
    otherwise end the process, is logged and ignored: nothing is reloaded (flags and the web
    config file are read once, at start), and a stray hang-up must not stop the safety net."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, log.info,
                            "SIGHUP received: ignored (nothing is reloaded; restart to change the configuration)")
    async with Sidecar(cfg) as sidecar:
        await stop.wait()
        log.info("stopping")
        started = time.monotonic()
        await sidecar.linger(cfg.stop_timeout)
    log.info("stopped in %.3fs", time.monotonic() - started)
    return 0


def run(cfg: ServeConfig) -> int:
    try:
        return asyncio.run(serve_until_signalled(cfg))
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
