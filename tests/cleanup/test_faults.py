"""Fault injection with real processes: Redis killed, Redis slow, the sidecar killed or stopped
first, a crash-looping worker. Each test asserts that no cleanup is lost and that no live entry
is removed: a bystander server of the same host (another pid, kept beating by an emulator
process) is watched every few milliseconds and must never be missing."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time

import aiohttp
import redis as redis_sync
import redis.asyncio as redis_async

from exporter.asynq import model as asynq
from exporter.server.sidecar import Sidecar
from exporter.settings import CleanupConfig, RedisConfig
from tests.support.faults import Bystander, gone_entirely, rss_kib, start_worker
from tests.support.helpers import eventually
from tests.support.lifecycle import HOST

# ---------------------------------------------------------------- Redis faults


async def test_redis_killed_and_restarted_while_a_worker_dies(faults, processes):
    """Redis is SIGKILLed, the worker is SIGKILLed while Redis is down; the cleanup is pending
    until Redis (append-only file on) is back, then completes."""
    server = faults.redis(persistent=True)
    rdb = redis_sync.Redis.from_url(server.url)
    bystander = await faults.bystander(server.url)
    sc = await faults.serve(server.url, "--redis-timeout", "0.3", "--settle", "1")
    w, child, m = await start_worker(processes, faults, server.url)
    await sc.wait_for("asynq_sidecar_workers", 1, state="running")

    server.stop()  # SIGKILL
    os.kill(child, signal.SIGKILL)
    assert await w.wait() == 128 + 9
    await sc.wait_for("asynq_sidecar_cleanups_pending", 1)  # /metrics answers while Redis is down
    assert await sc.value("asynq_sidecar_redis_up") == 0
    assert await sc.value("asynq_sidecar_worker_exits_total", outcome="killed") == 1

    server.start()
    # The registration came back with Redis (append-only, fsync always): the pending cleanup may
    # remove it as soon as Redis answers, so what proves it is the removal counted below.
    await eventually(lambda: gone_entirely(rdb, m), timeout=15, what="the cleanup after Redis returned")
    await sc.wait_for("asynq_sidecar_cleanups_pending", 0)
    assert await sc.value("asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1
    assert await sc.value("asynq_sidecar_cleanup_errors_total") >= 1
    assert "Redis down" in sc.log() and "Redis up again" in sc.log()
    bystander.assert_intact(sc)
    rdb.close()


async def test_redis_slower_than_the_timeout_while_a_worker_dies(faults, processes):
    """Every command waits behind `CLIENT PAUSE 4000 ALL`, longer than --redis-timeout: /metrics
    keeps answering within the timeout (counts absent, redis_up 0), the cleanup waits, and it
    completes once Redis answers in time again."""
    server = faults.redis()
    rdb = redis_sync.Redis.from_url(server.url)
    bystander = await faults.bystander(server.url)
    sc = await faults.serve(server.url, "--redis-timeout", "0.25")
    w, child, m = await start_worker(processes, faults, server.url)
    await sc.wait_for("asynq_sidecar_workers", 1, state="running")
    assert await sc.value("asynq_registry_entries", set="servers", state="live") == 2

    pause = 4.0
    paused_at = time.monotonic()
    rdb.execute_command("CLIENT", "PAUSE", int(pause * 1000), "ALL")
    os.kill(child, signal.SIGKILL)
    assert await w.wait() == 128 + 9
    await sc.wait_for("asynq_sidecar_cleanups_pending", 1, timeout=pause)
    began = time.monotonic()
    scraped = await sc.scrape()
    took = time.monotonic() - began
    assert time.monotonic() - paused_at < pause, "the machine was too slow to observe the pause"
    assert took < 1.5, f"a scrape took {took:.2f}s while Redis was slow (--redis-timeout 0.25)"
    assert scraped[("asynq_sidecar_redis_up", ())] == 0
    assert not any(name == "asynq_registry_entries" for name, _ in scraped)  # no stale counts
    assert rdb.zscore(asynq.SERVERS, m.key) is not None  # (this read waited for the pause)

    await eventually(lambda: gone_entirely(rdb, m), timeout=10, what="the cleanup once Redis was fast")
    await sc.wait_for("asynq_sidecar_cleanups_pending", 0)
    await sc.wait_for("asynq_sidecar_redis_up", 1)
    assert await sc.value("asynq_registry_entries", set="servers", state="live") == 1  # the bystander
    bystander.assert_intact(sc)
    rdb.close()


# ---------------------------------------------------------------- the sidecar killed


async def test_sidecar_killed_and_restarted_while_its_worker_runs(faults, processes, redis_url, rdb):
    """The launcher reconnects to the new sidecar and replays its hello (with started_at);
    tracking resumes, and the new sidecar cleans up after the worker's SIGKILL."""
    bystander = await faults.bystander(redis_url)
    first = await faults.serve(redis_url)
    w, child, m = await start_worker(processes, faults, redis_url)
    await first.wait_for("asynq_sidecar_workers", 1, state="running")

    await first.kill()  # SIGKILL: the socket file stays behind, stale
    second = await faults.serve(redis_url, port=first.port)
    await second.wait_for("asynq_sidecar_workers", 1, state="running")
    assert await second.value("asynq_sidecar_worker_starts_total") == 1
    assert f"worker started: {HOST} pid {child}" in second.log()
    assert "replacing the stale lifecycle socket" in second.log()

    os.kill(child, signal.SIGKILL)
    assert await w.wait() == 128 + 9
    await eventually(lambda: gone_entirely(rdb, m), timeout=5, what="the new sidecar's cleanup")
    assert await second.value("asynq_sidecar_worker_exits_total", outcome="killed") == 1
    await second.wait_for("asynq_sidecar_registrations_removed_total", 1, reason="worker_exit")
    bystander.assert_intact(first, second)


async def test_worker_dies_while_the_sidecar_is_down_and_the_next_sidecar_removes_it(
        faults, processes, redis_url, rdb):
    """The sidecar is SIGKILLed, then its worker; nobody reports the death. At start, the new
    sidecar removes this host's registration that expired longer than --settle ago, and leaves
    the live one of the same host alone."""
    settle = 0.5
    bystander = await faults.bystander(redis_url)
    first = await faults.serve(redis_url, "--settle", str(settle))
    # A registration that lives 2 s after its last beat (asynq's is 10 s), to keep the test short.
    w, child, m = await start_worker(processes, faults, redis_url, "--ttl", "2")
    await first.wait_for("asynq_sidecar_workers", 1, state="running")

    await first.kill()
    os.kill(child, signal.SIGKILL)
    assert await w.wait() == 128 + 9  # after at most 1 s of trying to report to nobody
    await eventually(lambda: rdb.zscore(asynq.SERVERS, m.key) < time.time() - settle - 0.2,
                     timeout=5, what="the registration expired longer than --settle")
    assert not gone_entirely(rdb, m)

    second = await faults.serve(redis_url, "--settle", str(settle), port=first.port)
    await eventually(lambda: gone_entirely(rdb, m), timeout=5, what="the start-up scan's removal")
    await second.wait_for("asynq_sidecar_registrations_removed_total", 1, reason="previous_incarnation")
    assert await second.value("asynq_sidecar_worker_starts_total") == 0  # nobody reported it
    bystander.assert_intact(first, second)


async def test_sidecar_terminated_before_its_worker_waits_for_the_drain_then_cleans_up(
        faults, processes, redis_url, rdb):
    """Without native sidecars the pod's containers get SIGTERM together, the sidecar first
    here: it keeps watching and serving while the worker drains, removes what the worker
    leaked, waits for a last scrape, and only then exits 0."""
    drain = 1.5
    bystander = await faults.bystander(redis_url)
    sc = await faults.serve(redis_url, "--stop-timeout", "20")
    w, child, m = await start_worker(processes, faults, redis_url, "--drain", str(drain),
                                     "--on-exit", "leak")
    await sc.wait_for("asynq_sidecar_workers", 1, state="running")

    terminated_at = time.monotonic()
    sc.signal(signal.SIGTERM)
    await eventually(lambda: "waiting up to 20s for 1 worker(s) to exit" in sc.log(),
                     what="the sidecar to linger")
    assert await sc.value("asynq_sidecar_workers", state="running") == 1  # still serving
    w.signal(signal.SIGTERM)
    assert await w.wait() == 0  # drained, then exited 0 leaving its registration (asynq #979)
    worker_exited_at = time.monotonic()

    # Scrape as Prometheus would until the sidecar is gone; the last scrape sees the cleanup.
    last: dict = {}

    async def scraped_until_exit() -> bool:
        nonlocal last
        if sc.proc.returncode is not None:
            return True
        with contextlib.suppress(aiohttp.ClientError):
            last = await sc.scrape()
        return False
    await eventually(scraped_until_exit, timeout=10, interval=0.05, what="the sidecar to exit")
    exited_at = time.monotonic()
    assert await sc.wait() == 0
    assert gone_entirely(rdb, m)
    assert last[("asynq_sidecar_worker_exits_total", (("outcome", "graceful"),))] == 1
    assert last[("asynq_sidecar_registrations_removed_total", (("reason", "worker_exit"),))] == 1
    assert exited_at >= worker_exited_at
    assert exited_at - terminated_at >= drain, "the sidecar left before the worker's drain ended"
    assert "stop timeout" not in sc.log()
    bystander.assert_intact(sc)


async def test_a_sidecar_whose_stop_timeout_ends_first_leaves_the_draining_worker_alone(
        faults, processes, redis_url, rdb):
    """The sidecar's own budget ends before the worker's drain: it exits 0 at --stop-timeout
    and removes nothing of the worker, which is still alive."""
    bystander = await faults.bystander(redis_url)
    sc = await faults.serve(redis_url, "--stop-timeout", "1")
    w, child, m = await start_worker(processes, faults, redis_url, "--drain", "30")
    await sc.wait_for("asynq_sidecar_workers", 1, state="running")
    w.signal(signal.SIGTERM)  # the worker starts a drain longer than the sidecar's budget
    await sc.wait_for("asynq_sidecar_workers", 1, state="stopping")
    terminated_at = time.monotonic()
    sc.signal(signal.SIGTERM)
    assert await sc.wait() == 0
    lingered = time.monotonic() - terminated_at
    assert 1.0 <= lingered < 3.0, lingered
    assert "stop timeout: leaving with 1 worker(s) live" in sc.log()
    assert "Traceback" not in sc.log()  # its open connection was closed quietly
    assert rdb.zscore(asynq.SERVERS, m.key) >= time.time() and rdb.exists(m.key)
    assert w.proc.returncode is None  # still draining
    bystander.assert_intact(sc)


# ---------------------------------------------------------------- a crash-looping worker


def hello_line(pid: int, host: str, started_at: float) -> bytes:
    return json.dumps({"event": "hello", "protocol": 1, "pid": pid, "host": host,
                       "started_at": started_at, "time": started_at}).encode() + b"\n"


def event_line(event: str, **fields: object) -> bytes:
    return json.dumps({"event": event, "time": time.time(), **fields}).encode() + b"\n"


async def register(client: redis_async.Redis, host: str, pid: int, server_id: str, started: float) -> asynq.Member:
    """One beat, as asynq writes it at start (score now + 10 s, keys with a 10 s TTL)."""
    m = asynq.server_member(host, pid, server_id)
    w = m.sibling("workers")
    info = asynq.ServerInfo(host=host, pid=pid, server_id=server_id, concurrency=10,
                            queues={"default": 1}, status="active", start_time=started,
                            active_worker_count=1)
    pipe = client.pipeline(transaction=False)
    pipe.zadd(asynq.SERVERS, {m.key: int(time.time() + 10)})
    pipe.zadd(asynq.WORKERS, {w.key: int(time.time() + 10)})
    pipe.set(m.key, asynq.encode_server_info(info), ex=10)
    pipe.hset(w.key, "task", b"x")
    pipe.expire(w.key, 10)
    await pipe.execute()
    return m


#: How each life of a crash-looping worker ends, in turn: SIGKILL, exit 0 without clearing
#: (asynq #979), a crash, a connection lost with no report (cleaned after --settle), a death
#: before registering, and a graceful exit that cleared its registration itself.
ENDINGS = ("killed", "killed", "leak", "error", "killed", "lost", "unregistered", "graceful")


async def crash_loop(socket_path: str, redis_url: str, *, lanes: int, lives: int, first: int = 0) -> int:
    """`lanes` pods on HOST, each one worker (its own pid, as a restarted container keeps its
    pid) that starts, registers and dies `lives` times in a row; returns the lives lived."""
    client = redis_async.Redis.from_url(redis_url)

    async def lane(n: int) -> None:
        pid = 100 + n
        for i in range(first, first + lives):
            ending = ENDINGS[(i + n) % len(ENDINGS)]
            started = time.time()
            reader, writer = await asyncio.open_unix_connection(socket_path)
            writer.write(hello_line(pid, HOST, started))
            if ending != "unregistered":
                m = await register(client, HOST, pid, f"lane{n}-life{i}", started)
            if ending == "graceful":  # ClearServerState, then bye
                w = m.sibling("workers")
                await client.zrem(asynq.SERVERS, m.key)
                await client.zrem(asynq.WORKERS, w.key)
                await client.delete(m.key, w.key)
                writer.write(event_line("stopping", signal="SIGTERM") + event_line("bye"))
            elif ending == "killed":
                writer.write(event_line("exited", signal="SIGKILL"))
            elif ending == "leak":
                writer.write(event_line("exited", code=0))
            elif ending in ("error", "unregistered"):
                writer.write(event_line("exited", code=1))
            # End of stream ("lost": with nothing more said); the sidecar closes its side once it
            # has read everything, and only then does the pod's next life begin.
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()

    try:
        await asyncio.gather(*(lane(n) for n in range(lanes)))
    finally:
        await client.aclose()
    return lanes * lives


def only_bystander_left(rdb: redis_sync.Redis, bystander: Bystander) -> bool:
    want = {bystander.member.key.encode()}
    return (set(rdb.zrange(asynq.SERVERS, 0, -1)) == want
            and set(rdb.zrange(asynq.WORKERS, 0, -1)) == {bystander.member.sibling("workers").key.encode()}
            and rdb.keys(f"asynq:servers:{{{HOST}:1*") == [] and rdb.keys(f"asynq:workers:{{{HOST}:1*") == [])


async def test_a_crash_looping_worker_leaves_nothing_and_the_sidecar_does_not_grow(
        faults, redis_url, rdb):
    """Eight pods crash-loop through the socket of a `serve` process, 640 lives in all. The
    second 320 may grow its RSS by less than 3 MiB over the first 320 (the bound is explained
    in docs/reliability.md); at the end no worker's entry is left and nothing is pending."""
    bystander = await faults.bystander(redis_url)
    sc = await faults.serve(redis_url, "--settle", "0.2")

    async def settled(expected_starts: int) -> bool:
        s = await sc.scrape()
        return (s[("asynq_sidecar_worker_starts_total", ())] == expected_starts
                and s[("asynq_sidecar_cleanups_pending", ())] == 0
                and s[("asynq_sidecar_socket_connections", ())] == 0
                and all(s[("asynq_sidecar_workers", (("state", st),))] == 0
                        for st in ("starting", "running", "stopping"))
                and only_bystander_left(rdb, bystander))

    warm = await crash_loop(faults.socket_path, redis_url, lanes=8, lives=40)  # the same load twice
    await eventually(lambda: settled(warm), timeout=40, what="the warm-up cleaned up")
    before = rss_kib(sc.pid)
    lived = await crash_loop(faults.socket_path, redis_url, lanes=8, lives=40, first=40)
    await eventually(lambda: settled(warm + lived), timeout=40, what="every life cleaned up")
    after = rss_kib(sc.pid)
    assert after - before < 3 * 1024, f"RSS grew {after - before} KiB over {lived} lives ({before} KiB before)"

    lives = warm + lived
    per_ending = lives // len(ENDINGS)

    async def removed() -> float:  # counted just after Redis answered: poll
        s = await sc.scrape()
        return sum(s[("asynq_sidecar_registrations_removed_total", (("reason", r),))]
                   for r in ("worker_exit", "previous_incarnation"))
    # Every leaked registration was removed, and counted, exactly once (a guarded ZREM succeeds
    # only once): killed x3, leak, error, lost.
    await eventually(async_equals(removed, 6 * per_ending), what=f"{6 * per_ending} removals counted")
    s = await sc.scrape()
    exits = {o: s[("asynq_sidecar_worker_exits_total", (("outcome", o),))]
             for o in ("graceful", "error", "killed", "lost")}
    assert exits == {"graceful": 2 * per_ending, "error": 2 * per_ending, "killed": 3 * per_ending,
                     "lost": per_ending}
    assert not any(v for (name, _), v in s.items() if name == "asynq_sidecar_protocol_errors_total")
    bystander.assert_intact(sc)


async def test_a_crash_loop_leaves_no_state_behind_in_the_sidecar(make_config, redis_url, rdb, tmp_socket,
                                                                   caplog):
    """The same crash loop against an in-process sidecar: afterwards the tracker, the cleanup's
    watches and tasks, and the socket's connections are empty, and no worker record is alive."""
    from exporter.lifecycle.tracker import Worker

    # pytest keeps every log record of a test, and the record of a failed Redis attempt holds
    # the exception, whose traceback holds the cleanup's frames and so its worker: below ERROR,
    # nothing is recorded here.
    caplog.set_level(logging.ERROR, logger="exporter")
    cfg = make_config(hostname=HOST, cleanup=CleanupConfig(settle=0.2),
                      redis=RedisConfig(url=redis_url, timeout=1.0))
    async with Sidecar(cfg) as sc:
        sc.cleanup.confirmations.after = 0.05  # read each removal back at once, so those tasks end too
        permanent = set(sc._tasks)
        lived = await crash_loop(tmp_socket, redis_url, lanes=8, lives=40)

        def state() -> dict:
            return dict(starts=metric_value(sc, "asynq_sidecar_worker_starts_total"),
                        workers=len(sc.tracker.workers), watches=len(sc.cleanup.observer.watches),
                        idle=sc.cleanup.idle, connections=sc.lifesocket.open_connections,
                        tasks=sorted(t.get_name() for t in set(sc._tasks) - permanent)[:5])
        empty = dict(starts=lived, workers=0, watches=0, idle=True, connections=0, tasks=[])
        try:
            await eventually(lambda: state() == empty, timeout=40, what="the sidecar to forget every life")
        except AssertionError as e:
            raise AssertionError(f"{e}: {state()}") from None

        def records() -> int:
            """Worker records of this test's lives still alive (other tests' are not counted)."""
            gc.collect()
            return sum(isinstance(o, Worker) and o.host == HOST and 100 <= o.pid < 108
                       for o in gc.get_objects())
        # At most two, held by loop variables until the next event or tick: the event task's
        # last decision, and the observer's last watch.
        await eventually(lambda: records() <= 2, timeout=5, what="the worker records to be freed")
        assert rdb.zcard(asynq.SERVERS) == 0 and rdb.zcard(asynq.WORKERS) == 0
        assert rdb.keys("asynq:*") == []


def async_equals(read, expected):
    async def check() -> bool:
        return await read() == expected
    return check


def metric_value(sc: Sidecar, name: str, **labels: str) -> float:
    v = sc.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


# ---------------------------------------------------------------- retries and bursts


async def test_a_cleanup_retried_after_redis_failed_midway_counts_its_leak_once(make_config, rdb):
    """Redis fails after the leak was established but before the removal: the retry removes
    the registration, and the leak and its in-flight tasks are counted once, not per attempt."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from exporter.lifecycle.tracker import Exited, Hello
    from tests.support.helpers import register_server

    async with Sidecar(make_config(hostname=HOST, cleanup=CleanupConfig(host_pids_unique=True))) as sc:
        store = sc.cleanup.store
        real_remove, failures = store.remove, []

        async def remove_failing_once(member, seen, how, settle):
            if not failures:
                failures.append(member)
                raise RedisConnectionError("connection reset (injected)")
            return await real_remove(member, seen, how, settle)

        store.remove = remove_failing_once
        conn = sc.new_conn_id()
        sc.submit(Hello(conn, pid=9, host=HOST, started_at=time.time()))
        m = register_server(rdb, HOST, 9, "s9", time.time() + 10, active=3)
        for i in range(3):
            rdb.hset(m.sibling("workers").key, f"task-{i}", b"x")
        await eventually(lambda: conn in sc.tracker.workers and sc.tracker.workers[conn].members,
                         what="the registration seen")
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone_entirely(rdb, m), timeout=5, what="the retried removal")
        await eventually(lambda: sc.cleanup.idle, what="the cleanup to end")
        assert failures == [m]
        assert metric_value(sc, "asynq_sidecar_cleanup_errors_total") == 1
        assert metric_value(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1
        assert metric_value(sc, "asynq_sidecar_leaked_registrations_total") == 1
        assert metric_value(sc, "asynq_sidecar_abandoned_tasks_total") == 3


async def test_hundreds_of_registrations_left_while_the_sidecar_was_down_are_all_removed_at_start(
        faults, redis_url, rdb):
    """A worker crash-looped (PID 1 every time) while its sidecar was down: 300 expired
    registrations of this host. The starting sidecar removes every one, without tripping over
    redis-py's pool of 100 connections, and leaves the live bystander alone."""
    from tests.support.helpers import register_server

    bystander = await faults.bystander(redis_url)
    now = time.time()
    dead = [register_server(rdb, HOST, 1, f"life-{i}", now - 60 + i * 0.1, start_time=now - 600 + i)
            for i in range(300)]
    sc = await faults.serve(redis_url, "--settle", "1")
    await sc.wait_for("asynq_sidecar_registrations_removed_total", 300, reason="previous_incarnation")
    assert not any(rdb.zscore(asynq.SERVERS, m.key) for m in dead)
    assert rdb.keys(f"asynq:servers:{{{HOST}:1:*") == []
    assert await sc.value("asynq_sidecar_cleanup_errors_total") == 0
    assert "Redis down" not in sc.log()
    bystander.assert_intact(sc)


# ---------------------------------------------------------------- signals


async def test_sighup_is_logged_and_does_not_stop_serve(faults, redis_url):
    """SIGHUP's default action ends a process: serve logs it and goes on serving, its socket in
    place; SIGTERM still stops it cleanly."""
    sc = await faults.serve(redis_url)
    sc.signal(signal.SIGHUP)
    await eventually(lambda: "SIGHUP received: ignored" in sc.log(), what="the SIGHUP logged")
    assert sc.proc.returncode is None
    assert await sc.value("asynq_sidecar_redis_up") == 1
    assert os.path.exists(faults.socket_path)
    sc.signal(signal.SIGTERM)
    assert await sc.wait() == 0
    assert not os.path.exists(faults.socket_path)
