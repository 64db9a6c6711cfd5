"""CPU of a real `asynq-sidecar serve` when idle: one running worker (a launcher and an emulated
asynq server beating every 5 s), a scrape every 15 s, default intervals otherwise.

utime + stime of the serve process are read from /proc/PID/stat at the edges of each window
(one scrape per window); a window's share of one core is its CPU seconds over its wall seconds.
The target is judged on the whole run (all windows together). The Redis side is read over the
same windows: redis-server's own CPU, and INFO commandstats (commands by name, so that the
emulated worker's heartbeat can be told apart from what the sidecar sends).

A second phase repeats it with 10,000 other live servers in Redis (a fleet of 10,000) and a
second sidecar, started first, that holds the fleet's details lease (--details-sharing, on by
default): the measured sidecar is then a follower, as all but one sidecar of a fleet are, and
the leader's cost (the full read of every live server each --watch-interval) is measured over
the same windows. Without sharing in this version (no `asynq_sidecar_details_leader`), the
measured sidecar reads the fleet itself.
"""

from __future__ import annotations

import os
import time

from bench.core import (
    CLOCK_TICKS,
    NOT_MEASURED,
    Report,
    Row,
    ServeProcess,
    Worker,
    cpu_seconds,
    judge,
    launcher_available,
    load_registrations,
    metric,
    metric_sum,
    private_redis,
    workdir,
)

TARGET_PERCENT = 0.5
#: Commands that only the emulated worker's heartbeat sends while idle (ZADD x2, the state script).
HEARTBEAT_COMMANDS = ("zadd", "evalsha", "setex", "del", "expire", "hset")


def _command_calls(client) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in client.info("commandstats").items()}


def _phase(server, client, wd: str, fleet: int, windows: int, window: float) -> dict:
    leader = None
    if fleet:
        load_registrations(client, fleet, expires_in=86_400)
        leader = ServeProcess(server.url, wd).start()
    try:
        if leader is not None:
            leader.wait_served()
            deadline = time.monotonic() + 60
            while metric_sum(leader.scrape(), "asynq_registry_servers") != fleet:
                if time.monotonic() > deadline:
                    raise RuntimeError("the leader did not read the fleet in 60 s")
                time.sleep(0.2)
        with ServeProcess(server.url, wd) as sc:
            return _measure(server, client, wd, sc, leader, fleet, windows, window)
    finally:
        if leader is not None:
            leader.stop()


def _measure(server, client, wd: str, sc: ServeProcess, leader: ServeProcess | None, fleet: int,
             windows: int, window: float) -> dict:
    sc.wait_served()
    worker = Worker(server.url, sc.socket, log_path=os.path.join(wd, "worker.log")).start()
    try:
        worker.wait_registered(client)
        sc.wait_metric("asynq_sidecar_workers", lambda v: v == 1, state="running")
        deadline = time.monotonic() + 60
        while metric_sum(sc.scrape(), "asynq_registry_servers") != fleet + 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the sidecar did not see the fleet in 60 s")
            time.sleep(0.2)
        time.sleep(2.0)  # past start-up: the first ticks and the first watcher read
        role = metric(sc.scrape(), "asynq_sidecar_details_leader")
        launcher_pid, redis_pid = worker.proc.pid, server.proc.pid
        out = {"shares": [], "launcher": 0.0, "cpu": 0.0, "wall": 0.0, "redis": 0.0, "sidecar_cmds": 0,
               "leader_cpu": 0.0, "role": role}
        for _ in range(windows):
            t0, c0, l0, r0 = (time.monotonic(), cpu_seconds(sc.pid), cpu_seconds(launcher_pid),
                              cpu_seconds(redis_pid))
            d0 = cpu_seconds(leader.pid) if leader else 0.0
            k0 = _command_calls(client)
            sc.scrape()  # the one scrape of this window, as Prometheus every 15 s
            if leader:
                leader.scrape()
            time.sleep(window)
            t1, c1, l1, r1 = (time.monotonic(), cpu_seconds(sc.pid), cpu_seconds(launcher_pid),
                              cpu_seconds(redis_pid))
            d1 = cpu_seconds(leader.pid) if leader else 0.0
            k1 = _command_calls(client)
            out["shares"].append(100 * (c1 - c0) / (t1 - t0))
            out["cpu"] += c1 - c0
            out["wall"] += t1 - t0
            out["launcher"] += l1 - l0
            out["redis"] += r1 - r0
            out["leader_cpu"] += d1 - d0
            out["sidecar_cmds"] += sum(k1.get(name, 0) - k0.get(name, 0) for name in k1
                                       if name not in HEARTBEAT_COMMANDS and name != "info"
                                       and not name.startswith("config"))
        if worker.proc.poll() is not None:
            raise RuntimeError("the worker exited during the measurement")
        return out
    finally:
        worker.stop()


def idle_cpu(quick: bool) -> Report:
    why = launcher_available()
    if why is not None:
        return Report([Row("idle-cpu", f"needs a running worker: {why}", [], "%",
                           f"mean <= {TARGET_PERCENT:g} %", NOT_MEASURED)])
    windows, window = (2, 5.0) if quick else (4, 15.0)
    fleet = 1_000 if quick else 10_000
    with private_redis() as (server, client), workdir() as wd:
        alone = _phase(server, client, wd, 0, windows, window)
        client.flushall()
        crowd = _phase(server, client, wd, fleet, max(2, windows // 2), window)
    rows = []
    resolution = 100 / CLOCK_TICKS / window
    mean = 100 * alone["cpu"] / alone["wall"]
    rows.append(Row("idle-cpu", f"serve, one worker, no other registrations: % of one core per {window:g} s "
                                f"window with one scrape (mean {mean:.3f} % over {alone['wall']:.0f} s; one "
                                f"tick = {resolution:.3f} %)", alone["shares"], "%",
                    f"mean <= {TARGET_PERCENT:g} %", judge(mean, TARGET_PERCENT)))
    rows.append(Row("idle-cpu", "the launcher (`run`) of that worker, % of one core",
                    [100 * alone["launcher"] / alone["wall"]], "%"))
    rows.append(Row("idle-cpu", f"Redis load of that sidecar: commands/s (the sidecar's only), and "
                                f"redis-server CPU {100 * alone['redis'] / alone['wall']:.3f} % (with the "
                                f"worker's heartbeat)", [alone["sidecar_cmds"] / alone["wall"]], "count"))
    shared = crowd["role"] is not None
    role = ("a follower (another sidecar holds the details lease)" if shared and crowd["role"] == 0
            else "reading the fleet itself")
    mean = 100 * crowd["cpu"] / crowd["wall"]
    rows.append(Row("idle-cpu", f"serve, one worker, {fleet:,} other live servers, {role}: % of one core "
                                f"(mean {mean:.3f} % over {crowd['wall']:.0f} s)", crowd["shares"], "%"))
    rows.append(Row("idle-cpu", "the details leader of that fleet (full read every 10 s, no worker): "
                                "% of one core", [100 * crowd["leader_cpu"] / crowd["wall"]], "%"))
    rows.append(Row("idle-cpu", f"Redis load of both sidecars together, {fleet:,} live servers: commands/s, "
                                f"and redis-server CPU {100 * crowd['redis'] / crowd['wall']:.3f} %",
                    [crowd["sidecar_cmds"] / crowd["wall"]], "count"))
    return Report(rows)
