"""End to end: Redis, `asynq-sidecar serve`, workers under the launcher, and a real Prometheus that
scrapes the sidecar and evaluates the alert rules. A scenario (graceful stop over budget, SIGKILL,
a #979 leak, a Redis stall, garbage on the socket) must make every dashboard query return data and
the leak alert fire, as seen through Prometheus's HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import redis as redis_sync

from exporter.devtools.redis_server import free_port
from tests.support.helpers import eventually, scrape, value
from tests.support.promql_names import substitute

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "alerts" / "asynq-sidecar.rules.yml"
DASHBOARDS = sorted((ROOT / "dashboards" / "grafana").glob("*.json"))
#: Values for the dashboards' own variables: all jobs, namespaces and pods; a 15 min window.
VARIABLES = {"job": ".*", "namespace": ".*", "pod": ".*", "window": "15m", "datasource": "prometheus"}
#: The labels Kubernetes service discovery would attach.
TARGET_LABELS = {"namespace": "shop", "pod": "worker-7d9f-abcde"}

pytestmark = pytest.mark.e2e


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expression) of every panel target."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((path.name, panel["title"], substitute(target["expr"], VARIABLES)))
    return out


class Processes:
    """Child processes of the test, all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, *args: str, log: Path) -> asyncio.subprocess.Process:
        with open(log, "ab") as f:
            # A group of its own: a launcher's worker child is killed with it at the end,
            # instead of living on (and beating into the shared Redis) as an orphan.
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=f, stderr=f, cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.procs.append(proc)
        return proc

    async def close(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher and its worker child
            except ProcessLookupError:
                pass
        for p in self.procs:
            await p.wait()


def child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


async def test_dashboards_and_alerts_against_a_real_prometheus(redis_url, tmp_path, prometheus):  # noqa: F811
    py = sys.executable
    port = free_port()
    sock = str(tmp_path / "l.sock")
    procs = Processes()
    try:
        serve = await procs.start(
            py, "-m", "exporter", "serve", "--redis-url", redis_url, "--listen", f"127.0.0.1:{port}",
            "--socket", sock, "--shutdown-budget", "1", "--redis-timeout", "0.3", "--poll-interval", "0.2",
            "--watch-interval", "1", "--stop-timeout", "0", "--host-pids", "unique", log=tmp_path / "serve.log")
        url = f"http://127.0.0.1:{port}"

        async def up():
            try:
                return await scrape(url)
            except OSError:
                return None

        await eventually(up, timeout=15, what="the sidecar's /metrics")
        # What a server that died long ago left in its queue: a task whose lease expired (no live
        # server serves the queue to recover it) and one whose lease entry a Redis incident lost.
        client = redis_sync.Redis.from_url(redis_url)
        now = int(client.time()[0])
        client.sadd("asynq:queues", "mail")
        client.rpush("asynq:{mail}:active", "expired-task", "orphaned-task")
        client.zadd("asynq:{mail}:lease", {"expired-task": now - 120})
        client.close()
        prom = await asyncio.to_thread(prometheus, [f"127.0.0.1:{port}"], rule_files=[RULES],
                                       labels=TARGET_LABELS)

        async def worker(name: str, *emulate: str) -> asyncio.subprocess.Process:
            return await procs.start(
                py, "-m", "exporter", "run", "--socket", sock, "--",
                py, "-m", "exporter", "emulate", "--redis-url", redis_url, *emulate,
                log=tmp_path / f"{name}.log")

        steady = await worker("steady", "--tasks", "3", "--concurrency", "10")
        graceful = await worker("graceful", "--drain", "1.5")  # over the 1 s budget
        killed = await worker("killed", "--tasks", "2")
        leaky = await worker("leaky", "--drain", "0.2", "--on-exit", "leak")

        async def all_running():
            return value(await scrape(url), "asynq_sidecar_workers", state="running") == 4

        await eventually(all_running, timeout=15, what="4 workers running")
        # Prometheus must have seen the counters at 0 before they move, or increase() sees nothing.
        await prom.eventually(lambda: prom.query("asynq_sidecar_worker_exits_total"), timeout=30)

        graceful.send_signal(signal.SIGTERM)
        os.kill(child_of(killed.pid), signal.SIGKILL)
        leaky.send_signal(signal.SIGTERM)
        for p in (graceful, killed, leaky):
            await asyncio.wait_for(p.wait(), 15)

        async def exits_counted():
            t = await scrape(url)
            return (value(t, "asynq_sidecar_leaked_registrations_total") == 2
                    and value(t, "asynq_sidecar_worker_exits_total", outcome="killed") == 1
                    and value(t, "asynq_sidecar_shutdowns_over_budget_total") == 1)

        await eventually(exits_counted, timeout=10, what="the exits counted by the sidecar")

        # Garbage on the lifecycle socket, and a Redis stall longer than the sidecar's timeout.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            s.sendall(b"this is not json\n")
        client = redis_sync.Redis.from_url(redis_url)
        client.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        client.close()

        async def redis_errors():
            return (value(await scrape(url), "asynq_sidecar_redis_errors_total") or 0) > 0

        await eventually(redis_errors, timeout=10, what="a failed Redis operation")

        firing = await prom.eventually(lambda: prom.firing("AsynqWorkerExitedLeakingRegistration"),
                                       timeout=30)
        labels = firing[0]["labels"]
        assert labels["severity"] == "warning" and labels["pod"] == TARGET_LABELS["pod"]
        assert TARGET_LABELS["pod"] in firing[0]["annotations"]["description"]

        queries = dashboard_queries()
        assert len(queries) > 30

        def empty_queries() -> list[str]:
            return [f"{board} / {title}: {expr}" for board, title, expr in queries if not prom.query(expr)]

        try:
            await prom.eventually(lambda: not empty_queries(), timeout=30)
        except AssertionError:
            pytest.fail("dashboard queries that return no data:\n" + "\n".join(empty_queries()))
        for var in ("job", "namespace", "pod"):
            values = prom.api(f"label/{var}/values", **{"match[]": "asynq_sidecar_build_info"})
            assert values, f"the ${var} variable would list nothing"
        assert steady.returncode is None and serve.returncode is None
    finally:
        await procs.close()
