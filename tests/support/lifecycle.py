"""Helpers for the lifecycle tests: real worker processes (through the launcher or the client),
and reading the lifecycle metrics of an in-process sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The host name the test workers report (nothing registers under it in Redis).
HOST = "lifecycle-test-host"

#: A worker whose drain time is known: on SIGTERM/SIGINT it prints, sleeps DRAIN seconds and
#: exits with CODE; other signals are printed. With a third argument it exits at once with it.
CHILD = r"""
import os, signal, sys, time
drain, code = float(sys.argv[1]), int(sys.argv[2])
def stop(sig, frame):
    print("stopping", signal.Signals(sig).name, flush=True)
    time.sleep(drain)
    os._exit(code)
def note(sig, frame):
    print("got", signal.Signals(sig).name, flush=True)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
for s in (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTSTP):
    signal.signal(s, note)
print("ready", os.getpid(), flush=True)
if len(sys.argv) > 3:
    os._exit(int(sys.argv[3]))
while True:
    signal.pause()
"""

#: A worker that speaks the protocol itself through LifecycleClient: hello, ready; on SIGTERM
#: stopping, a drain of DRAIN seconds, bye, close, exit 0.
CLIENT_WORKER = r"""
import asyncio, os, signal, sys
from exporter.lifecycle.client import LifecycleClient
path, drain = sys.argv[1], float(sys.argv[2])
async def main():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    client = LifecycleClient(path, host=sys.argv[3], shutdown_timeout=8)
    await client.start()
    await client.ready()
    print("ready", os.getpid(), flush=True)
    await stop.wait()
    await client.stopping("SIGTERM")
    await asyncio.sleep(drain)  # the drain
    await client.bye()
    await client.close()
asyncio.run(main())
"""


@dataclass
class Worker:
    """A process under test: a launcher (and its child), or a client worker."""

    proc: asyncio.subprocess.Process
    child_pid: int | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def expect(self, prefix: str, timeout: float = 10.0) -> str:
        """The next stdout line, which must start with `prefix`."""
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        line = raw.decode().strip()
        self.lines.append(line)
        assert line.startswith(prefix), f"expected {prefix!r}, got {line!r}; stderr: {await self.stderr()}"
        return line

    async def ready(self) -> int:
        self.child_pid = int((await self.expect("ready")).split()[1])
        return self.child_pid

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    async def wait(self, timeout: float = 10.0) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"pid {self.pid} still running after {timeout}s; stderr:\n"
                                 f"{await self.stderr()}") from None

    async def stderr(self) -> str:
        if self.proc.stderr is None or self.proc.returncode is None:
            return "(still running)"
        return (await self.proc.stderr.read()).decode(errors="replace")


class Processes:
    """Starts workers and, at the end of the test, kills whatever is left (by pid)."""

    def __init__(self) -> None:
        self.started: list[Worker] = []

    async def launcher(self, socket_path: str, *child_args: str, options: tuple[str, ...] = (),
                       command: tuple[str, ...] | None = None) -> Worker:
        cmd = command or (sys.executable, "-c", CHILD, *child_args)
        return await self._start(sys.executable, "-m", "exporter", "run", "--socket", socket_path,
                                 "--hostname", HOST, "--log-level", "info", *options, "--", *cmd)

    async def client_worker(self, socket_path: str, drain: float) -> Worker:
        return await self._start(sys.executable, "-c", CLIENT_WORKER, socket_path, str(drain), HOST)

    async def start(self, *argv: str, env: dict[str, str] | None = None) -> Worker:
        """Any command, with stdout and stderr piped; `env` adds to a copy of this environment
        from which every ASYNQ_SIDECAR_* variable is removed."""
        return await self._start(*argv, env=env)

    async def _start(self, *argv: str, env: dict[str, str] | None = None) -> Worker:
        base = {k: v for k, v in os.environ.items() if not k.startswith("ASYNQ_SIDECAR_")}
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env={**base, "PYTHONPATH": str(ROOT), **(env or {})})
        worker = Worker(proc)
        self.started.append(worker)
        return worker

    async def close(self) -> None:
        for w in self.started:
            for pid in (w.child_pid, w.proc.pid):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await w.proc.wait()


@pytest.fixture
async def processes():
    p = Processes()
    yield p
    await p.close()


def metric(sc, name: str, **labels: str) -> float | None:
    """A sample of the sidecar's registry (memory, no HTTP)."""
    return sc.registry.get_sample_value(name, labels)


def exits(sc) -> dict[str, float]:
    return {o: metric(sc, "asynq_sidecar_worker_exits_total", outcome=o)
            for o in ("graceful", "error", "killed", "lost")}
