"""A randomized fault run: two sidecars (two pods) and a dozen real workers on one real Redis,
driven by a seeded schedule of worker starts, kills (of a worker, or of its launcher so that the
worker outlives it), graceful stops, asynq #979 leaks (exit without clearing, a late beat after
the clear), stalls, Redis pauses and a restart, sidecar restarts, clock offsets and twins.

Pod A (host HOST, --host-pids shared) runs twins: workers that are PID 2 of their own PID
namespace (`unshare`), and workers that register and say hello as pid 2 (emulate --pid). Pod B
(another host, no twins, --host-pids unique) has a sidecar on a shifted clock (faketime): 20 to
75 s ahead, restarted 20 to 75 s behind, or the other way round. A Monitor thread reads
every worker's registration every few milliseconds and counts (a) live registrations ever
missing and (b) dead ones left after their expiry plus settle plus one sweep period; both must
be 0.

The seed is printed; FAULT_RUN_SEED=<seed> replays its schedule (the same faults in the same
order on the same workers; the machine decides the exact timing).

Every timing bound, and why it holds:

- A worker beats every HEARTBEAT s and writes the score floor(now + TTL) > now + TTL - 1: a
  registration whose owner beats is always more than MARGIN = TTL - 1 - HEARTBEAT ahead of
  Redis's clock, and the sidecar removes an unproven one only SETTLE after it expired.
- A stall (SIGSTOP) lasts at most STALL_MAX < MARGIN: the registration does not even expire,
  and its owner has MARGIN - STALL_MAX + SETTLE after SIGCONT to beat again.
- A Redis pause (CLIENT PAUSE WRITE) lasts at most PAUSE_MAX < MARGIN: no registration can
  expire while its owner's beat waits behind the pause.
- A Redis restart (append-only, fsync always: nothing acknowledged is lost) takes a few tens of
  milliseconds; workers beat again at their next beat.
- Faults run one at a time (each is awaited before the next), so their delays never add up.
- A machine too loaded to run a worker for longer than its TTL is a stall past the TTL, which
  asynq itself calls death: a registration missing only after a read that saw it whole past its
  expiry score is reported apart (owners late past their TTL) and not counted. The least margin
  (score minus now) of any live registration is printed: it shows how close the run came.
- A dead registration is due for removal GRACE (= SETTLE) after its expiry: the reaper of the
  sidecar that watched it removes it then, and sidecar A's sweep, every SWEEP s, removes
  anything expired by more than GRACE. A Redis outage or sidecar A's restart that overlaps the
  wait moves it to the outage's end. After the due time it gets one sweep period plus SLACK,
  the time a sweep and the event loop take on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis as redis_sync

from tests.support.faults import EMULATE, Monitor, Serve, Tracked, process_alive
from tests.support.helpers import eventually
from tests.support.lifecycle import HOST, Worker
from tests.support.tools import require_tool

SEED_VARIABLE = "FAULT_RUN_SEED"

HEARTBEAT = 0.5  # seconds between a worker's beats (asynq: 5)
TTL = 3  # seconds: a beat's score is now + TTL (asynq: 10)
MARGIN = TTL - 1 - HEARTBEAT  # 1.5 s: how far ahead of Redis's clock a beating worker's score always is
SETTLE = 1.0  # the sidecars' --settle
GRACE = SETTLE  # the sidecars' --grace
SWEEP = 2.0  # the sidecars' --sweep-interval
SLACK = 1.0  # a sweep's own time and the event loop's lateness on a loaded 2-core machine
STALL_MAX = 1.0  # the longest SIGSTOP
PAUSE_MAX = 0.8  # the longest CLIENT PAUSE
DRAIN = 0.2  # a worker's drain after SIGTERM
assert STALL_MAX < MARGIN and PAUSE_MAX < MARGIN

#: Pod B's host name (pod A is HOST); pod B's sidecar runs on a shifted clock.
HOST_B = "fault-run-pod-b"
#: The pid every worker of a PID namespace has (its launcher is PID 1).
TWIN_PID = 2

SIDECAR_ARGS = ("--settle", str(SETTLE), "--sweep-interval", str(SWEEP), "--grace", str(GRACE))

#: The faults of one run, shuffled by the seed; each kind appears at least once.
ACTIONS = (["start"] * 7 + ["end"] * 6 + ["stall"] * 3 + ["pause"] * 3 + ["orphan"]
           + ["redis-restart", "restart-a", "restart-b"])


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@dataclass
class Pod:
    """One simulated pod: a host name, a sidecar (on a fixed port and socket) and its clock."""

    name: str
    host: str
    host_pids: str  # the sidecar's --host-pids: shared where twins run, unique where none do
    socket: str
    port: int
    offsets: list[int]  # seconds: the sidecar's clock offset, one per (re)start; 0 = none
    sidecar: Serve | None = None
    starts: int = 0
    sweeps_before: int = 0  # sweeps its log showed when the sidecar last (re)started

    def sweeps(self) -> int:
        """Sweeps that ran to the end, as its sidecars' log (one file across restarts) shows."""
        return self.sidecar.log().count("exporter.cleanup.sweep: sweep removed") if self.sidecar else 0


@dataclass
class Run:
    """One worker under test."""

    n: int
    kind: str  # launcher | socket | twin-ns | twin-pid
    pod: Pod
    on_exit: str  # clear | leak | late-beat
    tracked: Tracked
    proc: Worker
    worker_pid: int = 0  # the emulator's pid (in this PID namespace)
    launcher_pid: int | None = None
    orphaned: bool = False  # its launcher was killed; it lives on
    ended: bool = False

    @property
    def name(self) -> str:
        return f"w{self.n}"


class FaultRun:
    """The schedule, its execution, and the record of what was done."""

    def __init__(self, seed: int, faults, processes, redis_server, tmp_path: Path) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults
        self.processes = processes
        self.redis_server = redis_server
        self.redis_url = redis_server.url
        self.tmp_path = tmp_path
        self.unshare = require_tool("unshare")
        self.faketime = require_tool("faketime")
        self.rdb = redis_sync.Redis.from_url(self.redis_url)
        self.outages: list[tuple[float, float | None]] = []  # Redis or sidecar A unavailable
        self.monitor = Monitor(self.redis_url, self.deadline)
        self.runs: list[Run] = []
        self.numbered = 0  # workers numbered so far (w0, w1, ...)
        self.log: list[str] = []
        self.deaths: list[asyncio.Task] = []
        self.t0 = time.time()
        ahead, behind = self.rng.randint(20, 75), -self.rng.randint(20, 75)
        offsets = [ahead, behind] if self.rng.random() < 0.5 else [behind, ahead]
        base = os.path.dirname(faults.socket_path)
        self.pod_a = Pod("a", HOST, "shared", faults.socket_path, 0, [0, 0])
        self.pod_b = Pod("b", HOST_B, "unique", os.path.join(base, "b.sock"), 0, offsets)

    # ------------------------------------------------------------ the bounds

    def deadline(self, t: Tracked) -> float | None:
        """When a dead registration must be gone (see the module docstring); None while unknown."""
        if t.dead_at is None or t.last_score is None:
            return None
        due = t.last_score + max(SETTLE, GRACE)
        for start, end in sorted(self.outages, key=lambda outage: outage[0]):
            if start <= due + SWEEP + SLACK:
                if end is None:
                    return None
                due = max(due, end)
        return due + SWEEP + SLACK

    def note(self, text: str) -> None:
        self.log.append(f"{time.time() - self.t0:6.2f}s {text}")

    # ------------------------------------------------------------ sidecars

    async def start_sidecar(self, pod: Pod) -> None:
        offset = pod.offsets[min(pod.starts, len(pod.offsets) - 1)]
        wrapper = (self.faketime, "-f", f"{offset:+d}s") if offset else ()
        sc = Serve(self.tmp_path, self.redis_url, pod.socket, *SIDECAR_ARGS, "--hostname", pod.host,
                   "--host-pids", pod.host_pids,
                   port=pod.port or None, name=f"serve-{pod.name}", wrapper=wrapper)
        pod.port = sc.port
        self.faults.sidecars.append(sc)
        pod.sidecar = await sc.start()
        pod.starts += 1
        pod.sweeps_before = pod.sweeps()
        self.note(f"sidecar {pod.name} up" + (f" (clock {offset:+d}s)" if offset else ""))

    async def restart_sidecar(self, pod: Pod, down: float) -> None:
        assert pod.sidecar is not None
        outage = len(self.outages)
        if pod is self.pod_a:
            self.outages.append((time.time(), None))
        await pod.sidecar.kill()
        self.note(f"sidecar {pod.name} killed; down {down:.2f}s")
        await asyncio.sleep(down)  # the fault: how long the pod has no sidecar
        await self.start_sidecar(pod)
        if pod is self.pod_a:
            self.outages[outage] = (self.outages[outage][0], time.time())

    # ------------------------------------------------------------ Redis

    async def redis_pause(self, seconds: float) -> None:
        start = time.time()
        self.outages.append((start, start + seconds))
        self.rdb.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "WRITE")
        self.note(f"Redis paused for writes {seconds:.2f}s")
        await asyncio.sleep(seconds)  # the fault's length

    async def redis_restart(self) -> None:
        outage = len(self.outages)
        self.outages.append((time.time(), None))
        self.redis_server.stop()
        await asyncio.to_thread(self.redis_server.start)
        self.outages[outage] = (self.outages[outage][0], time.time())
        self.note(f"Redis restarted (down {self.outages[outage][1] - self.outages[outage][0]:.2f}s)")

    # ------------------------------------------------------------ workers

    def emulator_argv(self, pod: Pod, server_id: str, on_exit: str, *extra: str) -> tuple[str, ...]:
        return (*EMULATE, "--redis-url", self.redis_url, "--host", pod.host, "--heartbeat", str(HEARTBEAT),
                "--ttl", str(TTL), "--tasks", "1", "--drain", str(DRAIN), "--server-id", server_id,
                "--on-exit", on_exit, *extra)

    def launcher_argv(self, pod: Pod, *command: str) -> tuple[str, ...]:
        return (sys.executable, "-m", "exporter", "run", "--socket", pod.socket, "--hostname", pod.host,
                "--log-level", "info", "--", *command)

    async def start_worker(self, kind: str, pod: Pod, on_exit: str) -> Run:
        n = self.numbered
        self.numbered += 1
        server_id = f"w{n}-{uuid.uuid4()}"
        tracked = self.monitor.track(server_id, f"w{n} {kind} pod {pod.name} on-exit {on_exit}")
        emulate = self.emulator_argv(pod, server_id, on_exit)
        if kind == "launcher":
            proc = await self.processes.start(*self.launcher_argv(pod, *emulate))
        elif kind == "twin-ns":
            proc = await self.processes.start(self.unshare, "-pf", "--kill-child", "--mount-proc",
                                              *self.launcher_argv(pod, *emulate))
        elif kind == "socket":
            proc = await self.processes.start(*emulate, "--socket", pod.socket)
        else:  # twin-pid: registers (and says hello) as pid TWIN_PID, as a namespaced twin does
            proc = await self.processes.start(*emulate, "--socket", pod.socket, "--pid", str(TWIN_PID))
        run = Run(n, kind, pod, on_exit, tracked, proc)
        self.runs.append(run)
        if kind == "launcher":
            run.launcher_pid = proc.pid
            run.worker_pid = (await self._child(proc.pid))[0]
        elif kind == "twin-ns":
            run.launcher_pid = (await self._child(proc.pid))[0]
            run.worker_pid = (await self._child(run.launcher_pid))[0]
        else:
            run.worker_pid = proc.pid
        proc.child_pid = run.worker_pid  # killed at the end of the test if still there
        await eventually(lambda: tracked.state == "live", timeout=15, what=f"{tracked.label} registered")
        self.note(f"{run.name} started: {kind} in pod {pod.name}, on-exit {on_exit}, pid {run.worker_pid}")
        return run

    async def _child(self, pid: int) -> list[int]:
        return await eventually(lambda: children(pid), timeout=15, what=f"a child of pid {pid}")

    def alive(self) -> list[Run]:
        """The workers not ended, in the order they were numbered (the schedule's picks use it)."""
        return sorted((r for r in self.runs if not r.ended), key=lambda r: r.n)

    async def end_worker(self, run: Run, how: str) -> None:
        """Stop a worker (graceful: SIGTERM, through its launcher if it has one) or SIGKILL it;
        its registration is no longer required from now on, and due once it is dead."""
        run.ended = True
        run.tracked.state = "ending"
        if how == "graceful":
            target = run.worker_pid if run.orphaned or run.launcher_pid is None else run.launcher_pid
            os.kill(target, signal.SIGTERM)
        else:
            os.kill(run.worker_pid, signal.SIGKILL)
        self.note(f"{run.name} {'stopped (SIGTERM)' if how == 'graceful' else 'killed (SIGKILL)'}"
                  + (f", on-exit {run.on_exit}" if how == "graceful" else ""))
        self.deaths.append(asyncio.create_task(self._died(run)))

    async def _died(self, run: Run) -> None:
        await eventually(lambda: not process_alive(run.worker_pid), timeout=15, interval=0.01,
                         what=f"{run.name} (pid {run.worker_pid}) to exit")
        run.tracked.dead_at = time.time()
        run.tracked.state = "dead"

    async def orphan(self, run: Run) -> None:
        """SIGKILL the launcher: the sidecar loses the connection, the worker lives on."""
        assert run.launcher_pid is not None
        os.kill(run.launcher_pid, signal.SIGKILL)
        run.orphaned = True
        self.note(f"{run.name}'s launcher killed; the worker (pid {run.worker_pid}) lives on")

    async def stall(self, run: Run, seconds: float) -> None:
        os.kill(run.worker_pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)  # the fault's length
        finally:
            os.kill(run.worker_pid, signal.SIGCONT)
        self.note(f"{run.name} stalled {seconds:.2f}s (SIGSTOP/SIGCONT)")

    # ------------------------------------------------------------ the schedule

    def plan(self) -> list[tuple]:
        """The whole schedule, drawn from the seed before anything runs: (action, gap before it,
        parameters). Which worker an action hits is a draw in [0, 1) that picks among the
        workers alive when it runs, which the schedule itself decides."""
        rng = self.rng
        actions = list(ACTIONS)
        rng.shuffle(actions)
        plan = []
        for action in actions:
            gap = round(rng.uniform(0.1, 0.8), 2)
            if action == "start":
                kind = rng.choice(["launcher", "socket", "twin-ns", "twin-pid"])
                pod = "a" if kind.startswith("twin") else rng.choice("ab")
                params = (kind, pod, rng.choice(["clear", "clear", "leak", "late-beat"]))
            elif action == "end":
                params = (rng.random(), rng.choice(["graceful", "graceful", "kill"]))
            elif action == "stall":
                params = (rng.random(), round(rng.uniform(0.2, STALL_MAX), 2))
            elif action == "pause":
                params = (round(rng.uniform(0.2, PAUSE_MAX), 2),)
            elif action == "orphan":
                params = (rng.random(), rng.choice("ab"), rng.choice(["clear", "leak"]))
            elif action.startswith("restart"):
                params = (round(rng.uniform(0.1, 1.0), 2),)
            else:
                params = ()
            plan.append((action, gap, params))
        return plan

    async def execute(self, action: str, params: tuple) -> None:
        def pick(u: float, runs: list[Run]) -> Run:
            return runs[int(u * len(runs))]

        if action == "start":
            kind, pod, on_exit = params
            await self.start_worker(kind, self.pod_a if pod == "a" else self.pod_b, on_exit)
        elif action == "end":
            u, how = params
            alive = self.alive()
            if len(alive) <= 2:  # keep some registrations live through every fault
                self.note("end: two workers left, none ended")
                return
            await self.end_worker(pick(u, alive), how)
        elif action == "stall":
            u, seconds = params
            await self.stall(pick(u, self.alive()), seconds)
        elif action == "pause":
            await self.redis_pause(*params)
        elif action == "orphan":
            u, pod, on_exit = params
            candidates = [r for r in self.alive() if r.kind == "launcher" and not r.orphaned]
            run = (pick(u, candidates) if candidates else
                   await self.start_worker("launcher", self.pod_a if pod == "a" else self.pod_b, on_exit))
            await self.orphan(run)
        elif action == "redis-restart":
            await self.redis_restart()
        elif action == "restart-a":
            await self.restart_sidecar(self.pod_a, *params)
        elif action == "restart-b":
            await self.restart_sidecar(self.pod_b, *params)

    async def run(self) -> None:
        plan = self.plan()
        initial = [("launcher", self.pod_a), ("socket", self.pod_a), ("twin-ns", self.pod_a),
                   ("twin-pid", self.pod_a), ("launcher", self.pod_b), ("socket", self.pod_b)]
        initial_exits = [self.rng.choice(["clear", "leak", "late-beat"]) for _ in initial]
        final = [self.rng.choice(["graceful", "kill"]) for _ in range(len(plan) + len(initial))]
        print(f"\n{SEED_VARIABLE}={self.seed}; plan:", *(f"{a} {p}" for a, _, p in plan), sep="\n  ")
        self.monitor.start()
        await asyncio.gather(self.start_sidecar(self.pod_a), self.start_sidecar(self.pod_b))
        await asyncio.gather(*(self.start_worker(kind, pod, on_exit)
                               for (kind, pod), on_exit in zip(initial, initial_exits, strict=False)))
        for action, gap, params in plan:
            await asyncio.sleep(gap)  # the schedule's spacing between faults
            await self.execute(action, params)
        # Every sidecar (the one restarted last too) sweeps once more while the last workers
        # live: what the last fault did to live registrations shows.
        pods = (self.pod_a, self.pod_b)
        after = {p.name: max(p.sweeps(), p.sweeps_before) for p in pods}
        await eventually(lambda: all(p.sweeps() > after[p.name] for p in pods), timeout=15,
                         what="a sweep by each sidecar after the last fault")
        for run, how in zip(self.alive(), final, strict=False):
            await self.end_worker(run, how)
        await asyncio.gather(*self.deaths)
        self.note("every worker is gone")
        await self.wait_for_deadlines()

    async def wait_for_deadlines(self) -> None:
        """Until every dead registration is gone or past its deadline (the monitor judges)."""
        while True:
            dead = [r.tracked for r in self.runs]
            dues = [self.deadline(t) for t in dead if t.gone_at is None and t.left is None]
            if not dues:
                return
            assert None not in dues, "an outage never ended"
            if time.time() > max(dues) + 0.5:  # the monitor has read past every deadline
                return
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------ the figures

    def sidecar_lines(self, text: str) -> list[str]:
        """The sidecars' log lines that contain `text`."""
        lines = []
        for path in sorted(self.tmp_path.glob("serve-*.log")):
            lines += [f"  {path.name}: {line}" for line in path.read_text(errors="replace").splitlines()
                      if text in line]
        return lines


async def test_randomized_faults_remove_no_live_registration_and_leave_no_dead_one(
        faults, processes, tmp_path):
    seed = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(2**32))
    started = time.monotonic()
    redis_server = faults.redis(persistent=True)
    run = FaultRun(seed, faults, processes, redis_server, tmp_path)
    try:
        await run.run()
    finally:
        run.monitor.stop()
        run.rdb.close()
    elapsed = time.monotonic() - started
    tracked = [r.tracked for r in run.runs]
    missing = [t for t in tracked if t.missing]
    left = [t for t in tracked if t.left]
    overdue = [t for t in tracked if t.overdue and not t.missing]
    late = max(((t.gone_at - t.last_score, t.label) for t in tracked
                if t.gone_at is not None and t.last_score is not None), default=(0.0, "none"))
    margin = min((t.least_margin for t in tracked if t.least_margin is not None), default=0)
    print(*run.log, sep="\n")
    print(f"{SEED_VARIABLE}={seed}: {len(tracked)} workers, {run.monitor.reads} reads, {elapsed:.1f}s; "
          f"live registrations ever missing: {len(missing)}; dead registrations left: {len(left)}; "
          f"least margin of a live registration {margin:.2f}s; owners late past their TTL (not "
          f"counted): {len(overdue)}; latest removal {late[0]:.2f}s after expiry ({late[1]})")
    problems = []
    for t in missing:
        (first, seen), (last, _) = t.missing[0], t.missing[-1]
        problems.append(f"LIVE MISSING {t.label} {t.member}: {len(t.missing)} reads from "
                        f"{first - run.t0:.2f}s to {last - run.t0:.2f}s, first (servers score, "
                        f"workers score, keys) {seen}")
        problems += run.sidecar_lines(t.member[t.member.index("{"):])
    for t in left:
        problems.append(f"DEAD LEFT {t.label} {t.member}: present at {t.left[0] - run.t0:.2f}s, due "
                        f"{t.left[1] - run.t0:.2f}s (expiry {t.last_score - run.t0:.2f}s)")
        problems += run.sidecar_lines(t.member[t.member.index("{"):])
    if problems:  # the sweeps that removed something (they name no member)
        problems += [line for line in run.sidecar_lines("sweep removed") if "sweep removed 0 " not in line]
    assert not problems, f"replay with {SEED_VARIABLE}={seed}:\n" + "\n".join(problems)
