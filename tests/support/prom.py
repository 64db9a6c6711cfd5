"""A real `prometheus` on loopback for tests: scrapes given targets every second, loads rule files,
and answers PromQL through its HTTP API.

Use the `prometheus` fixture (import it into the test module) as a factory:

    from tests.support.prom import prometheus  # noqa: F401  (a fixture)

    async def test_x(prometheus):
        prom = await asyncio.to_thread(prometheus, ["127.0.0.1:10050"], rule_files=[RULES])
        samples = await prom.eventually(lambda: prom.query("asynq_sidecar_redis_up"))

Prometheus shows a target's first sample about 5.5 s after start (service discovery hands out
targets every 5 s): poll with a deadline, never sleep a fixed time. The methods block (plain HTTP);
from an event loop that also serves the scrape target, use the async `eventually` or
`asyncio.to_thread`, so that the loop keeps answering scrapes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from exporter.devtools.redis_server import free_port
from tests.support.helpers import eventually, wait_until
from tests.support.tools import require_tool

T = TypeVar("T")

#: Prometheus binds, opens its TSDB and loads rules in about a second; allow for a slow machine.
START_TIMEOUT = 30.0


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    """One `prometheus` child process with its own config, TSDB directory and port."""

    def __init__(self, binary: str, workdir: Path, targets: Sequence[str], *,
                 rule_files: Sequence[str | Path] = (), job: str = "asynq-sidecar",
                 labels: Mapping[str, str] | None = None, scrape_interval: str = "1s",
                 evaluation_interval: str = "1s") -> None:
        self.binary = binary
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.job = job
        self.labels = dict(labels or {})
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        static: dict[str, Any] = {"targets": self.targets}
        if self.labels:
            static["labels"] = self.labels
        return {
            "global": {"scrape_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval,
                       "evaluation_interval": self.evaluation_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": self.job, "static_configs": [static]}],
        }

    # ---------------------------------------------------------------- life

    def start(self) -> Prometheus:
        """Start and wait until it is ready; the TSDB and the rules are loaded by then. A port
        taken between choosing and binding it (another process won the race) is chosen again."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        for attempt in range(3):
            try:
                return self._start_once()
            except PrometheusError as e:
                if "address already in use" not in str(e) or attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(self) -> Prometheus:
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary,
                 f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_for(self._ready, timeout=START_TIMEOUT, interval=0.05, what="prometheus ready")
        except BaseException:
            self.close()
            raise
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise PrometheusError(f"prometheus exited with status {self.process.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # ---------------------------------------------------------------- the HTTP API

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a success, else PrometheusError."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422 carry an error message in JSON
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: the result's samples, each {"metric": {...}, "value": [t, "v"]}."""
        params = {"query": expr}
        if at is not None:
            params["time"] = repr(at)
        data = self.api("query", **params)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return result

    def values(self, expr: str) -> dict[frozenset[tuple[str, str]], float]:
        """An instant query as {labels: value}."""
        return {frozenset(s["metric"].items()): float(s["value"][1]) for s in self.query(expr)}

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing): each has labels, annotations, state, value."""
        return self.api("alerts")["alerts"]

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts()
                if a["labels"].get("alertname") == alertname and a["state"] == "firing"]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, flattened over groups."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def active_targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    # ---------------------------------------------------------------- waiting

    def wait_for(self, check: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.25,
                 what: str = "condition") -> T:
        """`tests.support.helpers.wait_until`, failing with the tail of Prometheus's log as well."""
        try:
            return wait_until(check, timeout=timeout, interval=interval, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}\nprometheus log:\n{self.log()}") from None

    async def eventually(self, check: Callable[[], T], *, timeout: float = 20.0,
                         interval: float = 0.25, what: str = "condition") -> T:
        """`wait_for` from an event loop: `check` runs in a thread, the loop keeps serving."""
        try:
            return await eventually(lambda: asyncio.to_thread(check), timeout=timeout,
                                    interval=interval, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}\nprometheus log:\n{self.log()}") from None


@pytest.fixture
def prometheus(tmp_path_factory) -> Iterator[Callable[..., Prometheus]]:
    """A factory: `prometheus(targets, rule_files=..., labels=..., job=...)` starts a real
    Prometheus (blocking until ready) and returns it; every one started is stopped at teardown.
    Skips without the `prometheus` binary, fails under CI=true."""
    binary = require_tool("prometheus")
    started: list[Prometheus] = []

    def start(targets: Sequence[str], **options: Any) -> Prometheus:
        prom = Prometheus(binary, tmp_path_factory.mktemp("prometheus"), targets, **options)
        started.append(prom)
        return prom.start()

    yield start
    for prom in started:
        prom.close()
