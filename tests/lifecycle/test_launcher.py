"""`asynq-sidecar run --serve`: the Python launcher with the whole sidecar in its process.

The launcher contract both launchers share is tested in test_launcher_conformance.py."""

from __future__ import annotations

import signal
import subprocess
import sys

from exporter.devtools.redis_server import free_port
from tests.support.helpers import eventually, scrape, value
from tests.support.lifecycle import HOST, ROOT

DRAIN = 0.5  # the child's known drain time after SIGTERM


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


def test_undelivered_events_are_reported_on_stderr_and_serve_after_the_separator_is_the_workers():
    proc = subprocess.run([sys.executable, "-m", "exporter", "run", "--socket", "/nonexistent/l.sock", "--",
                           sys.executable, "-c", "import sys; print(sys.argv[1:])", "--serve", "-x"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 0 and "['--serve', '-x']" in proc.stdout
    assert "could not deliver" in proc.stderr  # no sidecar: bounded wait, then the child's status
