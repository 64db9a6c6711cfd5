"""The launcher contract (docs/protocol.md, "The launcher"), run against both launchers: the Python
`asynq-sidecar run` and the static Go `asynq-launch`, so that the two cannot drift apart.

Real processes and signals throughout. Where the question is what a launcher writes on the
socket (fields, stamps, replay), a small listener in the test records the lines; where it is what
the sidecar makes of them, the real sidecar listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exporter.server.sidecar import Sidecar
from tests.support.helpers import eventually
from tests.support.lifecycle import exits, metric

HOST = socket.gethostname()  # both launchers report this host's name by default
DRAIN = 0.5  # the child's known drain time after SIGTERM
TOLERANCE = 0.05  # stamps and shutdown durations must match the truth within 50 ms
FLUSH_TIMEOUT = 1.0  # after the child's exit, a launcher spends at most this long delivering

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
OTHER_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTSTP)


@dataclass(frozen=True)
class Launcher:
    name: str
    command: tuple[str, ...]  # up to the launcher's own options

    def argv(self, *cmd: str, socket_path: str | None = None) -> list[str]:
        options = ("--socket", socket_path) if socket_path else ()
        return [*self.command, *options, "--", *cmd]


@pytest.fixture(params=["python", "go"])
def launcher(request) -> Launcher:
    if request.param == "python":
        return Launcher("python", (sys.executable, "-m", "exporter", "run"))
    return Launcher("go", (str(request.getfixturevalue("go_launcher")),))


def child(*args: str) -> tuple[str, ...]:
    """The test worker (lifecycle_helpers.CHILD): DRAIN and exit code on a stop, other signals noted."""
    from tests.support.lifecycle import CHILD

    return (sys.executable, "-c", CHILD, *args)


async def launch(processes, launcher: Launcher, socket_path: str | None, *child_args: str,
                 env: dict[str, str] | None = None):
    return await processes.start(*launcher.argv(*child(*child_args), socket_path=socket_path), env=env)


@dataclass
class Line:
    conn: int
    event: dict
    received: float


@dataclass
class FakeSidecar:
    """A listener on the lifecycle socket that records every line it reads, with when it read it."""

    path: str
    lines: list[Line] = field(default_factory=list)
    closed: set[int] = field(default_factory=set)
    _conns: int = 0
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeSidecar:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop as a sidecar does: close the listener and every connection, remove the file."""
        if self._server is not None:
            self._server.close()
            for w in self._writers:
                w.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn, self._conns = self._conns, self._conns + 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while raw := await reader.readline():
                self.lines.append(Line(conn, json.loads(raw), time.time()))
        self.closed.add(conn)
        writer.close()

    def events(self, conn: int | None = None) -> list[dict]:
        return [ln.event for ln in self.lines if conn is None or ln.conn == conn]

    def names(self, conn: int | None = None) -> list[str]:
        return [e["event"] for e in self.events(conn)]

    async def wait_names(self, *names: str, conn: int | None = None, timeout: float = 5.0) -> list[dict]:
        """Wait until the events of `conn` (all, when None) are exactly `names`; return them."""
        await eventually(lambda: self.names(conn) == list(names), timeout=timeout,
                         what=f"events {list(names)} (have {self.names(conn)})")
        return self.events(conn)


# ---------------------------------------------------------------- what goes on the socket

async def test_hello_carries_the_childs_pid_this_host_and_its_start(launcher, tmp_socket, processes):
    async with FakeSidecar(tmp_socket) as fake:
        before = time.time()
        w = await launch(processes, launcher, tmp_socket, "0", "0")
        pid = await w.ready()
        (hello,) = await fake.wait_names("hello")
        assert hello["protocol"] == 1
        assert hello["pid"] == pid != w.pid  # the child's, not the launcher's
        assert hello["host"] == HOST
        assert before - TOLERANCE <= hello["started_at"] <= hello["time"] <= time.time()
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
async def test_a_stop_signal_is_stamped_on_receipt_forwarded_and_the_exit_reported(
        launcher, sig, tmp_socket, processes):
    async with FakeSidecar(tmp_socket) as fake:
        w = await launch(processes, launcher, tmp_socket, str(DRAIN), "0")
        await w.ready()
        await fake.wait_names("hello")
        sent = time.time()
        w.signal(sig)
        await w.expect(f"stopping {sig.name}")  # forwarded to the child
        assert await w.wait() == 0
        hello, stopping, exited = await fake.wait_names("hello", "stopping", "exited")
        assert stopping["signal"] == sig.name
        assert sent <= stopping["time"] <= sent + TOLERANCE
        assert exited == {"event": "exited", "code": 0, "time": exited["time"]}
        assert abs(exited["time"] - stopping["time"] - DRAIN) <= TOLERANCE
        await eventually(lambda: fake.closed == {0}, what="the connection closed after exited")


async def test_only_the_first_stop_signal_is_reported(launcher, tmp_socket, processes):
    async with FakeSidecar(tmp_socket) as fake:
        w = await launch(processes, launcher, tmp_socket, str(DRAIN), "0")
        await w.ready()
        await fake.wait_names("hello")
        w.signal(signal.SIGTERM)
        await w.expect("stopping SIGTERM")
        w.signal(signal.SIGINT)  # the child is draining and ignores it; the launcher reports nothing new
        assert await w.wait() == 0
        await fake.wait_names("hello", "stopping", "exited")


async def test_every_other_forwarded_signal_reaches_the_child_and_is_not_a_stop(launcher, tmp_socket, processes):
    async with FakeSidecar(tmp_socket) as fake:
        w = await launch(processes, launcher, tmp_socket, "0.1", "0")
        await w.ready()
        await fake.wait_names("hello")
        for sig in OTHER_SIGNALS:
            w.signal(sig)
            await w.expect(f"got {sig.name}")
        assert fake.names() == ["hello"]
        w.signal(signal.SIGTERM)
        await w.expect("stopping SIGTERM")
        assert await w.wait() == 0


async def test_a_child_ended_by_a_signal_is_reported_with_its_name_and_exits_128_plus_n(
        launcher, tmp_socket, processes):
    async with FakeSidecar(tmp_socket) as fake:
        w = await launch(processes, launcher, tmp_socket, str(DRAIN), "0")
        pid = await w.ready()
        await fake.wait_names("hello")
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        assert await w.wait() == 128 + signal.SIGKILL
        _, exited = await fake.wait_names("hello", "exited")
        assert exited["signal"] == "SIGKILL" and "code" not in exited
        assert killed <= exited["time"] <= killed + TOLERANCE


async def test_the_launcher_exits_with_the_childs_code(launcher, tmp_socket, processes):
    async with FakeSidecar(tmp_socket) as fake:
        w = await launch(processes, launcher, tmp_socket, "0", "0", "3")  # exits 3 at once
        await w.ready()
        assert await w.wait() == 3
        _, exited = await fake.wait_names("hello", "exited")
        assert exited["code"] == 3


async def test_arguments_after_the_separator_are_the_workers(launcher, tmp_socket, processes):
    async with FakeSidecar(tmp_socket) as fake:
        w = await processes.start(*launcher.argv(sys.executable, "-c", "import sys; print(sys.argv[1:])",
                                                 "--socket", "-x", socket_path=tmp_socket))
        assert await w.wait() == 0
        assert await w.expect("['--socket', '-x']")
        await fake.wait_names("hello", "exited")


async def test_command_errors_exit_like_a_shell(launcher, tmp_path, tmp_socket, processes):
    not_executable = tmp_path / "worker"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    for argv, status in (
        (launcher.argv("/nonexistent/worker", socket_path=tmp_socket), 127),
        (launcher.argv(str(not_executable), socket_path=tmp_socket), 126),
        ([*launcher.command, "--socket", tmp_socket, "--"], 2),  # no command
        ([*launcher.command, "--socket", tmp_socket], 2),
        ([*launcher.command, "--no-such-flag", "--", "true"], 2),
    ):
        w = await processes.start(*argv)
        assert await w.wait() == status, (argv, await w.stderr())
        assert (await w.stderr()).strip(), f"{argv}: exit {status} without a word on stderr"


# ---------------------------------------------------------------- never depending on the sidecar

async def _time_to_ready(processes, launcher: Launcher, socket_path: str) -> tuple[object, float]:
    t0 = time.monotonic()
    w = await launch(processes, launcher, socket_path, "0", "0")
    await w.ready()
    return w, time.monotonic() - t0


async def test_no_sidecar_never_delays_the_child_and_the_exit_is_bounded(launcher, tmp_path, processes):
    absent = str(tmp_path / "absent.sock")
    # A socket whose listener never accepts: connecting may hang, the child must not.
    hung_path = str(tmp_path / "hung.sock")
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(hung_path)
    hung.listen(0)
    try:
        for path in (absent, hung_path):
            w, took = await _time_to_ready(processes, launcher, path)
            assert took < 2.0, f"{path}: the child was ready {took:.2f}s after the launch"
            sent = time.monotonic()
            w.signal(signal.SIGTERM)
            assert await w.wait() == 0
            # The drain (0 s) plus at most the bounded delivery.
            assert time.monotonic() - sent <= FLUSH_TIMEOUT + 0.5, path
    finally:
        hung.close()


async def test_a_late_sidecar_receives_the_buffered_events_with_their_true_times(
        launcher, tmp_socket, processes):
    w = await launch(processes, launcher, tmp_socket, "5", "0")  # a long drain
    pid = await w.ready()
    sent = time.time()
    w.signal(signal.SIGTERM)
    await w.expect("stopping SIGTERM")
    listening = time.time()
    async with FakeSidecar(tmp_socket) as fake:  # 1 s backoff at most: it connects soon
        hello, stopping = await fake.wait_names("hello", "stopping", timeout=3)
        assert hello["pid"] == pid and hello["time"] < sent
        assert sent <= stopping["time"] <= min(sent + TOLERANCE, listening)
        assert all(ln.received >= listening for ln in fake.lines)  # delivered late, stamped true
        os.kill(pid, signal.SIGKILL)
        assert await w.wait() == 128 + signal.SIGKILL


async def test_after_a_sidecar_restart_the_whole_history_is_sent_again(launcher, tmp_socket, processes):
    async with FakeSidecar(tmp_socket) as first:
        w = await launch(processes, launcher, tmp_socket, str(DRAIN), "0")
        await w.ready()
        (hello,) = await first.wait_names("hello")
    async with FakeSidecar(tmp_socket) as second:
        assert await second.wait_names("hello", timeout=3) == [hello]  # the same line, the same time
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0
        await second.wait_names("hello", "stopping", "exited")


async def test_socket_flag_wins_over_the_environment(launcher, tmp_path, processes):
    flag, env = str(tmp_path / "flag.sock"), str(tmp_path / "env.sock")
    async with FakeSidecar(flag) as by_flag, FakeSidecar(env) as by_env:
        a = await launch(processes, launcher, flag, "0", "0", env={"ASYNQ_SIDECAR_SOCKET": env})
        b = await launch(processes, launcher, None, "0", "0", env={"ASYNQ_SIDECAR_SOCKET": env})
        pid_a, pid_b = await a.ready(), await b.ready()
        await eventually(lambda: len(by_flag.lines) == 1 and len(by_env.lines) == 1, what="two hellos")
        assert by_flag.events()[0]["pid"] == pid_a
        assert by_env.events()[0]["pid"] == pid_b
        for w in (a, b):
            w.signal(signal.SIGTERM)
            assert await w.wait() == 0


async def test_hostname_flag_wins_over_the_environment(launcher, tmp_socket, processes):
    async with FakeSidecar(tmp_socket) as fake:
        env = {"ASYNQ_SIDECAR_HOSTNAME": "from-env"}
        a = await processes.start(*launcher.command, "--socket", tmp_socket, "--hostname", "from-flag",
                                  "--", *child("0", "0"), env=env)
        b = await launch(processes, launcher, tmp_socket, "0", "0", env=env)
        pids = {await a.ready(): "from-flag", await b.ready(): "from-env"}
        await eventually(lambda: len(fake.lines) == 2, what="two hellos")
        assert {e["pid"]: e["host"] for e in fake.events()} == pids
        for w in (a, b):
            w.signal(signal.SIGTERM)
            assert await w.wait() == 0


# ---------------------------------------------------------------- with the real sidecar

def only_worker(sc):
    (worker,) = sc.tracker.workers.values()
    return worker


async def test_graceful_stop_is_measured_to_within_50ms_of_the_truth(launcher, make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await launch(processes, launcher, tmp_socket, str(DRAIN), "0")
        pid = await w.ready()
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="hello")
        tracked = only_worker(sc)
        assert (tracked.pid, tracked.host) == (pid, HOST)

        sent = time.time()
        w.signal(signal.SIGTERM)
        await w.expect("stopping SIGTERM")
        await eventually(lambda: sc.tracker.counts()["stopping"] == 1, what="stopping")
        assert sent <= tracked.stopping_at <= sent + TOLERANCE
        assert tracked.stop_signal == "SIGTERM"
        assert await w.wait() == 0
        observed = time.time() - sent
        await eventually(lambda: exits(sc)["graceful"] == 1, what="a graceful exit")

        duration = metric(sc, "asynq_sidecar_last_shutdown_duration_seconds")
        assert abs(duration - DRAIN) <= TOLERANCE, duration
        assert duration <= observed
        assert metric(sc, "asynq_sidecar_shutdown_duration_seconds_count") == 1
        assert metric(sc, "asynq_sidecar_shutdown_duration_seconds_bucket", le="0.5") == 0
        assert metric(sc, "asynq_sidecar_shutdown_duration_seconds_bucket", le="1.0") == 1
        assert metric(sc, "asynq_sidecar_shutdowns_over_budget_total") == 0
        assert metric(sc, "asynq_sidecar_worker_starts_total") == 1
        await eventually(lambda: sc.tracker.workers == {}, what="the record forgotten")
        assert metric(sc, "asynq_sidecar_socket_connections") == 0
        assert exits(sc) == {"graceful": 1, "error": 0, "killed": 0, "lost": 0}


async def test_non_zero_exit_is_an_error(launcher, make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await launch(processes, launcher, tmp_socket, "0", "0", "3")
        await w.ready()
        assert await w.wait() == 3
        await eventually(lambda: exits(sc)["error"] == 1, what="an error exit")
        assert metric(sc, "asynq_sidecar_worker_starts_total") == 1
        assert metric(sc, "asynq_sidecar_shutdown_duration_seconds_count") == 0  # no stopping


async def test_sigkill_of_the_child_is_killed(launcher, make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await launch(processes, launcher, tmp_socket, str(DRAIN), "0")
        pid = await w.ready()
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="hello")
        os.kill(pid, signal.SIGKILL)
        assert await w.wait() == 128 + 9
        await eventually(lambda: exits(sc)["killed"] == 1, what="a killed exit")
        assert exits(sc)["lost"] == 0


async def test_sigkill_of_the_launcher_itself_is_lost(launcher, make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await launch(processes, launcher, tmp_socket, str(DRAIN), "0")
        pid = await w.ready()
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="hello")
        w.signal(signal.SIGKILL)
        await eventually(lambda: exits(sc)["lost"] == 1, what="a lost exit")
        assert sc.tracker.counts() == {"starting": 0, "running": 0, "stopping": 0}
        os.kill(pid, signal.SIGKILL)  # the orphan holds the launcher's stdout open
        assert await w.wait() == -9


async def test_worker_started_before_the_sidecar_is_delivered_with_true_times(
        launcher, make_config, tmp_socket, processes):
    w = await launch(processes, launcher, tmp_socket, str(DRAIN), "0")
    pid = await w.ready()  # running, with no sidecar anywhere
    sidecar_started = time.time()
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: metric(sc, "asynq_sidecar_worker_starts_total") == 1,
                         what="the buffered hello delivered")
        tracked = only_worker(sc)
        assert tracked.pid == pid
        assert tracked.hello_at < sidecar_started  # when it happened, not when it arrived
        assert tracked.started_at is not None and tracked.started_at <= tracked.hello_at
        sent = time.time()
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0
        await eventually(lambda: exits(sc)["graceful"] == 1, what="a graceful exit")
        assert sent <= tracked.stopping_at <= sent + TOLERANCE
        assert abs(metric(sc, "asynq_sidecar_last_shutdown_duration_seconds") - DRAIN) <= TOLERANCE


async def test_a_shutdown_longer_than_the_budget_is_counted_and_logged(
        launcher, make_config, tmp_socket, processes, caplog):
    caplog.set_level(logging.INFO, logger="exporter.lifecycle.tracker")
    async with Sidecar(make_config(shutdown_budget=0.1)) as sc:
        w = await launch(processes, launcher, tmp_socket, "0.3", "0")
        await w.ready()
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="hello")
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0
        await eventually(lambda: metric(sc, "asynq_sidecar_shutdowns_over_budget_total") == 1)
        assert metric(sc, "asynq_sidecar_shutdown_budget_seconds") == 0.1
    edges = [r.getMessage() for r in caplog.records if r.name == "exporter.lifecycle.tracker"]
    assert [m.split(":")[0] for m in edges] == ["worker started", "worker stopping", "worker exited gracefully"]
    assert "over the 0.1s budget" in edges[-1]


def test_the_go_launcher_is_one_static_file_of_at_most_5_mb(go_launcher: Path):  # noqa: F811
    data = go_launcher.read_bytes()
    assert len(data) <= 5_000_000, f"{len(data)} bytes"
    # A static ELF has no program interpreter (PT_INTERP): it needs no libc in the image.
    assert data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data and b"/lib/ld-" not in data
