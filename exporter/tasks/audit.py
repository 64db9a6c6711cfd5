"""The stale tasks part of `audit`: per queue, the active count, the tasks whose lease expired
(waiting for asynq's recoverer) and the orphans (no lease, run by no live server: asynq never
recovers them), with up to TASK_IDS ids each. Read with exporter.tasks.read_stale."""

from __future__ import annotations

from typing import Any, TextIO

from exporter.tasks.reader import QueueTasks
from exporter.text import printable

#: Ids listed per queue and kind; the counts are complete.
TASK_IDS = 20


def stale_tasks_json(queues: dict[str, QueueTasks], now: float) -> dict[str, Any]:
    return {q: {"active": qt.active,
                "lease_expired": qt.lease_expired_total,
                "lease_expired_tasks": [{"id": i, "lease": score, "seconds_since_expiry": now - score}
                                        for i, score in qt.lease_expired],
                "orphaned": len(qt.orphaned),
                "orphaned_tasks": qt.orphaned[:TASK_IDS]}
            for q, qt in sorted(queues.items())}


def print_stale_tasks(queues: dict[str, QueueTasks], now: float, out: TextIO) -> None:
    if not queues:
        return
    out.write("\nTasks by queue (lease expired: waiting for asynq's recoverer; orphaned: no lease and "
              "run by no live server, never recovered by asynq):\n")
    width = max(len(printable(q, 40)) for q in queues)
    for q, qt in sorted(queues.items()):
        out.write(f"  {printable(q, 40):<{width}}  active {qt.active}, lease expired "
                  f"{qt.lease_expired_total}, orphaned {len(qt.orphaned)}\n")
        for i, score in qt.lease_expired:
            out.write(f"      lease expired {max(0, int(now - score))}s ago: {printable(i)}\n")
        if qt.lease_expired_total > len(qt.lease_expired):
            out.write(f"      ({qt.lease_expired_total - len(qt.lease_expired)} more lease-expired)\n")
        for i in qt.orphaned[:TASK_IDS]:
            out.write(f"      orphaned: {printable(i)}\n")
        if len(qt.orphaned) > TASK_IDS:
            out.write(f"      ({len(qt.orphaned) - TASK_IDS} more orphaned)\n")
