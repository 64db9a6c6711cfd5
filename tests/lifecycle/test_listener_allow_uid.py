"""`--socket-allow-uid`: a `serve` process admits lifecycle connections only from the listed
user ids (SO_PEERCRED), with real processes running under other uids (setpriv, as root)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from exporter.lifecycle import protocol
from tests.support.faults import Serve
from tests.support.lifecycle import CHILD, ROOT

ALLOWED, OTHER = 65534, 65533  # nobody, and a uid that no one else uses here

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to run processes as other users")

#: A peer that connects, says hello and reports what the sidecar did with its connection.
PEER = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.settimeout(2)
try:
    s.sendall(json.dumps({"event": "hello", "protocol": 1, "pid": 7, "host": sys.argv[2]}).encode() + b"\n")
    print("closed" if s.recv(1) == b"" else "data")
except (ConnectionResetError, BrokenPipeError):
    print("closed")
except TimeoutError:
    print("open")
"""


def as_user(uid: int, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


@pytest.fixture(scope="module")
def python_for_others() -> str:
    """An interpreter that another user may run: this one, unless it lives in root's home."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        # Through a shell running as that user: setpriv itself may still exec what root can.
        ok = subprocess.run(as_user(ALLOWED, "/bin/sh", "-c", '"$0" -c "import exporter.lifecycle.launcher"', candidate),
                            cwd="/", env={"PYTHONPATH": str(ROOT)}, capture_output=True)
        if ok.returncode == 0:
            return candidate
    pytest.skip("no Python interpreter that uid 65534 can run")


@pytest.fixture
def shared_dir():
    """A directory every user may enter (pytest's tmp_path is root's only)."""
    d = tempfile.mkdtemp(prefix="asynq-uid-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_only_the_allowed_uid_is_admitted_and_refusals_are_counted_and_logged(
        redis_url, shared_dir, tmp_path, python_for_others):
    path = os.path.join(shared_dir, "l.sock")
    sc = Serve(tmp_path, redis_url, path, "--socket-allow-uid", str(ALLOWED), "--socket-mode", "0666")
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    launcher, child = None, None
    try:
        await sc.start()
        assert await sc.value("asynq_sidecar_protocol_errors_total", reason="peer_not_allowed") == 0
        # The worker's user: a real launcher and its child, both running as nobody.
        launcher = await asyncio.create_subprocess_exec(
            *as_user(ALLOWED, python_for_others, "-m", "exporter", "run", "--socket", path,
                     "--hostname", "allowed-worker", "--", python_for_others, "-c", CHILD, "0.1", "0"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/", env=env)
        ready = await asyncio.wait_for(launcher.stdout.readline(), 15)
        assert ready.startswith(b"ready"), ready
        child = int(ready.split()[1])
        await sc.wait_for("asynq_sidecar_worker_starts_total", 1)
        assert "worker started: allowed-worker pid" in sc.log()

        # Another user, and root itself (not implied): closed at once, before a line is read.
        other = subprocess.run(as_user(OTHER, python_for_others, "-c", PEER, path, "other-uid"),
                               capture_output=True, text=True, cwd="/", env=env, timeout=15)
        assert other.stdout.strip() == "closed", other.stderr
        reader, writer = await asyncio.open_unix_connection(path)  # this test runs as uid 0
        writer.write(protocol.encode("hello", pid=8, host="root-peer"))
        with contextlib.suppress(ConnectionError):  # aborted: reset, or a broken pipe for the line
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        await sc.wait_for("asynq_sidecar_protocol_errors_total", 2, reason="peer_not_allowed")
        assert await sc.value("asynq_sidecar_worker_starts_total") == 1  # neither hello counted
        log = sc.log()
        assert f"uid {OTHER} is not in --socket-allow-uid {ALLOWED}" in log
        assert f"uid 0 is not in --socket-allow-uid {ALLOWED}" in log  # one line per uid
        assert "other-uid" not in log and "root-peer" not in log
        assert f"(mode 0666, uids {ALLOWED})" in log

        # The admitted worker is tracked to the end.
        launcher.terminate()
        assert await asyncio.wait_for(launcher.wait(), 10) == 0
        await sc.wait_for("asynq_sidecar_worker_exits_total", 1, outcome="graceful")
    finally:
        for pid in (child, launcher.pid if launcher is not None else None):
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(pid, signal.SIGKILL)
        if launcher is not None:
            await launcher.wait()
        await sc.kill()


async def test_a_bad_allow_list_stops_serve_with_exit_2_naming_the_flag(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter", "serve", "--socket-allow-uid", "nobody",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert "--socket-allow-uid: invalid value 'nobody': expected numeric user ids" in err.decode()
