"""`asynq-sidecar sweep`: removes exactly the long-expired registrations (by Redis's clock), in
short commands, under a lock.

All against a real redis-server; races are driven through the Sweeper's `after_batch` seam, and
clock skew with `faketime` on the sweeping process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_sync
import redis.asyncio as redis_async

from exporter.asynq import model as asynq
from exporter.cleanup.sweep import Sweeper, _not_own, _own_key
from exporter.cleanup.sweep_report import (
    LIST_AT_MOST,
    LOCK_KEY,
    Removed,
    SetSweep,
    SweepFailed,
    SweepReport,
    json_document,
)
from exporter.devtools.redis_server import RedisServer, free_port
from exporter.redisio.connect import connect
from exporter.redisio.health import RedisHealth
from exporter.settings import RedisConfig
from tests.support.helpers import faketime_prefix, redis_now, register_server, wait_until
from tests.support.redis_topologies import ClusterSetup
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
GRACE = 60.0


# ---------------------------------------------------------------- helpers


def snapshot(client: redis_sync.Redis) -> dict[bytes, tuple]:
    """Every key: sorted sets as (member, score) lists, anything else as its DUMP; plus whether
    it has a TTL. Two equal snapshots mean byte-for-byte equal data."""
    out: dict[bytes, tuple] = {}
    for key in client.scan_iter(count=1000):
        has_ttl = client.pttl(key) > 0
        if client.type(key) == b"zset":
            out[key] = ("zset", tuple(client.zrange(key, 0, -1, withscores=True)), has_ttl)
        else:
            out[key] = ("dump", client.dump(key), has_ttl)
    return out


def without(before: dict[bytes, tuple], members: dict[str, set[str]], keys: set[str]) -> dict[bytes, tuple]:
    """`before` with the given members removed from their sets and the given keys deleted."""
    out = {}
    for key, value in before.items():
        if key.decode() in keys:
            continue
        if value[0] == "zset" and key.decode() in members:
            gone = {m.encode() for m in members[key.decode()]}
            pairs = tuple(p for p in value[1] if p[0] not in gone)
            if not pairs:
                continue  # Redis deletes an empty sorted set
            value = ("zset", pairs, value[2])
        out[key] = value
    return out


def add_scheduler(client, host: str, pid: int, ident: str, expires_at: float, entries: int = 2,
                  with_key: bool = True) -> asynq.Member:
    m = asynq.Member("schedulers", host, pid, ident)
    client.zadd(asynq.SCHEDULERS, {m.key: int(expires_at)})
    if with_key:
        entry = asynq.SchedulerEntry(id="e", spec="@every 1m", task_type="t", enqueue_options=(),
                                     next_enqueue_time=None, prev_enqueue_time=None)
        client.rpush(m.key, *[asynq.encode_scheduler_entry(entry)] * entries)
        client.expire(m.key, 600)
    return m


def add_server(client, host: str, pid: int, ident: str, expires_at: float, *, keys: bool = True,
               tasks: int = 0) -> asynq.Member:
    """A server as asynq registers it; per-server keys (if any) get a TTL long enough for the test."""
    m = register_server(client, host, pid, ident, expires_at, with_keys=keys)
    if keys:
        client.expire(m.key, 600)
    if tasks:
        wkey = m.sibling("workers").key
        client.hset(wkey, mapping={f"task-{i}": b"\x0a\x01x" for i in range(tasks)})
        client.expire(wkey, 600)
    return m


def populate(client, now: float) -> dict[str, set[str]]:
    """A fleet with every kind of entry, relative to Redis's `now`; returns what a sweep with
    GRACE within the next second must remove: {"asynq:servers": members..., "keys": per-server keys}."""
    gone: dict[str, set[str]] = {asynq.SERVERS: set(), asynq.WORKERS: set(), asynq.SCHEDULERS: set(), "keys": set()}

    # Must survive: live, expired within the grace, expired 2 s short of the grace.
    add_server(client, "web-1", 1, "11111111-aaaa", now + 10, tasks=2)
    add_server(client, "web-1", 1, "22222222-bbbb", now + 5)
    add_server(client, "web-2", 7, "33333333-cccc", now - 30, tasks=1)
    add_server(client, "web-3", 1, "44444444-dddd", now - GRACE + 2)
    add_scheduler(client, "cron-1", 1, "sched-live", now + 20)
    add_scheduler(client, "cron-2", 1, "sched-recent", now - 10)

    # Must go: expired for longer than the grace, with whatever keys are still there.
    paused = add_server(client, "web-4", 1, "55555555-eeee", now - GRACE - 2, tasks=3)
    old = add_server(client, "web-5", 9, "66666666-ffff", now - 86400, keys=False)
    ipv6 = add_server(client, "fe80::1", 1, "77777777-0000", now - 3600)
    for m in (paused, old, ipv6):
        gone[asynq.SERVERS].add(m.key)
        gone[asynq.WORKERS].add(m.sibling("workers").key)
    gone["keys"] |= {paused.key, paused.sibling("workers").key, ipv6.key}
    orphan = asynq.Member("workers", "web-6", 1, "88888888-1111")  # in asynq:workers only
    client.zadd(asynq.WORKERS, {orphan.key: int(now - 7200)})
    client.hset(orphan.key, "t", b"x")
    gone[asynq.WORKERS].add(orphan.key)
    gone["keys"].add(orphan.key)
    sched = add_scheduler(client, "cron-3", 1, "sched-dead", now - 500)
    sched_nokey = add_scheduler(client, "cron-4", 1, "sched-gone", now - 500, with_key=False)
    gone[asynq.SCHEDULERS] |= {sched.key, sched_nokey.key}
    gone["keys"].add(sched.key)

    # Undecodable members, expired: removed from the set, same-named keys untouched.
    client.zadd(asynq.SERVERS, {"garbage": int(now - 1000)})
    client.set("garbage", "an application's key")
    wrong_set = asynq.Member("workers", "web-7", 1, "99999999-2222").key  # a workers name in servers
    client.zadd(asynq.SERVERS, {wrong_set: int(now - 1000)})
    client.hset(wrong_set, "t", b"x")
    gone[asynq.SERVERS] |= {"garbage", wrong_set}
    # Undecodable but within the grace: stays.
    client.zadd(asynq.SCHEDULERS, {"not-a-scheduler": int(now - 5)})

    # Unrelated keys.
    client.rpush("asynq:{default}:active", "task-0")
    client.zadd("asynq:{default}:lease", {"task-0": now + 30})
    client.set("asynq:servers:{stray:1:not-a-member}", b"\x00\x01")
    client.zadd("asynq:servers:{stray:2:zset}", {"x": 1})
    client.set("other", "value", ex=600)
    return gone


def sweeper(client, **kw) -> Sweeper:
    kw.setdefault("list_members", True)
    return Sweeper(client, RedisHealth("redis://test"), grace=GRACE, **kw)


def removed_members(report) -> dict[str, set[str]]:
    return {s.key: {r.member for r in s.members} for s in report.sets.values()}


def deleted_keys(report) -> set[str]:
    return {k for s in report.sets.values() for k in s.deleted_keys}


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def run_cli(*args: str, clock: str | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a process; `clock` ("+75s") runs it under faketime, its clock shifted."""
    env = {"PATH": "/usr/bin:/bin"}
    prefix: list[str] = []
    if clock is not None:
        prefix, env = faketime_prefix(clock, require_tool("faketime"))
    return subprocess.run([*prefix, sys.executable, "-m", "exporter", "sweep", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)


# ---------------------------------------------------------------- what goes and what stays


async def test_sweep_removes_exactly_the_long_expired_and_leaves_the_rest_byte_for_byte(rdb, ardb):
    now = redis_now(rdb)
    gone = populate(rdb, now)
    before = snapshot(rdb)

    report = await sweeper(ardb).sweep_once()

    assert report.complete and not report.dry_run and report.exit_code() == 0
    expected = {k: v for k, v in gone.items() if k != "keys"}
    assert removed_members(report) == expected
    assert deleted_keys(report) == gone["keys"]
    assert snapshot(rdb) == without(before, expected, gone["keys"])
    servers = report.sets["servers"]
    assert {r.member for r in servers.members if r.undecodable} == {"garbage", asynq.Member("workers", "web-7", 1, "99999999-2222").key}
    assert report.undecodable == 2 and report.came_back == 0
    assert report.removed == sum(len(v) for v in expected.values())
    assert report.keys_deleted == len(gone["keys"])
    assert now <= report.time <= redis_now(rdb), "the report's time is Redis's"
    assert report.cutoff == report.time - GRACE
    assert not await ardb.exists(LOCK_KEY), "the lock is released"

    again = await sweeper(ardb).sweep_once()
    assert again.removed == 0 and again.keys_deleted == 0


async def test_without_listing_the_same_is_removed_and_counted(rdb, ardb):
    """What `serve --sweep-interval` and the human report use: counts, and at most
    LIST_AT_MOST members per set (enough to print), no list of keys."""
    now = redis_now(rdb)
    gone = populate(rdb, now)
    for i in range(LIST_AT_MOST + 5):  # more than the human report lists
        add_scheduler(rdb, "cron-9", i, f"old-{i}", now - 3600, with_key=i % 2 == 0)
    before = snapshot(rdb)

    report = await sweeper(ardb, list_members=False, batch=7).sweep_once()

    expected = {k: set(v) for k, v in gone.items() if k != "keys"}
    keys = set(gone["keys"])
    for i in range(LIST_AT_MOST + 5):
        m = asynq.Member("schedulers", "cron-9", i, f"old-{i}").key
        expected[asynq.SCHEDULERS].add(m)
        if i % 2 == 0:
            keys.add(m)
    assert snapshot(rdb) == without(before, expected, keys)
    assert {s.key: s.removed for s in report.sets.values()} == {k: len(v) for k, v in expected.items()}
    assert report.keys_deleted == len(keys) and report.undecodable == 2
    assert all(not s.deleted_keys for s in report.sets.values())
    servers, schedulers = report.sets["servers"], report.sets["schedulers"]
    assert {r.member for r in servers.members} == expected[asynq.SERVERS], "a few: all listed, with scores"
    assert all(r.score < report.cutoff for r in servers.members)
    assert len(schedulers.members) == LIST_AT_MOST and schedulers.removed == LIST_AT_MOST + 7


def test_fast_ownership_check_agrees_with_the_parser():
    """The batch check of member names accepts exactly what asynq.parse_member accepts."""
    names = [b"asynq:servers:{h:1:x}", b"asynq:servers:{::1:1:x}", b"asynq:servers:{h:1:2:x}",
             b"asynq:servers:{:1:x}", b"asynq:servers:{h: 1:x}", b"asynq:servers:{h:+1:x}",
             b"asynq:servers:{h:1:x}\n", b"asynq:servers:{h:1:a}b}", b"asynq:servers:{h\n:1:x}",
             b"asynq:servers:{h:1:}", b"asynq:servers:{h:x:y}", b"asynq:servers:{h1x}", b"garbage",
             b"asynq:workers:{h:1:x}", b"asynq:servers:{h:\xd9\xa1:x}", "asynq:servers:{h:\u0661:x}".encode(),
             b"asynq:servers:{h:1:x}}", b"\xff\xfe"]
    for set_name in asynq.SETS:
        expected = {n for n in names if not _own_key(set_name, n)}
        assert _not_own(set_name, names) == expected, set_name
    assert asynq.Member("servers", "h", 1, "x").key.encode() not in _not_own("servers", names)


async def test_grace_zero_removes_everything_expired_before_now(rdb, ardb):
    now = redis_now(rdb)
    populate(rdb, now)
    report = await Sweeper(ardb, RedisHealth("redis://test"), grace=0).sweep_once()
    for key in asynq.SETS.values():
        assert rdb.zcount(key, "-inf", f"({report.time}") == 0
    assert report.sets["servers"].removed  # web-2 (30 s ago) and web-3 (58 s ago) went too
    assert rdb.zscore(asynq.SERVERS, asynq.server_member("web-2", 7, "33333333-cccc").key) is None
    assert rdb.zscore(asynq.SERVERS, asynq.server_member("web-1", 1, "11111111-aaaa").key) == int(now + 10)


async def test_dry_run_changes_nothing_sends_no_write_and_reports_what_would_go(rdb, ardb):
    now = redis_now(rdb)
    gone = populate(rdb, now)
    rdb.set(LOCK_KEY, "another-sweeper", px=60_000)  # a dry run takes no lock, so it is not blocked
    before = snapshot(rdb)
    rdb.config_resetstat()

    report = await sweeper(ardb, dry_run=True, batch=3).sweep_once()
    counted = await sweeper(ardb, dry_run=True, batch=3, list_members=False).sweep_once()

    commands = {name.removeprefix("cmdstat_") for name in rdb.info("commandstats")}
    assert snapshot(rdb) == before
    assert commands <= {"time", "zrange", "exists", "hello", "client|setinfo", "client|setname",
                        "config|resetstat", "info", "scan", "pttl", "type", "dump"}, commands
    assert report.dry_run and not report.lock_busy and report.complete
    assert removed_members(report) == {k: v for k, v in gone.items() if k != "keys"}
    assert deleted_keys(report) == gone["keys"]
    assert report.undecodable == 2
    assert (counted.removed, counted.keys_deleted, counted.undecodable) == (
        report.removed, report.keys_deleted, report.undecodable)


# ---------------------------------------------------------------- clock skew


@pytest.fixture
def beating(redis_url, rdb):
    """A live emulated asynq server, beating every second as its own process (real clock)."""
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "emulate", "--redis-url", redis_url,
                             "--host", "live-host", "--pid", "4242", "--server-id", "live-id",
                             "--heartbeat", "1"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    member = asynq.server_member("live-host", 4242, "live-id")
    try:
        wait_until(lambda: rdb.zscore(asynq.SERVERS, member.key) and rdb.exists(member.key),
                   timeout=10, what="the emulated server registered")
        yield member
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("offset", ["+75s", "-75s"])
def test_a_skewed_sweeper_goes_by_redis_clock(rdb, redis_url, beating, offset):
    """A sweeping machine 75 s ahead never removes a live registration nor one expired within the
    grace; one 75 s behind still removes what is expired for longer than the grace."""
    now = redis_now(rdb)
    recent = add_server(rdb, "web", 1, "expired-30s-ago", now - 30)  # within the grace
    old = add_server(rdb, "web", 2, "expired-70s-ago", now - 70)  # past it
    live_scores = []

    for _ in range(3):  # while the live server beats
        proc = run_cli("--redis-url", redis_url, "--json", clock=offset)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        removed = {m["member"] for s in doc["sets"].values() for m in s["members"]}
        assert beating.key not in removed and beating.sibling("workers").key not in removed
        assert recent.key not in removed
        live_scores.append(rdb.zscore(asynq.SERVERS, beating.key))
        assert rdb.exists(beating.key)
        assert abs(doc["time"] - redis_now(rdb)) < 5, "the report's time is Redis's, not the skewed clock"
    assert all(score is not None for score in live_scores)
    assert rdb.zscore(asynq.SERVERS, recent.key) is not None and rdb.exists(recent.key)
    assert rdb.zscore(asynq.SERVERS, old.key) is None and not rdb.exists(old.key)
    assert rdb.zscore(asynq.WORKERS, old.sibling("workers").key) is None


# ---------------------------------------------------------------- races


async def test_a_member_that_beats_again_before_its_batch_survives(rdb, ardb):
    now = redis_now(rdb)
    dead = add_server(rdb, "web-9", 1, "aaaaaaaa-dead", now - 7200)
    back = add_server(rdb, "web-8", 1, "bbbbbbbb-back", now - 3600)  # next batch: a higher score
    batches: list[tuple[str, list[bytes]]] = []

    async def beat_again(set_name: str, members: list[bytes]) -> None:
        batches.append((set_name, members))
        if len(batches) == 1:  # the paused server resumes: heartbeat as asynq does it
            await ardb.zadd(asynq.SERVERS, {back.key: int(now + 10)})
            await ardb.zadd(asynq.WORKERS, {back.sibling("workers").key: int(now + 10)})
            await ardb.set(back.key, b"fresh", ex=600)

    report = await sweeper(ardb, batch=1, after_batch=beat_again).sweep_once()

    assert batches[0] == ("servers", [dead.key.encode()]), "one batch had been removed when it beat"
    assert rdb.zscore(asynq.SERVERS, back.key) == int(now + 10)
    assert rdb.zscore(asynq.WORKERS, back.sibling("workers").key) == int(now + 10)
    assert rdb.get(back.key) == b"fresh"
    assert {r.member for r in report.sets["servers"].members} == {dead.key}
    assert rdb.zscore(asynq.SERVERS, dead.key) is None and not rdb.exists(dead.key)


async def test_two_concurrent_sweeps_one_runs_the_other_reports_busy(rdb, ardb, redis_url):
    now = redis_now(rdb)
    gone = populate(rdb, now)
    inside, release = asyncio.Event(), asyncio.Event()

    async def hold(set_name: str, members: list[bytes]) -> None:
        inside.set()
        await release.wait()

    first = asyncio.create_task(sweeper(ardb, after_batch=hold).sweep_once())
    await asyncio.wait_for(inside.wait(), 5)
    holder = rdb.get(LOCK_KEY)
    other = redis_async.Redis.from_url(redis_url)
    try:
        before = snapshot(rdb)
        busy = await sweeper(other).sweep_once()
        assert snapshot(rdb) == before, "the busy sweep changed nothing"
    finally:
        await other.aclose()
    assert busy.lock_busy and not busy.complete and busy.removed == 0 and busy.exit_code() == 0
    assert busy.lock_holder == holder.decode()

    release.set()
    done = await asyncio.wait_for(first, 10)
    assert not done.lock_busy and removed_members(done) == {k: v for k, v in gone.items() if k != "keys"}
    assert not rdb.exists(LOCK_KEY)


async def test_a_long_sweep_refreshes_its_lock(rdb, ardb):
    now = redis_now(rdb)
    for i in range(5):
        add_server(rdb, "web", i, f"id-{i}", now - 3600, keys=False)
    mono = FakeMonotonic()
    ttls: list[int] = []

    async def slow(set_name: str, members: list[bytes]) -> None:
        ttls.append(await ardb.pttl(LOCK_KEY))
        await ardb.pexpire(LOCK_KEY, 2000)  # as if most of its TTL had gone by
        mono.t += 11  # more than a third of the 30 s TTL

    report = await sweeper(ardb, batch=2, monotonic=mono, lock_ttl=30, after_batch=slow).sweep_once()

    assert report.complete and report.removed == 10
    assert len(ttls) >= 3
    assert all(ttl > 20_000 for ttl in ttls[1:]), f"refreshed to 30 s before each later batch: {ttls}"


async def test_a_lost_lock_stops_the_sweep_and_leaves_the_new_holder_alone(rdb, ardb):
    now = redis_now(rdb)
    for i in range(5):
        add_server(rdb, "web", i, f"id-{i}", now - 3600)
    mono = FakeMonotonic()

    async def stolen(set_name: str, members: list[bytes]) -> None:
        await ardb.set(LOCK_KEY, "someone-else", px=60_000)  # ours expired; another took it
        mono.t += 11

    report = await sweeper(ardb, batch=2, monotonic=mono, after_batch=stolen).sweep_once()

    assert report.lock_lost and not report.complete and report.exit_code() == 1
    assert report.removed == 2, "only the batch removed before the lock was lost"
    assert report.keys_deleted == 2, "whose keys are deleted all the same"
    assert rdb.zcard(asynq.SERVERS) == 3 and rdb.zcard(asynq.WORKERS) == 5
    assert rdb.get(LOCK_KEY) == b"someone-else"


async def test_redis_failure_raises_with_what_was_done(ardb):
    port = free_port()
    dead = redis_async.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5)
    health = RedisHealth("redis://down")
    try:
        with pytest.raises(SweepFailed) as e:
            await Sweeper(dead, health, grace=GRACE).sweep_once()
    finally:
        await dead.aclose()
    assert e.value.report.error and e.value.report.removed == 0 and e.value.report.exit_code() == 2
    assert health.up is False and health.errors >= 1


# ---------------------------------------------------------------- short commands


def test_thousands_in_batches_with_no_command_over_10ms():
    with RedisServer() as server:
        client = redis_sync.Redis.from_url(server.url)
        try:
            now = redis_now(client)
            pipe = client.pipeline(transaction=False)
            for i in range(4000):
                m = asynq.server_member(f"pod-{i % 50}", 1, f"{i:08d}-dead")
                pipe.zadd(asynq.SERVERS, {m.key: int(now - 120 - i)})
                pipe.zadd(asynq.WORKERS, {m.sibling("workers").key: int(now - 120 - i)})
                if i % 2:
                    pipe.set(m.key, b"info", ex=600)
                    pipe.hset(m.sibling("workers").key, "t", b"x")
            for i in range(1000):
                pipe.zadd(asynq.SCHEDULERS, {asynq.Member("schedulers", "cron", i, "s").key: int(now - 500)})
                pipe.rpush(asynq.Member("schedulers", "cron", i, "s").key, b"entry")
            for i in range(100):
                pipe.zadd(asynq.SERVERS, {asynq.server_member("live", i, "x").key: int(now + 10)})
            pipe.execute()

            client.config_set("slowlog-log-slower-than", 10_000)
            client.slowlog_reset()
            # The check can see a slow command: a script that spins for 15 ms is logged.
            client.eval("local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] "
                        "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > 15000 return 1", 0)
            assert client.slowlog_len() == 1
            client.slowlog_reset()

            async def sweep():
                aclient = redis_async.Redis.from_url(server.url)
                try:
                    return await Sweeper(aclient, RedisHealth(server.url), grace=GRACE).sweep_once()
                finally:
                    await aclient.aclose()

            report = asyncio.run(sweep())

            slow = client.slowlog_get(128)
            assert slow == [], [(e["duration"], e["command"][:80]) for e in slow]
            assert report.complete
            assert [s.removed for s in report.sets.values()] == [4000, 4000, 1000]
            assert report.keys_deleted == 2000 + 2000 + 1000
            assert report.batches >= 9000 // 500
            assert client.zcard(asynq.SERVERS) == 100 and client.zcard(asynq.WORKERS) == 0
            assert client.zcard(asynq.SCHEDULERS) == 0
            assert client.dbsize() == 1  # asynq:servers with the 100 live members
        finally:
            client.close()


def test_a_redis_cluster_sweep_removes_members_and_keys_across_slots():
    """On a Cluster the sets and the per-server keys are on different nodes: every command the
    sweep sends must stay within one slot (CROSSSLOT otherwise), counting and listing alike."""
    setup = ClusterSetup(require_tool("redis-cli")).start()
    client = setup.client()
    try:
        with redis_sync.Redis(port=setup.nodes[0].port) as node:
            now = redis_now(node)
        live = [add_server(client, "live", i, f"live-{i}", now + 10, tasks=1) for i in range(3)]

        async def sweep(list_members: bool):
            redis = connect(RedisConfig(url=setup.url, timeout=2.0, cluster=True))
            try:
                return await Sweeper(redis, RedisHealth(setup.url), grace=GRACE, batch=7,
                                     list_members=list_members).sweep_once()
            finally:
                await redis.aclose()

        for list_members in (False, True):
            dead = [add_server(client, f"dead-{list_members}", i, f"id-{i}", now - 3600, tasks=1)
                    for i in range(20)]
            keys = {k for m in dead for k in (m.key, m.sibling("workers").key)}
            report = asyncio.run(sweep(list_members))
            assert report.complete and report.sets["servers"].removed == report.sets["workers"].removed == 20
            assert report.keys_deleted == 40
            if list_members:
                assert deleted_keys(report) == keys
            assert not any(client.exists(k) for k in keys)
            assert all(client.zscore(asynq.SERVERS, m.key) is None for m in dead)
        assert all(client.zscore(asynq.SERVERS, m.key) is not None and client.exists(m.key) for m in live)
    finally:
        client.close()
        setup.close()


# ---------------------------------------------------------------- the command


def test_cli_json_is_one_document_and_exit_0(rdb, redis_url):
    now = time.time()
    dead = add_server(rdb, "web", 1, "dead-id", now - 3600)
    live = add_server(rdb, "web", 2, "live-id", now + 10)

    proc = run_cli("--redis-url", redis_url, "--json")

    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["removed"] == 2 and doc["keys_deleted"] == 1 and doc["complete"] and not doc["dry_run"]
    assert [m["member"] for m in doc["sets"]["servers"]["members"]] == [dead.key]
    assert doc["sets"]["servers"]["deleted_keys"] == [dead.key]
    assert [m["member"] for m in doc["sets"]["workers"]["members"]] == [dead.sibling("workers").key]
    assert doc["grace"] == 60.0
    assert rdb.zrange(asynq.SERVERS, 0, -1) == [live.key.encode()]


def test_the_json_document_is_what_json_dumps_writes():
    """--json is written by json_document (fast for long lists): the same text as json.dumps."""
    sets = {name: SetSweep(name, key) for name, key in asynq.SETS.items()}
    sets["servers"].members = [Removed(m, score, bad) for m, score, bad in [
        ('a"b\\c\n\x01é中\ud800', 1.5, True), ("x", 1e20, False), ("y", -3.0, False),
        ("z", float("-inf"), False), ("n", float("nan"), False), ("i", float("inf"), True)]]
    sets["servers"].deleted_keys = ['k"1', "ключ"]
    sets["schedulers"].deleted_keys = ["s"]
    sets["workers"].members = [Removed("w", 1700000000.0, False)]
    for report in (SweepReport("redis://x", 1.0, 60.0, -59.0, False, sets),
                   SweepReport("redis://x", 1.0, 60.0, -59.0, True, {n: SetSweep(n, k) for n, k in asynq.SETS.items()},
                               error="ConnectionError: down")):
        doc = report.to_json()
        assert json_document(doc) == json.dumps(doc, indent=2, sort_keys=True)


def test_cli_human_output_lists_a_few_members(rdb, redis_url):
    now = time.time()
    dead = add_server(rdb, "web", 1, "dead-id", now - 3600)
    proc = run_cli("--redis-url", redis_url, "--grace", "10")
    assert proc.returncode == 0, proc.stderr
    assert dead.key in proc.stdout and "Removed 2 registration(s) and 1 per-server key(s)" in proc.stdout


def test_cli_dry_run_changes_nothing(rdb, redis_url):
    now = time.time()
    dead = add_server(rdb, "web", 1, "dead-id", now - 3600)
    before = snapshot(rdb)
    proc = run_cli("--redis-url", redis_url, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["dry_run"] and doc["removed"] == 2
    assert [m["member"] for m in doc["sets"]["servers"]["members"]] == [dead.key]
    assert snapshot(rdb) == before
    human = run_cli("--redis-url", redis_url, "--dry-run")
    assert human.returncode == 0 and "Dry run, nothing was changed" in human.stdout
    assert "Would remove 2 registration(s)" in human.stdout
    assert snapshot(rdb) == before


def test_cli_lock_busy_exits_0_having_done_nothing(rdb, redis_url):
    add_server(rdb, "web", 1, "dead-id", time.time() - 3600)
    rdb.set(LOCK_KEY, "other-host:1:token", px=60_000)
    before = snapshot(rdb)

    proc = run_cli("--redis-url", redis_url, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["lock_busy"] and doc["lock_holder"] == "other-host:1:token" and doc["removed"] == 0
    human = run_cli("--redis-url", redis_url)
    assert human.returncode == 0 and "nothing was done" in human.stdout
    assert snapshot(rdb) == before


def test_cli_unreachable_redis_exits_2_with_masked_url():
    port = free_port()
    proc = run_cli("--redis-url", f"redis://user:hunter2@127.0.0.1:{port}/0", "--redis-timeout", "0.5")
    assert proc.returncode == 2
    assert f"redis://user:***@127.0.0.1:{port}/0" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    as_json = run_cli("--redis-url", f"redis://127.0.0.1:{port}/0", "--redis-timeout", "0.5", "--json")
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["error"]


def test_cli_rejects_a_batch_out_of_range():
    proc = run_cli("--sweep-batch", "0")
    assert proc.returncode == 2
    assert "--sweep-batch: invalid value '0': expected a whole number from 1 to 1000" in proc.stderr
    assert "ASYNQ_SIDECAR_SWEEP_BATCH; default 500]" in " ".join(run_cli("--help").stdout.split())
