"""Lifecycle protocol v1: one line of JSON in, a lifecycle event or a typed rejection out; and the encoder.

Pure: no I/O, no clock. docs/protocol.md is the specification for worker authors; this module is
its reference implementation (the socket server parses with `parse`, the Python client and the
launcher write with `encode`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from exporter.lifecycle.tracker import Bye, ConnId, Event, Exited, Hello, Ready, Registered, Stopping

VERSION = 1

#: Longest line accepted, in bytes, not counting the newline.
MAX_LINE = 64 * 1024

#: Why input was rejected (the `reason` label of asynq_sidecar_protocol_errors_total).
#: Parsing yields the first six; the socket server the next six; the tracker `out_of_order`.
REASONS = (
    "not_json",              # not a JSON object (or NaN/Infinity, or nested too deeply)
    "binary",                # not UTF-8
    "unknown_event",         # "event" names no v1 event
    "invalid_field",         # a field missing, of the wrong type, or out of range
    "unsupported_protocol",  # hello with a protocol version other than 1
    "oversized",             # a line longer than MAX_LINE (the connection is closed)
    "hello_timeout",         # no hello within --hello-timeout (the connection is closed)
    "line_timeout",          # a line begun but not ended in time (the connection is closed)
    "too_many_connections",  # no slot of --max-connections freed in time (the connection is refused)
    "evicted",               # an unproven connection closed to make room for a waiting one
    "too_many_messages",     # more lines than any worker's life needs (the connection is closed)
    "peer_not_allowed",      # a peer uid not in --socket-allow-uid (the connection is refused)
    "out_of_order",          # an event that is not legal in the worker's state
)

EVENTS = ("hello", "ready", "registered", "stopping", "exited", "bye")

_MAX_PID = 2**31 - 1  # asynq's ServerInfo.pid is an int32
_MAX_NAME = 255
_MAX_SIGNAL = 32
_MAX_TIMEOUT = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Message:
    """A well-formed line: the event, and the time the sender says it happened (Unix seconds)."""

    event: Event
    time: float | None = None


@dataclass(frozen=True, slots=True)
class Invalid:
    """A rejected line: `reason` is one of REASONS, `detail` says what was wrong (short, safe to log)."""

    reason: str
    detail: str


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _no_constant(name: str) -> Any:
    raise _Bad("not_json", f"{name} is not a JSON number")


def _show(value: Any) -> str:
    """A short, printable rendering of a hostile value for a log line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse(line: bytes, conn: ConnId) -> Message | Invalid:
    """One line (with or without its newline) from connection `conn`."""
    try:
        return _parse(line, conn)
    except _Bad as e:
        return Invalid(e.reason, e.detail)


def _parse(line: bytes, conn: ConnId) -> Message:
    line = line.rstrip(b"\r\n")
    if len(line) > MAX_LINE:
        raise _Bad("oversized", f"a line of {len(line)} bytes (at most {MAX_LINE})")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("binary", f"not UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except _Bad:
        raise
    except RecursionError:
        raise _Bad("not_json", "nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints too long to convert
        raise _Bad("not_json", f"not JSON: {str(e)[:80]}") from None
    if not isinstance(obj, dict):
        raise _Bad("not_json", f"not a JSON object: a {_json_type(obj)}")
    name = obj.get("event")
    if not isinstance(name, str):
        raise _Bad("invalid_field", f"'event' must be a string, got {_json_type(name)}")
    at = _number(obj, "time", required=False, low=0.0, high=None, strict_low=True)
    if name == "hello":
        return Message(_hello(obj, conn), at)
    if name == "ready":
        return Message(Ready(conn), at)
    if name == "registered":
        server_id = _server_id(obj, required=True)
        assert server_id is not None
        return Message(Registered(conn, server_id), at)
    if name == "stopping":
        return Message(Stopping(conn, _name(obj, "signal", _MAX_SIGNAL, required=False)), at)
    if name == "exited":
        return Message(_exited(obj, conn), at)
    if name == "bye":
        return Message(Bye(conn), at)
    raise _Bad("unknown_event", f"unknown event {_show(name)} (v1 has {', '.join(EVENTS)})")


def _hello(obj: dict[str, Any], conn: ConnId) -> Hello:
    if "protocol" not in obj:
        raise _Bad("invalid_field", "hello needs 'protocol': 1")
    version = obj["protocol"]
    if not _is_int(version):
        raise _Bad("invalid_field", f"'protocol' must be an integer, got {_json_type(version)}")
    if version != VERSION:
        raise _Bad("unsupported_protocol", f"protocol {_show(version)} (this sidecar speaks {VERSION})")
    pid = _integer(obj, "pid", 1, _MAX_PID)
    host = _name(obj, "host", _MAX_NAME, required=True)
    server_id = _server_id(obj, required=False)
    timeout = _number(obj, "shutdown_timeout", required=False, low=0.0, high=_MAX_TIMEOUT)
    started_at = _number(obj, "started_at", required=False, low=0.0, high=None, strict_low=True)
    assert host is not None
    return Hello(conn, pid=pid, host=host, server_id=server_id, shutdown_timeout=timeout,
                 protocol=version, started_at=started_at)


def _server_id(obj: dict[str, Any], *, required: bool) -> str | None:
    server_id = _name(obj, "server_id", _MAX_NAME, required=required)
    if server_id is not None and ":" in server_id:
        raise _Bad("invalid_field", "'server_id' must not contain ':'")
    return server_id


def _exited(obj: dict[str, Any], conn: ConnId) -> Exited:
    has_code = obj.get("code") is not None
    has_signal = obj.get("signal") is not None
    if has_code == has_signal:
        raise _Bad("invalid_field", "exited needs exactly one of 'code' or 'signal'")
    if has_code:
        return Exited(conn, code=_integer(obj, "code", 0, 255))
    return Exited(conn, signal=_name(obj, "signal", _MAX_SIGNAL, required=True))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(obj: dict[str, Any], key: str, low: int, high: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad("invalid_field", f"'{key}' must be an integer, got {_json_type(value)}")
    if not low <= value <= high:
        raise _Bad("invalid_field", f"'{key}' must be from {low} to {high}, got {_show(value)}")
    return value


def _number(obj: dict[str, Any], key: str, *, required: bool, low: float, high: float | None,
            strict_low: bool = False) -> float | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Bad("invalid_field", f"'{key}' must be a number, got {_json_type(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise _Bad("invalid_field", f"'{key}' is out of range") from None
    too_low = value <= low if strict_low else value < low
    if not math.isfinite(value) or too_low or (high is not None and value > high):
        raise _Bad("invalid_field", f"'{key}' is out of range: {_show(value)}")
    return value


def _name(obj: dict[str, Any], key: str, longest: int, *, required: bool) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _Bad("invalid_field", f"'{key}' must be a string, got {_json_type(value)}")
    if not value or len(value) > longest or not value.isprintable() or any(c.isspace() for c in value):
        raise _Bad("invalid_field",
                   f"'{key}' must be 1 to {longest} printable characters without spaces, got {_show(value)}")
    return value


def event_time(claimed: float | None, received: float, previous: float | None) -> float:
    """When an event happened: the time the sender gave (a launcher that buffered while no sidecar
    listened sends the true times) but never later than it was received, nor earlier than the
    previous event of the same connection; without one, the time it was received."""
    at = received if claimed is None else min(claimed, received)
    return at if previous is None else max(at, previous)


# ---------------------------------------------------------------- the client side


def encode(event: str, /, **fields: Any) -> bytes:
    """One protocol line: `encode("stopping", signal="SIGTERM", time=t)`. None fields are left out."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}")
    obj: dict[str, Any] = {"event": event}
    if event == "hello":
        obj["protocol"] = VERSION
    obj.update({k: v for k, v in fields.items() if v is not None})
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"
