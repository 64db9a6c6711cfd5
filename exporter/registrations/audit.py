"""`asynq-sidecar audit`: a read-only report of every registration in asynq's three sorted sets.

Unlike asynq's own listing (which runs ZREMRANGEBYSCORE), it deletes nothing: it reads with
ZSCAN and pipelined GET/HLEN/LLEN only. Live or expired, and every age, go by Redis's clock (one
TIME), not this machine's. Exit 0: nothing expired; 1: expired entries; 2: Redis unreadable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from exporter.asynq import model as asynq
from exporter.redisio.connect import connect, redis_time
from exporter.redisio.health import REDIS_FAILURES
from exporter.settings import AuditConfig, RedisConfig
from exporter.tasks.audit import TASK_IDS, print_stale_tasks, stale_tasks_json
from exporter.tasks.reader import QueueTasks, read_stale
from exporter.text import duration, printable, utc

log = logging.getLogger("exporter.registrations.audit")

EXIT_CLEAN, EXIT_EXPIRED, EXIT_UNREADABLE = 0, 1, 2

#: Members read per ZSCAN call and per pipeline of key reads.
PAGE = 500


@dataclass
class Registration:
    """One member of asynq:servers, asynq:workers or asynq:schedulers, and what its key holds."""

    set: str  # servers | workers | schedulers
    member: str
    score: float  # expiry time, Unix seconds
    state: str  # live | expired
    seconds_until_expiry: float | None  # when live
    seconds_since_expiry: float | None  # when expired
    host: str | None = None
    pid: int | None = None
    id: str | None = None  # server id, or scheduler id
    key_exists: bool | None = None  # the per-server key (STRING, HASH or LIST) still there
    status: str | None = None  # ServerInfo.status (for a workers member: its server's)
    active_tasks: int | None = None  # servers: active_worker_count; workers: HLEN
    concurrency: int | None = None
    queues: dict[str, int] | None = None
    start_time: float | None = None
    entries: int | None = None  # schedulers: LLEN of the entries list
    problem: str | None = None  # why a member or value could not be decoded


@dataclass
class Report:
    redis_url: str
    time: float
    registrations: list[Registration] = field(default_factory=list)
    undecodable_members: int = 0
    undecodable_values: int = 0
    tasks: dict[str, QueueTasks] = field(default_factory=dict)  # asynq's queues: stale tasks
    tasks_refused: str | None = None  # why Redis refused to let the tasks be read

    def counts(self) -> dict[str, dict[str, int]]:
        out = {name: {"live": 0, "expired": 0} for name in asynq.SETS}
        for reg in self.registrations:
            out[reg.set][reg.state] += 1
        return out

    @property
    def expired(self) -> int:
        return sum(1 for reg in self.registrations if reg.state == "expired")

    def exit_code(self) -> int:
        return EXIT_EXPIRED if self.expired else EXIT_CLEAN

    def to_json(self) -> dict[str, Any]:
        summary: dict[str, Any] = dict(self.counts())
        summary.update(expired=self.expired, undecodable_members=self.undecodable_members,
                       undecodable_values=self.undecodable_values)
        return {"redis_url": self.redis_url, "time": self.time,
                "registrations": [asdict(reg) for reg in self.registrations], "summary": summary,
                "tasks": stale_tasks_json(self.tasks, self.time), "tasks_refused": self.tasks_refused}


# ---------------------------------------------------------------- reading (never writing)


async def _scan_set(redis: Redis, key: str) -> dict[bytes, float]:
    """Every member of a sorted set with its score. ZSCAN may repeat a member; the dict dedupes."""
    members: dict[bytes, float] = {}
    async for member, score in redis.zscan_iter(key, count=PAGE):
        members[member] = float(score)
    return members


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _apply_server_info(reg: Registration, value: Any, report: Report, own: bool) -> None:
    """Fill status and friends from a GET of a server key (own=False: a workers member's server)."""
    if isinstance(value, Exception):
        if own:
            reg.key_exists, reg.problem = True, f"cannot read server key: {value}"
            report.undecodable_values += 1
        return
    if value is None:
        if own:
            reg.key_exists = False
        return
    try:
        info = asynq.decode_server_info(value)
    except asynq.UndecodableError as e:
        if own:
            reg.key_exists, reg.problem = True, str(e)
            reg.status = "undecodable"
            report.undecodable_values += 1
        return
    reg.status = info.status or "unknown"
    if own:
        reg.key_exists = True
        reg.active_tasks = info.active_worker_count
        reg.concurrency = info.concurrency
        reg.queues = dict(info.queues)
        reg.start_time = info.start_time


def _apply_length(reg: Registration, value: Any, report: Report, counts: str) -> None:
    if isinstance(value, Exception):
        reg.problem = f"cannot read key: {value}"
        report.undecodable_values += 1
        return
    reg.key_exists = bool(value)
    setattr(reg, counts, int(value))


async def _read_keys(redis: Redis, regs: Sequence[tuple[Registration, asynq.Member]], report: Report) -> None:
    """One pipelined round trip of read-only commands for a page of registrations."""
    pipe = redis.pipeline(transaction=False)
    plan: list[tuple[Registration, str]] = []
    for reg, member in regs:
        if member.set == "servers":
            pipe.get(member.key)
            plan.append((reg, "server"))
        elif member.set == "workers":
            pipe.hlen(member.key)
            plan.append((reg, "hlen"))
            pipe.get(member.sibling("servers").key)
            plan.append((reg, "sibling"))
        else:
            pipe.llen(member.key)
            plan.append((reg, "llen"))
    replies = await pipe.execute(raise_on_error=False)
    for (reg, what), value in zip(plan, replies, strict=True):
        if isinstance(value, Exception) and not isinstance(value, ResponseError):
            raise value  # the connection failed, not one key: the audit cannot be trusted
        if what == "server":
            _apply_server_info(reg, value, report, own=True)
        elif what == "sibling":
            _apply_server_info(reg, value, report, own=False)
        elif what == "hlen":
            _apply_length(reg, value, report, "active_tasks")
        else:
            _apply_length(reg, value, report, "entries")


async def read_report(redis: Redis, now: float | None = None, display_url: str = "") -> Report:
    """Read every registration of the three sets, as of `now` (default: Redis's clock, TIME).
    Only read commands are sent.

    A member is live when its score (an expiry in whole seconds) is at or after `now`, as in
    the exporter's `asynq_registry_entries`.
    """
    if now is None:
        now = await redis_time(redis)
    report = Report(redis_url=display_url, time=now)
    for set_name, set_key in asynq.SETS.items():
        members = await _scan_set(redis, set_key)
        readable: list[tuple[Registration, asynq.Member]] = []
        for raw, score in sorted(members.items(), key=lambda item: (item[1], item[0])):
            live = score >= now
            reg = Registration(
                set=set_name, member=raw.decode("utf-8", "replace"), score=score,
                state="live" if live else "expired",
                seconds_until_expiry=score - now if live else None,
                seconds_since_expiry=None if live else now - score,
            )
            report.registrations.append(reg)
            try:
                member = asynq.parse_member(raw)
                if member.set != set_name:
                    raise asynq.UndecodableError(f"a member of asynq:{member.set} in {set_key}")
            except asynq.UndecodableError as e:
                reg.problem = str(e)
                report.undecodable_members += 1
                continue
            reg.host, reg.pid, reg.id = member.host, member.pid, member.ident
            readable.append((reg, member))
        for page in _chunks(readable, PAGE):
            await _read_keys(redis, page, report)
    try:
        report.tasks = await read_stale(redis, now, keep=TASK_IDS)
    except ResponseError as e:  # an ACL without asynq's queue keys: the registrations still stand
        report.tasks_refused = str(e)
    return report


# ---------------------------------------------------------------- printing


def _row(reg: Registration) -> list[str]:
    if reg.state == "live":
        expiry = f"in {duration(reg.seconds_until_expiry or 0.0)}"
    else:
        expiry = f"{duration(reg.seconds_since_expiry or 0.0)} ago"
    if reg.host is None:  # an undecodable member: show what it is
        return [reg.set, "?", "?", printable(reg.member, 60), "undecodable member", reg.state, expiry, "-"]
    if reg.set == "schedulers":
        status = "-" if reg.problem is None else "unreadable"
        if reg.key_exists:
            status = f"{reg.entries} entries"
        elif reg.key_exists is False:
            status = "(key expired)"
    elif reg.status is not None:
        status = reg.status
    elif reg.problem is not None:
        status = "unreadable"
    elif reg.set == "servers" and reg.key_exists is False:
        status = "(key expired)"
    else:
        status = "-"
    tasks = "-" if reg.active_tasks is None else str(reg.active_tasks)
    return [reg.set, printable(reg.host), str(reg.pid), printable(reg.id or ""), status, reg.state, expiry, tasks]


def summary_line(report: Report) -> str:
    parts = [f"{name}: {c['live']} live, {c['expired']} expired" for name, c in report.counts().items()]
    line = "; ".join(parts)
    if report.undecodable_members or report.undecodable_values:
        line += (f"; undecodable: {report.undecodable_members} member(s), "
                 f"{report.undecodable_values} value(s)")
    return line


def print_table(report: Report, out: TextIO) -> None:
    when = utc(report.time)
    out.write(f"Registrations in {report.redis_url} at {when} (read-only; nothing was changed)\n\n")
    if report.registrations:
        header = ["SET", "HOST", "PID", "ID", "STATUS", "STATE", "EXPIRY", "TASKS"]
        rows = [header] + [_row(reg) for reg in report.registrations]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
        problems = [reg for reg in report.registrations if reg.problem]
        if problems:
            out.write("\nProblems:\n")
            for reg in problems:
                out.write(f"  {printable(reg.member, 100)}: {printable(reg.problem or '', 200)}\n")
    else:
        out.write("No registrations.\n")
    out.write("\n" + summary_line(report) + "\n")
    print_stale_tasks(report.tasks, report.time, out)
    if report.tasks_refused:
        out.write(f"\nTasks not read: Redis refused ({printable(report.tasks_refused, 200)}).\n")


# ---------------------------------------------------------------- command


def run(cfg: AuditConfig) -> int:
    try:
        report = asyncio.run(_read(cfg.redis))
    except REDIS_FAILURES as e:
        sys.stderr.write(f"asynq-sidecar audit: cannot read Redis at {cfg.redis.display_url}: "
                         f"{type(e).__name__}: {e}\n")
        return EXIT_UNREADABLE
    if cfg.json:
        json.dump(report.to_json(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print_table(report, sys.stdout)
    return report.exit_code()


async def _read(cfg: RedisConfig) -> Report:
    redis = connect(cfg)
    try:
        return await read_report(redis, display_url=cfg.display_url)
    finally:
        await redis.aclose()
