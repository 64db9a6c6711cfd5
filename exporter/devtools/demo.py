"""`asynq-sidecar demo`: the whole story on a laptop, on a private Redis.

It starts a throw-away Redis, the sidecar (in this process) and emulated Asynq workers under the
launcher (`asynq-sidecar run -- asynq-sidecar emulate`), then plays a scripted story and checks
each step against what the sidecar exports on /metrics and what is left in Redis:

1. leftovers of three "old pods" (expired registrations) are already in Redis;
2. three workers start and register;
3. one is stopped gracefully: it drains and deregisters itself, the shutdown is measured;
4. one is killed with SIGKILL: its registration is removed by the sidecar;
5. one exits 0 without deregistering (asynq #979): a leak, counted and removed;
6. a fleet sweep removes the old pods' leftovers;
7. a task that lost its lease entry (an orphan asynq never recovers) is found, only counted by
   `--recover-tasks dry-run` (the default), then handed back to asynq's recoverer as `on` does.

Then it keeps workers coming and going (so graphs move) until Ctrl-C or `--duration` seconds,
and exits 0 when every step behaved as expected, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from exporter.asynq import model as asynq
from exporter.cleanup.sweep import Sweeper
from exporter.cleanup.sweep_report import registrations_removed
from exporter.devtools.redis_server import RedisServer, RedisServerError
from exporter.redisio.connect import connect
from exporter.server.sidecar import Sidecar
from exporter.settings import CleanupConfig, DemoConfig, LogConfig, RedisConfig, ServeConfig, SocketConfig
from exporter.tasks import reader as tasks
from exporter.tasks.recovery import ORPHAN_CONFIRM_AFTER, repair_orphans

#: How long each emulated worker drains after SIGTERM, in seconds (asynq's default is up to 8 s).
DRAIN = 1.5
#: Old pods' leftovers are this many seconds past their expiry when the demo starts.
LEFTOVER_AGE = 600


class Printer:
    """Readable step-by-step output; colour only on a terminal and unless --no-color."""

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.color = color
        self.failures: list[str] = []

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def step(self, text: str) -> None:
        print("\n" + self._c("1", f"== {text}"), file=self.out, flush=True)

    def info(self, text: str) -> None:
        print(f"   {text}", file=self.out, flush=True)

    def check(self, ok: bool, text: str) -> bool:
        mark = self._c("32", "ok  ") if ok else self._c("31", "FAIL")
        print(f"   {mark} {text}", file=self.out, flush=True)
        if not ok:
            self.failures.append(text)
        return ok


@dataclass
class Worker:
    """One emulated asynq worker under the launcher (two processes: launcher and child)."""

    name: str
    launcher: asyncio.subprocess.Process
    log_path: Path
    child_pid: int | None = None
    registration: str | None = None


@dataclass
class Demo:
    sidecar: Sidecar
    redis: Redis
    redis_url: str
    socket: str
    workdir: Path
    p: Printer
    workers: list[Worker] = field(default_factory=list)
    counter: int = 0

    # ------------------------------------------------------------ what the sidecar exports

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with aiohttp.ClientSession() as s, s.get(self.sidecar.http_url + "/metrics") as r:
            text = await r.text()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    async def value(self, name: str, **labels: str) -> float:
        return (await self.metrics()).get((name, tuple(sorted(labels.items()))), 0.0)

    async def registrations(self) -> tuple[int, int]:
        m = await self.metrics()
        live = m.get(("asynq_registry_entries", (("set", "servers"), ("state", "live"))), 0.0)
        expired = m.get(("asynq_registry_entries", (("set", "servers"), ("state", "expired"))), 0.0)
        return int(live), int(expired)

    async def show_registrations(self, when: str) -> None:
        live, expired = await self.registrations()
        self.p.info(f"registrations in asynq:servers {when}: {live} live, {expired} expired")

    async def wait_for(self, check, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await check():
                return True
            await asyncio.sleep(0.02)
        return bool(await check())

    # ------------------------------------------------------------ workers

    async def start_worker(self, name: str, *, on_exit: str = "clear", tasks: int = 2) -> Worker:
        self.counter += 1
        log_path = self.workdir / f"worker-{self.counter}-{name}.log"
        cmd = [sys.executable, "-m", "exporter", "run", "--socket", self.socket, "--log-level", "warning",
               "--", sys.executable, "-m", "exporter", "emulate", "--redis-url", self.redis_url,
               "--tasks", str(tasks), "--drain", str(DRAIN), "--on-exit", on_exit, "--log-level", "warning"]
        with open(log_path, "wb") as log:
            # A process group of its own, so that the worker child goes with its launcher.
            proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=log, stderr=log, start_new_session=True)
        w = Worker(name, proc, log_path)
        self.workers.append(w)
        return w

    def child_of(self, w: Worker) -> int | None:
        try:
            text = Path(f"/proc/{w.launcher.pid}/task/{w.launcher.pid}/children").read_text().split()
        except OSError:
            return None
        return int(text[0]) if text else None

    async def wait_registered(self, w: Worker, timeout: float = 10.0) -> bool:
        """Until the worker's child process has a live registration in asynq:servers."""
        async def registered() -> bool:
            w.child_pid = w.child_pid or self.child_of(w)
            if w.child_pid is None:
                return False
            pattern = asynq.member_pattern("servers", self.sidecar.cfg.hostname, w.child_pid)
            async for member, _ in self.redis.zscan_iter(asynq.SERVERS, match=pattern):
                w.registration = member.decode()
                return True
            return False

        return await self.wait_for(registered, timeout)

    async def registration_gone(self, w: Worker) -> bool:
        return w.registration is not None and await self.redis.zscore(asynq.SERVERS, w.registration) is None

    async def wait_exit(self, w: Worker, timeout: float = 15.0) -> int | None:
        try:
            return await asyncio.wait_for(w.launcher.wait(), timeout)
        except TimeoutError:
            return None

    # ------------------------------------------------------------ the story

    async def seed_leftovers(self) -> None:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for i in range(1, 4):
            m = asynq.server_member(f"old-pod-{i}", 1, f"00000000-0000-4000-8000-00000000000{i}")
            pipe.zadd(asynq.SERVERS, {m.key: int(now - LEFTOVER_AGE - i * 60)})
            pipe.zadd(asynq.WORKERS, {m.sibling("workers").key: int(now - LEFTOVER_AGE - i * 60)})
        await pipe.execute()

    async def story(self) -> None:
        p = self.p
        p.step("1. Leftovers of three old pods are in Redis (killed long ago, never deregistered)")
        await self.seed_leftovers()
        await self.show_registrations("now")

        p.step("2. Three workers start under the launcher and register")
        graceful = await self.start_worker("graceful")
        killed = await self.start_worker("killed")
        leaky = await self.start_worker("leaky", on_exit="leak")
        for w in (graceful, killed, leaky):
            p.check(await self.wait_registered(w), f"worker '{w.name}' (pid {w.child_pid}) registered: {w.registration}")
        running = await self.wait_for(
            lambda: self._equals("asynq_sidecar_workers", 3, state="running"), timeout=10)
        p.check(running, "the sidecar sees 3 workers running (asynq_sidecar_workers{state=\"running\"})")
        await self.show_registrations("now")

        p.step(f"3. 'graceful' gets SIGTERM: asynq drains ({DRAIN}s) and deregisters itself")
        graceful.launcher.send_signal(signal.SIGTERM)
        code = await self.wait_exit(graceful)
        p.check(code == 0, f"it exited with status {code}")
        ok = await self.wait_for(lambda: self._equals("asynq_sidecar_worker_exits_total", 1, outcome="graceful"), 5)
        duration = await self.value("asynq_sidecar_last_shutdown_duration_seconds")
        p.check(ok and DRAIN - 0.1 <= duration <= DRAIN + 2.0,
                f"the sidecar measured its shutdown: {duration:.3f}s (exits{{outcome=\"graceful\"}} = 1)")
        p.check(await self.registration_gone(graceful)
                and await self.value("asynq_sidecar_leaked_registrations_total") == 0,
                "its registration is gone, and nothing leaked")

        p.step("4. 'killed' gets SIGKILL (an OOM kill): it cannot deregister")
        before = await self.value("asynq_sidecar_registrations_removed_total", reason="worker_exit")
        killed_at = time.monotonic()
        if killed.child_pid:
            os.kill(killed.child_pid, signal.SIGKILL)
        gone = await self.wait_for(lambda: self.registration_gone(killed), timeout=5)
        took = (time.monotonic() - killed_at) * 1000
        await self.wait_exit(killed)
        p.check(gone, f"the sidecar removed its registration {took:.0f} ms after the kill")
        removed = await self.wait_for(
            lambda: self._equals("asynq_sidecar_registrations_removed_total", before + 1, reason="worker_exit"), 5)
        p.check(removed and await self.value("asynq_sidecar_worker_exits_total", outcome="killed") == 1,
                "counted: exits{outcome=\"killed\"} = 1, registrations_removed{reason=\"worker_exit\"} +1")
        abandoned = await self.value("asynq_sidecar_abandoned_tasks_total")
        p.check(abandoned == 2, f"its {int(abandoned)} in-flight tasks are reported as abandoned to asynq's lease recovery")

        p.step("5. 'leaky' gets SIGTERM, drains, and exits 0 without deregistering (asynq #979)")
        leaky.launcher.send_signal(signal.SIGTERM)
        code = await self.wait_exit(leaky)
        p.check(code == 0, f"it exited with status {code}: a clean exit, by every outward sign")
        gone = await self.wait_for(lambda: self.registration_gone(leaky), timeout=5)
        leaked = await self.value("asynq_sidecar_leaked_registrations_total")
        p.check(gone and leaked == 2,
                f"the sidecar saw the registration outlive it: a leak (leaked_registrations_total = {int(leaked)}), removed")
        await self.show_registrations("now")

        p.step("6. A fleet sweep removes the old pods' leftovers (asynq-sidecar sweep)")
        report = await Sweeper(self.redis, self.sidecar.health, grace=60).sweep_once()
        n = registrations_removed(report)
        live, expired = await self.registrations()
        p.check(n == 3 and expired == 0, f"swept {n} registrations expired for over a minute; {expired} expired left")
        await self.show_registrations("after the sweep")

        await self.orphan()

    async def orphan(self) -> None:
        """An active task with no lease entry, run by no one: the sidecar finds it at its next
        details read, and in dry-run counts it once two reads ORPHAN_CONFIRM_AFTER apart agree;
        the repair script of `--recover-tasks on` (and `sweep --repair-tasks`) then gives it an
        already expired lease, for asynq's recoverer to retry it with its own semantics."""

        p = self.p
        p.step("7. A task lost its lease entry (a Redis incident): asynq's recoverer never sees it")
        queue, task_id = "mail", "0d1e7a5e-0000-4000-8000-000000000001"
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd("asynq:queues", queue)
        pipe.rpush(tasks.active_key(queue), task_id)
        await pipe.execute()
        found = await self.wait_for(lambda: self._equals("asynq_queue_orphaned_tasks", 1, queue=queue), 10)
        p.check(found, f"found: asynq_queue_orphaned_tasks{{queue=\"{queue}\"}} = 1 (active, no lease, run by no one)")
        p.info(f"--recover-tasks dry-run (the default) confirms it over two looks {ORPHAN_CONFIRM_AFTER:g} s apart ...")
        counted = await self.wait_for(
            lambda: self._equals("asynq_sidecar_tasks_would_recover_total", 1, reason="orphan"),
            ORPHAN_CONFIRM_AFTER + 10)
        untouched = await self.redis.zscore(tasks.lease_key(queue), task_id) is None
        p.check(counted and untouched,
                "dry run: counted (tasks_would_recover_total{reason=\"orphan\"} = 1), its lease entry still absent")
        repaired = await repair_orphans(self.redis, {queue: [task_id]}, dry_run=False)
        score = await self.redis.zscore(tasks.lease_key(queue), task_id)
        t = await self.redis.time()
        ago = t[0] - score if score is not None else 0
        p.check(repaired == {queue: [task_id]} and ago >= tasks.EXPIRE_BACK - 1,
                f"handed back by the repair of --recover-tasks on and sweep --repair-tasks: a lease entry "
                f"{ago:.0f} s in the past, so the next recoverer run of any live server retries it "
                "(the task itself is never moved)")
        expired = await self.wait_for(lambda: self._equals("asynq_queue_lease_expired_tasks", 1, queue=queue), 10)
        p.check(expired, f"asynq_queue_lease_expired_tasks{{queue=\"{queue}\"}} = 1: waiting for asynq's recoverer")

    async def _equals(self, name: str, expected: float, **labels: str) -> bool:
        return await self.value(name, **labels) == expected

    async def keep_going(self, until: float | None, stop: asyncio.Event) -> None:
        """Workers come and go, now and then, so that the graphs move."""
        self.p.step("The demo keeps workers coming and going" +
                    (" until the duration ends" if until else " (Ctrl-C to stop)"))
        rng = random.Random(7)
        while not stop.is_set() and (until is None or time.monotonic() < until):
            fate = rng.choice(["graceful", "graceful", "killed", "leaky"])
            w = await self.start_worker(fate, on_exit="leak" if fate == "leaky" else "clear")
            await self.wait_registered(w, timeout=5)
            await self._pause(rng.uniform(1, 3), until, stop)
            if fate == "killed" and w.child_pid:
                os.kill(w.child_pid, signal.SIGKILL)
            else:
                w.launcher.send_signal(signal.SIGTERM)
            await self.wait_exit(w)
            self.p.info(f"worker {self.counter} ({fate}) came and went")
            await self._pause(rng.uniform(0.5, 2), until, stop)

    @staticmethod
    async def _pause(seconds: float, until: float | None, stop: asyncio.Event) -> None:
        if until is not None:
            seconds = max(0.0, min(seconds, until - time.monotonic()))
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            pass

    async def stop_workers(self) -> None:
        for w in self.workers:
            if w.launcher.returncode is None:
                w.launcher.send_signal(signal.SIGTERM)
        for w in self.workers:
            if await self.wait_exit(w, timeout=10) is None:
                try:
                    os.killpg(w.launcher.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await w.launcher.wait()


async def run_demo(cfg: DemoConfig, out: TextIO) -> int:
    p = Printer(out, cfg.color)
    started = time.monotonic()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The workers' logs: removed at the end, unless a step failed (then they say why).
    tmp = tempfile.mkdtemp(prefix="asynq-sidecar-demo-")
    try:
        try:
            redis_server = RedisServer().start()
        except RedisServerError as e:
            print(f"demo: cannot start a private Redis: {e}", file=sys.stderr)
            return 1
        try:
            socket_path = str(Path(tmp) / "lifecycle.sock")
            listen = cfg.listen or ("127.0.0.1", 0)
            serve = ServeConfig(redis=RedisConfig(url=redis_server.url), listen=listen,
                              socket=SocketConfig(path=socket_path), log=LogConfig(),
                              cleanup=CleanupConfig(host_pids_unique=True), hostname=cfg.hostname,
                              watch_interval=2.0, poll_interval=0.5)
            async with Sidecar(serve) as sidecar:
                redis = connect(serve.redis)
                demo = Demo(sidecar, redis, redis_server.url, socket_path, Path(tmp), p)
                p.step("asynq-sidecar demo")
                p.info(f"private Redis:  {redis_server.url}")
                p.info(f"sidecar:        {sidecar.http_url}/metrics")
                try:
                    await demo.story()
                    until = None if cfg.duration is None else started + cfg.duration
                    await demo.keep_going(until, stop)
                finally:
                    await demo.stop_workers()
                    await redis.aclose()
                p.step("Summary")
                p.info(f"metrics were served at {sidecar.http_url}/metrics")
        finally:
            redis_server.close()
    except BaseException:
        p.failures.append("the demo itself failed")
        raise
    finally:
        if p.failures:
            p.info(f"the workers' logs are kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if p.failures:
        p.info(f"{len(p.failures)} step(s) did not behave as expected:")
        for f in p.failures:
            p.info(f"  - {f}")
        return 1
    p.info("every step behaved as expected")
    return 0


def run(cfg: DemoConfig) -> int:
    try:
        return asyncio.run(run_demo(cfg, sys.stdout))
    except KeyboardInterrupt:  # pragma: no cover - signal handlers normally catch it
        return 1
