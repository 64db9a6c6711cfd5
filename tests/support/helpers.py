"""Small helpers shared by tests: deadline polling, scraping, and writing registrations."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from exporter.asynq import model as asynq
from exporter.server.sidecar import Hooks

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T] | T], timeout: float = 5.0,
                     interval: float = 0.02, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        result = check()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result  # type: ignore[misc]
        if result:
            return result  # type: ignore[return-value]
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


def wait_until(check: Callable[[], T], timeout: float = 5.0, interval: float = 0.02,
               what: str = "condition") -> T:
    """Synchronous `eventually`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {result!r})")
        time.sleep(interval)


async def scrape(url: str, accept: str | None = None) -> str:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics", headers=headers) as r:
        assert r.status == 200
        return await r.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def register_server(client, host: str, pid: int, server_id: str, expires_at: float, *,
                    status: str = "active", concurrency: int = 10, active: int = 0,
                    start_time: float | None = None, with_keys: bool = True) -> asynq.Member:
    """Write a server's registration as asynq's heartbeat does (sync client), with any expiry."""
    m = asynq.server_member(host, pid, server_id)
    score = int(expires_at)
    client.zadd(asynq.SERVERS, {m.key: score})
    client.zadd(asynq.WORKERS, {m.sibling("workers").key: score})
    if with_keys:
        info = asynq.ServerInfo(host=host, pid=pid, server_id=server_id, concurrency=concurrency,
                                queues={"default": 1}, status=status,
                                start_time=start_time if start_time is not None else time.time(),
                                active_worker_count=active)
        client.set(m.key, asynq.encode_server_info(info), ex=10)
    return m


def redis_now(client) -> float:
    """Redis's clock (TIME), Unix seconds, from a synchronous client."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def clear_stale_faketime_files() -> None:
    """The faketime wrapper names a semaphore and a shared-memory file in /dev/shm after its own
    pid and leaves them behind when it is SIGKILLed; a later wrapper that gets the same pid then
    fails at once ("sem_open: File exists"). Remove those of pids that no longer run."""
    for path in Path("/dev/shm").glob("*faketime_*"):
        pid = path.name.rsplit("_", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)


def faketime_prefix(offset: str, faketime: str) -> tuple[list[str], dict[str, str]]:
    """argv prefix and environment that run a command on a wall clock shifted by `offset`
    ("+75s"), as on a machine whose clock is off (its monotonic clock left alone). Checks that
    the shift really happens, so that a test cannot pass because faketime did nothing."""
    import subprocess
    import sys

    clear_stale_faketime_files()
    prefix = [faketime, "-f", offset]
    env = {"PATH": "/usr/bin:/bin", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    proc = subprocess.run([*prefix, sys.executable, "-c", "import time; print(time.time())"],
                          capture_output=True, text=True, env=env, timeout=30, check=True)
    shift = float(proc.stdout) - time.time()
    wanted = float(offset.rstrip("s"))
    assert abs(shift - wanted) < 5, f"faketime {offset} shifted the clock by {shift:.1f} s"
    return prefix, env


class Watched:
    """A sidecar's hooks, counted: for tests that wait on what the sidecar did."""

    def __init__(self) -> None:
        self.full_reads = 0
        self.cleanup_settled = asyncio.Event()

    @property
    def hooks(self) -> Hooks:
        return Hooks(cleanup_settled=self.cleanup_settled.set, details_read=self._read)

    def _read(self) -> None:
        self.full_reads += 1
