"""The lifecycle socket under real-world faults: its file deleted or taken over, quiet
connections filling it, and bursts of short connections."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from exporter.server.sidecar import Sidecar
from exporter.settings import SocketConfig
from tests.support.helpers import eventually, register_server
from tests.support.lifecycle import HOST, ROOT, exits, metric


def line(event: str, **fields: object) -> bytes:
    return json.dumps({"event": event, **fields}).encode() + b"\n"


def hello(pid: int, host: str = HOST, **fields: object) -> bytes:
    return line("hello", protocol=1, pid=pid, host=host, **fields)


def errors(sc: Sidecar, reason: str) -> float:
    return metric(sc, "asynq_sidecar_protocol_errors_total", reason=reason)


def recreated(sc: Sidecar) -> float | None:
    return metric(sc, "asynq_sidecar_socket_recreated_total")


def inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


async def status(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------- the socket file


async def test_a_deleted_socket_file_is_recreated_logged_and_counted_and_old_connections_go_on(
        make_config, tmp_socket, caplog):
    caplog.set_level(logging.INFO, logger="exporter.lifecycle.listener")
    async with Sidecar(make_config()) as sc:
        _, old = await asyncio.open_unix_connection(tmp_socket)
        old.write(hello(501))
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="the first worker")
        before = inode(tmp_socket)

        os.unlink(tmp_socket)

        async def connect() -> asyncio.StreamWriter | None:
            try:
                return (await asyncio.open_unix_connection(tmp_socket))[1]
            except OSError:  # no file yet (or a listener gone: refused)
                return None

        # A worker that connects now is heard; the one connected before is heard still.
        new = await eventually(connect, what="a socket to connect to again")
        assert recreated(sc) == 1 and inode(tmp_socket) != before
        assert sc.lifesocket.listening
        assert await status(sc.http_url + "/readyz") == (200, "ok: redis reachable\n")
        new.write(hello(502))
        await eventually(lambda: sc.tracker.counts()["starting"] == 2, what="a worker on the new socket")
        old.write(line("exited", code=0))
        new.write(line("exited", code=3))
        await eventually(lambda: (exits(sc)["graceful"], exits(sc)["error"]) == (1, 1), what="both exits")
        old.close()
        new.close()
    notes = [r for r in caplog.records if tmp_socket in r.getMessage() and "recreated" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]
    assert not Path(tmp_socket).exists()  # removed on exit, as the first one would have been


@pytest.mark.parametrize("blocker", ["live socket", "regular file"])
async def test_a_path_taken_by_something_else_is_not_stolen_and_readyz_fails_until_it_is_free(
        make_config, tmp_socket, caplog, blocker):
    caplog.set_level(logging.INFO, logger="exporter.lifecycle.listener")
    async with Sidecar(make_config()) as sc:
        # Replace the socket at once (no await in between: the sidecar cannot look meanwhile).
        os.unlink(tmp_socket)
        other = None
        if blocker == "live socket":  # what another process serving the same path looks like
            other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            other.bind(tmp_socket)
            other.listen(1)
        else:
            Path(tmp_socket).write_text("precious")
        theirs = inode(tmp_socket)

        def warned() -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and "not listening" in r.getMessage()]

        await eventually(warned, what="a warning that the socket is not listening")
        code, text = await status(sc.http_url + "/readyz")
        assert (code, text) == (503, "not ready: the lifecycle socket is not listening\n")
        assert (await status(sc.http_url + "/healthz"))[0] == 200
        assert inode(tmp_socket) == theirs and recreated(sc) == 0
        if other is None:
            assert Path(tmp_socket).read_text() == "precious"

        # The path is freed: the sidecar listens there again within seconds.
        if other is not None:
            other.close()  # a dead socket file stays behind, as a killed process leaves it
        else:
            os.unlink(tmp_socket)
        await eventually(lambda: recreated(sc) == 1, what="the socket recreated once the path is free")
        assert await status(sc.http_url + "/readyz") == (200, "ok: redis reachable\n")
        _, w = await asyncio.open_unix_connection(tmp_socket)
        w.write(hello(503))
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="a worker on the new socket")
        w.close()
    assert len(warned()) == 1, warned()  # one line for the whole episode, not one per retry


# ---------------------------------------------------------------- quiet connections


async def test_quiet_connections_do_not_lock_out_a_real_launcher(make_config, tmp_socket, processes, caplog):
    """--max-connections quiet connections that said hello and nothing else: a real launcher
    that connects after them is admitted once the oldest quiet one has had --hello-timeout
    to prove itself, and that one is evicted."""
    cfg = make_config(socket=SocketConfig(path=tmp_socket, max_connections=4, hello_timeout=0.5))
    async with Sidecar(cfg) as sc:
        quiet = []
        for pid in range(601, 605):
            reader, writer = await asyncio.open_unix_connection(tmp_socket)
            writer.write(hello(pid))
            quiet.append((reader, writer))
            await eventually(lambda: sc.tracker.counts()["starting"] == pid - 600, what=f"quiet {pid}")

        launcher = await processes.launcher(tmp_socket, "0", "0")
        child = await launcher.ready()
        await eventually(lambda: any(w.pid == child for w in sc.tracker.workers.values()), timeout=5,
                         what="the launcher's worker tracked")
        assert errors(sc, "evicted") == 1 and errors(sc, "too_many_connections") == 0
        assert await closed_by_peer(quiet[0][0])  # the oldest went
        evictions = [r.getMessage() for r in caplog.records if ": evicted: " in r.getMessage()]
        assert len(evictions) == 1 and "without proof of an asynq worker" in evictions[0], evictions
        launcher.signal(signal.SIGTERM)
        assert await launcher.wait() == 0
        await eventually(lambda: exits(sc)["graceful"] == 1, what="the launcher's exit")
        assert exits(sc)["lost"] == 1  # the evicted one: its connection closed with no exit report
        assert sc.tracker.counts()["starting"] == 3
        for _, writer in quiet:
            writer.close()


async def test_proven_workers_are_never_evicted(make_config, tmp_socket, rdb, caplog):
    """Quiet workers that named their server id, or whose registration the sidecar saw in Redis,
    keep their connections: a newcomer waits --hello-timeout for a slot, then is refused."""
    hostname = make_config().hostname  # the observer looks for registrations of this host
    cfg = make_config(socket=SocketConfig(path=tmp_socket, max_connections=4, hello_timeout=0.5))
    async with Sidecar(cfg) as sc:
        held = []
        for pid in (701, 702):
            reader, writer = await asyncio.open_unix_connection(tmp_socket)
            writer.write(hello(pid, server_id=f"sid-{pid}"))  # quiet after it, but named
            held.append((reader, writer))
        for pid in (703, 704):
            register_server(rdb, hostname, pid, f"sid-{pid}", expires_at=rdb.time()[0] + 60)
            reader, writer = await asyncio.open_unix_connection(tmp_socket)
            writer.write(hello(pid, hostname))
            held.append((reader, writer))
        await eventually(lambda: sc.tracker.counts() == {"starting": 2, "running": 2, "stopping": 0},
                         what="four proven workers")

        loop = asyncio.get_running_loop()
        began = loop.time()
        reader, writer = await asyncio.open_unix_connection(tmp_socket)
        writer.write(hello(705))
        assert await closed_by_peer(reader)
        assert loop.time() - began >= 0.5  # it waited for a slot before it was refused
        assert errors(sc, "too_many_connections") == 1 and errors(sc, "evicted") == 0
        assert sum(sc.tracker.counts().values()) == 4 and metric(sc, "asynq_sidecar_worker_starts_total") == 4
        refusals = [r.getMessage() for r in caplog.records if ": too_many_connections: " in r.getMessage()]
        assert len(refusals) == 1 and "none could be evicted" in refusals[0], refusals
        writer.close()
        for _, w in held:
            w.close()


# ---------------------------------------------------------------- bursts

#: A client that makes N short connections one after another, each a whole (tiny) life:
#: hello, exited, close; it prints how many it could not deliver.
BURST = r"""
import json, socket, sys
path, host, first, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
failed = 0
for pid in range(first, first + n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.sendall(json.dumps({"event": "hello", "protocol": 1, "pid": pid, "host": host}).encode()
                  + b'\n{"event":"exited","code":0}\n')
    except OSError:
        failed += 1
    finally:
        s.close()
print(failed, flush=True)
"""


async def test_a_burst_of_short_connections_is_served_not_refused(make_config, tmp_socket):
    clients, each = 8, 200
    cfg = make_config()
    async with Sidecar(cfg) as sc:
        procs = [await asyncio.create_subprocess_exec(
                     sys.executable, "-c", BURST, tmp_socket, cfg.hostname, str(1000 + i * each), str(each),
                     stdout=asyncio.subprocess.PIPE, cwd=ROOT)
                 for i in range(clients)]
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 20)
        assert [int(out) for out, _ in outputs] == [0] * clients
        total = clients * each
        # Each connection ends up either served or refused: wait for all, then count.
        await eventually(lambda: exits(sc)["graceful"] + errors(sc, "too_many_connections") == total,
                         timeout=10, what=f"{total} connections served or refused")
        assert errors(sc, "too_many_connections") == 0
        assert exits(sc)["graceful"] == total
        assert metric(sc, "asynq_sidecar_worker_starts_total") == total
        assert exits(sc)["lost"] == 0
        await eventually(lambda: not sc.tracker.workers, what="every worker forgotten")


async def test_recreating_the_socket_again_and_again_disturbs_no_other_connection(make_config, tmp_socket,
                                                                                  monkeypatch):
    """A replaced listener is closed only once the event loop no longer watches it: a closed
    descriptor left in the selector breaks whichever socket next gets its number (here, the
    HTTP client's connections to the sidecar's own port)."""
    monkeypatch.setattr("exporter.lifecycle.listener.CHECK_INTERVAL", 0.01)
    async with Sidecar(make_config()) as sc:
        host, port = sc.http_address
        for i in range(1, 101):
            os.unlink(tmp_socket)
            while recreated(sc) < i:  # new sockets all the time, as a busy sidecar has
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
        _, w = await asyncio.open_unix_connection(tmp_socket)
        w.write(hello(504))
        await eventually(lambda: sc.tracker.counts()["starting"] == 1, what="a worker on the last socket")
        w.close()
