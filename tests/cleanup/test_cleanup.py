"""The safety net against a real Redis: a dead worker's registration goes, a live one never does."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import redis as redis_sync
import redis.asyncio as redis_async
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.asynq import model as asynq
from exporter.cleanup.rule import ABSENT, KEPT, REMOVED, Verdict
from exporter.cleanup.store import RegistrationStore
from exporter.devtools.redis_server import RedisServer
from exporter.lifecycle.tracker import Bye, Disconnected, Exited, Hello, State
from exporter.redisio.clock import RedisClock
from exporter.server.sidecar import Sidecar
from exporter.settings import CleanupConfig, RedisConfig
from tests.support.helpers import Watched, eventually, register_server

HOST = socket.gethostname()  # a worker shares its pod's host name with the sidecar
#: An ordinary pod: one worker container, so host:pid is unique and a reported exit is proof.
UNIQUE = CleanupConfig(host_pids_unique=True)


def metric(sc: Sidecar, name: str, **labels: str) -> float:
    v = sc.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def registration_present(rdb, m: asynq.Member) -> bool:
    return rdb.zscore(asynq.SERVERS, m.key) is not None


def gone_entirely(rdb, m: asynq.Member) -> bool:
    w = m.sibling("workers")
    return (rdb.zscore(asynq.SERVERS, m.key) is None and rdb.zscore(asynq.WORKERS, w.key) is None
            and not rdb.exists(m.key) and not rdb.exists(w.key))


def redis_time(rdb) -> float:
    seconds, micros = rdb.time()
    return seconds + micros / 1e6


def running(sc: Sidecar, conn: int) -> bool:
    w = sc.tracker.workers.get(conn)
    return w is not None and w.state is State.RUNNING


def add_tasks(rdb, m: asynq.Member, n: int) -> None:
    for i in range(n):
        rdb.hset(m.sibling("workers").key, f"task-{i}", b"x")
    rdb.expire(m.sibling("workers").key, 10)


async def start_worker(sc: Sidecar, rdb, pid: int, sid: str, *, tasks: int = 0, host: str = HOST,
                       expires_in: float = 10) -> tuple[int, asynq.Member]:
    """A worker says hello, then registers (as asynq does right after Start); wait until the
    sidecar has seen the registration and marked it running."""
    conn = sc.new_conn_id()
    sc.submit(Hello(conn, pid=pid, host=host, started_at=time.time()))
    m = register_server(rdb, host, pid, sid, time.time() + expires_in, active=tasks)
    add_tasks(rdb, m, tasks)
    await eventually(lambda: conn in sc.tracker.workers and sc.tracker.workers[conn].state is State.RUNNING,
                     what="the worker to be running via its registration")
    return conn, m


async def test_reported_kill_removes_the_registration_within_a_second(rdb, make_config):
    async with Sidecar(make_config(cleanup=UNIQUE)) as sc:
        conn, m = await start_worker(sc, rdb, 1, "s1", tasks=3)
        killed_at = time.monotonic()
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone_entirely(rdb, m), timeout=1.0, what="registration removed")
        assert time.monotonic() - killed_at < 1.0
        assert metric(sc, "asynq_sidecar_leaked_registrations_total") == 1
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1
        assert metric(sc, "asynq_sidecar_abandoned_tasks_total") == 3
        assert metric(sc, "asynq_sidecar_cleanups_pending") == 0


async def test_a_clean_exit_0_that_leaves_the_registration_is_a_leak_asynq_979(rdb, make_config):
    async with Sidecar(make_config(cleanup=UNIQUE)) as sc:
        conn, m = await start_worker(sc, rdb, 1, "s1")
        sc.submit(Exited(conn, code=0))
        await eventually(lambda: gone_entirely(rdb, m), timeout=1.0, what="registration removed")
        assert metric(sc, "asynq_sidecar_leaked_registrations_total") == 1
        assert metric(sc, "asynq_sidecar_abandoned_tasks_total") == 0


async def test_a_worker_that_deregistered_itself_is_not_a_leak(rdb, make_config):
    watched = Watched()
    async with Sidecar(make_config(), hooks=watched.hooks) as sc:
        conn, m = await start_worker(sc, rdb, 1, "s1")
        # asynq's ClearServerState, then the process exits 0
        rdb.zrem(asynq.SERVERS, m.key)
        rdb.zrem(asynq.WORKERS, m.sibling("workers").key)
        rdb.delete(m.key, m.sibling("workers").key)
        watched.cleanup_settled.clear()
        sc.submit(Exited(conn, code=0))
        await eventually(watched.cleanup_settled.is_set, what="cleanup finished")
        assert metric(sc, "asynq_sidecar_leaked_registrations_total") == 0
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 0


async def test_death_before_the_first_tick_found_the_registration_is_still_cleaned(rdb, make_config):
    async with Sidecar(make_config(poll_interval=3600, cleanup=UNIQUE)) as sc:
        await asyncio.sleep(0)  # let the observer take its first (empty) look
        conn = sc.new_conn_id()
        sc.submit(Hello(conn, pid=5, host=HOST, started_at=time.time()))
        m = register_server(rdb, HOST, 5, "quick", time.time() + 10)
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone_entirely(rdb, m), timeout=1.0, what="registration removed")


async def test_lost_connection_removes_only_once_expired_by_redis_clock(rdb, make_config):
    """A lost connection proves nothing: even the worker's own registration waits until Redis's
    clock is past its expiry by more than --settle."""
    settle = 0.3
    async with Sidecar(make_config(cleanup=CleanupConfig(settle=settle, host_pids_unique=True))) as sc:
        conn, m = await start_worker(sc, rdb, 1, "s1", expires_in=1.5)
        sc.submit(Disconnected(conn))
        await eventually(lambda: conn not in sc.tracker.workers, what="the loss to be applied")
        expiry = rdb.zscore(asynq.SERVERS, m.key)
        await eventually(lambda: gone_entirely(rdb, m), timeout=4, what="registration removed")
        assert redis_time(rdb) >= expiry + settle  # not a moment before asynq calls it dead
        assert metric(sc, "asynq_sidecar_leaked_registrations_total") == 1


async def test_a_live_server_whose_connection_dropped_is_kept_while_it_beats_and_removed_once_it_stops(
        rdb, make_config, redis_url):
    """Watched to the end: a registration left alone because it still beats (the worker outlived
    its launcher) is looked at again, and removed once the worker really dies."""
    async with Sidecar(make_config(cleanup=CleanupConfig(settle=0.2))) as sc, \
            Beating(redis_url, ttl=1) as beat:
        conn, m = await start_worker(sc, rdb, 1, "s1", expires_in=1)
        beat.members.append(m)
        sc.submit(Disconnected(conn))
        await eventually(lambda: conn not in sc.tracker.workers, what="the loss to be applied")
        deadline = time.monotonic() + 3  # three expiry periods of a server that keeps beating
        while time.monotonic() < deadline:
            assert registration_present(rdb, m) and rdb.exists(m.key)
            await asyncio.sleep(0.05)
        assert metric(sc, "asynq_sidecar_leaked_registrations_total") == 0
        assert not sc.cleanup.idle  # still watched
        await beat.stop()  # the worker dies now
        await eventually(lambda: gone_entirely(rdb, m), timeout=4, what="removed once expired")
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1
        await eventually(lambda: sc.cleanup.idle, what="nothing left to watch")


async def test_only_the_dead_workers_registration_goes(rdb, make_config):
    now = time.time()
    other_host = register_server(rdb, "pod-b", 1, "other-host", now + 10)
    other_pid = register_server(rdb, HOST, 2, "other-pid", now + 10)
    old = register_server(rdb, HOST, 1, "earlier-incarnation", now - 60, start_time=now - 600,
                          with_keys=False)
    async with Sidecar(make_config(cleanup=UNIQUE)) as sc:
        conn, mine = await start_worker(sc, rdb, 1, "mine")
        await eventually(lambda: not registration_present(rdb, old), what="earlier incarnation removed")
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone_entirely(rdb, mine), timeout=1.0, what="registration removed")
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="previous_incarnation") == 1
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1
    for m in (other_host, other_pid):
        assert registration_present(rdb, m) and rdb.exists(m.key)


async def test_a_newer_incarnation_is_not_claimed_by_the_dead_worker(rdb, make_config):
    watched = Watched()
    async with Sidecar(make_config(cleanup=CleanupConfig(settle=0.3)), hooks=watched.hooks) as sc:
        conn = sc.new_conn_id()
        sc.submit(Hello(conn, pid=1, host=HOST, started_at=time.time()))
        await eventually(lambda: conn in sc.tracker.workers, what="hello applied")
        # A restarted container (same host and pid) is already registered when the dead
        # worker's cleanup looks, but it started after that worker's exit.
        exit_at = time.time()
        newer = register_server(rdb, HOST, 1, "newer", exit_at + 10, start_time=exit_at + 0.5)
        watched.cleanup_settled.clear()
        sc.submit(Exited(conn, signal="SIGKILL"), at=exit_at)  # died before registering
        await eventually(watched.cleanup_settled.is_set, what="cleanup finished")
        assert registration_present(rdb, newer) and rdb.exists(newer.key)
        assert metric(sc, "asynq_sidecar_leaked_registrations_total") == 0


@pytest.mark.parametrize("mode", ["dry-run", "off"])
async def test_dry_run_and_off_count_the_leak_but_remove_nothing(rdb, make_config, mode):
    watched = Watched()
    async with Sidecar(make_config(cleanup=CleanupConfig(mode=mode, host_pids_unique=True)), hooks=watched.hooks) as sc:
        conn, m = await start_worker(sc, rdb, 1, "s1")
        watched.cleanup_settled.clear()
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(watched.cleanup_settled.is_set, what="cleanup finished")
        assert registration_present(rdb, m)
        assert metric(sc, "asynq_sidecar_leaked_registrations_total") == 1
        expected = 1 if mode == "dry-run" else 0
        assert metric(sc, "asynq_sidecar_registrations_would_remove_total", reason="worker_exit") == expected


async def test_a_redis_restart_during_a_pending_cleanup_completes_after_redis_returns(make_config, tmp_path):
    # Append-only file on: the registration survives the restart, as it would in production.
    server = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")).start()
    try:
        rdb = redis_sync.Redis.from_url(server.url)
        cfg = make_config(redis=RedisConfig(url=server.url, timeout=0.3), cleanup=UNIQUE)
        async with Sidecar(cfg) as sc:
            conn, m = await start_worker(sc, rdb, 1, "s1")
            server.stop()
            sc.submit(Exited(conn, signal="SIGKILL"))
            await eventually(lambda: metric(sc, "asynq_sidecar_cleanups_pending") == 1, what="a pending cleanup")
            assert metric(sc, "asynq_sidecar_cleanup_errors_total") >= 1
            server.start()
            assert registration_present(rdb, m)  # it came back with Redis
            await eventually(lambda: gone_entirely(rdb, m), timeout=10, what="registration removed after Redis returned")
            await eventually(lambda: metric(sc, "asynq_sidecar_cleanups_pending") == 0, what="nothing pending")
            assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1
        rdb.close()
    finally:
        server.close()


async def test_start_up_removes_expired_registrations_of_this_host(rdb, make_config):
    now = time.time()
    dead = register_server(rdb, HOST, 7, "died-while-sidecar-was-down", now - 30, with_keys=False)
    fresh = register_server(rdb, HOST, 8, "expired-just-now", now - 1)  # within settle: left
    live = register_server(rdb, HOST, 9, "live", now + 10)
    async with Sidecar(make_config(hostname=HOST)) as sc:
        await eventually(lambda: not registration_present(rdb, dead), what="orphan removed")
        await eventually(lambda: metric(sc, "asynq_sidecar_registrations_removed_total",
                                        reason="previous_incarnation") == 1, what="the removal counted")
    assert registration_present(rdb, fresh) and registration_present(rdb, live)


# ---------------------------------------------------------------- the conditional removal itself

_steps = st.lists(st.sampled_from(["beat", "decide", "remove", "die"]), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_steps)
def test_interleavings_never_remove_an_entry_that_beat_after_the_decision(redis_url, steps):
    """Whatever the order of heartbeats, decisions and removals, a removal goes through only
    when no heartbeat came after the decision it acts on; an owner that beat since survives."""

    async def scenario() -> None:
        client = redis_async.Redis.from_url(redis_url)
        store = RegistrationStore(client, RedisClock(), lambda coro, name: asyncio.ensure_future(coro))
        m = asynq.server_member("h", 1, "s")
        await client.delete(asynq.SERVERS, asynq.WORKERS, m.key, m.sibling("workers").key)
        score, alive, seen, beat_since_decision = 1000, True, None, False
        for step in steps:
            if step == "beat" and alive:
                score += 5
                await client.zadd(asynq.SERVERS, {m.key: score})
                await client.zadd(asynq.WORKERS, {m.sibling("workers").key: score})
                await client.set(m.key, b"info", ex=10)
                beat_since_decision = True
            elif step == "decide":
                seen = await store.scores(m)
                beat_since_decision = False
            elif step == "remove" and seen is not None:
                present = await client.zscore(asynq.SERVERS, m.key) is not None
                result = await store.remove(m, seen, Verdict.NOW, 0.0)
                if beat_since_decision and seen[0] is not None:
                    assert result == KEPT
                    assert await client.zscore(asynq.SERVERS, m.key) is not None
                elif present and seen[0] is not None:
                    assert result == REMOVED
                    assert not await client.exists(m.key)
                else:
                    assert result in (ABSENT, REMOVED, KEPT)
                    if result == KEPT:
                        assert beat_since_decision
            elif step == "die":
                alive = False
        await client.aclose()

    asyncio.run(scenario())


async def test_serve_sweeps_periodically_when_asked(rdb, make_config):
    now = time.time()
    old = [register_server(rdb, f"gone-{i}", 1, f"s{i}", now - 120, with_keys=False) for i in range(3)]
    recent = register_server(rdb, "recent", 1, "r", now - 5, with_keys=False)  # within the grace
    cfg = make_config(cleanup=CleanupConfig(sweep_interval=0.1, sweep_grace=60))
    async with Sidecar(cfg) as sc:
        await eventually(lambda: metric(sc, "asynq_sidecar_registrations_removed_total", reason="sweep") == 3,
                         what="a periodic sweep")
    assert not any(registration_present(rdb, m) for m in old)
    assert registration_present(rdb, recent)


async def test_on_stop_the_sidecar_lingers_until_the_worker_exited_and_was_cleaned_up(rdb, make_config):
    async with Sidecar(make_config(cleanup=UNIQUE)) as sc:
        conn, m = await start_worker(sc, rdb, 1, "s1")
        lingering = asyncio.create_task(sc.linger(10))
        await asyncio.sleep(0.2)  # a stop signal with a live worker: it must not return yet
        assert not lingering.done()
        sc.submit(Exited(conn, signal="SIGKILL"))
        assert await asyncio.wait_for(lingering, 5) is True
        assert gone_entirely(rdb, m)  # the cleanup finished before the sidecar would stop


async def test_lingering_waits_for_a_final_scrape_when_something_scrapes(rdb, make_config):
    from tests.support.helpers import scrape, value

    watched = Watched()

    async with Sidecar(make_config(cleanup=UNIQUE), hooks=watched.hooks) as sc:
        conn, _ = await start_worker(sc, rdb, 1, "s1")
        await scrape(sc.http_url)  # a Prometheus scrapes this sidecar
        sc.submit(Exited(conn, code=0))
        lingering = asyncio.create_task(sc.linger(10))
        await eventually(watched.cleanup_settled.is_set, what="the cleanup")
        await asyncio.sleep(0.2)
        assert not lingering.done()  # the exit has not been scraped yet
        text = await scrape(sc.http_url)
        assert value(text, "asynq_sidecar_worker_exits_total", outcome="graceful") == 1
        assert await asyncio.wait_for(lingering, 2) is True
        assert await sc.linger(0) is True  # settled: returns at once


async def test_an_exit_applied_while_a_scrape_waits_for_redis_counts_as_scraped(rdb, make_config):
    """A scrape that began before the exit but read memory after it has shown the exit: the
    stopping sidecar does not wait for another scrape (Redis paused mid-scrape makes the
    overlap certain)."""
    from tests.support.helpers import scrape, value

    watched = Watched()
    async with Sidecar(make_config(cleanup=UNIQUE), hooks=watched.hooks) as sc:
        conn, m = await start_worker(sc, rdb, 1, "s1")
        rdb.zrem(asynq.SERVERS, m.key)  # it deregistered: the exit leaves nothing to clean up
        rdb.zrem(asynq.WORKERS, m.sibling("workers").key)
        rdb.delete(m.key, m.sibling("workers").key)
        await scrape(sc.http_url)
        rdb.execute_command("CLIENT", "PAUSE", "500", "ALL")
        scraping = asyncio.create_task(scrape(sc.http_url))  # its refresh waits for Redis
        await asyncio.sleep(0.1)
        assert not scraping.done()
        sc.submit(Exited(conn, code=0))
        text = await scraping
        assert value(text, "asynq_sidecar_worker_exits_total", outcome="graceful") == 1
        await eventually(watched.cleanup_settled.is_set, what="the cleanup")
        assert await sc.linger(3) is True


async def test_lingering_ends_once_the_exit_was_scraped_even_if_the_connection_closes_later(rdb, make_config):
    """The final state was scraped after bye; the connection then closes, which changes no
    metric: the stopping sidecar does not wait for yet another scrape up to its timeout."""
    from tests.support.helpers import scrape, value

    async with Sidecar(make_config()) as sc:
        conn = sc.new_conn_id()
        sc.submit(Hello(conn, pid=3, host=HOST, started_at=time.time()))
        sc.submit(Bye(conn))
        await eventually(lambda: conn in sc.tracker.workers and sc.tracker.workers[conn].state is State.EXITED,
                         what="bye applied")
        text = await scrape(sc.http_url)
        assert value(text, "asynq_sidecar_worker_exits_total", outcome="graceful") == 1
        sc.submit(Disconnected(conn))
        started = time.monotonic()
        assert await sc.linger(5) is True
        assert time.monotonic() - started < 2.5  # the look for a late write after bye ends 1 s after the close


async def test_lingering_gives_up_at_its_timeout(rdb, make_config):
    async with Sidecar(make_config()) as sc:
        await start_worker(sc, rdb, 1, "s1")
        started = time.monotonic()
        assert await sc.linger(0.3) is False
        assert 0.3 <= time.monotonic() - started < 1.0


async def test_start_up_scan_waits_for_redis_when_it_is_down_at_start(make_config):
    server = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")).start()
    try:
        rdb = redis_sync.Redis.from_url(server.url)
        dead = register_server(rdb, HOST, 7, "died-while-all-was-down", time.time() - 30, with_keys=False)
        server.stop()
        cfg = make_config(hostname=HOST, redis=RedisConfig(url=server.url, timeout=0.3))
        async with Sidecar(cfg) as sc:
            await eventually(lambda: sc.health.up is False, what="the sidecar to find Redis down")
            server.start()
            await eventually(lambda: not registration_present(rdb, dead), timeout=20, what="orphan removed")
            await eventually(lambda: metric(sc, "asynq_sidecar_registrations_removed_total",
                                            reason="previous_incarnation") == 1, what="the removal counted")
        rdb.close()
    finally:
        server.close()


# ---------------------------------------------------------------- ownership under doubt


class Beating:
    """Keeps registrations alive the way asynq's heartbeat does: every `every` seconds, each
    member's score becomes now + `ttl` (asynq: every 5 s, now + 10)."""

    def __init__(self, redis_url: str, every: float = 0.1, ttl: float = 10) -> None:
        self.client = redis_async.Redis.from_url(redis_url)
        self.every = every
        self.ttl = ttl
        self.members: list[asynq.Member] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            score = int(time.time() + self.ttl) + 1  # whole seconds, as asynq writes them
            for m in self.members:
                await self.client.zadd(asynq.SERVERS, {m.key: score})
                await self.client.zadd(asynq.WORKERS, {m.sibling("workers").key: score})
            try:
                await asyncio.wait_for(self._stop.wait(), self.every)
            except TimeoutError:
                pass

    async def __aenter__(self) -> Beating:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def __aexit__(self, *exc) -> None:
        await self.stop()
        await self.client.aclose()


async def test_a_live_server_of_the_same_host_and_pid_that_registered_first_survives_an_exit(
        rdb, make_config, redis_url):
    """hostNetwork: pod B's server ({node:1:*}) registers between worker A's hello and A's own
    registration. Without --host-pids unique neither is proven A's: A's goes once expired, B's,
    which keeps beating, stays."""
    async with Sidecar(make_config(cleanup=CleanupConfig(settle=0.2))) as sc, Beating(redis_url, ttl=1) as beat:
        conn = sc.new_conn_id()
        sc.submit(Hello(conn, pid=1, host=HOST, started_at=time.time() - 1))
        other = register_server(rdb, HOST, 1, "pod-b-server", time.time() + 1)
        beat.members.append(other)
        await eventually(lambda: running(sc, conn), what="running")
        mine = register_server(rdb, HOST, 1, "pod-a-server", time.time() + 1)
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone_entirely(rdb, mine), timeout=4, what="A's registration removed")
        assert registration_present(rdb, other) and rdb.exists(other.key)
        assert metric(sc, "asynq_sidecar_leaked_registrations_total") == 1


async def test_a_worker_with_two_servers_leaves_neither_behind(rdb, make_config):
    watched = Watched()
    async with Sidecar(make_config(cleanup=CleanupConfig(settle=0.3, host_pids_unique=True)), hooks=watched.hooks) as sc:
        conn, first = await start_worker(sc, rdb, 1, "first")
        second = register_server(rdb, HOST, 1, "second", time.time() + 10)
        watched.cleanup_settled.clear()
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(watched.cleanup_settled.is_set, timeout=5, what="cleanup finished")
        assert gone_entirely(rdb, first) and gone_entirely(rdb, second)
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 2


async def test_two_workers_with_one_host_and_pid_each_keep_their_own(rdb, make_config, redis_url):
    """Two PID-1 containers in one pod: when A dies, B's live registration stays and A's goes."""
    async with Sidecar(make_config(cleanup=CleanupConfig(settle=0.2))) as sc, Beating(redis_url, ttl=1) as beat:
        a, mine = await start_worker(sc, rdb, 1, "a", expires_in=1)
        b = sc.new_conn_id()
        sc.submit(Hello(b, pid=1, host=HOST, started_at=time.time()))
        theirs = register_server(rdb, HOST, 1, "b", time.time() + 1, start_time=time.time() + 0.01)
        beat.members.append(theirs)
        await eventually(lambda: running(sc, b), what="B running")
        sc.submit(Exited(a, signal="SIGKILL"))
        await eventually(lambda: gone_entirely(rdb, mine), timeout=4, what="A's registration removed")
        assert registration_present(rdb, theirs)


async def test_a_stalled_worker_after_a_lost_connection_keeps_its_registration(rdb, make_config, redis_url):
    """A worker frozen for longer than a heartbeat (CPU throttling, a GC pause) whose launcher
    died: its registration is not expired yet, so it stays; the next beat proves it alive."""
    async with Sidecar(make_config(cleanup=CleanupConfig(settle=0.2))) as sc:
        conn, m = await start_worker(sc, rdb, 1, "stalled", expires_in=2.5)
        sc.submit(Disconnected(conn))
        await eventually(lambda: conn not in sc.tracker.workers, what="the loss to be applied")
        expiry = rdb.zscore(asynq.SERVERS, m.key)
        while redis_time(rdb) < expiry - 0.3:  # frozen: no beat for 2 s, well past one period
            assert registration_present(rdb, m)
            await asyncio.sleep(0.05)
        register_server(rdb, HOST, 1, "stalled", time.time() + 2.5)  # it thaws and beats
        await asyncio.sleep(0.6)  # past the old expiry plus settle: a removal would have happened
        assert registration_present(rdb, m)
        assert metric(sc, "asynq_sidecar_leaked_registrations_total") == 0


async def test_a_wrong_server_id_falls_back_to_the_start_time(rdb, make_config):
    async with Sidecar(make_config(cleanup=CleanupConfig(settle=0.3, host_pids_unique=True))) as sc:
        conn = sc.new_conn_id()
        sc.submit(Hello(conn, pid=1, host=HOST, server_id="not-what-asynq-made", started_at=time.time()))
        m = register_server(rdb, HOST, 1, "what-asynq-made", time.time() + 10)
        await eventually(lambda: running(sc, conn), what="running")
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone_entirely(rdb, m), timeout=5, what="registration removed")


async def test_a_reported_server_id_is_removed_at_once_and_precisely(rdb, make_config):
    other = register_server(rdb, HOST, 1, "another-server-same-pid", time.time() + 10,
                            start_time=time.time() - 3600)  # long-lived: not this worker's
    async with Sidecar(make_config()) as sc:
        conn = sc.new_conn_id()
        sc.submit(Hello(conn, pid=1, host=HOST, server_id="mine", started_at=time.time()))
        m = register_server(rdb, HOST, 1, "mine", time.time() + 10)
        await eventually(lambda: running(sc, conn), what="running")
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone_entirely(rdb, m), timeout=1, what="registration removed")
    assert registration_present(rdb, other)


async def test_a_hello_naming_another_host_gets_nothing_removed(rdb, make_config):
    theirs = register_server(rdb, "some-other-pod", 1, "s", time.time() + 10)
    async with Sidecar(make_config(cleanup=CleanupConfig(settle=0.2))) as sc:
        conn = sc.new_conn_id()
        sc.submit(Hello(conn, pid=1, host="some-other-pod", started_at=time.time() - 60))
        await eventually(lambda: conn in sc.tracker.workers, what="hello applied")
        assert conn not in sc.cleanup.observer.watches  # tracked, but never watched: no cleanup can follow
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: sc.tracker.workers[conn].state is State.EXITED, what="exit applied")
        assert sc.cleanup.idle
    assert registration_present(rdb, theirs) and rdb.exists(theirs.key)


async def test_a_member_that_is_not_utf8_does_not_stop_the_observer(rdb, make_config):
    rdb.zadd(asynq.SERVERS, {b"asynq:servers:{" + HOST.encode() + b":1:\xff\xfe}": time.time() + 10})
    async with Sidecar(make_config(cleanup=UNIQUE)) as sc:
        conn, m = await start_worker(sc, rdb, 1, "fine")
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone_entirely(rdb, m), timeout=2, what="registration removed")


async def test_a_removal_retried_after_redis_failed_counts_the_leak_and_tasks_once(rdb, make_config, redis_url):
    cfg = make_config(redis=RedisConfig(url=redis_url, timeout=0.3), cleanup=UNIQUE)
    async with Sidecar(cfg) as sc:
        conn, m = await start_worker(sc, rdb, 1, "s1", tasks=2)
        # Reads go through, writes (the removal scripts) time out for 1.5 s: the leak is seen and
        # counted, the removal fails and is retried until Redis takes writes again.
        rdb.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: metric(sc, "asynq_sidecar_cleanup_errors_total") >= 2, timeout=5,
                         what="failed removal attempts")
        await eventually(lambda: gone_entirely(rdb, m), timeout=10, what="registration removed")
        assert metric(sc, "asynq_sidecar_leaked_registrations_total") == 1
        assert metric(sc, "asynq_sidecar_abandoned_tasks_total") == 2
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1


# ---------------------------------------------------------------- whole scenarios, generated

_fates = st.sampled_from(["alive", "alive-connection-lost", "dead-reported", "dead-lost"])
_workers = st.lists(st.tuples(st.sampled_from([1, 2]), st.booleans(), _fates), min_size=1, max_size=4)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workers=_workers, unique=st.booleans())
def test_generated_fleets_lose_every_dead_registration_and_keep_every_live_one(redis_url, workers, unique):
    """Workers on one host (pids collide: two PID-1 containers), with or without a reported
    server id, that stay alive and beating, stay alive but lose their connection, or die with an
    exit report or without one, all at once. No live registration is ever missing, and every dead
    one is gone soon after it expires."""
    if unique:  # the promise of --host-pids unique: one process per pid, so no collisions
        workers = [(i + 1, reports_id, fate) for i, (_, reports_id, fate) in enumerate(workers)]

    async def scenario() -> None:
        rdb = redis_sync.Redis.from_url(redis_url)
        rdb.flushall()
        cfg = generated_config(redis_url, unique)
        async with Sidecar(cfg) as sc, Beating(redis_url, every=0.05, ttl=1) as beat:
            conns = []
            for i, (pid, reports_id, fate) in enumerate(workers):
                sid = f"server-{i}"
                conn = sc.new_conn_id()
                started = time.time()
                sc.submit(Hello(conn, pid=pid, host=HOST, server_id=sid if reports_id else None,
                                started_at=started))
                m = register_server(rdb, HOST, pid, sid, time.time() + 1, start_time=started + 0.001)
                if fate.startswith("alive"):
                    beat.members.append(m)
                conns.append((conn, m, fate))
            await eventually(lambda: all(running(sc, c) for c, _, _ in conns), timeout=5, what="all running")
            for conn, _, fate in conns:
                if fate == "dead-reported":
                    sc.submit(Exited(conn, signal="SIGKILL"))
                elif fate in ("dead-lost", "alive-connection-lost"):
                    sc.submit(Disconnected(conn))
            deadline = time.monotonic() + 1 + cfg.cleanup.settle + 1.5  # expiry + settle + ticks
            while True:
                for _, m, fate in conns:
                    if fate.startswith("alive"):
                        assert registration_present(rdb, m), f"{fate} {m.key} was removed"
                dead_left = [m.key for _, m, fate in conns if fate.startswith("dead") and not gone_entirely(rdb, m)]
                if not dead_left:
                    break
                assert time.monotonic() < deadline, f"left behind: {dead_left}"
                await asyncio.sleep(0.02)
        rdb.close()

    asyncio.run(scenario())


def generated_config(redis_url: str, unique: bool):
    import tempfile

    from exporter.settings import LogConfig, ServeConfig, SocketConfig

    return ServeConfig(redis=RedisConfig(url=redis_url, timeout=1.0), listen=("127.0.0.1", 0),
                       socket=SocketConfig(path=tempfile.mktemp(prefix="s", dir="/tmp")), log=LogConfig(),
                       cleanup=CleanupConfig(settle=0.3, host_pids_unique=unique), hostname=HOST, watch_interval=5.0,
                       poll_interval=0.05)
