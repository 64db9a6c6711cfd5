"""What a sweep did: the report of each set swept, and its two forms (a table for people, and a
JSON document streamed member by member, for `--json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TextIO

from exporter.text import duration, printable, utc

#: The sweep's lock: a STRING holding its holder's identity, with a TTL.
LOCK_KEY = "asynq-sidecar:sweep:lock"
#: Exit status of `sweep`: swept (or another sweeper holds the lock), the lock lost mid-sweep,
#: Redis unreachable or failing mid-sweep.
EXIT_OK, EXIT_LOCK_LOST, EXIT_REDIS = 0, 1, 2
#: The human report lists the members of a set when it removed at most this many.
LIST_AT_MOST = 20


# ---------------------------------------------------------------- the report


@dataclass
class Removed:
    """A member removed from a set (or, in a dry run, one that would be)."""

    member: str  # as text (invalid UTF-8 escaped)
    score: float  # its expiry, Unix seconds
    undecodable: bool = False  # not asynq's name for a member of this set; its same-named key is kept


@dataclass
class SetSweep:
    """What the sweep did to one of asynq:servers, asynq:workers, asynq:schedulers.

    The counts are complete. `members` and `deleted_keys` are complete when the sweeper lists
    (`list_members`); otherwise `members` holds the first LIST_AT_MOST removed and
    `deleted_keys` stays empty.
    """

    set: str  # servers | workers | schedulers
    key: str  # asynq:servers ...
    removed: int = 0  # members removed
    keys_deleted: int = 0  # per-server keys deleted (that existed)
    undecodable: int = 0  # removed members whose name is not asynq's for this set
    # Selected as expired, but beat again before the removal: kept. Always 0 now that one
    # script selects and removes atomically; the field stays in the report's documents.
    came_back: int = 0
    members: list[Removed] = field(default_factory=list)
    deleted_keys: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "removed": self.removed,
            "undecodable": self.undecodable,
            "keys_deleted": self.keys_deleted,
            "came_back": self.came_back,
            "members": [{"member": r.member, "score": r.score, "undecodable": r.undecodable}
                        for r in self.members],
            "deleted_keys": list(self.deleted_keys),
        }


@dataclass
class SweepReport:
    """The outcome of one sweep. In a dry run, "removed" and "deleted" mean "would be"."""

    redis_url: str
    time: float  # the sweep's `now`: Redis's clock at its start (the local clock if Redis never answered)
    grace: float
    # Members with a score below this, at the start, were expired for longer than the grace;
    # each batch compares with Redis's clock at that batch, so later batches' cutoffs are later.
    cutoff: float
    dry_run: bool
    sets: dict[str, SetSweep]
    lock_busy: bool = False  # another sweeper held the lock: nothing was done
    lock_holder: str | None = None  # that sweeper's lock value (host:pid:token)
    lock_lost: bool = False  # the lock expired or was taken mid-sweep: stopped early
    batches: int = 0
    duration: float = 0.0  # seconds
    error: str | None = None  # Redis failed mid-sweep (see SweepFailed)

    @property
    def removed(self) -> int:
        """Members removed from the three sets, all together."""
        return sum(s.removed for s in self.sets.values())

    @property
    def keys_deleted(self) -> int:
        return sum(s.keys_deleted for s in self.sets.values())

    @property
    def undecodable(self) -> int:
        return sum(s.undecodable for s in self.sets.values())

    @property
    def came_back(self) -> int:
        return sum(s.came_back for s in self.sets.values())

    @property
    def complete(self) -> bool:
        return not (self.lock_busy or self.lock_lost or self.error)

    def exit_code(self) -> int:
        if self.error:
            return EXIT_REDIS
        if self.lock_lost:
            return EXIT_LOCK_LOST
        return EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "redis_url": self.redis_url,
            "time": self.time,
            "grace": self.grace,
            "cutoff": self.cutoff,
            "dry_run": self.dry_run,
            "lock_busy": self.lock_busy,
            "lock_holder": self.lock_holder,
            "lock_lost": self.lock_lost,
            "complete": self.complete,
            "error": self.error,
            "batches": self.batches,
            "duration": round(self.duration, 6),
            "removed": self.removed,
            "keys_deleted": self.keys_deleted,
            "undecodable": self.undecodable,
            "came_back": self.came_back,
            "sets": {name: s.to_json() for name, s in self.sets.items()},
        }


class SweepFailed(Exception):
    """Redis failed mid-sweep. `report` holds what was removed before the failure; the lock
    was released if Redis allowed, else it expires by itself."""

    def __init__(self, report: SweepReport) -> None:
        super().__init__(report.error)
        self.report = report


# ---------------------------------------------------------------- printing


def print_report(report: SweepReport, out: TextIO) -> None:
    if report.lock_busy:
        out.write(f"Another sweep is running on {report.redis_url} (lock {LOCK_KEY} held by "
                  f"{printable(report.lock_holder or '?', 120)}); nothing was done.\n")
        return
    verb = "Would remove" if report.dry_run else "Removed"
    head = "Dry run, nothing was changed. " if report.dry_run else ""
    out.write(f"{head}Sweep of {report.redis_url} at {utc(report.time)}: registrations expired "
              f"before {utc(report.cutoff)} (grace {report.grace:g} s)\n\n")
    width = max(len(name) for name in report.sets) + 1
    for name, s in report.sets.items():
        line = f"  {name + ':':<{width}} {verb.lower()} {s.removed}, per-server keys {s.keys_deleted}"
        if s.undecodable:
            line += f", undecodable members {s.undecodable}"
        if s.came_back:
            line += f", kept {s.came_back} that beat again"
        out.write(line + "\n")
        if 0 < s.removed <= LIST_AT_MOST:
            for r in s.members:
                note = "  (undecodable: its same-named key is left alone)" if r.undecodable else ""
                out.write(f"      {printable(r.member, 120)}  expired {duration(report.time - r.score)} ago{note}\n")
        elif s.removed:
            out.write(f"      ({s.removed} members; --json lists them all)\n")
    out.write(f"\n{verb} {report.removed} registration(s) and {report.keys_deleted} per-server key(s) "
              f"in {report.duration:.3f} s ({report.batches} batches).\n")
    if report.lock_lost:
        out.write("The sweep stopped early: its lock expired or was taken by another sweeper.\n")


def json_document(doc: dict[str, Any]) -> str:
    """`json.dumps(doc, indent=2, sort_keys=True)`, character for character, made fast for the
    long lists (every member and key of a large sweep): Python's JSON encoder is pure Python when
    it indents (about 10 s for 200,000 members), so those lists are written here with the C
    string encoder, and the rest of the document by json.dumps around placeholders."""
    lists: dict[str, str] = {}
    sets = {}
    for name, s in doc.get("sets", {}).items():
        s = dict(s)
        for field_name, render in (("members", _json_members), ("deleted_keys", _json_strings)):
            if s.get(field_name):
                placeholder = f"\0{len(lists)}\0"
                lists[json.dumps(placeholder)] = render(s[field_name])
                s[field_name] = placeholder
        sets[name] = s
    text = json.dumps({**doc, "sets": sets} if "sets" in doc else doc, indent=2, sort_keys=True)
    pieces, at = [], 0
    for where, placeholder in sorted((text.index(p), p) for p in lists):
        pieces += [text[at:where], lists[placeholder]]
        at = where + len(placeholder)
    return "".join([*pieces, text[at:]])


# The lists sit at depth 3 (document, "sets", the set): items indented by 8, their fields by 10.
_ITEM, _FIELD, _CLOSE = " " * 8, " " * 10, " " * 6
_encode_string = json.encoder.encode_basestring_ascii


def _json_members(members: list[dict[str, Any]]) -> str:
    items = [f'{_ITEM}{{\n{_FIELD}"member": {_encode_string(m["member"])},\n'
             f'{_FIELD}"score": {_json_float(m["score"])},\n'
             f'{_FIELD}"undecodable": {"true" if m["undecodable"] else "false"}\n{_ITEM}}}'
             for m in members]
    return "[\n" + ",\n".join(items) + "\n" + _CLOSE + "]"


def _json_float(value: float) -> str:
    """As json writes a float: repr, or Infinity / -Infinity / NaN (a score may be +-inf)."""
    return float.__repr__(value) if value - value == 0 else json.dumps(value)


def _json_strings(strings: list[str]) -> str:
    return "[\n" + ",\n".join(_ITEM + _encode_string(k) for k in strings) + "\n" + _CLOSE + "]"


def registrations_removed(report: SweepReport) -> int:
    """Registrations (not members) a sweep removed: each server counts once, as each scheduler."""
    return report.sets["servers"].removed + report.sets["schedulers"].removed
