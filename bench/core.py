"""What every measurement shares: result rows and the table, statistics, a private Redis loaded
with registrations, real `asynq-sidecar` processes, and readers of /proc and of Redis' counters."""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families

from exporter.asynq import model as asynq
from exporter.devtools.redis_server import RedisServer, find_redis_server, free_port

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

#: Host names used by the benchmark: loaded registrations never match the sidecar's own host,
#: so the sidecar's start-up scan of its host finds nothing to remove in them.
FLEET_HOST = "bench-fleet"
SIDECAR_HOST = "bench-pod"

PASS, MISS, INFO, NOT_MEASURED = "PASS", "MISS", "INFO", "NOT MEASURED"


class BenchError(RuntimeError):
    """A benchmark could not run (a process did not start, a deadline passed)."""


# ---------------------------------------------------------------- statistics and rows


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was really observed."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Row:
    """One line of the results table: samples in `unit`, a target and whether it was met.

    `verdict` is PASS or MISS for a row with a target, INFO for a figure reported for context,
    NOT MEASURED when what it measures cannot run here (the reason is in `what`).
    """

    name: str
    what: str
    samples: list[float]
    unit: str
    target: str = ""
    verdict: str = INFO

    @property
    def n(self) -> int:
        return len(self.samples)


def judge(value: float, limit: float) -> str:
    return PASS if value <= limit else MISS


def fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "timeout"
    if unit in ("cmds", "count"):
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"
    if unit == "x":
        return f"{value:.1f}x" if value < 100 else f"{value:,.0f}x"
    if unit == "%":
        return f"{value:.3f} %"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.2f} {unit}"


HEADER = ("measurement", "what", "n", "median", "p99", "max", "target", "result")


def table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        if r.samples:
            stats = [fmt(median(r.samples), r.unit), fmt(percentile(r.samples, 99), r.unit),
                     fmt(max(r.samples), r.unit)]
        else:
            stats = ["-", "-", "-"]
        cells = [r.name, r.what, str(r.n), *stats, r.target or "-", r.verdict]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


@dataclass
class Report:
    """What one measurement returns: table rows, and optional extra tables (comparisons)."""

    rows: list[Row] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- Redis


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[RedisServer, redis_sync.Redis]]:
    """A fresh redis-server on a free port and a sync client of it; both gone on exit."""
    server = RedisServer().start()
    client = redis_sync.Redis.from_url(server.url)
    try:
        yield server, client
    finally:
        client.close()
        server.close()


def commands_processed(client: redis_sync.Redis) -> int:
    """INFO stats total_commands_processed. Commands inside a script count one each, as does
    the INFO itself: callers subtract `INFO_OVERHEAD` per pair of readings."""
    return int(client.info("stats")["total_commands_processed"])


#: A reading of commands_processed followed at once by another differs by this (the INFO).
INFO_OVERHEAD = 1


def load_registrations(client: redis_sync.Redis, n: int, *, expires_in: float,
                       key_ttl: int | None = 86_400, host: str = FLEET_HOST, pid_base: int = 1000,
                       status: str = "active", chunk: int = 2000) -> list[str]:
    """Write `n` servers as asynq's heartbeat leaves them: a member in asynq:servers and in
    asynq:workers with score now + `expires_in` (negative: expired), and the ServerInfo STRING
    (with `key_ttl`, or none when key_ttl is None: expired registrations' keys are gone by TTL).

    Pipelined in chunks; returns the servers members. Live registrations get a far-future score
    and TTL so that they stay live for the whole benchmark.
    """
    now = time.time()
    score = int(now + expires_in)
    members: list[str] = []
    for start in range(0, n, chunk):
        pipe = client.pipeline(transaction=False)
        servers: dict[str, int] = {}
        workers: dict[str, int] = {}
        for i in range(start, min(n, start + chunk)):
            sid = str(uuid.UUID(int=i + 1))
            m = asynq.server_member(f"{host}-{i // 1000}", pid_base + i, sid)
            servers[m.key] = score
            workers[m.sibling("workers").key] = score
            members.append(m.key)
            if key_ttl is not None:
                info = asynq.ServerInfo(host=m.host, pid=m.pid, server_id=sid, concurrency=10,
                                        queues={"default": 1, "critical": 6}, status=status,
                                        start_time=now - 3600, active_worker_count=i % 4)
                pipe.set(m.key, asynq.encode_server_info(info), ex=key_ttl)
        pipe.zadd(asynq.SERVERS, servers)
        pipe.zadd(asynq.WORKERS, workers)
        pipe.execute()
    return members


# ---------------------------------------------------------------- /proc


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    """VmRSS (or VmHWM, the peak) of a process, from /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no {field_name} in /proc/{pid}/status")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (not its children), from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        redis_version = subprocess.run([find_redis_server(), "--version"], capture_output=True,
                                       text=True, timeout=10).stdout.split()[2].removeprefix("v=")
    except (OSError, IndexError, subprocess.SubprocessError):
        redis_version = "unknown"
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    from importlib.metadata import PackageNotFoundError, version

    libs = []
    for dist in ("redis", "hiredis", "aiohttp", "prometheus-client", "protobuf"):
        with contextlib.suppress(PackageNotFoundError):
            libs.append(f"{dist} {version(dist)}")
    return {"cpus": str(os.cpu_count()), "model": model, "python": sys.version.split()[0],
            "redis": redis_version, "load": load, "libs": ", ".join(libs)}


# ---------------------------------------------------------------- real processes


def prepare_bytecode() -> None:
    """Compile this checkout's `exporter` (and `bench`) to .pyc next to the sources, as the image
    does at `pip install`. The processes measured then load bytecode instead of compiling every
    module at each start: that compile costs ~1 MiB of RSS (the compiler's memory is not given
    back) and start-up time that a deployed sidecar never pays. compileall writes the files
    even under PYTHONDONTWRITEBYTECODE, which only stops the interpreter writing them itself."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "exporter"), str(REPO / "bench")],
                   check=True, stdout=subprocess.DEVNULL, timeout=120)


def python_env() -> dict[str, str]:
    """The environment of child processes: this checkout's `exporter` first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; only this one process (started by us)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)


class Scraper:
    """A keep-alive HTTP/1.1 client of one sidecar's /metrics (as Prometheus keeps its connection)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def get(self, path: str = "/metrics") -> str:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise BenchError(f"GET {path}: HTTP {resp.status}")
        return body.decode()

    def timed(self) -> float:
        """One scrape; its latency in seconds, from the request written to the body read."""
        started = time.perf_counter()
        self.get()
        return time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def metric_sum(text: str, name: str) -> float | None:
    """The sum of every sample of `name` (over all label values); None when there is none."""
    total, seen = 0.0, False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                total += s.value
                seen = True
    return total if seen else None


class ServeProcess:
    """`asynq-sidecar serve` as a real subprocess on a free port, with its own lifecycle socket.

    Its log goes to a file in `workdir`; `tail()` shows the end of it when something fails.
    """

    def __init__(self, redis_url: str, workdir: str, *, args: Sequence[str] = (),
                 hostname: str = SIDECAR_HOST) -> None:
        self.port = free_port()
        self.socket = os.path.join(workdir, f"s{self.port}.sock")
        self.log_path = os.path.join(workdir, f"serve-{self.port}.log")
        # --host-pids unique, as the example pods run it: every worker here is a process of
        # this machine (or a client naming a pid no other worker has).
        self.argv = [sys.executable, "-m", "exporter", "serve", "--redis-url", redis_url,
                     "--listen", f"127.0.0.1:{self.port}", "--socket", self.socket,
                     "--hostname", hostname, "--host-pids", "unique", *args]
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServeProcess:
        log = open(self.log_path, "ab")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     cwd=REPO, env=python_env(), start_new_session=True)
        log.close()
        return self

    def wait_served(self, timeout: float = 15.0) -> float:
        """Poll /metrics in a tight loop until it answers 200; seconds since start()."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status == 200:
                    return time.perf_counter() - self.started_at
            except OSError:
                pass
            time.sleep(0.001)
        raise BenchError(f"serve did not serve /metrics within {timeout}s:\n{self.tail()}")

    def scrape(self) -> str:
        s = Scraper(self.port)
        try:
            return s.get()
        finally:
            s.close()

    def wait_metric(self, name: str, predicate, timeout: float = 30.0, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = metric(self.scrape(), name, **labels)
            if last is not None and predicate(last):
                return last
            time.sleep(0.05)
        raise BenchError(f"{name}{labels} did not reach the expected value within {timeout}s "
                         f"(last {last}):\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launcher_available() -> str | None:
    """None when `asynq-sidecar run` and the lifecycle socket exist in this checkout; else why not."""
    missing = [m for m in ("launcher", "lifesocket", "client") if not (REPO / "exporter" / f"{m}.py").exists()]
    if missing:
        return "exporter/" + ", ".join(f"{m}.py" for m in missing) + " not in this checkout yet"
    return None


class Worker:
    """`asynq-sidecar run --socket S -- python -m exporter emulate ...`: a launcher and its child,
    an emulated asynq server with a known server id (so its member is known once its pid is)."""

    def __init__(self, redis_url: str, socket_path: str, *, host: str = SIDECAR_HOST,
                 heartbeat: float = 5.0, log_path: str | None = None) -> None:
        self.server_id = str(uuid.uuid4())
        self.host = host
        self.argv = [sys.executable, "-m", "exporter", "run", "--socket", socket_path,
                     "--hostname", host, "--log-level", "warning", "--",
                     sys.executable, "-m", "exporter", "emulate", "--redis-url", redis_url,
                     "--host", host, "--server-id", self.server_id, "--heartbeat", str(heartbeat),
                     "--log-level", "warning"]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.child_pid: int | None = None
        self.registered_at: float | None = None  # monotonic time its member was first seen

    def start(self) -> Worker:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                     cwd=REPO, env=python_env(), start_new_session=True)
        if self.log_path:
            out.close()
        return self

    @property
    def member(self) -> str | None:
        if self.child_pid is None:
            return None
        return asynq.server_member(self.host, self.child_pid, self.server_id).key

    def poll_registered(self, client: redis_sync.Redis) -> bool:
        """True once the emulator's member is in asynq:servers (records when it was first seen)."""
        if self.registered_at is not None:
            return True
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"launcher exited early with {self.proc.returncode}: {' '.join(self.argv)}")
        if self.child_pid is None:
            kids = children(self.proc.pid)
            if not kids:
                return False
            self.child_pid = kids[0]
        if client.zscore(asynq.SERVERS, self.member) is not None:
            self.registered_at = time.monotonic()
            return True
        return False

    def wait_registered(self, client: redis_sync.Redis, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.poll_registered(client):
            if time.monotonic() > deadline:
                raise BenchError(f"worker did not register within {timeout}s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the launcher (it forwards SIGTERM to the emulator, which deregisters)."""
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
        if self.child_pid is not None and self.is_our_child_alive():  # never leave it behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child_pid, signal.SIGKILL)

    def is_our_child_alive(self) -> bool:
        """The emulator still runs: its pid exists and carries our server id (not a reused pid)."""
        try:
            with open(f"/proc/{self.child_pid}/cmdline", "rb") as f:
                return self.server_id.encode() in f.read()
        except OSError:
            return False


@contextlib.contextmanager
def workdir() -> Iterator[str]:
    """A short temporary directory (AF_UNIX paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/tmp") as d:
        yield d


def wait_until(check, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
