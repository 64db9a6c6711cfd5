"""Asynq's server registration in Redis: key names, member parsing and protobuf decoding.

The facts come from hibiken/asynq v0.26.0 (internal/base/base.go, internal/rdb/rdb.go,
heartbeat.go); docs/asynq-registration.md repeats them with sources.

ServerInfo, the one message `serve` reads, is decoded by exporter.asynq.pbwire without the protobuf
runtime (about 3 MiB per sidecar); the other messages, and every encoder (the emulator, tests),
import the runtime when first used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from exporter.asynq import pbwire

if TYPE_CHECKING:
    from types import ModuleType

SERVERS = "asynq:servers"
WORKERS = "asynq:workers"
SCHEDULERS = "asynq:schedulers"

SetName = Literal["servers", "workers", "schedulers"]
#: The three sorted sets, keyed by the `set` label value used in metrics.
SETS: dict[str, str] = {"servers": SERVERS, "workers": WORKERS, "schedulers": SCHEDULERS}

#: The values asynq writes in ServerInfo.status (its serverState's String()).
SERVER_STATUSES = ("new", "active", "stopped", "closed")

HEARTBEAT_INTERVAL = 5.0  # seconds, fixed in asynq
REGISTRATION_TTL = 10  # seconds: a beat sets score = now + 10 and the per-server keys' TTL to 10 s

# A zero Go time.Time is encoded with this many seconds rather than as an absent field.
GO_ZERO_TIME_SECONDS = -62135596800

_MEMBER_RE = re.compile(r"^asynq:(servers|workers|schedulers):\{(.*)\}$", re.DOTALL)


class UndecodableError(ValueError):
    """A Redis value that is not what asynq writes there (bad member name or protobuf bytes)."""


@dataclass(frozen=True, slots=True)
class Member:
    """One member of asynq's registration sets: `asynq:<set>:{<host>:<pid>:<id>}`.

    `ident` is the server id (a UUID) for servers and workers, the scheduler id for schedulers.
    """

    set: SetName
    host: str
    pid: int
    ident: str

    @property
    def key(self) -> str:
        """The member string itself, which is also the name of the per-server key."""
        return f"asynq:{self.set}:{{{self.host}:{self.pid}:{self.ident}}}"

    @property
    def tag(self) -> str:
        """`{host:pid:id}`: the hash tag shared by a server's STRING and workers HASH."""
        return f"{{{self.host}:{self.pid}:{self.ident}}}"

    def sibling(self, set_name: SetName) -> Member:
        """The member of the same server in another set (servers <-> workers)."""
        return Member(set_name, self.host, self.pid, self.ident)


def parse_member(raw: str | bytes) -> Member:
    """Parse a sorted-set member; raise UndecodableError when it is not asynq's format.

    The text inside the braces is split from the right on ':' into host, pid and id, so a
    host name that itself contains ':' (an IPv6 literal) still parses.
    """
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    m = _MEMBER_RE.match(text)
    if not m:
        raise UndecodableError(f"not an asynq registration member: {text[:120]!r}")
    parts = m.group(2).rsplit(":", 2)
    if len(parts) != 3 or not parts[2]:
        raise UndecodableError(f"member has no host:pid:id inside braces: {text[:120]!r}")
    host, pid_text, ident = parts
    try:
        pid = int(pid_text)
    except ValueError:
        raise UndecodableError(f"member pid is not a number: {text[:120]!r}") from None
    return Member(m.group(1), host, pid, ident)  # type: ignore[arg-type]


def server_member(host: str, pid: int, server_id: str) -> Member:
    return Member("servers", host, pid, server_id)


def glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so `text` matches itself in SCAN/ZSCAN MATCH."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def member_pattern(set_name: SetName, host: str, pid: int) -> str:
    """ZSCAN MATCH pattern for every member of `set_name` owned by host and pid."""
    return f"asynq:{set_name}:{{{glob_escape(host)}:{pid}:*}}"


def _timestamp(ts) -> float | None:
    """Seconds since the epoch, or None for an absent or zero Go time."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    if ts.seconds <= GO_ZERO_TIME_SECONDS:
        return None
    return ts.seconds + ts.nanos / 1e9


@dataclass(frozen=True, slots=True)
class ServerInfo:
    host: str
    pid: int
    server_id: str
    concurrency: int
    queues: dict[str, int] = field(default_factory=dict)
    strict_priority: bool = False
    status: str = ""
    start_time: float | None = None
    active_worker_count: int = 0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    host: str
    pid: int
    server_id: str
    task_id: str
    task_type: str
    queue: str
    start_time: float | None
    deadline: float | None


@dataclass(frozen=True, slots=True)
class SchedulerEntry:
    id: str
    spec: str
    task_type: str
    enqueue_options: tuple[str, ...]
    next_enqueue_time: float | None
    prev_enqueue_time: float | None


def _pb() -> ModuleType:
    """exporter.asynq.proto, the protobuf runtime's messages: imported on first use."""
    # The protobuf runtime (several MiB) loads only for a full decode: `serve` reads ServerInfo
    # through pbwire and never needs it.
    from exporter.asynq import proto as asynqpb  # noqa: PLC0415

    return asynqpb


def _parse(cls, data: bytes):
    from google.protobuf.message import DecodeError  # noqa: PLC0415 - with _pb(), on first use

    try:
        return cls.FromString(data)
    except (DecodeError, TypeError, ValueError) as e:  # TypeError: not bytes at all
        raise UndecodableError(f"cannot decode {cls.DESCRIPTOR.name}: {e}") from None


def _server_info_fields(data: bytes) -> pbwire.ServerInfoFields:
    try:
        return pbwire.server_info(data)
    except pbwire.WireError as e:
        raise UndecodableError(f"cannot decode ServerInfo: {e}") from None


def _wire_timestamp(ts: tuple[int, int] | None) -> float | None:
    if ts is None:
        return None
    seconds, nanos = ts
    if (seconds == 0 and nanos == 0) or seconds <= GO_ZERO_TIME_SECONDS:
        return None
    return seconds + nanos / 1e9


def decode_server_info(data: bytes) -> ServerInfo:
    f = _server_info_fields(data)
    return ServerInfo(
        host=f.host,
        pid=f.pid,
        server_id=f.server_id,
        concurrency=f.concurrency,
        queues=f.queues,
        strict_priority=f.strict_priority,
        status=f.status,
        start_time=_wire_timestamp(f.start_time),
        active_worker_count=f.active_worker_count,
    )


def decode_server_load(data: bytes) -> tuple[str, int, int]:
    """(status, concurrency, active_worker_count) of a ServerInfo: all the details watcher
    aggregates, without building the full ServerInfo (read 100,000 times per interval by a
    fleet's details leader)."""
    try:
        return pbwire.server_load(data)
    except pbwire.WireError as e:
        raise UndecodableError(f"cannot decode ServerInfo: {e}") from None


def decode_worker_info(data: bytes) -> WorkerInfo:
    msg = _parse(_pb().WorkerInfo, data)
    return WorkerInfo(
        host=msg.host,
        pid=msg.pid,
        server_id=msg.server_id,
        task_id=msg.task_id,
        task_type=msg.task_type,
        queue=msg.queue,
        start_time=_timestamp(msg.start_time) if msg.HasField("start_time") else None,
        deadline=_timestamp(msg.deadline) if msg.HasField("deadline") else None,
    )


def decode_scheduler_entry(data: bytes) -> SchedulerEntry:
    msg = _parse(_pb().SchedulerEntry, data)
    return SchedulerEntry(
        id=msg.id,
        spec=msg.spec,
        task_type=msg.task_type,
        enqueue_options=tuple(msg.enqueue_options),
        next_enqueue_time=_timestamp(msg.next_enqueue_time) if msg.HasField("next_enqueue_time") else None,
        prev_enqueue_time=_timestamp(msg.prev_enqueue_time) if msg.HasField("prev_enqueue_time") else None,
    )


def _set_timestamp(ts, seconds: float | None) -> None:
    if seconds is None:
        ts.seconds = GO_ZERO_TIME_SECONDS
        return
    whole = int(seconds // 1)
    ts.seconds = whole
    ts.nanos = int(round((seconds - whole) * 1e9)) % 1_000_000_000


def encode_server_info(info: ServerInfo) -> bytes:
    """Protobuf bytes laid out exactly as asynq's base.EncodeServerInfo writes them."""
    msg = _pb().ServerInfo(
        host=info.host,
        pid=info.pid,
        server_id=info.server_id,
        concurrency=info.concurrency,
        queues=info.queues,
        strict_priority=info.strict_priority,
        status=info.status,
        active_worker_count=info.active_worker_count,
    )
    _set_timestamp(msg.start_time, info.start_time)
    return msg.SerializeToString(deterministic=True)


def encode_worker_info(info: WorkerInfo, payload: bytes = b"") -> bytes:
    msg = _pb().WorkerInfo(
        host=info.host,
        pid=info.pid,
        server_id=info.server_id,
        task_id=info.task_id,
        task_type=info.task_type,
        task_payload=payload,
        queue=info.queue,
    )
    _set_timestamp(msg.start_time, info.start_time)
    _set_timestamp(msg.deadline, info.deadline)
    return msg.SerializeToString(deterministic=True)


def encode_scheduler_entry(entry: SchedulerEntry, payload: bytes = b"") -> bytes:
    msg = _pb().SchedulerEntry(
        id=entry.id,
        spec=entry.spec,
        task_type=entry.task_type,
        task_payload=payload,
        enqueue_options=list(entry.enqueue_options),
    )
    _set_timestamp(msg.next_enqueue_time, entry.next_enqueue_time)
    _set_timestamp(msg.prev_enqueue_time, entry.prev_enqueue_time)
    return msg.SerializeToString(deterministic=True)
