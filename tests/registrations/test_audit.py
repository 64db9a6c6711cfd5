"""`asynq-sidecar audit` lists every registration, live or expired, and changes nothing in Redis."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as redis_async

from exporter.asynq import model as asynq
from exporter.cli import main as cli
from exporter.devtools.emulator import Emulator
from exporter.devtools.redis_server import free_port
from exporter.registrations.audit import read_report
from exporter.settings import EmulatorConfig
from exporter.text import duration
from tests.support.helpers import faketime_prefix, redis_now
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]

LIVE_ACTIVE = ("web-1", 1, "11111111-1111-4111-8111-111111111111")
LIVE_CLOSED = ("web-2", 1, "22222222-2222-4222-8222-222222222222")
EXPIRED = ("web-3", 1, "33333333-3333-4333-8333-333333333333")
BAD_VALUE = ("web-4", 9, "44444444-4444-4444-8444-444444444444")
GARBAGE_MEMBER = b"asynq:servers:no-braces-here"


def key(set_name: str, ident: tuple[str, int, str]) -> str:
    return asynq.Member(set_name, *ident).key


def write_emulated(url: str, ident: tuple[str, int, str], tasks: int, shut_down: bool = False) -> None:
    """One emulated server's registration, written once (no background beats)."""

    async def write() -> None:
        client = redis_async.Redis.from_url(url)
        try:
            host, pid, server_id = ident
            emulator = Emulator(client, EmulatorConfig(host, pid, server_id, concurrency=5, tasks=tasks,
                                                       drain=0.0, on_exit="leak"))
            await emulator.start()
            if shut_down:
                await emulator.shutdown()  # leak mode: status closed, registration left behind
        finally:
            await client.aclose()

    asyncio.run(write())


@pytest.fixture
def live_only(redis_url) -> str:
    write_emulated(redis_url, LIVE_ACTIVE, tasks=2)
    return redis_url


@pytest.fixture
def mixed(live_only, rdb) -> float:
    """Live servers from the emulator plus hand-written stale and broken entries; returns now."""
    write_emulated(live_only, LIVE_CLOSED, tasks=1, shut_down=True)
    now = time.time()
    # A server that died 5 minutes ago: members left, per-server keys long expired.
    rdb.zadd(asynq.SERVERS, {key("servers", EXPIRED): int(now) - 300})
    rdb.zadd(asynq.WORKERS, {key("workers", EXPIRED): int(now) - 300})
    # A member that is not asynq's format, expired 30 s ago.
    rdb.zadd(asynq.SERVERS, {GARBAGE_MEMBER: int(now) - 30})
    # A live member whose ServerInfo is not a protobuf.
    rdb.zadd(asynq.SERVERS, {key("servers", BAD_VALUE): int(now) + 8})
    rdb.set(key("servers", BAD_VALUE), b"not a protobuf", ex=10)
    # A live scheduler with two entries.
    sched = "asynq:schedulers:{cron-1:7:55555555-5555-4555-8555-555555555555}"
    rdb.zadd(asynq.SCHEDULERS, {sched: int(now) + 15})
    rdb.lpush(sched, b"entry-1", b"entry-2")
    rdb.expire(sched, 20)
    return now


def audit(url: str, *flags: str) -> int:
    return cli.main(["audit", "--redis-url", url, *flags])


# ---------------------------------------------------------------- the report


async def test_report_lists_every_registration(mixed, ardb):
    report = await read_report(ardb, mixed, "redis://test")
    by_member = {reg.member: reg for reg in report.registrations}
    assert len(by_member) == len(report.registrations) == 9

    live = by_member[key("servers", LIVE_ACTIVE)]
    assert (live.host, live.pid, live.id) == LIVE_ACTIVE
    assert (live.state, live.status, live.active_tasks, live.concurrency) == ("live", "active", 2, 5)
    assert live.queues == {"default": 1} and live.key_exists is True and live.problem is None
    assert 5 <= live.seconds_until_expiry <= 10 and live.seconds_since_expiry is None

    closed = by_member[key("servers", LIVE_CLOSED)]
    assert (closed.state, closed.status, closed.active_tasks) == ("live", "closed", 1)
    workers = by_member[key("workers", LIVE_ACTIVE)]
    assert (workers.state, workers.status, workers.active_tasks) == ("live", "active", 2)

    gone = by_member[key("servers", EXPIRED)]
    assert (gone.host, gone.pid, gone.id) == EXPIRED
    assert (gone.state, gone.key_exists, gone.status) == ("expired", False, None)
    assert gone.seconds_since_expiry == pytest.approx(300, abs=1)
    gone_workers = by_member[key("workers", EXPIRED)]
    assert (gone_workers.state, gone_workers.key_exists, gone_workers.active_tasks) == ("expired", False, 0)

    garbage = by_member[GARBAGE_MEMBER.decode()]
    assert (garbage.state, garbage.host) == ("expired", None) and "not an asynq" in garbage.problem
    bad = by_member[key("servers", BAD_VALUE)]
    assert (bad.state, bad.status, bad.key_exists) == ("live", "undecodable", True)
    assert "ServerInfo" in bad.problem

    sched = next(reg for reg in report.registrations if reg.set == "schedulers")
    assert (sched.host, sched.pid, sched.state, sched.entries) == ("cron-1", 7, "live", 2)

    assert report.counts() == {"servers": {"live": 3, "expired": 2},
                               "workers": {"live": 2, "expired": 1},
                               "schedulers": {"live": 1, "expired": 0}}
    assert (report.undecodable_members, report.undecodable_values) == (1, 1)
    assert report.exit_code() == 1


async def test_wrong_type_key_is_shown_not_fatal(live_only, ardb):
    ident = ("web-9", 3, "99999999-9999-4999-8999-999999999999")
    await ardb.zadd(asynq.SERVERS, {key("servers", ident): int(time.time()) + 8})
    await ardb.hset(key("servers", ident), "not", "a string")
    report = await read_report(ardb, time.time())
    (reg,) = [reg for reg in report.registrations if reg.host == "web-9"]
    assert "WRONGTYPE" in reg.problem and report.undecodable_values == 1


def test_format_duration():
    assert [duration(s) for s in (0, 7.4, 125, 3 * 3600 + 240, 5 * 86400 + 7200)] == \
        ["0s", "7s", "2m05s", "3h04m", "5d02h"]


# ---------------------------------------------------------------- the command


def test_table_and_exit_1_when_expired(mixed, redis_url, capsys, keep_logging):
    assert audit(redis_url) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("SET"))
    columns = ["SET", "HOST", "PID", "ID", "STATUS", "STATE", "EXPIRY", "TASKS"]
    assert header.split() == columns
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    rows = [line for line in lines if line.startswith(("servers ", "workers ", "schedulers "))]
    assert len(rows) == 9
    for row in rows:  # aligned: each cell starts at its column
        for start in starts[1:]:
            assert row[start - 2:start] == "  " and row[start] != " "
    expired_row = next(r for r in rows if EXPIRED[2] in r and r.startswith("servers"))
    assert "(key expired)" in expired_row and " expired " in expired_row
    assert re.search(r" 5m0[01]s ago ", expired_row)  # score int(now) - 300
    assert any(LIVE_ACTIVE[2] in r and " active " in r and " live " in r for r in rows)
    assert any("no-braces-here" in r and "undecodable member" in r for r in rows)
    assert ("servers: 3 live, 2 expired; workers: 2 live, 1 expired; schedulers: 1 live, 0 expired; "
            "undecodable: 1 member(s), 1 value(s)") in out


def test_exit_0_when_nothing_expired(live_only, capsys, keep_logging):
    assert audit(live_only) == 0
    out = capsys.readouterr().out
    assert "servers: 1 live, 0 expired; workers: 1 live, 0 expired; schedulers: 0 live, 0 expired" in out


def test_empty_redis_exit_0(redis_url, capsys, keep_logging):
    assert audit(redis_url) == 0
    assert "No registrations." in capsys.readouterr().out


def test_exit_2_when_redis_cannot_be_read(capsys, keep_logging):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    assert audit(url, "--redis-timeout", "0.5") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot read Redis at redis://:***@127.0.0.1:" in captured.err
    assert "hunter2" not in captured.err


def test_json_document(mixed, redis_url, capsys, keep_logging):
    assert audit(redis_url, "--json") == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["redis_url"] == redis_url
    assert doc["summary"]["servers"] == {"live": 3, "expired": 2}
    assert doc["summary"]["expired"] == 3
    assert (doc["summary"]["undecodable_members"], doc["summary"]["undecodable_values"]) == (1, 1)
    regs = {r["member"]: r for r in doc["registrations"]}
    live = regs[key("servers", LIVE_ACTIVE)]
    assert (live["host"], live["pid"], live["id"], live["status"], live["active_tasks"]) == (*LIVE_ACTIVE, "active", 2)
    assert regs[key("servers", EXPIRED)]["seconds_since_expiry"] == pytest.approx(300, abs=2)


@pytest.mark.parametrize("offset", ["+75s", "-75s"])
def test_states_and_ages_go_by_redis_clock(live_only, rdb, offset):
    """On a machine whose clock is 75 s off, a live server is still live and ages are right."""
    prefix, env = faketime_prefix(offset, require_tool("faketime"))
    now = redis_now(rdb)
    rdb.zadd(asynq.SERVERS, {key("servers", EXPIRED): int(now) - 30})

    proc = subprocess.run([*prefix, sys.executable, "-m", "exporter", "audit", "--redis-url", live_only,
                           "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)

    assert proc.returncode == 1, proc.stderr  # the one expired entry
    doc = json.loads(proc.stdout)
    regs = {r["member"]: r for r in doc["registrations"]}
    live = regs[key("servers", LIVE_ACTIVE)]
    assert live["state"] == "live" and 0 < live["seconds_until_expiry"] <= 10
    gone = regs[key("servers", EXPIRED)]
    assert gone["state"] == "expired" and gone["seconds_since_expiry"] == pytest.approx(30, abs=2)
    assert doc["summary"]["servers"] == {"live": 1, "expired": 1}
    assert abs(doc["time"] - redis_now(rdb)) < 5, "the audit's time is Redis's"


# ---------------------------------------------------------------- read-only


def snapshot(rdb) -> dict:
    """Every key's type and DUMP, plus each set's members and scores (TTLs shrink, so not those)."""
    state = {}
    for name in sorted(rdb.scan_iter(count=1000)):
        state[name] = (rdb.type(name), rdb.dump(name))
    for set_key in asynq.SETS.values():
        state[("zrange", set_key)] = rdb.zrange(set_key, 0, -1, withscores=True)
    return state


def test_audit_changes_nothing(mixed, redis_url, rdb, capsys, keep_logging):
    # Stale tasks too, which the audit lists: one whose lease expired, one with no lease at all.
    rdb.sadd("asynq:queues", "default")
    rdb.lpush("asynq:{default}:active", "expired-task", "orphaned-task")
    rdb.zadd("asynq:{default}:lease", {"expired-task": int(mixed) - 50})
    rdb.hset("asynq:{default}:t:orphaned-task", "state", "active")
    before = snapshot(rdb)
    rdb.config_resetstat()
    assert audit(redis_url) == 1
    assert "orphaned: orphaned-task" in capsys.readouterr().out
    assert audit(redis_url, "--json") == 1
    stats = rdb.info("commandstats")
    assert snapshot(rdb) == before

    # And no command the audit sent is one that may write.
    sent = {name.removeprefix("cmdstat_") for name in stats}
    assert {"zscan", "get", "hlen", "llen", "smembers", "lrange", "zrangebyscore"} <= sent
    for command in sent - {"config|resetstat", "info"}:
        main, _, sub = command.partition("|")
        reply = rdb.execute_command("COMMAND", "INFO", main)
        flags = reply[main]["flags"] if isinstance(reply, dict) else reply[0][2]
        if sub:
            continue  # client|setname and friends: connection state, not data
        assert "write" not in {f.decode() if isinstance(f, bytes) else f for f in flags}, command
