"""A real asynq peer process (go/internal/asynqpeer, under a launcher or alone) as the tests see
it: its stdout lines, its own pid and server id, its exit."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field

from exporter.asynq import model as asynq
from tests.support.helpers import eventually

HOST = socket.gethostname()  # what asynq registers under, and what the launchers report


@dataclass
class Peer:
    """A real asynq worker process (under a launcher, or alone); its stdout lines are collected."""

    proc: asyncio.subprocess.Process
    label: str
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task | None = None
    pid: int | None = None  # the asynq process's own pid (the launcher's child)
    server_id: str | None = None

    @property
    def member(self) -> asynq.Member:
        assert self.pid is not None and self.server_id is not None
        return asynq.server_member(HOST, self.pid, self.server_id)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            self.lines.append(raw.decode().strip())

    async def line(self, prefix: str, timeout: float = 15.0) -> str:
        def found() -> str | None:
            return next((ln for ln in self.lines if ln.startswith(prefix)), None)
        try:
            return await eventually(found, timeout=timeout, what=f"{self.label}: a line {prefix!r}")
        except AssertionError:
            raise AssertionError(f"{self.label}: no line {prefix!r} in {self.lines}; stderr:\n"
                                 f"{await self.stderr()}") from None

    async def ready(self) -> asynq.Member:
        _, pid, server_id = (await self.line("ready ")).split()
        self.pid, self.server_id = int(pid), server_id
        return self.member

    async def left_registered(self) -> bool:
        """The peer's own check, made just before its clean exit: was its registration still there?"""
        return (await self.line("exit registered=")).endswith("true")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def watch_exit(self) -> asyncio.Future[float]:
        """When the asynq process itself ends (a pidfd turns readable), not its launcher."""
        assert self.pid is not None
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[float] = loop.create_future()
        fd = os.pidfd_open(self.pid)

        def readable() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            ended.set_result(time.time())

        loop.add_reader(fd, readable)
        return ended

    async def wait(self, timeout: float = 15.0) -> int:
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.label} still running after {timeout}s") from None
        if self.reader is not None:
            await self.reader
        return rc

    async def stderr(self) -> str:
        if self.proc.stderr is None or self.proc.returncode is None:
            return "(still running)"
        return (await self.proc.stderr.read()).decode(errors="replace")
