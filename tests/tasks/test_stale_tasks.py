"""Stale tasks against a real Redis, with asynq's keys written as asynq v0.26 writes them (the
emulator's --leases: asynq:queues, the active list, the lease, the task hash, the workers hash of
WorkerInfo): the per-queue gauges, a proven death's leases handed to asynq's recoverer (and only
a proven one), orphan repair by the details leader and by `sweep --repair-tasks`, and `audit`."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.asynq import model as asynq
from exporter.cli import configs
from exporter.cli import main as cli
from exporter.cli.options import SERVE_OPTIONS, ConfigError, resolve
from exporter.devtools.emulator import Emulator, task_key
from exporter.lifecycle.tracker import Disconnected, Exited, Hello, State
from exporter.metrics.registrations import new_collector_registry
from exporter.redisio.health import RedisHealth
from exporter.server.sidecar import Sidecar
from exporter.settings import CleanupConfig, EmulatorConfig, SocketConfig
from exporter.tasks import reader as tasks
from exporter.tasks import recovery as taskrecovery
from tests.support.helpers import Watched, eventually, redis_now, scrape, value

HOST = socket.gethostname()  # a worker shares its pod's host name with the sidecar
DEFAULT, CRITICAL = "default", "critical"


def emulated(ardb, pid: int, server_id: str, n: int, queues=(DEFAULT,)) -> Emulator:
    """A server with `n` tasks in flight, leased as asynq's dequeue leaves them; it beats only
    when told (no background task), so what it wrote stays as written."""
    return Emulator(ardb, EmulatorConfig(HOST, pid, server_id, tasks=n, leases=True, concurrency=max(10, n),
                                         queues={q: 1 for q in queues}, heartbeat=3600, drain=0.0))


def leases(rdb, queue: str = DEFAULT) -> dict[str, float]:
    return {k.decode(): s for k, s in rdb.zrange(tasks.lease_key(queue), 0, -1, withscores=True)}


def active(rdb, queue: str = DEFAULT) -> list[str]:
    return [i.decode() for i in rdb.lrange(tasks.active_key(queue), 0, -1)]


def orphan(rdb, task_id: str, queue: str = DEFAULT) -> None:
    """An active task with no lease entry, in no workers hash (asynq #1144)."""
    rdb.sadd(tasks.QUEUES, queue)
    rdb.hset(task_key(queue, task_id), "state", "active")
    rdb.lpush(tasks.active_key(queue), task_id)


def metric(sc: Sidecar, name: str, **labels: str) -> float:
    v = sc.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def running(sc: Sidecar, conn: int) -> bool:
    w = sc.tracker.workers.get(conn)
    return w is not None and w.state is State.RUNNING


def gone(rdb, m: asynq.Member) -> bool:
    return rdb.zscore(asynq.SERVERS, m.key) is None and not rdb.exists(m.sibling("workers").key)


def untouched_task_state(rdb, queue: str = DEFAULT) -> tuple:
    """What only asynq may change: pending, retry, archived, and every task hash's state."""
    hashes = sorted(rdb.scan_iter(match=f"asynq:{{{queue}}}:t:*"))
    return (rdb.lrange(f"asynq:{{{queue}}}:pending", 0, -1), rdb.zrange(f"asynq:{{{queue}}}:retry", 0, -1),
            rdb.zrange(f"asynq:{{{queue}}}:archived", 0, -1), [(h, rdb.hgetall(h)) for h in hashes])


# ---------------------------------------------------------------- the gauges


async def test_per_queue_gauges_on_metrics(rdb, ardb, make_config):
    live = emulated(ardb, 2, "live", 2)
    await live.start()
    now = redis_now(rdb)
    rdb.sadd(tasks.QUEUES, CRITICAL)  # a queue with nothing in flight
    rdb.lpush(tasks.active_key(DEFAULT), "expired-1")  # its server died 50 s ago
    rdb.zadd(tasks.lease_key(DEFAULT), {"expired-1": int(now) - 50})
    orphan(rdb, "orphan-1")
    # A live server's task whose lease entry is gone: the server lists it, so it is no orphan.
    rdb.zrem(tasks.lease_key(DEFAULT), live.tasks[0].task_id)
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: sc.watcher.latest and sc.watcher.latest.orphaned is not None,
                         what="a details read with tasks")
        text = await scrape(sc.http_url)
    assert value(text, "asynq_queue_active_tasks", queue=DEFAULT) == 4
    assert value(text, "asynq_queue_lease_expired_tasks", queue=DEFAULT) == 1
    assert value(text, "asynq_queue_oldest_lease_expired_seconds", queue=DEFAULT) == pytest.approx(50, abs=3)
    assert value(text, "asynq_queue_orphaned_tasks", queue=DEFAULT) == 1
    for name in ("active_tasks", "lease_expired_tasks", "oldest_lease_expired_seconds", "orphaned_tasks"):
        assert value(text, f"asynq_queue_{name}", queue=CRITICAL) == 0


async def test_the_fleets_other_sidecars_export_the_leaders_orphan_count(rdb, make_config, tmp_path_factory):
    orphan(rdb, "orphan-1")
    orphan(rdb, "orphan-2")
    other = str(tmp_path_factory.mktemp("o", numbered=True) / "l.sock")
    watched = {"first": Watched(), "second": Watched()}
    async with Sidecar(make_config(), hooks=watched["first"].hooks) as first, \
            Sidecar(make_config(socket=SocketConfig(path=other)), hooks=watched["second"].hooks) as second:
        for sc in (first, second):
            await eventually(lambda: sc.watcher.latest and sc.watcher.latest.orphaned, what="orphans read")
        assert first.watcher.leader != second.watcher.leader
        follower = "second" if first.watcher.leader else "first"
        assert watched[follower].full_reads == 0  # it read the leader's aggregate, not the queues
        for sc in (first, second):
            assert value(await scrape(sc.http_url), "asynq_queue_orphaned_tasks", queue=DEFAULT) == 2


# ---------------------------------------------------------------- a proven death


@pytest.mark.parametrize("mode", ["on", "dry-run", "off"])
async def test_a_proven_death_hands_its_tasks_to_asynqs_recoverer_only_when_on(rdb, ardb, make_config, mode):
    async with Sidecar(make_config(cleanup=CleanupConfig(recover_tasks=mode))) as sc:
        conn = sc.new_conn_id()
        sc.submit(Hello(conn, pid=1, host=HOST, server_id="dead", started_at=time.time()))
        dead, live = emulated(ardb, 1, "dead", 3), emulated(ardb, 2, "live", 2)
        await dead.start()
        await live.start()
        await eventually(lambda: running(sc, conn), what="the worker running")
        dead_ids = {t.task_id for t in dead.tasks}
        before, in_flight, state = leases(rdb), active(rdb), untouched_task_state(rdb)
        exited_at = redis_now(rdb)
        sc.submit(Exited(conn, signal="SIGKILL"))  # the launcher's report after waitpid: proof
        await eventually(lambda: gone(rdb, dead.server_member) and sc.cleanup.idle, what="the cleanup")
        after = leases(rdb)
        now = redis_now(rdb)  # the recovery came between the exit and this
        recovered = metric(sc, "asynq_sidecar_tasks_recovered_total", reason="worker_death")
        would = metric(sc, "asynq_sidecar_tasks_would_recover_total", reason="worker_death")
    if mode == "on":
        assert recovered == 3 and would == 0
        # The script wrote Redis's TIME (whole seconds) less EXPIRE_BACK, at some moment in between.
        assert all(int(exited_at) - tasks.EXPIRE_BACK <= after[i] <= now - tasks.EXPIRE_BACK for i in dead_ids), (
            exited_at, now, after)
        assert all(after[i] < now - tasks.RECOVERER_SKEW for i in dead_ids)  # the next recoverer run takes them
    else:
        assert recovered == 0 and would == (3 if mode == "dry-run" else 0)
        assert {i: after[i] for i in dead_ids} == {i: before[i] for i in dead_ids}
    # The live server's tasks are never touched; nothing is moved: asynq's recoverer does that.
    assert {i: after[i] for i in before if i not in dead_ids} == {i: before[i] for i in before if i not in dead_ids}
    assert active(rdb) == in_flight
    assert untouched_task_state(rdb) == state


@pytest.mark.parametrize("doubt", ["host-pids shared, no server id", "lost connection"])
async def test_a_doubtful_death_never_touches_tasks(rdb, ardb, make_config, doubt):
    """The registration goes once expired, as the removal rule says, but with its workers hash
    still readable (10 s TTL) nothing of its tasks is touched: the worker's death is not proven."""
    cfg = make_config(cleanup=CleanupConfig(recover_tasks="on", settle=0.2, host_pids_unique=False))
    async with Sidecar(cfg) as sc:
        conn = sc.new_conn_id()
        reported = "dead" if doubt == "lost connection" else None
        sc.submit(Hello(conn, pid=1, host=HOST, server_id=reported, started_at=time.time() - 1))
        dead = emulated(ardb, 1, "dead", 3)
        await dead.start()
        await eventually(lambda: running(sc, conn), what="the worker running")
        before, state = leases(rdb), untouched_task_state(rdb)
        expired = int(redis_now(rdb)) - 1  # its last beat is past: removable once settled
        rdb.zadd(asynq.SERVERS, {dead.server_member.key: expired})
        rdb.zadd(asynq.WORKERS, {dead.workers_member.key: expired})
        sc.submit(Disconnected(conn) if doubt == "lost connection" else Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone(rdb, dead.server_member) and sc.cleanup.idle, what="the removal")
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1
        assert metric(sc, "asynq_sidecar_tasks_recovered_total", reason="worker_death") == 0
        assert metric(sc, "asynq_sidecar_tasks_would_recover_total", reason="worker_death") == 0
    assert leases(rdb) == before
    assert untouched_task_state(rdb) == state


async def test_a_task_that_moved_since_the_last_beat_is_skipped(rdb, ardb):
    """Each expiry is conditional in one script: the task is still active and its lease score is
    still the one read (a live server's beat since, or a new dequeue, moves it)."""
    recovery = taskrecovery.TaskRecovery(ardb, RedisHealth("test"), "on", registry=new_collector_registry())
    dead = emulated(ardb, 1, "dead", 3)
    await dead.start()
    found = await recovery.last_beat_tasks(dead.workers_member)
    assert sorted(t.id for t in found) == sorted(t.task_id for t in dead.tasks)
    extended, finished, stale = found
    rdb.zadd(tasks.lease_key(DEFAULT), {extended.id: extended.lease + 5})  # beaten by a live server
    rdb.lrem(tasks.active_key(DEFAULT), 0, finished.id)  # no longer active
    assert await recovery.worker_died(found, "a test worker") == 1
    now = redis_now(rdb)
    after = leases(rdb)
    assert after[extended.id] == extended.lease + 5
    assert after[finished.id] == finished.lease
    assert after[stale.id] <= now - tasks.EXPIRE_BACK
    assert recovery.metrics.recovered.labels(reason="worker_death")._value.get() == 1


# ---------------------------------------------------------------- orphans, by the details leader


@pytest.mark.parametrize("mode", ["on", "dry-run"])
async def test_the_details_leader_repairs_an_orphan_seen_twice_apart(rdb, ardb, make_config, mode):
    live = emulated(ardb, 2, "live", 1)
    await live.start()
    listed = live.tasks[0].task_id
    rdb.zrem(tasks.lease_key(DEFAULT), listed)  # no lease, but a live server runs it
    state = untouched_task_state(rdb)
    watched = Watched()
    async with Sidecar(make_config(cleanup=CleanupConfig(recover_tasks=mode), watch_interval=0.05),
                       hooks=watched.hooks) as sc:
        sc.task_recovery.orphan_confirm_after = 0.5
        counter = "asynq_sidecar_tasks_recovered_total" if mode == "on" else "asynq_sidecar_tasks_would_recover_total"
        orphan(rdb, "orphan-1")
        made_at = time.monotonic()
        await eventually(lambda: metric(sc, counter, reason="orphan") == 1, what="the repair")
        assert time.monotonic() - made_at >= 0.5
        reads = watched.full_reads
        await eventually(lambda: watched.full_reads >= reads + 3, what="three more reads")
        assert metric(sc, counter, reason="orphan") == 1  # once, whatever the number of reads
        orphaned = sc.watcher.latest.orphaned
    lease = leases(rdb).get("orphan-1")
    if mode == "on":
        assert lease is not None and lease <= redis_now(rdb) - tasks.EXPIRE_BACK
        assert orphaned == {DEFAULT: 0}
    else:
        assert lease is None and orphaned == {DEFAULT: 1}
    assert listed not in leases(rdb)  # the live server's task: never given a lease
    assert "orphan-1" in active(rdb)
    assert untouched_task_state(rdb)[:3] == state[:3]


# ---------------------------------------------------------------- sweep --repair-tasks and audit


@pytest.mark.parametrize("flags", [["--repair-tasks"], ["--repair-tasks", "--dry-run"], []])
def test_sweep_repair_tasks(rdb, redis_url, capsys, monkeypatch, keep_logging, flags):
    monkeypatch.setattr(taskrecovery, "ORPHAN_CONFIRM_AFTER", 0.3)
    orphan(rdb, "orphan-1")
    orphan(rdb, "orphan-2", queue=CRITICAL)
    started = time.monotonic()
    assert cli.main(["sweep", "--redis-url", redis_url, "--json", *flags]) == 0
    doc = json.loads(capsys.readouterr().out)
    repaired = {q: sorted(leases(rdb, q)) for q in (DEFAULT, CRITICAL)}
    if not flags:  # without --repair-tasks a sweep never touches tasks
        assert "tasks" not in doc and repaired == {DEFAULT: [], CRITICAL: []}
        return
    assert time.monotonic() - started >= 0.3  # two looks, apart
    assert doc["tasks"]["repaired"] == 2
    assert doc["tasks"]["queues"] == {DEFAULT: ["orphan-1"], CRITICAL: ["orphan-2"]}
    if "--dry-run" in flags:
        assert repaired == {DEFAULT: [], CRITICAL: []}
    else:
        assert repaired == {DEFAULT: ["orphan-1"], CRITICAL: ["orphan-2"]}
        assert leases(rdb)["orphan-1"] <= redis_now(rdb) - tasks.EXPIRE_BACK


def start_emulated(url: str, pid: int, server_id: str, n: int) -> Emulator:
    """`emulated(...).start()` from synchronous code (a test that runs a command's asyncio.run)."""
    import redis.asyncio as redis_async

    async def start() -> Emulator:
        client = redis_async.Redis.from_url(url)
        try:
            emulator = emulated(client, pid, server_id, n)
            await emulator.start()
            return emulator
        finally:
            await client.aclose()

    return asyncio.run(start())


def test_audit_lists_stale_tasks(rdb, redis_url, capsys, keep_logging):
    live = start_emulated(redis_url, 2, "live", 1)
    rdb.lpush(tasks.active_key(DEFAULT), "expired-1")
    rdb.zadd(tasks.lease_key(DEFAULT), {"expired-1": int(redis_now(rdb)) - 50})
    orphan(rdb, "orphan-1")
    assert cli.main(["audit", "--redis-url", redis_url]) == 0  # registrations all live
    text = capsys.readouterr().out
    assert f"{DEFAULT}  active 3, lease expired 1, orphaned 1" in text
    assert "lease expired 5" in text and "expired-1" in text
    assert "orphaned: orphan-1" in text
    assert live.tasks[0].task_id not in text  # a live task is not stale
    assert cli.main(["audit", "--redis-url", redis_url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["tasks"][DEFAULT]
    assert doc["active"] == 3 and doc["lease_expired"] == 1 and doc["orphaned_tasks"] == ["orphan-1"]
    assert [t["id"] for t in doc["lease_expired_tasks"]] == ["expired-1"]


# ---------------------------------------------------------------- the flag


def test_recover_tasks_is_dry_run_by_default_and_names_itself_when_wrong():
    parser = cli.build_parser("serve")
    assert configs.serve_config(resolve(parser.parse_args(["serve"]), SERVE_OPTIONS, environ={})
                                   ).cleanup.recover_tasks == "dry-run"
    on = resolve(parser.parse_args(["serve"]), SERVE_OPTIONS, environ={"ASYNQ_SIDECAR_RECOVER_TASKS": "on"})
    assert configs.serve_config(on).cleanup.recover_tasks == "on"
    with pytest.raises(ConfigError, match=r"--recover-tasks: invalid value 'yes': expected one of off, dry-run, on"):
        resolve(parser.parse_args(["serve", "--recover-tasks", "yes"]), SERVE_OPTIONS, environ={})


# ---------------------------------------------------------------- an ACL without the queue keys


@pytest.fixture
def registrations_only_url(rdb, redis_url):
    """A user granted only the registration keys (the ACL rule before tasks were measured)."""
    user, password = "registrations-only", "pw-registrations-only"
    rdb.execute_command("ACL", "SETUSER", user, "reset", "on", "resetkeys", "~asynq:servers*",
                        "~asynq:workers*", "~asynq:schedulers*", "~asynq-sidecar:*", "resetchannels",
                        "-@all", "+@read", "+@write", "+@scripting", "+@connection", "-@dangerous",
                        "+time", f">{password}")
    yield redis_url.replace("redis://", f"redis://{user}:{password}@")
    rdb.execute_command("ACL", "DELUSER", user)


async def test_an_acl_without_the_queue_keys_keeps_the_registry_metrics_and_cleanup(
        rdb, ardb, make_config, registrations_only_url, caplog):
    from exporter.settings import RedisConfig

    orphan(rdb, "orphan-1")
    cfg = make_config(redis=RedisConfig(url=registrations_only_url, timeout=1.0),
                      cleanup=CleanupConfig(recover_tasks="on"))
    async with Sidecar(cfg) as sc:
        conn = sc.new_conn_id()
        sc.submit(Hello(conn, pid=1, host=HOST, server_id="dead", started_at=time.time()))
        dead = emulated(ardb, 1, "dead", 2)
        await dead.start()
        await eventually(lambda: running(sc, conn), what="the worker running")
        before = leases(rdb)
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone(rdb, dead.server_member) and sc.cleanup.idle, what="the cleanup")
        text = await scrape(sc.http_url)
        assert sc.watcher.latest is not None and sc.watcher.latest.orphaned is None
    assert value(text, "asynq_sidecar_redis_up") == 1
    assert value(text, "asynq_registry_entries", set="servers", state="live") == 0
    assert value(text, "asynq_registry_concurrency") == 0
    assert "asynq_queue_" not in text
    assert leases(rdb) == before
    assert "Redis refused to read a dead worker's tasks" in caplog.text
    assert "cannot read asynq's queues" in caplog.text


async def test_audit_with_an_acl_without_the_queue_keys_still_lists_registrations(
        ardb, registrations_only_url):
    import redis.asyncio as redis_async

    from exporter.registrations.audit import read_report

    await emulated(ardb, 1, "live", 1).start()
    client = redis_async.Redis.from_url(registrations_only_url)
    try:
        report = await read_report(client)
    finally:
        await client.aclose()
    assert report.counts()["servers"] == {"live": 1, "expired": 0}
    assert report.tasks == {} and "no permissions" in (report.tasks_refused or "")


# ---------------------------------------------------------------- WorkerInfo's queue, without protobuf


@given(queue=st.text(max_size=40), task_id=st.text(max_size=40), payload=st.binary(max_size=64),
       start=st.one_of(st.none(), st.floats(min_value=0, max_value=4e9)))
@settings(max_examples=100, deadline=None)
def test_worker_queue_reads_what_asynq_encodes(queue, task_id, payload, start):
    info = asynq.WorkerInfo(host="h", pid=1, server_id="s", task_id=task_id, task_type="t", queue=queue,
                            start_time=start, deadline=None)
    assert tasks.worker_queue(asynq.encode_worker_info(info, payload)) == queue


@given(data=st.binary(max_size=80))
@settings(max_examples=300, deadline=None)
def test_worker_queue_agrees_with_protobuf_on_any_bytes(data):
    try:
        expected = asynq.decode_worker_info(data).queue
    except asynq.UndecodableError:
        expected = None
    try:
        got = tasks.worker_queue(data)
    except asynq.UndecodableError:
        got = None
    if expected is not None:
        assert got == expected


async def test_an_undecodable_workers_value_is_counted_and_the_other_tasks_still_go(rdb, ardb):
    recovery = taskrecovery.TaskRecovery(ardb, RedisHealth("test"), "on", registry=new_collector_registry())
    bad: list[tuple[str, bytes]] = []
    recovery.on_undecodable = lambda kind, key: bad.append((kind, key))
    dead = emulated(ardb, 1, "dead", 2)
    await dead.start()
    rdb.hset(dead.workers_member.key, "garbage-task", b"\xff\xff\xff")
    found = await recovery.last_beat_tasks(dead.workers_member)
    assert sorted(t.id for t in found) == sorted(t.task_id for t in dead.tasks)
    assert bad == [("worker_info", dead.workers_member.key.encode() + b" garbage-task")]
    assert await recovery.worker_died(found, "a test worker") == 2


# ---------------------------------------------------------------- the emulator's --leases


async def test_the_emulator_leases_tasks_as_asynq_does(rdb, ardb):
    clock = [1_000_000.0]
    emulator = Emulator(ardb, EmulatorConfig(HOST, 3, "emu", tasks=2, leases=True, queues={DEFAULT: 1},
                                             drain=0.0), clock=lambda: clock[0])
    await emulator.start()
    ids = sorted(t.task_id for t in emulator.tasks)
    assert rdb.smembers(tasks.QUEUES) == {DEFAULT.encode()}
    assert sorted(active(rdb)) == ids
    assert leases(rdb) == {i: 1_000_030 for i in ids}
    assert all(rdb.hget(task_key(DEFAULT, i), "state") == b"active" for i in ids)
    assert sorted(k.decode() for k in rdb.hkeys(emulator.workers_member.key)) == ids
    clock[0] += 5
    rdb.zadd(tasks.lease_key(DEFAULT), {ids[0]: 1})  # expired in Redis, not in the server's own view
    await emulator.beat()  # ExtendLease (ZADD XX) for every lease the server still holds
    assert leases(rdb) == {i: 1_000_035 for i in ids}
    clock[0] += 60  # a server whose own lease ran out never extends it again
    rdb.zadd(tasks.lease_key(DEFAULT), {ids[0]: 2})
    emulator.leases[ids[1]] = clock[0] + 1
    await emulator.beat()
    assert leases(rdb) == {ids[0]: 2, ids[1]: 1_000_095}
    assert await emulator.shutdown()  # a graceful Shutdown requeues the unfinished tasks
    assert active(rdb) == [] and leases(rdb) == {}
    assert sorted(i.decode() for i in rdb.lrange(f"asynq:{{{DEFAULT}}}:pending", 0, -1)) == ids


def test_sweep_repair_tasks_reports_in_words(rdb, redis_url, capsys, monkeypatch, keep_logging):
    monkeypatch.setattr(taskrecovery, "ORPHAN_CONFIRM_AFTER", 0.1)
    orphan(rdb, "orphan-1")
    assert cli.main(["sweep", "--redis-url", redis_url, "--repair-tasks", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would give 1 an expired lease for asynq's recoverer" in out
    assert "queue default: orphan-1" in out
    assert leases(rdb) == {}


@pytest.mark.parametrize("n", [3, 30])  # a few ids: LPOS each; more: the active list read once
async def test_the_scripts_check_every_task_however_many(rdb, ardb, n):
    ids = [f"orphan-{i}" for i in range(n)]
    for i in ids:
        orphan(rdb, i)
    rdb.lrem(tasks.active_key(DEFAULT), 0, ids[0])  # no longer active
    rdb.zadd(tasks.lease_key(DEFAULT), {ids[1]: 123})  # given a lease since
    expected = {DEFAULT: ids[2:]}
    assert await taskrecovery.repair_orphans(ardb, {DEFAULT: ids}, dry_run=True) == expected
    assert set(leases(rdb)) == {ids[1]}
    assert await taskrecovery.repair_orphans(ardb, {DEFAULT: ids}, dry_run=False) == expected
    assert set(leases(rdb)) == set(ids[1:]) and leases(rdb)[ids[1]] == 123

    recovery = taskrecovery.TaskRecovery(ardb, RedisHealth("test"), "on", registry=new_collector_registry())
    dead = emulated(ardb, 1, "dead", n)
    await dead.start()
    found = await recovery.last_beat_tasks(dead.workers_member)
    rdb.lrem(tasks.active_key(DEFAULT), 0, found[0].id)
    dry_run = taskrecovery.TaskRecovery(ardb, RedisHealth("test"), "dry-run", registry=new_collector_registry())
    before = leases(rdb)
    assert await dry_run.worker_died(found, "a test worker") == n - 1
    assert leases(rdb) == before
    assert await recovery.worker_died(found, "a test worker") == n - 1
    after = leases(rdb)
    assert after[found[0].id] == found[0].lease
    assert all(after[t.id] <= redis_now(rdb) - tasks.EXPIRE_BACK for t in found[1:])
