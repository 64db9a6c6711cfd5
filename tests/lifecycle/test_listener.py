"""The lifecycle socket: file mode, stale and live sockets, and hostile input beside a good worker."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from exporter.lifecycle.listener import MAX_MESSAGES, SocketInUseError
from exporter.server.sidecar import Sidecar
from exporter.settings import SocketConfig
from tests.support.helpers import eventually, scrape, value
from tests.support.lifecycle import exits, metric

DRAIN = 0.4


def hello(pid: int, host: str = "peer", **extra: object) -> bytes:
    return json.dumps({"event": "hello", "protocol": 1, "pid": pid, "host": host, **extra}).encode() + b"\n"


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    return await asyncio.wait_for(reader.read(), timeout) == b""


async def test_socket_gets_its_mode_in_a_created_directory_and_is_removed_on_exit(make_config, tmp_path_factory):
    base = tmp_path_factory.mktemp("m")
    default = base / "new" / "dir" / "l.sock"
    async with Sidecar(make_config(socket=SocketConfig(path=str(default)))):
        st = os.stat(default)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert not default.exists()
    custom = base / "c.sock"
    async with Sidecar(make_config(socket=SocketConfig(path=str(custom), mode=0o600))):
        assert stat.S_IMODE(os.stat(custom).st_mode) == 0o600
    assert not custom.exists()


async def test_stale_socket_is_replaced_and_a_live_one_is_a_clear_error(make_config, tmp_socket):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(tmp_socket)  # a socket file that nothing serves: what a killed sidecar leaves
    dead.close()
    cfg = make_config()
    async with Sidecar(cfg) as first:
        with pytest.raises(SocketInUseError, match="another live process .* is serving"):
            async with Sidecar(cfg):
                pass
        # the failed start left the live socket alone
        reader, writer = await asyncio.open_unix_connection(tmp_socket)
        writer.write(hello(4242))
        await eventually(lambda: metric(first, "asynq_sidecar_worker_starts_total") == 1)
        writer.close()


async def test_a_file_that_is_not_a_socket_is_never_replaced(make_config, tmp_socket):
    path = Path(tmp_socket)
    path.write_text("precious")
    with pytest.raises(SocketInUseError, match="not a socket"):
        async with Sidecar(make_config()):
            pass
    assert path.read_text() == "precious"


async def test_a_closed_connection_without_exit_report_is_lost_and_a_last_line_needs_no_newline(make_config, tmp_socket):
    async with Sidecar(make_config()) as sc:
        reader, writer = await asyncio.open_unix_connection(tmp_socket)
        future = time.time() + 1000
        writer.write(hello(77, time=future).rstrip(b"\n"))  # no newline, then end of stream
        writer.write_eof()
        assert await closed_by_peer(reader)
        await eventually(lambda: exits(sc)["lost"] == 1, what="a lost exit")
        assert metric(sc, "asynq_sidecar_worker_starts_total") == 1
        assert metric(sc, "asynq_sidecar_socket_connections") == 0
        writer.close()


async def test_hostile_peer_gets_every_rejection_while_a_good_worker_beside_it_is_tracked(
        make_config, tmp_socket, processes, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config(socket=SocketConfig(path=tmp_socket, max_connections=4, hello_timeout=1.0))
    async with Sidecar(cfg) as sc:
        good = await processes.launcher(tmp_socket, str(DRAIN), "0")
        await good.ready()
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="the good worker")

        def errors(reason: str) -> float:
            return metric(sc, "asynq_sidecar_protocol_errors_total", reason=reason)

        # One connection sends every kind of bad line, says a valid hello in between, breaks the
        # order of events, and ends with an oversized line, which closes it.
        reader, writer = await asyncio.open_unix_connection(tmp_socket)
        writer.write(b"this is not json\n")
        writer.write(b"\xff\xfe\x00\x01 binary\n")
        writer.write(b'{"event":"launch"}\n')
        writer.write(b'{"event":"hello","protocol":1,"pid":"seven","host":"h"}\n')
        writer.write(b'{"event":"hello","protocol":9,"pid":7,"host":"h"}\n')
        writer.write(b'{"event":"stopping","time":NaN}\n')
        writer.write(b"[" * 30_000 + b"\n")
        writer.write(b'{"event":"ready"}\n')                    # before hello: out of order
        writer.write(hello(4242, "hostile"))
        writer.write(b'{"event":"exited","code":0}\n')
        writer.write(b'{"event":"ready"}\n')                    # after exit: out of order
        writer.write(b'{"event":"exited","code":1}\n')          # a second exit: out of order
        await writer.drain()
        await eventually(lambda: errors("out_of_order") == 3, what="three out-of-order events")
        writer.write(b"x" * (64 * 1024 + 10))                     # oversized, no newline yet
        await writer.drain()
        assert await closed_by_peer(reader)
        writer.close()

        # One connection never says hello; one floods lines. (Too many connections at once:
        # test_socket_resilience.py.)
        silent_reader, silent = await asyncio.open_unix_connection(tmp_socket)
        flood_reader, flood = await asyncio.open_unix_connection(tmp_socket)
        flood.write(hello(4343, "flood") + b'{"event":"ready"}\n' * MAX_MESSAGES)
        assert await closed_by_peer(flood_reader)
        assert await closed_by_peer(silent_reader)
        flood.close()
        silent.close()

        expected = {"not_json": 3, "binary": 1, "unknown_event": 1, "invalid_field": 1,
                    "unsupported_protocol": 1, "out_of_order": 3, "oversized": 1,
                    "hello_timeout": 1, "too_many_messages": 1}
        await eventually(lambda: {r: errors(r) for r in expected} == expected,
                         what=f"errors {expected}")

        # Through all of it the good worker stayed tracked, alone in its state.
        assert sc.tracker.counts() == {"starting": 1, "running": 0, "stopping": 0}
        good.signal(signal.SIGTERM)
        await good.expect("stopping SIGTERM")
        assert await good.wait() == 0
        await eventually(lambda: exits(sc)["graceful"] == 2, what="the good worker's graceful exit")
        await eventually(lambda: metric(sc, "asynq_sidecar_socket_connections") == 0)
        text = await scrape(sc.http_url)

    assert value(text, "asynq_sidecar_worker_starts_total") == 3  # good, hostile, flood
    assert value(text, "asynq_sidecar_worker_exits_total", outcome="graceful") == 2  # hostile's exit 0, good
    assert value(text, "asynq_sidecar_worker_exits_total", outcome="lost") == 1  # flood, cut off
    assert value(text, "asynq_sidecar_shutdown_duration_seconds_count") == 1
    assert abs(value(text, "asynq_sidecar_last_shutdown_duration_seconds") - DRAIN) <= 0.05
    for reason, count in expected.items():
        assert value(text, "asynq_sidecar_protocol_errors_total", reason=reason) == count

    # Each reason was logged, and repeats were held back by the rate limiter.
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    for reason in expected:
        assert sum(f"({reason})" in m or f": {reason}:" in m for m in rejected) == 1, (reason, rejected)
