"""Stale tasks against real asynq: go/internal/asynqpeer at asynq v0.26.0 and an older version,
a real `asynq-sidecar serve` with `--recover-tasks`, the Python launcher, a real redis-server per
test, real signals. Every handler run is recorded by the peer (task id, server id, asynq's retry
count), so "ran again exactly once" and "never ran twice" are read, not inferred.

- a worker SIGKILLed with tasks in flight: with `on`, its tasks' leases are expired within
  seconds of the kill and a server started afterwards reruns each task exactly once (its Start()
  recoverer retries them, asynq's own logic); with `dry-run`, a server started right after the
  kill reruns none of them (their leases are still in the future), while a task whose lease was
  expired by hand, picked up by the same recoverer run, shows that the recoverer did run;
- live workers whose registrations are doubtful (a twin with the same host and pid in another PID
  namespace under `--host-pids shared`, a worker frozen by SIGSTOP past its registration's
  expiry): their leases are never lowered, their tasks complete once;
- an orphan (an active task whose lease entry was deleted, its worker dead): given an expired
  lease with `on` and rerun once, only counted with `dry-run`; a live worker's task without a
  lease entry is no orphan.

asynq's recoverer runs at Start() and then once a minute, so these tests start the server that
reruns a task after its lease was expired; bench `stale-tasks` measures the minute-period case.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import redis as redis_sync

from exporter.asynq import model as asynq
from exporter.devtools.redis_server import RedisServer
from tests.support.asynqpeer import HOST, Peer
from tests.support.faults import Poller, Serve
from tests.support.gobuild import PEER_VERSIONS
from tests.support.helpers import eventually, redis_now
from tests.support.lifecycle import ROOT
from tests.support.tools import require_tool

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: The Redis list every peer records its handler runs in.
RUNS = "test:runs"
#: A held handler returns once this key exists.
RELEASE = "test:release"
#: asynq's recoverer retries a task whose lease score is more than this many seconds in the past.
RECOVERER_SKEW = 30
#: From a proven death to its tasks' leases expired: the launcher's report, the reaper's
#: decision and one script per task, plus a margin for a loaded machine.
LEASE_DEADLINE = 10.0
#: An orphan is repaired after two looks at least 10 s apart (two beats), each a details read.
ORPHAN_DEADLINE = 30.0
#: A server started now reruns a task whose lease is expired within this (its Start() recoverer,
#: a zero retry delay, a 100 ms forwarder period).
RERUN_DEADLINE = 10.0
#: A frozen worker stays frozen until Redis's clock is this far past its registration's expiry:
#: past the removal's settle (0.5 s) and a few of the sidecar's reads.
STALL_PAST = 2.0


@dataclass(frozen=True)
class Run:
    task_id: str
    server_id: str
    retried: int
    at_ms: int


def runs(rdb: redis_sync.Redis) -> list[Run]:
    out = []
    for raw in rdb.lrange(RUNS, 0, -1):
        task_id, server_id, retried, at_ms = raw.decode().split()
        out.append(Run(task_id, server_id, int(retried), int(at_ms)))
    return out


def runs_of(rdb: redis_sync.Redis, task_ids) -> dict[str, list[tuple[str, int]]]:
    """{task id: [(server id, retry count) of each run, in order]}."""
    want = {t: [] for t in task_ids}
    for r in runs(rdb):
        if r.task_id in want:
            want[r.task_id].append((r.server_id, r.retried))
    return want


def lease_key(queue: str) -> str:
    return f"asynq:{{{queue}}}:lease"


def active_key(queue: str) -> str:
    return f"asynq:{{{queue}}}:active"


def leases(rdb: redis_sync.Redis, queue: str, ids) -> dict[str, float | None]:
    pipe = rdb.pipeline(transaction=False)
    for i in ids:
        pipe.zscore(lease_key(queue), i)
    return dict(zip(ids, pipe.execute(), strict=False))


def drained(rdb: redis_sync.Redis, queue: str) -> bool:
    """Nothing of the queue left anywhere: every task ran to completion (and was deleted)."""
    pipe = rdb.pipeline(transaction=False)
    pipe.llen(active_key(queue))
    pipe.llen(f"asynq:{{{queue}}}:pending")
    pipe.zcard(f"asynq:{{{queue}}}:retry")
    pipe.zcard(f"asynq:{{{queue}}}:archived")
    pipe.zcard(lease_key(queue))
    return not any(pipe.execute())


class LeaseGuard(Poller):
    """Reads the lease scores of some tasks every 5 ms and records every time one went lower than
    the highest seen, or vanished while the task was still active: a lease someone other than
    its worker lowered, even for a moment."""

    def __init__(self, redis_url: str, tasks: dict[str, str]) -> None:  # {task id: queue}
        super().__init__(redis_url, name="lease-guard")
        self.tasks = tasks
        self.highest: dict[str, float] = {}
        self.touched: list[tuple[str, float | None, float]] = []

    def _read(self, client: redis_sync.Redis) -> None:
        pipe = client.pipeline(transaction=True)  # one moment: the lease and the active list
        for task_id, queue in self.tasks.items():
            pipe.zscore(lease_key(queue), task_id)
            pipe.lpos(active_key(queue), task_id)
        seen = pipe.execute()
        for i, task_id in enumerate(self.tasks):
            score, position = seen[2 * i], seen[2 * i + 1]
            high = self.highest.get(task_id)
            if score is None:
                if position is not None and high is not None:
                    self.touched.append((task_id, None, high))
            elif high is not None and score < high:
                self.touched.append((task_id, score, high))
            else:
                self.highest[task_id] = score

    def assert_untouched(self) -> None:
        assert self.reads > 0 and len(self.highest) == len(self.tasks), (self.reads, self.highest)
        assert self.touched == [], f"leases lowered or removed: {self.touched[:5]}"


@dataclass
class Scene:
    """One test's world: a private redis-server, one `serve` with the test's flags, and peers."""

    redis: RedisServer
    rdb: redis_sync.Redis
    serve: Serve
    socket_path: str
    peers: dict[str, Path]
    started: list[Peer] = field(default_factory=list)
    #: Peers in a PID namespace of their own: their pid is not this machine's, never signalled
    #: as such (the namespace ends with its first process, `unshare`, killed on close).
    namespaced: set[int] = field(default_factory=set)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.redis.port}"

    def peer_argv(self, version: str, queue: str, *, tasks: int = 0, concurrency: int = 2,
                  task_sleep: str = "600s", hold: bool = False) -> list[str]:
        argv = [str(self.peers[version]), "--mode", "run", "--redis", self.addr, "--queue", queue,
                "--concurrency", str(concurrency), "--enqueue", str(tasks), "--task-sleep", task_sleep,
                "--runs", RUNS, "--retry-delay", "0s", "--poll", "100ms", "--shutdown-timeout", "1s"]
        return [*argv, "--hold", RELEASE] if hold else argv

    def launcher(self, socket_path: str | None = None) -> list[str]:
        return [sys.executable, "-m", "exporter", "run", "--socket", socket_path or self.socket_path,
                "--hostname", HOST, "--"]

    async def start(self, argv: list[str], label: str) -> Peer:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        p = Peer(proc, label)
        p.reader = asyncio.ensure_future(p._read())
        self.started.append(p)
        return p

    async def busy(self, argv: list[str], label: str, tasks: int, *,
                   pidns: bool = False) -> tuple[Peer, list[str]]:
        """A peer with all its `tasks` in flight and listed in its workers hash (the next beat,
        within 5 s, writes them): what a sidecar reads as its last beat's tasks. With `pidns`,
        argv runs as PID 1 of a PID namespace of its own (`unshare -pf`, root only)."""
        if pidns:
            argv = [require_tool("unshare"), "-pf", "--kill-child", "--mount-proc", *argv]
        p = await self.start(argv, label)
        if pidns:
            self.namespaced.add(id(p))
        m = await p.ready()
        await p.line(f"busy {tasks}")
        ids = await eventually(lambda: len(h := self.rdb.hkeys(m.sibling("workers").key)) == tasks and h,
                               timeout=10, what=f"{label}: its {tasks} tasks in its workers hash")
        return p, sorted(i.decode() for i in ids)

    async def rerun(self, version: str, queue: str, label: str) -> Peer:
        """A live server of `queue` that reruns at once what asynq's recoverer hands back."""
        p = await self.start(self.peer_argv(version, queue, concurrency=4, task_sleep="0s"), label)
        await p.ready()
        return p

    async def metric(self, name: str, **labels: str) -> float:
        return (await self.serve.value(name, **labels)) or 0.0

    def gone(self, m: asynq.Member) -> bool:
        return (self.rdb.zscore(asynq.SERVERS, m.key) is None
                and self.rdb.zscore(asynq.WORKERS, m.sibling("workers").key) is None)

    def expired_for_asynq(self, queue: str, ids) -> bool:
        """Every lease is far enough in the past (by Redis's clock) for asynq's recoverer."""
        cutoff = redis_now(self.rdb) - RECOVERER_SKEW
        return all(s is not None and s < cutoff for s in leases(self.rdb, queue, ids).values())

    async def close(self) -> None:
        for p in self.started:
            for pid in (p.proc.pid,) if id(p) in self.namespaced else (p.pid, p.proc.pid):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await p.proc.wait()
            if p.reader is not None:
                await p.reader


@pytest_asyncio.fixture(loop_scope="module")
async def scene_factory(asynq_peers, tmp_path_factory):  # noqa: F811
    """Builds Scenes: `await make("on", "--host-pids", "shared")`; all torn down after the test."""
    made: list[Scene] = []

    async def make(mode: str, *args: str) -> Scene:
        redis = RedisServer()
        redis.start()
        rdb = redis_sync.Redis.from_url(redis.url)
        d = tmp_path_factory.mktemp("st", numbered=True)
        socket_path = str(d / "l.sock")
        serve = Serve(d, redis.url, socket_path, "--hostname", HOST, "--recover-tasks", mode, *args)
        scene = Scene(redis, rdb, serve, socket_path, asynq_peers)
        made.append(scene)
        await serve.start()
        return scene

    yield make
    for s in made:
        await s.close()
        await s.serve.kill()
        s.rdb.close()
        s.redis.stop()


# ---------------------------------------------------------------- a worker killed with tasks in flight


async def test_with_on_a_killed_workers_tasks_run_again_exactly_once_on_a_server_started_after(
        scene_factory, capsys):
    s = await scene_factory("on")
    before = await s.metric("asynq_sidecar_tasks_recovered_total", reason="worker_death")

    async def one(version: str) -> float:
        queue = f"k{version}"
        p, ids = await s.busy([*s.launcher(), *s.peer_argv(version, queue, tasks=2)], f"killed {version}", 2)
        m = p.member
        killed_at = redis_now(s.rdb)
        os.kill(m.pid, signal.SIGKILL)
        assert await p.wait() == 128 + signal.SIGKILL
        await eventually(lambda: s.expired_for_asynq(queue, ids), timeout=LEASE_DEADLINE,
                         what=f"{version}: the leases of {ids} expired for asynq's recoverer")
        took = redis_now(s.rdb) - killed_at
        # The sidecar changed lease scores only: the tasks are still active, nothing retried.
        assert {i.decode() for i in s.rdb.lrange(active_key(queue), 0, -1)} == set(ids)
        assert s.rdb.zcard(f"asynq:{{{queue}}}:retry") == 0
        b = await s.rerun(version, queue, f"rerun {version}")
        await eventually(lambda: drained(s.rdb, queue), timeout=RERUN_DEADLINE,
                         what=f"{version}: every task rerun to completion")
        # Each ran twice in all: once on the killed server, once more (asynq's retry) on the other.
        assert runs_of(s.rdb, ids) == {i: [(m.ident, 0), (b.server_id, 1)] for i in ids}
        return took

    took = await asyncio.gather(*(one(v) for v in PEER_VERSIONS))
    await s.serve.wait_for("asynq_sidecar_tasks_recovered_total", before + 2 * len(PEER_VERSIONS),
                           reason="worker_death")
    assert await s.metric("asynq_sidecar_tasks_would_recover_total", reason="worker_death") == 0
    with capsys.disabled():
        print(f"\nkill -> leases expired: {', '.join(f'{t:.2f} s' for t in took)}")


async def test_with_dry_run_a_server_started_right_after_the_kill_leaves_the_tasks_running(scene_factory):
    """The contrast: a dry run counts the tasks and changes nothing; a server started once the
    dead worker's registration is gone does not rerun them (their leases run 30 s past the last
    beat, and asynq's recoverer allows 30 s more), although its recoverer did run: it picked up
    the one task whose lease the test expired by hand, as `on` would have."""
    s = await scene_factory("dry-run")

    async def one(version: str) -> None:
        queue = f"d{version}"
        p, ids = await s.busy([*s.launcher(), *s.peer_argv(version, queue, tasks=3, concurrency=3)],
                              f"killed {version}", 3)
        m = p.member
        written = leases(s.rdb, queue, ids)
        os.kill(m.pid, signal.SIGKILL)
        assert await p.wait() == 128 + signal.SIGKILL
        await eventually(lambda: s.gone(m), timeout=LEASE_DEADLINE, what=f"{version}: the registration removed")
        assert leases(s.rdb, queue, ids) == written
        control, *left = ids
        now = redis_now(s.rdb)
        assert s.rdb.zadd(lease_key(queue), {control: int(now) - 90}, xx=True, ch=True) == 1
        b = await s.rerun(version, queue, f"rerun {version}")
        await eventually(lambda: runs_of(s.rdb, [control])[control] == [(m.ident, 0), (b.server_id, 1)],
                         timeout=RERUN_DEADLINE, what=f"{version}: the control task rerun")
        assert all(score > now - RECOVERER_SKEW for score in written.values())
        assert runs_of(s.rdb, left) == {i: [(m.ident, 0)] for i in left}
        assert leases(s.rdb, queue, left) == {i: written[i] for i in left}
        assert {i.decode() for i in s.rdb.lrange(active_key(queue), 0, -1)} == set(left)

    await asyncio.gather(*(one(v) for v in PEER_VERSIONS))
    await s.serve.wait_for("asynq_sidecar_tasks_would_recover_total", 3 * len(PEER_VERSIONS),
                           reason="worker_death")
    assert await s.metric("asynq_sidecar_tasks_recovered_total", reason="worker_death") == 0


# ---------------------------------------------------------------- live workers, doubtful registrations


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_live_workers_tasks_are_never_touched_while_their_registrations_are_doubtful(scene_factory):
    """Under `--host-pids shared` (no server id reported), with `on`:
    - X and its twin T run as pid 2 of two PID namespaces under one host name; X (watched) is
      SIGKILLed: nothing proves which `{host:2:*}` registration was X's, so no task is touched,
      and T's tasks, live, must not be;
    - W (watched) is frozen by SIGSTOP for longer than its registration and workers hash live;
      thawed, it beats again and its tasks complete.
    Every lease is watched every 5 ms; every task runs exactly once."""
    s = await scene_factory("on", "--host-pids", "shared", "--settle", "0.5")
    version = PEER_VERSIONS[0]

    async def twins():  # X starts once T is registered: each peer tells its registration by its being new
        t = asyncio.ensure_future(s.busy([*s.launcher("/nonexistent/l.sock"),
                                          *s.peer_argv(version, "qt", tasks=2, hold=True)], "T", 2, pidns=True))
        await eventually(lambda: s.started and s.started[-1].server_id, timeout=15, what="T registered")
        x = await s.busy([*s.launcher(), *s.peer_argv(version, "qx", tasks=2, hold=True)], "X", 2, pidns=True)
        return x, await t

    (w, w_ids), ((x, x_ids), (t, t_ids)) = await asyncio.gather(
        s.busy([*s.launcher(), *s.peer_argv(version, "qw", tasks=2, hold=True)], "W", 2), twins())
    assert x.pid == t.pid == 2 and x.server_id != t.server_id
    tasks = {**dict.fromkeys(w_ids, "qw"), **dict.fromkeys(x_ids, "qx"), **dict.fromkeys(t_ids, "qt")}
    guard = LeaseGuard(s.redis.url, tasks).start()
    try:
        await eventually(lambda: len(guard.highest) == len(tasks), timeout=5, what="every lease read")
        os.kill(w.pid, signal.SIGSTOP)
        frozen_score = s.rdb.zscore(asynq.SERVERS, w.member.key)
        (launcher,) = children(x.proc.pid)
        (x_pid,) = children(launcher)
        os.kill(x_pid, signal.SIGKILL)
        assert await x.wait() == 128 + signal.SIGKILL
        await s.serve.wait_for("asynq_sidecar_worker_exits_total", 1, outcome="killed")
        # X's registration goes once expired (nothing proves it X's); T's stays.
        await eventually(lambda: s.gone(x.member), timeout=20, what="X's registration removed once expired")
        assert not s.gone(t.member)
        # W stays frozen until its registration is expired past settle and a details read, and
        # its last beat's task list is gone (TTL): nothing in Redis says W is alive.
        await eventually(lambda: (redis_now(s.rdb) > frozen_score + STALL_PAST
                                  and not s.rdb.exists(w.member.sibling("workers").key)),
                         timeout=15, what="W's registration expired and its workers hash gone")
        os.kill(w.pid, signal.SIGCONT)
        await eventually(lambda: s.rdb.hlen(w.member.sibling("workers").key) == 2, timeout=10,
                         what="W beating again")
        s.rdb.set(RELEASE, 1)
        await eventually(lambda: drained(s.rdb, "qw") and drained(s.rdb, "qt"), timeout=10,
                         what="W's and T's tasks completed")
        guard.assert_untouched()
    finally:
        guard.stop()
    assert runs_of(s.rdb, w_ids) == {i: [(w.server_id, 0)] for i in w_ids}
    assert runs_of(s.rdb, t_ids) == {i: [(t.server_id, 0)] for i in t_ids}
    assert runs_of(s.rdb, x_ids) == {i: [(x.server_id, 0)] for i in x_ids}
    for reason in ("worker_death", "orphan"):
        assert await s.metric("asynq_sidecar_tasks_recovered_total", reason=reason) == 0


# ---------------------------------------------------------------- orphans


async def orphan_scene(s: Scene, version: str) -> tuple[Peer, str, str, Peer, str]:
    """D, a worker no sidecar watches, is SIGKILLed with two tasks in flight; one loses its lease
    entry (the orphan), the other keeps it (asynq recovers that one itself). D's registration is
    removed, as the sidecar's cleanup or asynq's own listing does for a dead server. L, live,
    holds a task whose lease entry was deleted too: listed in a live workers hash, no orphan."""
    (d, (orphan, leased)), (live, (held,)) = await asyncio.gather(
        s.busy(s.peer_argv(version, "qo", tasks=2), "D", 2),
        s.busy(s.peer_argv(version, "ql", tasks=1, concurrency=1, hold=True), "L", 1))
    os.kill(d.pid, signal.SIGKILL)
    await d.wait()
    assert s.rdb.zrem(lease_key("qo"), orphan) == 1
    assert s.rdb.zrem(lease_key("ql"), held) == 1
    m = d.member
    s.rdb.zrem(asynq.SERVERS, m.key)
    s.rdb.zrem(asynq.WORKERS, m.sibling("workers").key)
    s.rdb.delete(m.key, m.sibling("workers").key)
    return d, orphan, leased, live, held


async def test_an_orphan_gets_an_expired_lease_with_on_and_runs_once_more_and_is_only_counted_with_dry_run(
        scene_factory):
    version = PEER_VERSIONS[0]
    on, dry = await asyncio.gather(scene_factory("on"), scene_factory("dry-run"))
    (d, orphan, leased, live, held), (_, dry_orphan, _, dry_live, dry_held) = await asyncio.gather(
        orphan_scene(on, version), orphan_scene(dry, version))

    async def counted(s: Scene, name: str) -> None:
        await s.serve.wait_for(name, 1, timeout=ORPHAN_DEADLINE, reason="orphan")

    await asyncio.gather(counted(on, "asynq_sidecar_tasks_recovered_total"),
                         counted(dry, "asynq_sidecar_tasks_would_recover_total"))
    # on: an expired lease entry, nothing else; dry-run: still none, still counted as an orphan.
    assert on.expired_for_asynq("qo", [orphan])
    assert dry.rdb.zscore(lease_key("qo"), dry_orphan) is None
    await dry.serve.wait_for("asynq_queue_orphaned_tasks", 1, queue="qo")
    assert await dry.metric("asynq_queue_orphaned_tasks", queue="ql") == 0
    assert await dry.metric("asynq_sidecar_tasks_recovered_total", reason="orphan") == 0
    assert await on.metric("asynq_sidecar_tasks_would_recover_total", reason="orphan") == 0
    # The live worker's lease-less task was left alone by both.
    for s, task in ((on, held), (dry, dry_held)):
        assert s.rdb.zscore(lease_key("ql"), task) is None
        assert s.rdb.lpos(active_key("ql"), task) is not None

    b = await on.rerun(version, "qo", "rerun")
    await eventually(lambda: runs_of(on.rdb, [orphan])[orphan] == [(d.server_id, 0), (b.server_id, 1)],
                     timeout=RERUN_DEADLINE, what="the orphan rerun")
    # The task that kept its lease waits for asynq (its lease is not past the recoverer's skew).
    assert runs_of(on.rdb, [leased]) == {leased: [(d.server_id, 0)]}
    for s, peer, task in ((on, live, held), (dry, dry_live, dry_held)):
        s.rdb.set(RELEASE, 1)
        await eventually(lambda s=s: drained(s.rdb, "ql"), timeout=10, what="the live task completed")
        assert runs_of(s.rdb, [task]) == {task: [(peer.server_id, 0)]}
    assert await on.metric("asynq_sidecar_tasks_recovered_total", reason="orphan") == 1
