"""The two launchers side by side: the static Go `asynq-launch` and the Python `asynq-sidecar run`.

Real processes, a listener on the lifecycle socket that reads and discards (so each launcher
is connected, as in a pod), and one small Python child for both:

- resident memory of the launcher while it supervises (VmRSS once the child runs and hello is
  delivered), fresh processes each time;
- start overhead: from just before the launcher is spawned to the moment a `date +%s.%N` child
  reads the clock, less the same for `date` spawned directly (a child that starts in about a
  millisecond, so that its own start does not drown the launcher's);
- signal forwarding: from kill(launcher, SIGUSR1) to the child's handler running, less the
  same signal sent to a child directly;
- the Go launcher's file size (static, -s -w).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.core import (
    INFO,
    MIB,
    NOT_MEASURED,
    REPO,
    BenchError,
    Report,
    Row,
    judge,
    median,
    percentile,
    python_env,
    rss_bytes,
    stop_process,
    workdir,
)

RSS_TARGET_MIB = 5.0
SIZE_TARGET_MB = 5.0

#: The supervised child: prints time.time() as it starts and in each SIGUSR1 handler.
CHILD = r"""
import os, signal, time
signal.signal(signal.SIGUSR1, lambda s, f: os.write(1, b"%.6f\n" % time.time()))
signal.signal(signal.SIGTERM, lambda s, f: os._exit(0))
os.write(1, b"%.6f\n" % time.time())
while True:
    signal.pause()
"""


@contextlib.contextmanager
def listener(path: str) -> Iterator[None]:
    """A lifecycle socket that accepts every connection and discards what it reads."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    stop = threading.Event()

    def serve() -> None:
        conns: list[socket.socket] = []
        while not stop.is_set():
            ready, _, _ = select.select([srv, *conns], [], [], 0.05)
            for s in ready:
                if s is srv:
                    conns.append(srv.accept()[0])
                elif not s.recv(65536):
                    conns.remove(s)
                    s.close()
        for s in conns:
            s.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        srv.close()


class Supervised:
    """A child, under a launcher (`prefix`) or directly (empty prefix); reads its stamps."""

    def __init__(self, prefix: list[str]) -> None:
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", CHILD], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=REPO,
                                     env=python_env())
        self.stamp()  # running

    def stamp(self, timeout: float = 10.0) -> float:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise BenchError(f"the child printed nothing within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"the child ended (exit {self.proc.wait()})")
        return float(line)

    def forward_latency(self) -> float:
        """Seconds from SIGUSR1 sent (to the launcher, or the child) to the child's handler."""
        sent = time.time()
        os.kill(self.proc.pid, signal.SIGUSR1)
        return self.stamp() - sent

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_time(prefix: list[str]) -> float:
    """Seconds from spawning `prefix date` to date reading the clock."""
    spawned = time.time()
    proc = subprocess.run([*prefix, "date", "+%s.%N"], capture_output=True, text=True, timeout=30,
                          cwd=REPO, env=python_env())
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(prefix)} date: exit {proc.returncode}: {proc.stderr}")
    return float(proc.stdout) - spawned


def measure(prefix: list[str], reps: int, signals: int) -> dict[str, list[float]]:
    """Start times over 2 x `reps` runs, RSS over `reps` fresh processes, signal latencies over
    `signals`."""
    out: dict[str, list[float]] = {"start": [start_time(prefix) for _ in range(2 * reps)],
                                   "rss": [], "signal": []}
    for i in range(reps):
        s = Supervised(prefix)
        try:
            if prefix:
                # Settled: hello written, the launcher waiting for its child and for signals.
                time.sleep(0.2)
                out["rss"].append(rss_bytes(s.proc.pid) / MIB)
            if i == 0:
                for _ in range(signals):
                    out["signal"].append(s.forward_latency())
                    time.sleep(0.002)
        finally:
            s.stop()
    return out


def go_launcher() -> tuple[Path | None, str]:
    """The static launcher, built as the tests build it (cached); or None and why not."""
    try:
        from tests.support.gobuild import build_launcher, find_go
    except ImportError as e:  # pragma: no cover - the test extras are missing
        return None, f"tests.support.gobuild: {e}"
    go = find_go()
    if go is None:
        return None, "go is not installed"
    if not (REPO / "go" / "cmd" / "asynq-launch").is_dir():
        return None, "go/cmd/asynq-launch is not in this checkout yet"
    return build_launcher(go), ""


def launcher(quick: bool) -> Report:
    reps, signals = (3, 20) if quick else (10, 200)
    binary, why = go_launcher()
    rows: list[Row] = []
    with workdir() as wd:
        path = os.path.join(wd, "l.sock")
        with listener(path):
            direct = measure([], reps, signals)
            runs = {"python": measure([sys.executable, "-m", "exporter", "run", "--socket", path, "--"],
                                      reps, signals)}
            if binary is not None:
                runs["go"] = measure([str(binary), "--socket", path, "--"], reps, signals)
    base_start, base_signal = median(direct["start"]), median(direct["signal"])
    for name in ("go", "python"):
        label = "asynq-launch (Go)" if name == "go" else "asynq-sidecar run (Python)"
        if name not in runs:
            rows.append(Row(f"launcher-{name}", f"{label}: {why}", [], "MiB", verdict=NOT_MEASURED))
            continue
        r = runs[name]
        rss_target = f"<= {RSS_TARGET_MIB:g} MiB" if name == "go" else ""
        rows += [
            Row(f"launcher-rss-{name}", f"{label}: resident memory while supervising", r["rss"], "MiB",
                rss_target, judge(max(r["rss"]), RSS_TARGET_MIB) if rss_target else INFO),
            Row(f"launcher-start-{name}", f"{label}: launch -> child runs, less a direct spawn of it",
                [(t - base_start) * 1000 for t in r["start"]], "ms"),
            Row(f"launcher-signal-{name}", f"{label}: SIGUSR1 to the launcher -> child's handler, less direct",
                [(t - base_signal) * 1000 for t in r["signal"]], "ms"),
        ]
    rows.append(Row("launcher-direct", "no launcher: spawn -> `date` reads the clock (the baseline)",
                    [t * 1000 for t in direct["start"]], "ms"))
    rows.append(Row("launcher-direct-signal", "no launcher: SIGUSR1 -> child's handler (the baseline)",
                    [t * 1000 for t in direct["signal"]], "ms"))
    if binary is not None:
        size = binary.stat().st_size / 1e6
        rows.append(Row("launcher-size-go", "asynq-launch: static binary (CGO_ENABLED=0, -s -w)", [size], "MB",
                        f"<= {SIZE_TARGET_MB:g} MB", judge(size, SIZE_TARGET_MB)))
    extra = []
    if "go" in runs:
        py, go = runs["python"], runs["go"]
        extra.append("\n".join([
            "| launcher | RSS median | start overhead median | signal forwarding median / p99 |",
            "|---|---|---|---|",
            *(f"| {label} | {median(r['rss']):.1f} MiB | {(median(r['start']) - base_start) * 1000:.1f} ms | "
              f"{(median(r['signal']) - base_signal) * 1000:.2f} / "
              f"{(percentile(r['signal'], 99) - base_signal) * 1000:.2f} ms |"
              for label, r in (("asynq-launch (Go)", go), ("asynq-sidecar run (Python)", py))),
        ]))
    return Report(rows, extra)
