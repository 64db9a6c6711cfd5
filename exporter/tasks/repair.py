"""`sweep --repair-tasks`: give every orphaned task an expired lease, for asynq's recoverer.

An orphan (an active task with no lease entry, listed by no live server) is repaired only when
two looks `ORPHAN_CONFIRM_AFTER` seconds (two heartbeats) apart both find it, so a sweep with
--repair-tasks that finds an orphan takes that much longer. Each repair is one conditional
script per queue (exporter.tasks.REPAIR_ORPHANS); with --dry-run, read commands only.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from exporter.redisio.connect import connect
from exporter.redisio.health import REDIS_FAILURES
from exporter.settings import RedisConfig
from exporter.tasks import recovery as taskrecovery


@dataclass
class RepairReport:
    dry_run: bool
    found: int = 0  # orphans at the second look (0 when the first found none)
    repaired: dict[str, list[str]] = field(default_factory=dict)  # or would be, in a dry run
    error: str | None = None

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self.repaired.values())

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "orphaned": self.found, "repaired": self.total,
                "queues": {q: sorted(ids) for q, ids in sorted(self.repaired.items())},
                "error": self.error}

    def print(self, out: TextIO) -> None:
        if self.error:
            out.write(f"\nTask repair failed: {self.error}\n")
            return
        verb = "Would give" if self.dry_run else "Gave"
        out.write(f"\nOrphaned tasks (active, no lease, run by no live server at two looks "
                  f"{taskrecovery.ORPHAN_CONFIRM_AFTER:g} s apart): {verb.lower()} {self.total} an "
                  f"expired lease for asynq's recoverer.\n")
        for q, ids in sorted(self.repaired.items()):
            shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
            out.write(f"  queue {q}: {shown}\n")


def repair_tasks(cfg: RedisConfig, *, dry_run: bool) -> RepairReport:
    report = RepairReport(dry_run=dry_run)

    async def main() -> None:
        redis = connect(cfg)
        try:
            report.repaired, report.found = await taskrecovery.repair_after_two_looks(
                redis, dry_run=dry_run, gap=taskrecovery.ORPHAN_CONFIRM_AFTER)
        finally:
            await redis.aclose()

    try:
        asyncio.run(main())
    except REDIS_FAILURES as e:
        report.error = f"{type(e).__name__}: {e}"
        sys.stderr.write(f"asynq-sidecar sweep: task repair on {cfg.display_url} failed: {report.error}\n")
    return report
