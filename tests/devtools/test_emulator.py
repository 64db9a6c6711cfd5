"""The Asynq emulator writes, drains and clears a registration exactly as asynq's heartbeater does."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter.asynq import model as asynq
from exporter.devtools.emulator import TASK_TIMEOUT, TASK_TYPE, Emulator
from exporter.devtools.redis_server import free_port
from exporter.settings import EmulatorConfig
from tests.support.helpers import eventually, wait_until

ROOT = Path(__file__).resolve().parents[2]
HOST, PID, SERVER_ID = "worker-7f9c", 4242, "1c4b2a8e-5d6f-4e3a-9b1c-0d2e3f4a5b6c"
SERVER_KEY = f"asynq:servers:{{{HOST}:{PID}:{SERVER_ID}}}"
WORKERS_KEY = f"asynq:workers:{{{HOST}:{PID}:{SERVER_ID}}}"


def make_config(**overrides) -> EmulatorConfig:
    values = dict(host=HOST, pid=PID, server_id=SERVER_ID, concurrency=20,
                  queues={"default": 1, "critical": 6}, tasks=2, heartbeat=5.0, drain=0.0)
    values.update(overrides)
    return EmulatorConfig(**values)


class FrozenClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wire_fields(data: bytes) -> list[int]:
    """Top-level protobuf field numbers in wire order, read without the protobuf runtime."""

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = data[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if not b & 0x80:
                return value, i

    fields, i = [], 0
    while i < len(data):
        key, i = varint(i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, i = varint(i)
        elif wire_type == 2:
            length, i = varint(i)
            i += length
        else:
            raise AssertionError(f"unexpected wire type {wire_type} for field {number}")
        fields.append(number)
    return fields


# ---------------------------------------------------------------- one beat, field by field


async def test_start_writes_registration_that_decodes_field_by_field(ardb):
    clock = FrozenClock(time.time())
    emulator = Emulator(ardb, make_config(), clock=clock)
    await emulator.start()

    expiry = math.floor(clock.now + 10)  # Go's exp.Unix() of now + 10 s
    assert await ardb.zrange(asynq.SERVERS, 0, -1, withscores=True) == [(SERVER_KEY.encode(), expiry)]
    assert await ardb.zrange(asynq.WORKERS, 0, -1, withscores=True) == [(WORKERS_KEY.encode(), expiry)]
    assert await ardb.type(SERVER_KEY) == b"string"
    assert await ardb.type(WORKERS_KEY) == b"hash"
    for key in (SERVER_KEY, WORKERS_KEY):
        assert 9.0 < await ardb.pttl(key) / 1000 <= 10.0

    raw = await ardb.get(SERVER_KEY)
    assert wire_fields(raw) == [1, 2, 3, 4, 5, 5, 7, 8, 9]  # strict_priority false: omitted by proto3
    info = asynq.decode_server_info(raw)
    assert info.host == HOST
    assert info.pid == PID
    assert info.server_id == SERVER_ID
    assert info.concurrency == 20
    assert info.queues == {"default": 1, "critical": 6}
    assert info.strict_priority is False
    assert info.status == "active"
    assert info.start_time == pytest.approx(clock.now, abs=1e-6)
    assert info.active_worker_count == 2

    workers = await ardb.hgetall(WORKERS_KEY)
    assert len(workers) == 2
    queues = set()
    for task_id, value in workers.items():
        assert wire_fields(value) == [1, 2, 3, 4, 5, 7, 8, 9]  # empty payload: omitted
        w = asynq.decode_worker_info(value)
        assert (w.host, w.pid, w.server_id) == (HOST, PID, SERVER_ID)
        assert w.task_id == task_id.decode()
        assert w.task_type == TASK_TYPE
        assert w.start_time == pytest.approx(clock.now, abs=1e-6)
        assert w.deadline == pytest.approx(clock.now + TASK_TIMEOUT, abs=1e-6)
        queues.add(w.queue)
    assert queues == {"critical", "default"}  # tasks are spread over the queues


async def test_beat_moves_score_and_replaces_workers_hash(ardb):
    clock = FrozenClock(time.time())
    emulator = Emulator(ardb, make_config(tasks=3, ttl=10), clock=clock)
    await emulator.start()
    first_ids = set(await ardb.hkeys(WORKERS_KEY))

    clock.now += 5.4
    emulator.tasks = emulator.tasks[:1]
    await emulator.beat()
    assert await ardb.zscore(asynq.SERVERS, SERVER_KEY) == math.floor(clock.now + 10)
    assert await ardb.zscore(asynq.WORKERS, WORKERS_KEY) == math.floor(clock.now + 10)
    remaining = set(await ardb.hkeys(WORKERS_KEY))
    assert len(remaining) == 1 and remaining < first_ids  # DEL then HSET: finished tasks vanish
    assert asynq.decode_server_info(await ardb.get(SERVER_KEY)).active_worker_count == 1

    emulator.tasks = []
    await emulator.beat()
    assert not await ardb.exists(WORKERS_KEY)  # asynq keeps the hash only while a task is active
    assert await ardb.zscore(asynq.WORKERS, WORKERS_KEY) is not None  # the member stays


async def test_serve_beats_every_heartbeat_until_stopped(ardb):
    clock = FrozenClock(time.time())
    emulator = Emulator(ardb, make_config(heartbeat=0.02), clock=clock)
    await emulator.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(emulator.serve(stop))
    try:
        clock.now += 100

        async def moved():
            return await ardb.zscore(asynq.SERVERS, SERVER_KEY) == math.floor(clock.now + 10)

        await eventually(moved, what="a beat with the new score")
    finally:
        stop.set()
        await asyncio.wait_for(serving, 1.0)


# ---------------------------------------------------------------- shutdown


async def test_shutdown_clear_removes_only_its_own_registration(ardb):
    other = Emulator(ardb, make_config(server_id="other-id"))
    await other.start()
    emulator = Emulator(ardb, make_config())
    await emulator.start()

    assert await emulator.shutdown() is True
    assert emulator.status == "closed" and emulator.tasks == []
    assert not await ardb.exists(SERVER_KEY, WORKERS_KEY)
    assert await ardb.zrange(asynq.SERVERS, 0, -1) == [other.server_member.key.encode()]
    assert await ardb.zrange(asynq.WORKERS, 0, -1) == [other.workers_member.key.encode()]
    assert await ardb.exists(other.server_member.key, other.workers_member.key) == 2


async def test_shutdown_leak_leaves_the_last_beat_behind(ardb):
    emulator = Emulator(ardb, make_config(on_exit="leak", tasks=2))
    await emulator.start()

    assert await emulator.shutdown() is False
    assert await ardb.zscore(asynq.SERVERS, SERVER_KEY) is not None
    assert await ardb.zscore(asynq.WORKERS, WORKERS_KEY) is not None
    info = asynq.decode_server_info(await ardb.get(SERVER_KEY))
    assert (info.status, info.active_worker_count) == ("closed", 2)
    assert await ardb.hlen(WORKERS_KEY) == 2


# ---------------------------------------------------------------- the command, as a subprocess


@pytest.fixture
def spawn(redis_url):
    procs: list[subprocess.Popen] = []

    def start(*args: str, url: str = redis_url) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "emulate", "--redis-url", url, *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)


def status_of(rdb) -> str | None:
    raw = rdb.get(SERVER_KEY)
    return asynq.decode_server_info(raw).status if raw else None


@pytest.mark.parametrize("mode", ["clear", "leak"])
def test_sigterm_drains_with_status_closed_then_clears_or_leaks(rdb, spawn, mode):
    proc = spawn("--host", HOST, "--pid", str(PID), "--server-id", SERVER_ID, "--tasks", "2",
                 "--heartbeat", "0.1", "--drain", "0.5", "--on-exit", mode)
    wait_until(lambda: status_of(rdb) == "active", what="status active")
    assert rdb.hlen(WORKERS_KEY) == 2

    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: status_of(rdb) == "closed", what="status closed")
    proc.send_signal(signal.SIGTERM)  # a second SIGTERM is ignored, as in asynq
    _, stderr = proc.communicate(timeout=5)
    assert proc.returncode == 0, stderr.decode()

    if mode == "clear":
        assert rdb.zrange(asynq.SERVERS, 0, -1) == []
        assert rdb.zrange(asynq.WORKERS, 0, -1) == []
        assert not rdb.exists(SERVER_KEY, WORKERS_KEY)
    else:
        assert rdb.zrange(asynq.SERVERS, 0, -1) == [SERVER_KEY.encode()]
        assert rdb.zrange(asynq.WORKERS, 0, -1) == [WORKERS_KEY.encode()]
        assert status_of(rdb) == "closed"
        assert rdb.hlen(WORKERS_KEY) == 2  # the last beat (while draining) had the tasks


def test_defaults_register_this_process(rdb, spawn):
    proc = spawn("--drain", "0")
    member = wait_until(lambda: rdb.zrange(asynq.SERVERS, 0, -1), what="a registration")[0]
    parsed = asynq.parse_member(member)
    assert (parsed.host, parsed.pid) == (socket.gethostname(), proc.pid)
    # A beat adds the members before it writes the ServerInfo, as asynq's does.
    info = asynq.decode_server_info(wait_until(lambda: rdb.get(parsed.key), what="its ServerInfo"))
    assert (info.concurrency, info.queues, info.active_worker_count) == (10, {"default": 1}, 0)
    assert 5 <= rdb.zscore(asynq.SERVERS, member) - time.time() <= 10
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 0
    assert rdb.zcard(asynq.SERVERS) == 0


def test_redis_unreachable_at_start_exits_1_naming_the_url(spawn):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    proc = spawn("--drain", "0", url=url)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 1
    text = stderr.decode()
    assert "redis://:***@127.0.0.1:" in text and "hunter2" not in text


@pytest.mark.parametrize(("args", "message"), [
    (["--on-exit", "forget"], "--on-exit: 'forget': expected one of clear, leak"),
    (["--queues", "default"], "--queues: 'default': expected NAME=PRIORITY"),
    (["--ttl", "1.5"], "--ttl: '1.5': expected a whole number of seconds"),
    (["--tasks", "11"], "--tasks 11 is more than --concurrency 10"),
])
def test_bad_flags_exit_2_naming_flag_and_value(spawn, args, message):
    proc = spawn(*args)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert message in stderr.decode()
