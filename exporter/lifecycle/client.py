"""The Python client of lifecycle protocol v1: a worker (or the launcher) reports its life to the sidecar.

Each call records one event, stamped with the time of the call, and returns at once; a
background task connects, reconnects with backoff, and on every new connection replays the
whole history with the original times. So a worker that starts before its sidecar, or outlives
a sidecar restart, is still tracked with true durations. Usage (see docs/protocol.md):

    client = LifecycleClient("/run/asynq-sidecar/lifecycle.sock", shutdown_timeout=8)
    await client.start()              # hello
    ...                               # register with asynq
    await client.ready()
    await client.registered(server_id)  # when known: exact ownership of the registration
    ...                               # SIGTERM arrives
    await client.stopping("SIGTERM")
    ...                               # drain, deregister
    await client.bye()
    await client.close()              # deliver what is buffered (bounded), then disconnect
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as signal_module
import socket
import time
from collections.abc import Callable
from typing import Any

from exporter.lifecycle import protocol
from exporter.settings import DEFAULT_SOCKET

log = logging.getLogger("exporter.lifecycle.client")


#: First and longest wait between connection attempts, in seconds.
RETRY_MIN = 0.05
RETRY_MAX = 1.0
#: A connection that lived this long resets the backoff.
STABLE_AFTER = 5.0


def signal_name(sig: str | int | signal_module.Signals | None) -> str | None:
    """'SIGTERM' for signal.SIGTERM, 15 or 'SIGTERM'; 'SIG<n>' for a number with no name."""
    if sig is None or isinstance(sig, str):
        return sig
    try:
        return signal_module.Signals(sig).name
    except ValueError:
        return f"SIG{int(sig)}"


class LifecycleClient:
    """One worker's connection to the sidecar. Not thread-safe: use it from one event loop.

    `host` defaults to this machine's host name, `pid` to this process's pid (a launcher passes
    its child's). Closing without `exited` or `bye` tells the sidecar the worker is gone (lost).
    """

    def __init__(self, path: str = DEFAULT_SOCKET, *, host: str | None = None, pid: int | None = None,
                 server_id: str | None = None, shutdown_timeout: float | None = None,
                 started_at: float | None = None, retry_max: float = RETRY_MAX,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.server_id = server_id
        self.shutdown_timeout = shutdown_timeout
        self.started_at = started_at
        self.retry_max = retry_max
        self._clock = clock
        self._lines: list[bytes] = []
        self._sent = 0  # lines written on the current connection
        self._connected = False
        self._closing = False
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()  # set while every recorded event is written
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ events

    async def start(self, at: float | None = None) -> None:
        """Say hello and start delivering in the background."""
        if self._task is not None:
            raise RuntimeError("LifecycleClient.start() was already called")
        self._record("hello", at, pid=self.pid, host=self.host, server_id=self.server_id,
                     shutdown_timeout=self.shutdown_timeout, started_at=self.started_at)
        self._task = asyncio.create_task(self._run(), name="lifecycle-client")

    async def ready(self, at: float | None = None) -> None:
        """The worker serves (asynq's srv.Start returned)."""
        self._event("ready", at)

    async def registered(self, server_id: str, at: float | None = None) -> None:
        """The worker's asynq server id, once known (after asynq's Start): the sidecar then knows
        exactly which registration is the worker's, and cleans it up at once after the exit."""
        self._event("registered", at, server_id=server_id)

    async def stopping(self, signal: str | int | signal_module.Signals | None = None,
                       at: float | None = None) -> None:
        """The worker was asked to stop, by `signal` (e.g. "SIGTERM")."""
        self._event("stopping", at, signal=signal_name(signal))

    async def exited(self, code: int | None = None, signal: str | int | signal_module.Signals | None = None,
                     at: float | None = None) -> None:
        """The process ended with exit `code`, or was ended by `signal` (what a launcher reports)."""
        if (code is None) == (signal is None):
            raise ValueError("exited needs exactly one of code or signal")
        self._event("exited", at, code=code, signal=signal_name(signal))

    async def bye(self, at: float | None = None) -> None:
        """The worker deregistered (asynq's srv.Shutdown returned) and is about to exit."""
        self._event("bye", at)

    async def flush(self, timeout: float = 1.0) -> bool:
        """Wait, at most `timeout` seconds, until every recorded event is written to the sidecar
        (e.g. before blocking the event loop). True when it was."""
        try:
            await asyncio.wait_for(self._flushed.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = 1.0) -> bool:
        """Deliver what is buffered, waiting at most `timeout` seconds, then disconnect.
        True when everything was delivered."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return not self._lines
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
            return True
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.warning("could not deliver %d lifecycle event(s) to the sidecar at %s within %gs",
                        len(self._lines) - self._sent, self.path, timeout)
            return False

    async def __aenter__(self) -> LifecycleClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def delivered(self) -> bool:
        """Every recorded event has been written to the current connection."""
        return self._connected and self._sent == len(self._lines)

    # ------------------------------------------------------------ delivery

    def _event(self, name: str, at: float | None, **fields: Any) -> None:
        if self._task is None:
            raise RuntimeError(f"{name}: call start() first (hello comes first)")
        self._record(name, at, **fields)

    def _record(self, name: str, at: float | None, **fields: Any) -> None:
        self._lines.append(protocol.encode(name, time=self._clock() if at is None else at, **fields))
        self._flushed.clear()
        self._wake.set()

    async def _run(self) -> None:
        delay = RETRY_MIN
        waiting = False
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError as e:
                if not waiting:
                    log.info("sidecar not reachable at %s (%s); buffering and retrying in the background",
                             self.path, e.strerror or e)
                    waiting = True
                await self._pause(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            opened = time.monotonic()
            if waiting:
                log.info("connected to the sidecar at %s; delivering %d buffered event(s)",
                         self.path, len(self._lines))
                waiting = False
            self._connected, self._sent = True, 0
            try:
                if await self._pump(reader, writer):
                    return
            except OSError:
                pass
            finally:
                self._connected = False
                self._flushed.clear()  # a new connection gets the history again
                writer.close()
            log.info("lost the connection to the sidecar at %s; reconnecting", self.path)
            waiting = True
            if time.monotonic() - opened > STABLE_AFTER:
                delay = RETRY_MIN
            await self._pause(delay)
            delay = min(delay * 2, self.retry_max)

    async def _pause(self, delay: float) -> None:
        """Wait `delay` seconds, or less when a new event or close() wants another attempt."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            pass

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Write the history, then each new event, until closing (True) or the sidecar hangs up."""
        closed = asyncio.ensure_future(reader.read(1))  # the sidecar never writes: any end is a hang-up
        woken: asyncio.Future[Any] | None = None
        try:
            while True:
                self._wake.clear()
                if self._sent < len(self._lines):
                    end = len(self._lines)
                    writer.writelines(self._lines[self._sent:end])
                    await writer.drain()
                    self._sent = end
                    if end == len(self._lines):
                        self._flushed.set()
                if self._closing and self._sent == len(self._lines):
                    return True
                woken = asyncio.ensure_future(self._wake.wait())
                done, _ = await asyncio.wait({woken, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    return False
        finally:
            for fut in (closed, woken):
                if fut is not None and not fut.done():
                    fut.cancel()
            if closed.done() and not closed.cancelled():
                closed.exception()  # retrieved: a reset is just a hang-up
