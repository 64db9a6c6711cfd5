"""`python -m bench [--quick] all | NAME...`: run measurements, print the table, fail on a missed target.

Exit status: 0 every target met; 1 a target was missed (listed on stderr); 2 a benchmark could
not run (no redis-server, a process that did not start); 3 no target missed, but a measurement
could not be made in this checkout (NOT MEASURED rows say why).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from bench.core import MISS, NOT_MEASURED, BenchError, Report, machine, prepare_bytecode, table

#: name -> (module, function, what it measures). Each runs alone: `python -m bench NAME`.
MEASUREMENTS: dict[str, tuple[str, str, str]] = {
    "rss": ("bench.memory", "rss", "resident memory of serve, one worker, 100,000 registrations"),
    "growth": ("bench.memory", "growth", "memory growth over 2,000 worker start/exit cycles"),
    "idle-cpu": ("bench.cpu", "idle_cpu", "CPU of serve when idle: one worker, a scrape every 15 s"),
    "startup": ("bench.startup", "startup", "time from process start to a served /metrics"),
    "scrape-latency": ("bench.scrape", "latency", "scrape latency at 10 and 100,000 registrations"),
    "scrape-commands": ("bench.scrape", "commands", "Redis commands per scrape at 10 and 100,000"),
    "kill": ("bench.kill", "kill_to_removed", "SIGKILL of a worker -> its registration removed"),
    "kill-backlog": ("bench.kill", "kill_with_backlog",
                     "the same, with 1,000,000 expired members in each set"),
    "find": ("bench.backlog", "find", "a new worker's registration found, 1,000,000 expired members"),
    "sweep": ("bench.sweep", "sweep", "sweep of 100,000 expired registrations, SLOWLOG"),
    "watcher": ("bench.watcher", "watcher", "the watcher's full read of 10,000 live servers"),
    "compare": ("bench.compare", "compare", "side by side with asynq's Inspector.Servers listing"),
    "stale-tasks": ("bench.staletasks", "stale_tasks",
                    "SIGKILL of a real asynq worker -> its tasks run again, with and without --recover-tasks on"),
    "launcher": ("bench.launcher", "launcher",
                 "the launchers, Go against Python: memory, start overhead, signal forwarding"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", metavar="all|NAME",
                        help="measurements to run: " + ", ".join(MEASUREMENTS))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer registrations, repetitions and seconds")
    args = parser.parse_args(argv)
    names = list(MEASUREMENTS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        parser.error(f"unknown measurement {', '.join(unknown)}; choose from all, {', '.join(MEASUREMENTS)}")

    prepare_bytecode()
    m = machine()
    print(f"# asynq-sidecar benchmarks{' (--quick)' if args.quick else ''}", flush=True)
    print(f"machine: {m['cpus']} x {m['model']}; Python {m['python']}; redis-server {m['redis']}; "
          f"load average at start {m['load']}", flush=True)
    print(f"libraries: {m['libs']}", flush=True)
    rows, extra, broken = [], [], []
    started = time.monotonic()
    for name in names:
        module, func, what = MEASUREMENTS[name]
        print(f"\n## {name}: {what}", flush=True)
        t0 = time.monotonic()
        try:
            report: Report = getattr(importlib.import_module(module), func)(args.quick)
        except BenchError as e:
            print(f"!! {name} could not run: {e}", file=sys.stderr, flush=True)
            broken.append(name)
            continue
        except Exception:
            traceback.print_exc()
            broken.append(name)
            continue
        if report.rows:
            print(table(report.rows), flush=True)
        for t in report.extra:
            print("\n" + t, flush=True)
        print(f"({name} took {time.monotonic() - t0:.1f} s)", flush=True)
        rows += report.rows
        extra += report.extra

    with open("/proc/loadavg") as f:
        load_end = " ".join(f.read().split()[:3])
    print(f"\n## results ({time.monotonic() - started:.0f} s; load average at end {load_end})\n")
    if rows:
        print(table(rows))
    for t in extra:
        print("\n" + t)
    missed = [r for r in rows if r.verdict == MISS]
    unmeasured = [r for r in rows if r.verdict == NOT_MEASURED]
    if broken:
        print(f"\nBENCHMARK ERROR: {', '.join(broken)} could not run (see above)", file=sys.stderr)
        return 2
    if missed:
        print("\nTARGET MISSED:", file=sys.stderr)
        for r in missed:
            print(f"  {r.name}: {r.what}: {r.target}", file=sys.stderr)
        return 1
    if unmeasured:
        print("\nNOT MEASURED: " + ", ".join(f"{r.name} ({r.what})" for r in unmeasured), file=sys.stderr)
        return 3
    print("\nall targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
