"""Real asynq as the sidecar's peer: go/internal/asynqpeer built from the Go module proxy at
asynq v0.26.0 and an older version, run under both launchers (and the drop-in example worker)
with a real `asynq-sidecar serve`, a real redis-server, real signals.

- a graceful srv.Run(): the shutdown the sidecar measures is the one the test observes;
- SIGKILL with tasks in flight: the registration is removed, its tasks counted abandoned;
- asynq's #979 race, reproduced on purpose: every registration the real library leaks is
  counted and removed, and no live registration is ever missing meanwhile;
- the sidecar decodes every field real asynq writes as asynq's own Inspector reports it.

A leaked registration is removed at once only when the worker's server id proves it the dead
worker's; otherwise once asynq itself would call it expired (10 s after its last beat). The
deadlines below allow for that, and the invariants are asserted, not the latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import redis as redis_sync

from exporter.asynq import model as asynq
from tests.support.asynqpeer import Peer
from tests.support.faults import Serve
from tests.support.gobuild import PEER_VERSIONS
from tests.support.helpers import eventually
from tests.support.lifecycle import ROOT

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOST = socket.gethostname()  # what asynq registers under, and what the launchers report
#: A leaked registration is gone by then: asynq's expiry (10 s after the last beat, which can be
#: up to 5 s before the exit) plus the sidecar's polling and a margin for a loaded machine.
REMOVAL_DEADLINE = 20.0
TOLERANCE = 0.05  # the measured shutdown must be within 50 ms of what the test observed
RACE_RUNS = 3  # #979 runs per asynq version and launcher


# ---------------------------------------------------------------- the processes


class LiveWatch:
    """A thread that reads the registrations of live workers every 10 ms and records every
    moment one was missing while Redis answered: a removal is seen even if the next heartbeat
    would write it back."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.live: dict[str, asynq.Member] = {}
        self.missing: list[tuple[str, float]] = []
        self.reads = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="live-watch", daemon=True)

    def add(self, m: asynq.Member) -> None:
        with self._lock:
            self.live[m.key] = m

    def drop(self, m: asynq.Member) -> None:
        """From now on the worker may deregister itself (it was asked to stop, or is killed)."""
        with self._lock:
            self.live.pop(m.key, None)

    def _watch(self) -> None:
        client = redis_sync.Redis.from_url(self.redis_url, socket_timeout=0.5)
        while not self._stop.is_set():
            with self._lock:
                members = list(self.live.values())
            if members:
                pipe = client.pipeline(transaction=False)
                for m in members:
                    pipe.zscore(asynq.SERVERS, m.key)
                    pipe.zscore(asynq.WORKERS, m.sibling("workers").key)
                scores = pipe.execute()
                with self._lock:  # still live after the read: a miss counts
                    for i, m in enumerate(members):
                        if m.key in self.live and (scores[2 * i] is None or scores[2 * i + 1] is None):
                            self.missing.append((m.key, time.time()))
                self.reads += 1
            self._stop.wait(0.01)
        client.close()

    def __enter__(self) -> LiveWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Env:
    redis_url: str
    redis_addr: str
    rdb: redis_sync.Redis
    serve: Serve
    socket_path: str
    peers: dict[str, Path]
    launchers: dict[str, tuple[str, ...]]
    started: list[Peer] = field(default_factory=list)
    queues: int = 0
    #: {asynq version: go/examples/worker built at it}, once a test asked for the drop-in.
    dropins: dict[str, Path] = field(default_factory=dict)
    #: One steady server per asynq version, started with the module and never stopped by a test:
    #: the decode test reads them, and every other test must leave their registrations alone.
    steady: dict[str, Peer] = field(default_factory=dict)

    def queue(self) -> str:
        """A queue of its own per worker, so that its tasks are its own."""
        self.queues += 1
        return f"q{self.queues}"

    async def start(self, argv: list[str], label: str) -> Peer:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "ASYNQ_SIDECAR_SOCKET": self.socket_path})
        peer = Peer(proc, label)
        peer.reader = asyncio.ensure_future(peer._read())
        self.started.append(peer)
        return peer

    async def peer(self, version: str, launcher: str, mode: str, *, concurrency: int, tasks: int,
                   task_sleep: str, shutdown_timeout: str) -> Peer:
        """asynqpeer at `version` under `launcher` ("python", "go" or "none")."""
        cmd = [str(self.peers[version]), "--mode", mode, "--redis", self.redis_addr, "--queue", self.queue(),
               "--concurrency", str(concurrency), "--enqueue", str(tasks), "--task-sleep", task_sleep,
               "--shutdown-timeout", shutdown_timeout]
        prefix = [*self.launchers[launcher], "--"] if launcher != "none" else []
        return await self.start([*prefix, *cmd], f"{mode} {version} {launcher}")

    async def dropin(self, version: str, *, concurrency: int, tasks: int, task_sleep: str,
                     shutdown_timeout: str) -> Peer:
        """go/examples/worker (asynqsidecar.NewServer + Run) at `version`, reporting on its own;
        it serves the queue default. It prints no lines for the test: its registration, found in
        Redis by its pid, stands for "ready"."""
        p = await self.start([str(self.dropins[version]), "--redis", self.redis_addr,
                              "--concurrency", str(concurrency), "--enqueue", str(tasks),
                              "--task-sleep", task_sleep, "--shutdown-timeout", shutdown_timeout],
                             f"drop-in {version}")
        p.pid = p.proc.pid
        prefix = f"asynq:servers:{{{HOST}:{p.pid}:"

        def found() -> str | None:
            return next((m.decode() for m in self.rdb.zrange(asynq.SERVERS, 0, -1)
                         if m.decode().startswith(prefix)), None)

        key = await eventually(found, timeout=15, what=f"{p.label}: its registration")
        p.server_id = asynq.parse_member(key).ident
        return p

    def active(self, queue: str = "default") -> int:
        """Tasks in flight in `queue` (the LIST asynq:{queue}:active, written at dequeue)."""
        return self.rdb.llen(f"asynq:{{{queue}}}:active")

    async def metric(self, name: str, **labels: str) -> float:
        return (await self.serve.value(name, **labels)) or 0.0

    def gone(self, m: asynq.Member) -> bool:
        return (self.rdb.zscore(asynq.SERVERS, m.key) is None
                and self.rdb.zscore(asynq.WORKERS, m.sibling("workers").key) is None)

    async def close(self) -> None:
        for p in self.started:
            for pid in (p.pid, p.proc.pid):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await p.proc.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(redis_server, asynq_peers, tmp_path_factory):  # noqa: F811
    """One sidecar (`asynq-sidecar serve`) for the module, on the session's Redis, emptied first."""
    rdb = redis_sync.Redis.from_url(redis_server.url)
    rdb.flushall()
    d = tmp_path_factory.mktemp("ra", numbered=True)
    socket_path = str(d / "l.sock")
    serve = Serve(d, redis_server.url, socket_path, "--hostname", HOST)
    await serve.start()
    e = Env(redis_server.url, f"127.0.0.1:{redis_server.port}", rdb, serve, socket_path, asynq_peers,
            {"python": (sys.executable, "-m", "exporter", "run")})
    # A queue map, strict priority, and 2 of 3 slots busy: every field has a telling value.
    for v in PEER_VERSIONS:
        e.steady[v] = await e.start(
            [str(asynq_peers[v]), "--mode", "run", "--redis", e.redis_addr, "--queue", f"d{v}=3,low=1",
             "--strict", "--concurrency", "3", "--enqueue", "2", "--task-sleep", "600s",
             "--shutdown-timeout", "1s"], f"steady {v}")
    for p in e.steady.values():
        await p.ready()
    yield e
    await e.close()
    await serve.kill()
    rdb.close()


COMBOS = [(v, launcher) for v in PEER_VERSIONS for launcher in ("python", "go")]


def combo_id(combo) -> str:
    return f"asynq-{combo[0]}-{combo[1]}"


# ---------------------------------------------------------------- graceful


def use_launcher(request, env: Env, launcher: str) -> None:
    """Make `launcher` runnable in `env`: the Go one, or the drop-in example worker ("drop-in"),
    is built (or the test skips without it)."""
    if launcher == "go" and "go" not in env.launchers:
        env.launchers["go"] = (str(request.getfixturevalue("go_launcher")),)
    if launcher == "drop-in" and not env.dropins:
        env.dropins.update(request.getfixturevalue("example_workers"))


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
async def test_a_graceful_run_is_measured_within_50ms_and_leaves_nothing(request, env: Env, combo):
    version, launcher = combo
    use_launcher(request, env, launcher)
    leaked, graceful = (await env.metric("asynq_sidecar_leaked_registrations_total"),
                        await env.metric("asynq_sidecar_worker_exits_total", outcome="graceful"))
    # One task in flight when SIGTERM comes: Shutdown waits for it (about 1 s), then deregisters.
    p = await env.peer(version, launcher, "run", concurrency=1, tasks=1, task_sleep="1s",
                       shutdown_timeout="5s")
    m = await p.ready()
    await p.line("busy 1")
    ended = p.watch_exit()
    sent = time.time()
    p.signal(signal.SIGTERM)
    assert await p.wait() == 0
    observed = await ended - sent
    assert not await p.left_registered()
    assert env.gone(m)
    await env.serve.wait_for("asynq_sidecar_worker_exits_total", graceful + 1, outcome="graceful")
    duration = await env.metric("asynq_sidecar_last_shutdown_duration_seconds")
    assert abs(duration - observed) <= TOLERANCE, (duration, observed)
    assert await env.metric("asynq_sidecar_leaked_registrations_total") == leaked


@pytest.mark.parametrize("version", PEER_VERSIONS, ids=lambda v: f"asynq-{v}")
async def test_the_drop_in_drains_every_busy_slot_ignores_a_second_sigterm_and_leaves_nothing(
        request, env: Env, version):
    """What #979 needs (all slots busy, a second stop while the first Shutdown drains) cannot
    make the drop-in exit before its registration is gone: one signal loop, one Shutdown."""
    use_launcher(request, env, "drop-in")
    leaked, graceful = (await env.metric("asynq_sidecar_leaked_registrations_total"),
                        await env.metric("asynq_sidecar_worker_exits_total", outcome="graceful"))
    p = await env.dropin(version, concurrency=2, tasks=2, task_sleep="60s", shutdown_timeout="1s")
    m = p.member
    await eventually(lambda: env.active() == 2, timeout=10, what="both slots busy")
    ended = p.watch_exit()
    sent = time.time()
    p.signal(signal.SIGTERM)
    await env.serve.wait_for("asynq_sidecar_workers", 1, state="stopping")
    p.signal(signal.SIGTERM)  # during the drain
    assert await p.wait() == 0
    observed = await ended - sent
    assert env.gone(m)  # deregistered before it exited
    await env.serve.wait_for("asynq_sidecar_worker_exits_total", graceful + 1, outcome="graceful")
    duration = await env.metric("asynq_sidecar_last_shutdown_duration_seconds")
    assert abs(duration - observed) <= TOLERANCE, (duration, observed)
    assert 1.0 <= duration  # the drain waited out the shutdown timeout for the busy slots
    assert await env.metric("asynq_sidecar_leaked_registrations_total") == leaked
    assert env.active() == 0  # Shutdown requeued both tasks


# ---------------------------------------------------------------- SIGKILL and the #979 race


async def busy_peer(env: Env, watch: LiveWatch, version: str, launcher: str, mode: str):
    """A peer in `mode` with both of its two slots running a 60 s task; its registration watched."""
    p = await env.peer(version, launcher, mode, concurrency=2, tasks=2, task_sleep="60s",
                       shutdown_timeout="1s")
    m = await p.ready()
    watch.add(m)
    await p.line("busy 2")
    return p, m


async def both_tasks_listed(env: Env, p, m: asynq.Member) -> None:
    await eventually(lambda: env.rdb.hlen(m.sibling("workers").key) == 2, timeout=10,
                     what=f"{p.label}: both tasks in the workers hash")


async def killed_with_tasks_in_flight(env: Env, watch: LiveWatch, version: str, launcher: str) -> asynq.Member:
    """A worker SIGKILLed while both its slots run a task; its registration, once gone. Under the
    drop-in, every drop-in worker of the run serves the queue default with as many slots as it
    enqueued tasks, so that every slot ends up busy."""
    if launcher == "drop-in":
        p = await env.dropin(version, concurrency=2, tasks=2, task_sleep="60s", shutdown_timeout="1s")
        m = p.member
        watch.add(m)
    else:
        p, m = await busy_peer(env, watch, version, launcher, "run")
    # The sidecar counts the tasks of the workers hash, which the next beat (within 5 s) writes.
    await both_tasks_listed(env, p, m)
    watch.drop(m)
    os.kill(m.pid, signal.SIGKILL)
    # A launcher exits with 128+9; the drop-in worker itself was killed.
    assert await p.wait() == (-signal.SIGKILL if launcher == "drop-in" else 128 + signal.SIGKILL)
    await eventually(lambda: env.gone(m), timeout=REMOVAL_DEADLINE, what=f"{p.label}: {m.key} removed")
    return m


async def race(env: Env, watch: LiveWatch, version: str, launcher: str) -> bool:
    """One #979 run, all slots busy; whether the real library leaked the registration. A leak
    must be removed by the sidecar; no leak means the worker deregistered itself."""
    p, m = await busy_peer(env, watch, version, launcher, "race")
    # With the tasks in the workers hash, a leak's abandoned tasks are known: 2.
    await both_tasks_listed(env, p, m)
    watch.drop(m)
    p.signal(signal.SIGTERM)
    assert await p.wait() == 0  # a clean exit 0 either way: the leak is silent
    leaked = await p.left_registered()
    if leaked:
        await eventually(lambda: env.gone(m), timeout=REMOVAL_DEADLINE, what=f"{p.label}: leaked {m.key} removed")
    else:
        assert env.gone(m)
    return leaked


async def test_sigkill_and_the_979_race_every_leak_is_removed_and_no_live_registration_touched(
        request, env: Env, capsys):
    launchers = ["python"]
    for name in ("go", "drop-in"):
        try:
            use_launcher(request, env, name)
            launchers.append(name)
        except pytest.skip.Exception:
            pass  # not in this checkout yet (in CI the fixture fails instead)
    # The drop-in cannot run the race (that is its point): it is SIGKILLed, and tested with a
    # second SIGTERM above.
    kill_combos = [(v, launcher) for v in PEER_VERSIONS for launcher in launchers]
    combos = [(v, launcher) for v, launcher in kill_combos if launcher != "drop-in"]
    before = {name: await env.metric(name) for name in (
        "asynq_sidecar_leaked_registrations_total", "asynq_sidecar_abandoned_tasks_total")}
    with LiveWatch(env.redis_url) as watch:
        for bystander in env.steady.values():  # live servers of this host that nothing watches
            watch.add(bystander.member)
        kills = [killed_with_tasks_in_flight(env, watch, v, launcher) for v, launcher in kill_combos]
        races = [race(env, watch, v, launcher) for v, launcher in combos for _ in range(RACE_RUNS)]
        results = await asyncio.gather(*kills, *races)
        assert watch.reads > 0
        assert watch.missing == [], f"live registrations went missing: {watch.missing[:5]}"
    assert not any(env.gone(b.member) for b in env.steady.values())
    leaks = results[len(kills):]
    per_combo = {combo_id(c): sum(leaks[i * RACE_RUNS:(i + 1) * RACE_RUNS]) for i, c in enumerate(combos)}
    with capsys.disabled():
        print(f"\n#979 leaks out of {RACE_RUNS} runs each: {per_combo}")
    # Every leak and every kill counted once. A killed worker's two in-flight tasks are
    # abandoned; a #979 leak's Shutdown requeued its tasks, and what the leaked workers hash
    # still lists depends on which beat raced the clear: 0 or 2 each.
    expected = len(kills) + sum(leaks)
    await env.serve.wait_for("asynq_sidecar_leaked_registrations_total",
                             before["asynq_sidecar_leaked_registrations_total"] + expected)
    abandoned = await env.metric("asynq_sidecar_abandoned_tasks_total") - before["asynq_sidecar_abandoned_tasks_total"]
    assert 2 * len(kills) <= abandoned <= 2 * expected and abandoned % 2 == 0, abandoned


# ---------------------------------------------------------------- decoding


def inspector_view(env: Env, version: str) -> list[dict]:
    """asynq's own Inspector.Servers(), at `version`, as the peer prints it."""
    proc = subprocess.run([str(env.peers[version]), "--mode", "inspect", "--redis", env.redis_addr],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def stored(env: Env, m: asynq.Member) -> tuple[bytes | None, dict[bytes, bytes]]:
    return env.rdb.get(m.key), env.rdb.hgetall(m.sibling("workers").key)


def seconds(pair: list[int]) -> float:
    """The Inspector's time as the sidecar computes one from a protobuf Timestamp."""
    return pair[0] + pair[1] / 1e9


async def test_the_sidecar_decodes_every_field_real_asynq_writes_as_its_inspector_reports_it(env: Env):
    members = {v: p.member for v, p in env.steady.items()}
    for v, m in members.items():
        await eventually(lambda m=m: env.rdb.hlen(m.sibling("workers").key) == 2, timeout=10,
                         what=f"asynq {v}: its 2 tasks in the workers hash")
    for reader in PEER_VERSIONS:
        # Read Redis around the Inspector's read; a beat in between rewrites the values: read again.
        for _ in range(5):
            raw = {v: stored(env, m) for v, m in members.items()}
            view = {s["id"]: s for s in inspector_view(env, reader)}
            if raw == {v: stored(env, m) for v, m in members.items()}:
                break
        else:
            raise AssertionError("the values kept changing under the Inspector's read")
        for v, m in members.items():
            info_bytes, workers = raw[v]
            info = asynq.decode_server_info(info_bytes)
            want = view[m.ident]
            assert (info.server_id, info.host, info.pid) == (want["id"], want["host"], want["pid"])
            assert (m.ident, m.host, m.pid) == (want["id"], want["host"], want["pid"])
            assert info.concurrency == want["concurrency"] == 3
            assert info.queues == want["queues"] == {f"d{v}": 3, "low": 1}
            assert info.strict_priority is want["strict_priority"] is True
            assert info.status == want["status"] == "active"
            assert info.start_time == seconds(want["started"])
            assert info.active_worker_count == len(want["active_workers"]) == 2
            decoded = sorted((asynq.decode_worker_info(b) for b in workers.values()), key=lambda w: w.task_id)
            expected = sorted(want["active_workers"], key=lambda w: w["task_id"])
            assert [(w.task_id, w.task_type, w.queue, w.start_time, w.deadline) for w in decoded] == [
                (w["task_id"], w["task_type"], w["queue"], seconds(w["started"]), seconds(w["deadline"]))
                for w in expected]
            assert all((w.host, w.pid, w.server_id) == (m.host, m.pid, m.ident) for w in decoded)
