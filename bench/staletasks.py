"""From a worker's SIGKILL to its in-flight tasks running again, with `--recover-tasks on` and
without (`off`: asynq's own lease recovery alone), against real asynq.

Real processes, one set per run, all runs at once (they mostly wait): a redis-server, `asynq-sidecar
serve`, a worker (go/internal/asynqpeer at asynq v0.26.0, under `asynq-sidecar run`) with TASKS
tasks in flight, and a live server B of the same queue, started before the kill, with a zero retry
delay and a 100 ms forwarder period (so that a task asynq's recoverer retries runs at once: what is
measured is when the recoverer hands it back). B's recoverer runs at its Start() and then every
minute; the worker is killed PHASE seconds after B's start, i.e. that long after B's recoverer
ran. The clock starts just before kill(SIGKILL) and stops at the moment B's handler starts each
task again (the peer records it, with asynq's retry count, in a Redis list).

Expected: with `on` the sidecar expires the leases at once and B's next run (at most a minute
later) retries them; with `off` a lease runs out 30 s after the worker's last beat and asynq's
recoverer takes it only once it is 30 s expired, at a run: 60-120 s after the kill.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.core import (
    INFO,
    MISS,
    NOT_MEASURED,
    PASS,
    REPO,
    BenchError,
    Report,
    Row,
    ServeProcess,
    metric,
    private_redis,
    python_env,
    stop_process,
    wait_until,
    workdir,
)

VERSION = "v0.26.0"
TASKS = 4
QUEUE = "bench"
RUNS = "bench:runs"
#: Seconds after B's start (its recoverer's run) at which the worker is killed: just after a run
#: (the longest wait for the next one) and half a period later.
PHASES, QUICK_PHASES = (5.0, 35.0), (5.0,)
WITH_TARGET = 60.0
WITHOUT_RANGE = (60.0, 120.0)
#: Give up on a rerun after this long (asynq's worst case is 120 s).
RERUN_TIMEOUT = 180.0
HOST = socket.gethostname()  # what asynq registers under: the sidecar must watch this host


@dataclass
class Peer:
    """An asynqpeer process (alone or under the launcher) and the lines it printed."""

    argv: list[str]
    lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def start(self) -> Peer:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, cwd=REPO, env=python_env(),
                                     start_new_session=True, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def line(self, prefix: str, timeout: float = 30.0) -> str:
        return wait_until(lambda: next((ln for ln in self.lines if ln.startswith(prefix)), None), timeout,
                          f"a line {prefix!r} from {self.argv[-1]!r}")

    def ready(self) -> tuple[int, str]:
        _, pid, server_id = self.line("ready ").split()
        return int(pid), server_id

    def stop(self, pid: int | None = None) -> None:
        if pid is not None:  # the asynq process under a launcher: never left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            stop_process(self.proc)


@dataclass
class Result:
    mode: str
    phase: float
    rerun: list[float]  # seconds from the kill to each task's second run
    expired: float | None  # seconds from the kill to every lease expired for asynq, if it happened
    exactly_twice: bool
    counted: float


def _peer_argv(peer: Path, addr: str, *extra: str) -> list[str]:
    return [str(peer), "--mode", "run", "--redis", addr, "--queue", QUEUE, "--runs", RUNS,
            "--retry-delay", "0s", "--poll", "100ms", "--shutdown-timeout", "1s", *extra]


def _one(peer: Path, mode: str, phase: float) -> Result:
    with private_redis() as (server, client), workdir() as wd:
        addr = f"127.0.0.1:{server.port}"
        sc = ServeProcess(server.url, wd, hostname=HOST, args=["--recover-tasks", mode]).start()
        worker = b = None
        worker_pid = None
        try:
            sc.wait_served()
            worker = Peer([sys.executable, "-m", "exporter", "run", "--socket", sc.socket, "--hostname", HOST,
                           "--log-level", "warning", "--",
                           *_peer_argv(peer, addr, "--enqueue", str(TASKS), "--concurrency", str(TASKS),
                                       "--task-sleep", "600s")]).start()
            worker_pid, worker_id = worker.ready()
            worker.line(f"busy {TASKS}")
            workers_hash = f"asynq:workers:{{{HOST}:{worker_pid}:{worker_id}}}"
            # The sidecar hands back what the worker's last beat listed: wait for that beat.
            wait_until(lambda: client.hlen(workers_hash) == TASKS, 15, "the tasks in the workers hash")
            ids = [i.decode() for i in client.hkeys(workers_hash)]
            b = Peer(_peer_argv(peer, addr, "--concurrency", str(TASKS), "--task-sleep", "0s")).start()
            b.ready()
            b_started = time.time()  # its Start() ran the recoverer just before it registered
            time.sleep(max(0.0, b_started + phase - time.time()))
            killed = time.time()
            os.kill(worker_pid, signal.SIGKILL)
            worker_pid = None  # dead: its pid may be reused by the time we clean up
            expired = None
            deadline = killed + RERUN_TIMEOUT
            while True:
                now = time.time()
                if expired is None:
                    t = client.time()
                    cutoff = t[0] + t[1] / 1e6 - 30
                    scores = [client.zscore(f"asynq:{{{QUEUE}}}:lease", i) for i in ids]
                    if all(s is not None and s < cutoff for s in scores):
                        expired = now - killed
                reruns = {}
                for raw in client.lrange(RUNS, 0, -1):
                    task_id, _, retried, at_ms = raw.decode().split()
                    if int(retried) >= 1 and task_id in ids:
                        reruns.setdefault(task_id, int(at_ms) / 1000 - killed)
                if len(reruns) == len(ids):
                    break
                if now > deadline:
                    raise BenchError(f"{mode}, phase {phase:g} s: {len(ids) - len(reruns)} of {len(ids)} "
                                     f"tasks not rerun within {RERUN_TIMEOUT:g} s:\n{sc.tail()}")
                time.sleep(0.05)
            wait_until(lambda: client.llen(f"asynq:{{{QUEUE}}}:active") == 0, 10, "the reruns to complete")
            per_task: dict[str, int] = {}
            for raw in client.lrange(RUNS, 0, -1):
                task_id = raw.decode().split()[0]
                per_task[task_id] = per_task.get(task_id, 0) + 1
            counted = metric(sc.scrape(), "asynq_sidecar_tasks_recovered_total", reason="worker_death") or 0
            return Result(mode, phase, sorted(reruns.values()), expired,
                          per_task == dict.fromkeys(ids, 2), counted)
        finally:
            if b is not None:
                b.stop()
            if worker is not None:
                worker.stop(worker_pid)
            sc.stop()


def stale_tasks(quick: bool) -> Report:
    name = "stale-tasks"
    try:
        from tests.support.gobuild import GoBuildError, build_peer, find_go
    except ImportError as e:  # an installed package without the tests
        return Report([Row(name, f"needs tests/gobuild.py: {e}", [], "s", verdict=NOT_MEASURED)])
    go = find_go()
    if go is None:
        return Report([Row(name, "needs go to build the real asynq peer", [], "s", verdict=NOT_MEASURED)])
    try:
        peer = build_peer(go, VERSION)
    except GoBuildError as e:
        raise BenchError(str(e)) from None
    phases = QUICK_PHASES if quick else PHASES
    runs = [(mode, phase) for phase in phases for mode in ("on", "off")]
    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(lambda r: _one(peer, *r), runs))
    rows = []
    low, high = WITHOUT_RANGE
    for r in results:
        where = f"kill {r.phase:g} s after the live server's recoverer ran, {TASKS} tasks, asynq {VERSION}"
        if r.mode == "on":
            rows.append(Row(name, f"SIGKILL -> task runs again, --recover-tasks on; {where}", r.rerun, "s",
                            f"<= {WITH_TARGET:g} s", PASS if max(r.rerun) <= WITH_TARGET else MISS))
            rows.append(Row(name, "SIGKILL -> every lease expired for asynq's recoverer (on)",
                            [r.expired] if r.expired is not None else [], "s"))
        else:
            ok = low <= min(r.rerun) and max(r.rerun) <= high
            rows.append(Row(name, f"SIGKILL -> task runs again, --recover-tasks off (asynq alone); {where}",
                            r.rerun, "s", f"{low:g}-{high:g} s (asynq's own)", PASS if ok else MISS))
        want = TASKS if r.mode == "on" else 0
        check = Row(name, f"({r.mode}) each task ran exactly twice; the sidecar counted {r.counted:.0f} "
                          f"recovered (worker_death)", [r.counted], "count", verdict=INFO)
        if not r.exactly_twice or r.counted != want:
            check.target, check.verdict = f"twice each, {want} counted", MISS
        rows.append(check)
    return Report(rows)
