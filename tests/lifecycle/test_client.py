"""The Python client: real worker processes that speak the protocol, and its buffering and replay."""

from __future__ import annotations

import signal
import time

import pytest

from exporter.lifecycle.client import LifecycleClient
from exporter.server.sidecar import Sidecar
from tests.support.helpers import eventually
from tests.support.lifecycle import HOST, exits, metric

DRAIN = 0.3
TOLERANCE = 0.05


async def test_a_worker_speaking_the_protocol_is_tracked_through_ready_stopping_and_bye(
        make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await processes.client_worker(tmp_socket, DRAIN)
        pid = await w.ready()
        await eventually(lambda: sc.tracker.counts()["running"] == 1, what="running via ready")
        (tracked,) = sc.tracker.workers.values()
        assert (tracked.pid, tracked.host, tracked.shutdown_timeout) == (pid, HOST, 8.0)
        sent = time.time()
        w.signal(signal.SIGTERM)
        await eventually(lambda: sc.tracker.counts()["stopping"] == 1, what="stopping")
        assert await w.wait() == 0
        await eventually(lambda: exits(sc)["graceful"] == 1, what="bye")
        assert tracked.outcome == "graceful" and tracked.stop_signal == "SIGTERM"
        assert sent <= tracked.stopping_at <= sent + TOLERANCE
        assert abs(metric(sc, "asynq_sidecar_last_shutdown_duration_seconds") - DRAIN) <= TOLERANCE
        await eventually(lambda: sc.tracker.workers == {}, what="forgotten after close")


async def test_a_worker_killed_with_sigkill_is_lost(make_config, tmp_socket, processes):
    async with Sidecar(make_config()) as sc:
        w = await processes.client_worker(tmp_socket, DRAIN)
        await w.ready()
        await eventually(lambda: sc.tracker.counts()["running"] == 1, what="running")
        w.signal(signal.SIGKILL)
        assert await w.wait() == -9
        await eventually(lambda: exits(sc)["lost"] == 1, what="a lost exit")
        assert sc.tracker.counts() == {"starting": 0, "running": 0, "stopping": 0}


async def test_client_buffers_until_a_sidecar_listens_and_replays_its_history_to_a_new_one(
        make_config, tmp_socket):
    client = LifecycleClient(tmp_socket, host=HOST, pid=4242, server_id="s-1", retry_max=0.1)
    await client.start()
    await client.ready()
    hello_sent = time.time()
    assert not client.connected
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: sc.tracker.counts()["running"] == 1, what="the buffered events")
        (first,) = sc.tracker.workers.values()
        assert first.hello_at <= hello_sent and first.server_ids == {"s-1"}
        await eventually(lambda: client.delivered)
    # The sidecar restarts: the client reconnects and tells the new one everything, with the
    # original times, so it knows the worker is running (and since when).
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: sc.tracker.counts()["running"] == 1, what="the replayed history")
        (again,) = sc.tracker.workers.values()
        assert (again.hello_at, again.running_at) == (first.hello_at, first.running_at)
        await client.stopping(signal.SIGTERM)
        await client.bye()
        assert await client.close() is True
        await eventually(lambda: exits(sc)["graceful"] == 1, what="bye")
        await eventually(lambda: sc.tracker.workers == {}, what="forgotten")


async def test_close_without_a_sidecar_gives_up_after_its_timeout(tmp_socket):
    client = LifecycleClient(tmp_socket)
    with pytest.raises(RuntimeError, match="start"):
        await client.ready()
    await client.start()
    with pytest.raises(ValueError):
        await client.exited()
    started = time.monotonic()
    assert await client.close(timeout=0.2) is False
    assert time.monotonic() - started < 1.0
