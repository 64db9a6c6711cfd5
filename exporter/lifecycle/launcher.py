"""`asynq-sidecar run [--socket PATH] [--serve ...] -- CMD ARGS...`: start a worker and report its life.

The launcher starts CMD as its child and reports, for it: `hello` (the child's pid, --hostname),
`stopping` on SIGTERM/SIGINT, `exited` with the exit code or signal. It forwards SIGTERM, SIGINT,
SIGTSTP, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 and exits with the child's status (128+N for
signal N). Without --serve it reports over the lifecycle socket through `LifecycleClient`, which
buffers while no sidecar listens; with --serve the whole sidecar runs in this process and the
launcher submits the child's events to it directly, as one more in-process source.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Protocol

from exporter.lifecycle.client import LifecycleClient
from exporter.lifecycle.tracker import Decision, Disconnected, Exited, Hello, Ready, Stopping, WorkerForgotten
from exporter.settings import DEFAULT_SOCKET, LaunchConfig, ServeConfig

if TYPE_CHECKING:
    from exporter.server.sidecar import Sidecar

log = logging.getLogger("exporter.lifecycle.launcher")

#: Signals passed on to the child.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGTSTP, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
#: Signals that ask the worker to stop: reported as `stopping`.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: After the child exits, at most this long is spent delivering the last events.
FLUSH_TIMEOUT = 1.0


class Reporter(Protocol):
    """Where the launcher reports the child's life: `LifecycleClient` or `InProcessReporter`."""

    async def start(self, at: float | None = None) -> None: ...
    async def stopping(self, signal: str | None = None, at: float | None = None) -> None: ...
    async def exited(self, code: int | None = None, signal: str | None = None,
                     at: float | None = None) -> None: ...
    async def close(self, timeout: float = 1.0) -> bool: ...


#: (child pid, time the child was started) -> the reporter for it.
ReporterFactory = Callable[[int, float], Reporter]


class InProcessReporter:
    """Submits the child's events to the Sidecar running in this process (`run --serve`).

    It has a connection id of its own, like a socket connection; `close()` submits Disconnected
    and waits (bounded) until the tracker has applied it, so the exit is logged and counted
    before the sidecar stops.
    """

    def __init__(self, sidecar: Sidecar, *, host: str, pid: int, started_at: float | None = None) -> None:
        self._sidecar = sidecar
        self.conn = sidecar.new_conn_id()
        self.host = host
        self.pid = pid
        self.started_at = started_at
        self._forgotten = asyncio.Event()
        sidecar.sinks.append(self)

    async def start(self, at: float | None = None) -> None:

        self._sidecar.submit(Hello(self.conn, pid=self.pid, host=self.host,
                                   started_at=self.started_at), at)

    async def ready(self, at: float | None = None) -> None:

        self._sidecar.submit(Ready(self.conn), at)

    async def stopping(self, signal: str | None = None, at: float | None = None) -> None:

        self._sidecar.submit(Stopping(self.conn, signal), at)

    async def exited(self, code: int | None = None, signal: str | None = None,
                     at: float | None = None) -> None:

        self._sidecar.submit(Exited(self.conn, code=code, signal=signal), at)

    async def close(self, timeout: float = 1.0) -> bool:

        self._sidecar.submit(Disconnected(self.conn))
        try:
            await asyncio.wait_for(self._forgotten.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if self in self._sidecar.sinks:
                self._sidecar.sinks.remove(self)

    def handle(self, decision: Decision, now: float) -> None:
        """A sink, only to learn when the tracker is done with this connection."""

        if isinstance(decision, WorkerForgotten) and decision.worker.conn == self.conn:
            self._forgotten.set()


def exit_status(returncode: int) -> int:
    """The launcher's own exit status for the child's: its code, or 128+N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def _put_signal(signals: asyncio.Queue[tuple[signal.Signals, float]], sig: signal.Signals) -> None:
    signals.put_nowait((sig, time.time()))


async def launch(cmd: Sequence[str], *, host: str, socket_path: str | None = None,
                 serve: ServeConfig | None = None) -> int:
    """Run CMD to its end, reporting over `socket_path`, or to a sidecar of config `serve` run in
    this process; the launcher's exit status. Raises OSError when that sidecar cannot start."""
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[tuple[signal.Signals, float]] = asyncio.Queue()
    for sig in FORWARDED:  # before the child exists: a signal now is forwarded once it does
        loop.add_signal_handler(sig, _put_signal, signals, sig)
    try:
        async with AsyncExitStack() as stack:
            if serve is not None:
                # The sidecar (aiohttp, redis, prometheus) is loaded only for --serve: a launcher
                # that reports over the socket stays small and starts fast.
                from exporter.server.sidecar import Sidecar  # noqa: PLC0415

                sidecar = await stack.enter_async_context(Sidecar(serve))

                def reporter_for(pid: int, started_at: float) -> Reporter:
                    return InProcessReporter(sidecar, host=host, pid=pid, started_at=started_at)
            else:

                path = socket_path or DEFAULT_SOCKET

                def reporter_for(pid: int, started_at: float) -> Reporter:
                    return LifecycleClient(path, host=host, pid=pid, started_at=started_at)
            status = await supervise(cmd, reporter_for, signals)
            if serve is not None:  # clean up after the worker and let a scrape see its end
                await sidecar.linger(serve.stop_timeout)
            return status
    finally:
        for sig in FORWARDED:
            loop.remove_signal_handler(sig)


async def supervise(cmd: Sequence[str], reporter_for: ReporterFactory,
                    signals: asyncio.Queue[tuple[signal.Signals, float]]) -> int:
    """Start CMD, forward what arrives on `signals` (signal, time received), report its life."""
    started_at = time.time()
    try:
        child = await asyncio.create_subprocess_exec(*cmd)
    except OSError as e:
        log.error("cannot start %s: %s", cmd[0], e.strerror or e)
        return 127 if isinstance(e, FileNotFoundError) else 126
    log.info("started pid %d: %s", child.pid, " ".join(cmd))
    reporter = reporter_for(child.pid, started_at)
    await reporter.start(at=started_at)
    exited = asyncio.ensure_future(child.wait())
    stop_reported = False
    try:
        while True:
            received = asyncio.ensure_future(signals.get())
            done, _ = await asyncio.wait({exited, received}, return_when=asyncio.FIRST_COMPLETED)
            if received in done:
                sig, at = received.result()
                log.info("%s received: forwarding to pid %d", sig.name, child.pid)
                try:
                    child.send_signal(sig)
                except ProcessLookupError:
                    pass
                if sig in STOP_SIGNALS and not stop_reported:
                    stop_reported = True
                    await reporter.stopping(sig.name, at=at)
            else:
                received.cancel()
            if exited in done:
                break
    except BaseException:
        exited.cancel()
        raise
    ended_at = time.time()
    rc = exited.result()
    if rc < 0:
        name = _signal_name(-rc)
        log.info("pid %d was ended by %s", child.pid, name)
        await reporter.exited(signal=name, at=ended_at)
    else:
        log.info("pid %d exited with code %d", child.pid, rc)
        await reporter.exited(code=rc, at=ended_at)
    await reporter.close(FLUSH_TIMEOUT)
    return exit_status(rc)


def run(cfg: LaunchConfig) -> int:
    if not cfg.command:
        print("asynq-sidecar run: a command is required: asynq-sidecar run [options] -- CMD [ARGS...]",
              file=sys.stderr)
        return 2
    try:
        return asyncio.run(launch(cfg.command, host=cfg.hostname, socket_path=cfg.socket, serve=cfg.serve))
    except OSError as e:  # only the in-process sidecar raises: the child was never started
        log.error("cannot start the sidecar (--serve): %s", e)
        return 1
