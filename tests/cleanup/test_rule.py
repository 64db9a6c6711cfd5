"""The removal rule under real-world faults, with real processes: a twin in another PID namespace,
a worker that stalls after its launcher died, a sidecar whose clock is off, a heartbeat that comes
after the worker said bye, and a worker that outlives its launcher. Each registration that must
survive is watched every 5 ms by a Sentry; a removal shows even if the next beat writes it back."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import redis as redis_sync

from exporter.asynq import model as asynq
from tests.support.faults import EMULATE, Sentry, gone_entirely
from tests.support.helpers import eventually, register_server
from tests.support.lifecycle import CHILD, HOST
from tests.support.tools import require_tool


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def registrations_of(rdb: redis_sync.Redis, pid: int) -> list[asynq.Member]:
    return [m for m in (asynq.parse_member(raw) for raw, _ in rdb.zscan_iter(
        asynq.SERVERS, match=asynq.member_pattern("servers", HOST, pid)))]


async def in_pid_namespace(processes, *argv: str):
    """`unshare -pf --mount-proc ARGV`: ARGV runs as PID 1 of a new PID namespace (needs root)."""
    unshare = require_tool("unshare")
    return await processes._start(unshare, "-pf", "--kill-child", "--mount-proc", *argv)


def launcher_argv(socket_path: str, *command: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "exporter", "run", "--socket", socket_path, "--hostname", HOST,
            "--log-level", "info", "--", *command)


# ---------------------------------------------------------------- twins


async def test_a_twin_in_another_pid_namespace_survives_the_watched_workers_death(
        faults, processes, redis_url, rdb):
    """Two containers of one pod (or hostNetwork pods on one node): each runs its launcher as
    PID 1 and its worker as pid 2, under one host name. The watched worker never registers and
    is killed; the launcher reports the exit. The unwatched twin, which registered during the
    watched worker's life, must keep its registration: nothing proves it is not the twin's."""
    sc = await faults.serve(redis_url, "--host-pids", "shared", "--settle", "0.5")
    watched = await in_pid_namespace(processes, *launcher_argv(faults.socket_path, sys.executable,
                                                               "-c", CHILD, "30", "0"))
    assert await watched.ready() == 2  # the worker as its own namespace sees it
    await sc.wait_for("asynq_sidecar_workers", 1, state="starting")
    twin = await in_pid_namespace(processes, *launcher_argv(
        "/nonexistent/lifecycle.sock", *EMULATE, "--redis-url", redis_url, "--host", HOST,
        "--heartbeat", "0.5", "--ttl", "2", "--tasks", "1"))
    (member,) = await eventually(lambda: registrations_of(rdb, 2), timeout=15, what="the twin registered")
    sentry = Sentry(redis_url, member).start()
    try:
        (launcher,) = children(watched.pid)
        (worker,) = children(launcher)
        os.kill(worker, signal.SIGKILL)
        assert await watched.wait() == 128 + 9
        await sc.wait_for("asynq_sidecar_worker_exits_total", 1, outcome="killed")
        # Past the twin's expiry plus settle had it stopped beating: a removal would have come.
        await asyncio.sleep(3)
        sentry.assert_never_missing()
        assert await sc.value("asynq_sidecar_leaked_registrations_total") == 0
        assert await sc.value("asynq_sidecar_registrations_removed_total", reason="worker_exit") == 0
        # The twin dies too, unwatched: the sweep or a sidecar's host scan is its cleanup.
    finally:
        sentry.stop()
        twin.signal(signal.SIGKILL)


# ---------------------------------------------------------------- a stall, and watching to the end


async def test_a_worker_that_stalls_after_its_launcher_died_is_kept_then_removed_once_dead(
        faults, processes, redis_url, rdb):
    """The launcher is SIGKILLed just after a heartbeat (a lost connection) and its worker, not a
    child of anything watching it, is frozen (SIGSTOP: CPU throttling, a long GC pause) for longer
    than a heartbeat period. Its registration is not expired, so it stays; the worker thaws and
    beats. Watched to the end: when the worker later dies, its registration goes once expired."""
    settle = 0.5
    sc = await faults.serve(redis_url, "--settle", str(settle))
    w = await processes.launcher(faults.socket_path, command=(
        *EMULATE, "--redis-url", redis_url, "--host", HOST, "--heartbeat", "1", "--ttl", "3", "--tasks", "1"))
    (member,) = await eventually(lambda: registrations_of_child(rdb, w.pid), timeout=15,
                                 what="the worker registered")
    worker_pid = member.pid
    await sc.wait_for("asynq_sidecar_workers", 1, state="running")
    sentry = Sentry(redis_url, member).start()
    try:
        first = rdb.zscore(asynq.SERVERS, member.key)
        await eventually(lambda: rdb.zscore(asynq.SERVERS, member.key) != first, timeout=5,
                         interval=0.005, what="a heartbeat")
        w.signal(signal.SIGKILL)  # the launcher: the connection is lost, the worker lives on
        os.kill(worker_pid, signal.SIGSTOP)
        stalled_at = time.monotonic()
        await sc.wait_for("asynq_sidecar_worker_exits_total", 1, outcome="lost")
        await asyncio.sleep(max(0.0, 1.6 - (time.monotonic() - stalled_at)))  # 1.6 heartbeat periods
        os.kill(worker_pid, signal.SIGCONT)
        await asyncio.sleep(settle + 1)  # past the old registration's expiry plus settle
        sentry.assert_never_missing()
        assert await sc.value("asynq_sidecar_leaked_registrations_total") == 0
    finally:
        sentry.stop()
    os.kill(worker_pid, signal.SIGKILL)  # now it dies for real
    killed_at = time.monotonic()
    await eventually(lambda: gone_entirely(rdb, member), timeout=3 + settle + 3,
                     what="the registration removed once expired")
    assert time.monotonic() - killed_at >= settle
    await sc.wait_for("asynq_sidecar_registrations_removed_total", 1, reason="worker_exit")
    await sc.wait_for("asynq_sidecar_leaked_registrations_total", 1)


def registrations_of_child(rdb: redis_sync.Redis, launcher_pid: int) -> list[asynq.Member]:
    kids = children(launcher_pid)
    return [m for pid in kids for m in registrations_of(rdb, pid)]


# ---------------------------------------------------------------- asynq #979 after bye


async def test_a_heartbeat_after_bye_is_found_removed_and_counted_as_a_leak(faults, processes, redis_url, rdb):
    """The worker speaks the protocol: it deregisters, says bye, and 50 ms later the heartbeat
    that raced its Shutdown (asynq #979) writes the registration again before the exit. The
    sidecar keeps looking after bye, finds it, removes it (its server id was reported) and
    counts the leak."""
    sc = await faults.serve(redis_url, "--host-pids", "shared")
    w = await processes._start(*EMULATE, "--redis-url", redis_url, "--host", HOST, "--heartbeat", "0.5",
                               "--drain", "0.1", "--on-exit", "late-beat", "--socket", faults.socket_path)
    (member,) = await eventually(lambda: registrations_of(rdb, w.pid), timeout=15, what="registered")
    await sc.wait_for("asynq_sidecar_workers", 1, state="running")
    w.signal(signal.SIGTERM)
    assert await w.wait() == 0
    await sc.wait_for("asynq_sidecar_worker_exits_total", 1, outcome="graceful")
    await eventually(lambda: gone_entirely(rdb, member), timeout=5, what="the late registration removed")
    await sc.wait_for("asynq_sidecar_leaked_registrations_total", 1)
    await sc.wait_for("asynq_sidecar_registrations_removed_total", 1, reason="worker_exit")
    assert "beat once more after the clear" in (await w.stderr())


# ---------------------------------------------------------------- the sidecar's clock


async def test_a_sidecar_with_a_skewed_clock_judges_expiry_by_redis_time(faults, processes, redis_url, rdb):
    """`serve` under faketime, 75 s ahead and then 75 s behind: its start-up scan removes this
    host's registration that Redis's clock calls expired and never the live one, and its gauges
    count by Redis's clock."""
    faketime = require_tool("faketime")
    for offset in ("+75s", "-75s"):
        rdb.flushall()
        now = time.time()
        dead = register_server(rdb, HOST, 7, "died-while-sidecar-was-down", now - 30, with_keys=False)
        live = await processes._start(*EMULATE, "--redis-url", redis_url, "--host", HOST, "--pid", "9",
                                      "--server-id", "live", "--heartbeat", "0.5", "--tasks", "1")
        member = asynq.server_member(HOST, 9, "live")
        await eventually(lambda: rdb.zscore(asynq.SERVERS, member.key), timeout=10, what="live registered")
        sentry = Sentry(redis_url, member).start()
        try:
            sc = await faults.serve(redis_url, "--settle", "1", wrapper=(faketime, "-f", offset))
            await eventually(lambda: gone_entirely(rdb, dead), timeout=10, what=f"the orphan removed ({offset})")
            await sc.wait_for("asynq_registry_entries", 1, set="servers", state="live")
            await sc.wait_for("asynq_registry_entries", 0, set="servers", state="expired")
            await asyncio.sleep(1)
            sentry.assert_never_missing()
            assert member.tag not in sc.log()
        finally:
            sentry.stop()
            live.proc.kill()
            await faults.stop_sidecars()
