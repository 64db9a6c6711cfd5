"""`asynq-sidecar run -- CMD`: real launcher and worker processes against a real sidecar and Redis."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from exporter.redis_server import free_port
from exporter.sidecar import Sidecar
from tests.helpers import eventually, scrape, value
from tests.lifecycle_helpers import HOST, ROOT, exits, metric, processes  # noqa: F401 - a fixture

DRAIN = 0.5  # the child's known drain time after SIGTERM
TOLERANCE = 0.05  # shutdown durations must match the truth within 50 ms


def only_worker(sc):
    (worker,) = sc.tracker.workers.values()
    return worker


async def test_graceful_stop_is_measured_to_within_50ms_of_the_truth(make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await processes.launcher(tmp_socket, str(DRAIN), "0")
        child = await w.ready()
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="hello")
        tracked = only_worker(sc)
        assert (tracked.pid, tracked.host) == (child, HOST)  # the child's pid, --hostname

        sent = time.time()
        w.signal(signal.SIGTERM)
        await w.expect("stopping SIGTERM")  # forwarded to the child
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
        assert metric(sc, "asynq_sidecar_shutdown_budget_seconds") == 25
        assert metric(sc, "asynq_sidecar_worker_starts_total") == 1
        await eventually(lambda: sc.tracker.workers == {}, what="the record forgotten")
        assert metric(sc, "asynq_sidecar_socket_connections") == 0
        assert exits(sc) == {"graceful": 1, "error": 0, "killed": 0, "lost": 0}


async def test_non_zero_exit_is_an_error_and_the_launcher_exits_with_the_code(make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await processes.launcher(tmp_socket, "0", "0", "3")  # exits 3 at once
        await w.ready()
        assert await w.wait() == 3
        await eventually(lambda: exits(sc)["error"] == 1, what="an error exit")
        assert metric(sc, "asynq_sidecar_worker_starts_total") == 1
        assert metric(sc, "asynq_sidecar_shutdown_duration_seconds_count") == 0  # no stopping


async def test_sigkill_of_the_child_is_killed_and_the_launcher_exits_128_plus_9(make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await processes.launcher(tmp_socket, str(DRAIN), "0")
        child = await w.ready()
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="hello")
        os.kill(child, signal.SIGKILL)
        assert await w.wait() == 128 + 9
        await eventually(lambda: exits(sc)["killed"] == 1, what="a killed exit")
        assert exits(sc)["lost"] == 0


async def test_sigkill_of_the_launcher_itself_is_lost(make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await processes.launcher(tmp_socket, str(DRAIN), "0")
        child = await w.ready()
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="hello")
        w.signal(signal.SIGKILL)
        await eventually(lambda: exits(sc)["lost"] == 1, what="a lost exit")
        assert sc.tracker.counts() == {"starting": 0, "running": 0, "stopping": 0}
        os.kill(child, signal.SIGKILL)  # the orphan holds the launcher's stdout open
        assert await w.wait() == -9


async def test_worker_started_before_the_sidecar_is_buffered_then_delivered_with_true_times(
        make_config, tmp_socket, processes):
    w = await processes.launcher(tmp_socket, str(DRAIN), "0")
    child = await w.ready()  # running, with no sidecar anywhere
    sidecar_started = time.time()
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: metric(sc, "asynq_sidecar_worker_starts_total") == 1,
                         what="the buffered hello delivered")
        tracked = only_worker(sc)
        assert tracked.pid == child
        assert tracked.hello_at < sidecar_started  # when it happened, not when it arrived
        assert tracked.started_at is not None and tracked.started_at <= tracked.hello_at
        sent = time.time()
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0
        await eventually(lambda: exits(sc)["graceful"] == 1, what="a graceful exit")
        assert sent <= tracked.stopping_at <= sent + TOLERANCE
        assert abs(metric(sc, "asynq_sidecar_last_shutdown_duration_seconds") - DRAIN) <= TOLERANCE


async def test_signals_are_forwarded_and_sigint_is_a_stop(make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await processes.launcher(tmp_socket, "0.1", "0")
        await w.ready()
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="hello")
        for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTSTP):
            w.signal(sig)
            await w.expect(f"got {sig.name}")
        assert sc.tracker.counts()["starting"] == 1  # none of those is a stop
        w.signal(signal.SIGINT)
        await w.expect("stopping SIGINT")
        assert await w.wait() == 0
        await eventually(lambda: exits(sc)["graceful"] == 1, what="a graceful exit")


async def test_a_shutdown_longer_than_the_budget_is_counted_and_logged(make_config, tmp_socket, processes, caplog):
    caplog.set_level(logging.INFO, logger="exporter.lifecycle")
    async with Sidecar(make_config(shutdown_budget=0.1)) as sc:
        w = await processes.launcher(tmp_socket, "0.3", "0")
        await w.ready()
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="hello")
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0
        await eventually(lambda: metric(sc, "asynq_sidecar_shutdowns_over_budget_total") == 1)
        assert metric(sc, "asynq_sidecar_shutdown_budget_seconds") == 0.1
    edges = [r.getMessage() for r in caplog.records if r.name == "exporter.lifecycle"]
    assert [m.split(":")[0] for m in edges] == ["worker started", "worker stopping", "worker exited gracefully"]
    assert "over the 0.1s budget" in edges[-1]


async def test_serve_runs_the_whole_sidecar_in_the_launcher_process(redis_url, tmp_socket, processes):
    port = free_port()
    w = await processes.launcher(
        tmp_socket, str(DRAIN), "0",
        options=("--serve", "--redis-url", redis_url, "--listen", f"127.0.0.1:{port}"))
    child = await w.ready()
    url = f"http://127.0.0.1:{port}"

    async def scraped():
        try:
            return await scrape(url)
        except OSError:
            return None

    text = await eventually(scraped, timeout=10, what="the in-process sidecar's /metrics")
    assert value(text, "asynq_sidecar_workers", state="starting") == 1
    assert value(text, "asynq_sidecar_worker_starts_total") == 1
    assert value(text, "asynq_sidecar_socket_connections") == 0  # events go in-process, not over the socket
    w.signal(signal.SIGTERM)
    await w.expect("stopping SIGTERM")
    text = await scrape(url)  # still serving while the worker drains
    assert value(text, "asynq_sidecar_workers", state="stopping") == 1

    async def final_state_scraped():
        t = await scraped()
        return t is not None and value(t, "asynq_sidecar_worker_exits_total", outcome="graceful") == 1

    # The launcher lingers after the worker exits until a scrape has read the exit.
    await eventually(final_state_scraped, timeout=10, what="a scrape of the worker's exit")
    assert await w.wait() == 0
    log = await w.stderr()
    assert f"worker started: {HOST} pid {child}" in log
    assert "worker exited gracefully" in log and "shutdown took 0.5" in log
    assert "Traceback" not in log


def test_command_errors_exit_like_a_shell():
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "exporter", "run", "--socket", "/nonexistent/l.sock",
                               *args], capture_output=True, text=True, cwd=ROOT, timeout=30)

    missing = run("--", "/nonexistent/worker")
    assert missing.returncode == 127 and "cannot start /nonexistent/worker" in missing.stderr
    nothing = run()
    assert nothing.returncode == 2 and "a command is required" in nothing.stderr
    flagged = run("--", sys.executable, "-c", "import sys; print(sys.argv[1:])", "--serve", "-x")
    assert flagged.returncode == 0 and "['--serve', '-x']" in flagged.stdout  # after --, all the worker's
    assert "could not deliver" in flagged.stderr  # no sidecar: bounded wait, then the child's status
