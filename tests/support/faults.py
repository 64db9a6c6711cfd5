"""Real processes for the fault and hostile-input tests: an `asynq-sidecar serve` process, a
bystander server that must survive every fault, and a worker run by the launcher."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import redis as redis_sync

from exporter.asynq import model as asynq
from exporter.devtools.redis_server import RedisServer, free_port
from tests.support.helpers import clear_stale_faketime_files, eventually, samples
from tests.support.lifecycle import HOST, ROOT

EMULATE = (sys.executable, "-m", "exporter", "emulate")
#: The bystander: a live server of the sidecar's own host under a pid no test worker has.
BYSTANDER_PID = 4_000_000
BYSTANDER_ID = "bystander"


def gone_entirely(rdb: redis_sync.Redis, m: asynq.Member) -> bool:
    w = m.sibling("workers")
    return (rdb.zscore(asynq.SERVERS, m.key) is None and rdb.zscore(asynq.WORKERS, w.key) is None
            and not rdb.exists(m.key) and not rdb.exists(w.key))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------- the processes under test


class Serve:
    """An `asynq-sidecar serve` process; its log goes to a file, /metrics on a fixed port (so
    that a restarted sidecar is found where the old one was)."""

    def __init__(self, tmp_path: Path, redis_url: str, socket_path: str, *args: str,
                 port: int | None = None, name: str = "serve", wrapper: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"{name}.log"
        self.argv = [*wrapper, sys.executable, "-m", "exporter", "serve", "--redis-url", redis_url,
                     "--listen", f"127.0.0.1:{self.port}", "--socket", socket_path,
                     "--hostname", HOST, "--poll-interval", "0.1", "--watch-interval", "0.5",
                     # These workers are processes of this machine: one pid, one process, as
                     # in an ordinary pod (a test of twins passes --host-pids shared).
                     "--host-pids", "unique", "--log-level", "info", *args]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Serve:
        if self.argv and Path(self.argv[0]).name == "faketime":
            clear_stale_faketime_files()
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=log, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        await eventually(self._healthy, timeout=15, what=f"serve on {self.url}; log:\n{self.log()}")
        return self

    async def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
        try:
            async with aiohttp.ClientSession() as s, s.get(self.url + "/healthz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def scrape(self) -> dict:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as r:
            assert r.status == 200
            return samples(await r.text())

    async def value(self, name: str, **labels: str) -> float | None:
        return (await self.scrape()).get((name, tuple(sorted(labels.items()))))

    async def wait_for(self, name: str, expected: float, timeout: float = 10.0, **labels: str) -> None:
        seen: list[float | None] = [None]

        async def check() -> bool:
            seen[0] = await self.value(name, **labels)
            return seen[0] == expected
        try:
            await eventually(check, timeout=timeout, what=f"{name}{labels} == {expected}")
        except AssertionError as e:
            raise AssertionError(f"{e}; it was {seen[0]}") from None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"serve still running after {timeout}s:\n{self.log()}") from None

    async def kill(self) -> None:
        """SIGKILL the sidecar, and the process a wrapper (faketime forks one) runs it as."""
        if self.proc is not None and self.proc.returncode is None:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for pid in (self.proc.pid, *map(int, kids)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await self.proc.wait()


class Poller:
    """A thread that calls `_read(client)` every `interval` seconds until stopped; reads that fail
    (Redis down, paused or loading) see nothing. `reads` counts those that went through."""

    def __init__(self, redis_url: str, interval: float = 0.005, name: str = "poller") -> None:
        self.redis_url = redis_url
        self.interval = interval
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def _watch(self) -> None:
        client = redis_sync.Redis.from_url(self.redis_url, socket_timeout=0.2, socket_connect_timeout=0.2)
        while not self._stop.is_set():
            try:
                self._read(client)
                self.reads += 1
            except (redis_sync.RedisError, OSError):
                pass
            self._stop.wait(self.interval)
        client.close()

    def _read(self, client: redis_sync.Redis) -> None:
        raise NotImplementedError


class Sentry(Poller):
    """Reads one registration every 5 ms and records every moment it was missing while Redis
    answered: a removal is seen even though the owner's next beat would write it back."""

    def __init__(self, redis_url: str, member: asynq.Member) -> None:
        super().__init__(redis_url, name="sentry")
        self.member = member
        self.missing: list[tuple[float, tuple]] = []

    def _read(self, client: redis_sync.Redis) -> None:
        w = self.member.sibling("workers")
        pipe = client.pipeline(transaction=False)
        pipe.zscore(asynq.SERVERS, self.member.key)
        pipe.zscore(asynq.WORKERS, w.key)
        pipe.exists(self.member.key, w.key)
        seen = tuple(pipe.execute())
        if seen[0] is None or seen[1] is None or seen[2] != 2:
            self.missing.append((time.time(), seen))

    def assert_never_missing(self) -> None:
        assert self.missing == [], f"{self.member.key} went missing: {self.missing[:5]}"
        assert self.reads > 0


class Bystander:
    """A live server of HOST (another pid) beating every 0.5 s from an emulator process, watched
    by a Sentry."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.member = asynq.server_member(HOST, BYSTANDER_PID, BYSTANDER_ID)
        self.sentry = Sentry(redis_url, self.member)
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def missing(self) -> list[tuple[float, tuple]]:
        return self.sentry.missing

    async def start(self) -> Bystander:
        self.proc = await asyncio.create_subprocess_exec(
            *EMULATE, "--redis-url", self.redis_url, "--host", HOST, "--pid", str(BYSTANDER_PID),
            "--server-id", BYSTANDER_ID, "--heartbeat", "0.5", "--tasks", "2",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rdb = redis_sync.Redis.from_url(self.redis_url)
        try:
            await eventually(lambda: rdb.zscore(asynq.SERVERS, self.member.key), timeout=10,
                             what="the bystander registered")
        finally:
            rdb.close()
        self.sentry.start()
        return self

    def assert_intact(self, *sidecars: Serve) -> None:
        """Never missing, alive now, never named by a sidecar (not even as "left alone")."""
        self.sentry.assert_never_missing()
        assert self.proc is not None and self.proc.returncode is None, "the bystander died"
        rdb = redis_sync.Redis.from_url(self.redis_url)
        try:
            assert rdb.zscore(asynq.SERVERS, self.member.key) >= time.time()
            assert rdb.exists(self.member.key)
        finally:
            rdb.close()
        for sc in sidecars:
            assert self.member.tag not in sc.log(), f"{sc.log_path.name} touched the bystander"

    async def close(self) -> None:
        self.sentry.stop()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class Faults:
    """What a fault test starts; everything is stopped at the end, by pid."""

    tmp_path: Path
    socket_path: str
    sidecars: list[Serve] = field(default_factory=list)
    servers: list[RedisServer] = field(default_factory=list)
    bystanders: list[Bystander] = field(default_factory=list)

    def redis(self, persistent: bool = False) -> RedisServer:
        extra = ("--appendonly", "yes", "--appendfsync", "always") if persistent else ()
        server = RedisServer(extra_args=extra).start()
        self.servers.append(server)
        return server

    async def bystander(self, redis_url: str) -> Bystander:
        b = Bystander(redis_url)
        self.bystanders.append(b)
        return await b.start()

    async def serve(self, redis_url: str, *args: str, port: int | None = None,
                    wrapper: tuple[str, ...] = ()) -> Serve:
        """An `asynq-sidecar serve` process; `wrapper` runs it under another command (faketime)."""
        sc = Serve(self.tmp_path, redis_url, self.socket_path, *args, port=port,
                   name=f"serve-{len(self.sidecars)}", wrapper=wrapper)
        self.sidecars.append(sc)
        return await sc.start()

    async def stop_sidecars(self) -> None:
        for sc in self.sidecars:
            await sc.kill()

    async def close(self) -> None:
        await self.stop_sidecars()
        for b in self.bystanders:
            await b.close()
        for server in self.servers:
            server.close()


@pytest.fixture
async def faults(tmp_path, tmp_socket):
    f = Faults(tmp_path, tmp_socket)
    yield f
    await f.close()


async def start_worker(processes, faults: Faults, redis_url: str, *emulator_args: str):
    """`asynq-sidecar run -- asynq-sidecar emulate ...` under HOST; returns the launcher, the
    emulator's pid and its registration, once it is in Redis."""
    w = await processes.launcher(faults.socket_path, command=(
        *EMULATE, "--redis-url", redis_url, "--host", HOST, "--heartbeat", "0.5", "--tasks", "1",
        *emulator_args))
    rdb = redis_sync.Redis.from_url(redis_url)

    def registered() -> asynq.Member | None:
        for raw, _ in rdb.zscan_iter(asynq.SERVERS, match=f"asynq:servers:{{{HOST}:*}}"):
            m = asynq.parse_member(raw)
            if m.pid != BYSTANDER_PID:
                return m
        return None

    try:
        m = await eventually(registered, timeout=15, what="the worker's registration")
    finally:
        rdb.close()
    w.child_pid = m.pid
    return w, m.pid, m


# ---------------------------------------------------------------- many registrations, watched


def process_alive(pid: int) -> bool:
    """The process runs (or is stopped): it exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@dataclass
class Tracked:
    """A registration a Monitor follows, known by its server id (unique per worker), through its
    owner's life: `awaited` (not seen whole yet), `live` (must never be missing), `ending` (its
    owner was told to stop or killed: no longer required), `dead` (its owner is gone: it must
    be removed by its deadline)."""

    server_id: str
    label: str
    member: str | None = None  # asynq:servers:{host:pid:id}, once seen
    state: str = "awaited"
    last_score: float | None = None  # the latest expiry score seen in asynq:servers
    dead_at: float | None = None  # time.time() when its owner was found dead
    whole_at: float | None = None  # time.time() of the last read that saw it whole
    least_margin: float | None = None  # while live: the least (score - now) seen, in seconds
    missing: list[tuple[float, tuple]] = field(default_factory=list)  # while live
    # Missing while live, but only after its owner was already late past its TTL (the last read
    # that saw it whole was past its expiry score: asynq itself calls it dead): a starved owner.
    overdue: list[tuple[float, tuple]] = field(default_factory=list)
    left: tuple[float, float] | None = None  # (time seen, deadline) when present past its deadline
    gone_at: float | None = None  # time.time() when first seen gone once dead

    @property
    def workers_member(self) -> str:
        assert self.member is not None
        return "asynq:workers:" + self.member[len("asynq:servers:"):]


class Monitor(Poller):
    """A thread that reads every tracked registration every few milliseconds, as the Sentry does
    for one: a live registration missing at any read is recorded (even if its owner's next beat
    writes it back), and so is a dead one still present after `deadline(tracked)`. Reads that
    fail (Redis down, loading) see nothing."""

    def __init__(self, redis_url: str, deadline, interval: float = 0.005) -> None:
        super().__init__(redis_url, interval, name="monitor")
        self.deadline = deadline  # Tracked -> time.time() by which it must be gone, or None (not yet known)
        self.tracked: list[Tracked] = []
        self._lock = threading.Lock()

    def track(self, server_id: str, label: str) -> Tracked:
        t = Tracked(server_id, label)
        with self._lock:
            self.tracked.append(t)
        return t

    def _read(self, client: redis_sync.Redis) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.zrange(asynq.SERVERS, 0, -1, withscores=True)
        pipe.zrange(asynq.WORKERS, 0, -1, withscores=True)
        raw_servers, raw_workers = pipe.execute()
        servers = {k.decode(): s for k, s in raw_servers}
        workers = {k.decode(): s for k, s in raw_workers}
        with self._lock:
            tracked = list(self.tracked)
        for t in tracked:
            if t.member is None:
                t.member = next((k for k in servers if k.endswith(f":{t.server_id}}}")), None)
        known = [t for t in tracked if t.member is not None and t.state in ("awaited", "live")]
        pipe = client.pipeline(transaction=False)
        for t in known:
            pipe.exists(t.member, t.workers_member)
        counts = pipe.execute()
        now = time.time()
        for t in tracked:
            if t.member is None:
                continue
            score = servers.get(t.member)
            if score is not None and (t.last_score is None or score > t.last_score):
                t.last_score = score
        for t, keys in zip(known, counts, strict=False):
            seen = (servers.get(t.member), workers.get(t.workers_member), keys)
            whole = seen[0] is not None and seen[1] is not None and keys == 2
            if t.state == "awaited" and whole:
                t.state = "live"
            if t.state != "live":
                continue
            if whole:
                margin = seen[0] - now
                t.least_margin = margin if t.least_margin is None else min(t.least_margin, margin)
                t.whole_at = now
            elif t.whole_at is not None and t.last_score is not None and t.whole_at > t.last_score:
                t.overdue.append((now, seen))
            else:
                t.missing.append((now, seen))
        for t in tracked:
            if t.state != "dead" or t.member is None or t.left is not None:
                continue
            present = t.member in servers or t.workers_member in workers
            if not present:
                if t.gone_at is None:
                    t.gone_at = now
                continue
            due = self.deadline(t)
            if due is not None and now > due:
                t.left = (now, due)
