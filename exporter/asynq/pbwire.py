"""asynq's ServerInfo read straight from the protobuf wire format, without the protobuf runtime.

`serve` decodes no other message, and the protobuf runtime costs a sidecar about 3 MiB of
memory and a few tens of milliseconds of start-up, in every pod. This reader accepts what
protobuf's own parser accepts for ServerInfo (tests/asynq/test_pbwire.py compares the two on generated
and on random bytes) and gives the same values:

- fields in any order; a field given twice: the last value wins (a message field, start_time,
  is merged); a map entry given twice: the last wins; a missing key or value is "" or 0; an
  entry with any other field is left out of the map;
- unknown fields, and known fields with an unexpected wire type, are skipped (groups too);
- int32 fields keep the low 32 bits of their varint, as a signed number; a varint longer than
  10 bytes, a field number 0, a truncated field, an unmatched end-group or invalid UTF-8 in a
  string (proto3 requires UTF-8) make the message undecodable.

Field numbers are those of exporter/asynq.proto.
"""

from __future__ import annotations

from typing import NamedTuple

_U64 = (1 << 64) - 1
_MAX_FIELD = (1 << 29) - 1


class WireError(ValueError):
    """Bytes that are not a valid encoding of the message."""


class ServerInfoFields(NamedTuple):
    host: str
    pid: int
    server_id: str
    concurrency: int
    queues: dict[str, int]
    strict_priority: bool
    status: str
    start_time: tuple[int, int] | None  # (seconds, nanos) of the Timestamp, when the field is there
    active_worker_count: int


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos` (at most 10 bytes, kept to 64 bits)."""
    result = 0
    shift = 0
    while pos < end:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _U64, pos
        shift += 7
        if shift >= 70:
            raise WireError("a varint longer than 10 bytes")
    raise WireError("truncated varint")


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _tag(data: bytes, pos: int, end: int, *, in_group: bool = False) -> tuple[int, int, int]:
    """(field number, wire type, next position). Inside a group, as protobuf, any number goes."""
    b = data[pos]
    if b < 0x80:
        tag, pos = b, pos + 1
    else:
        start = pos
        tag, pos = _varint(data, pos, end)
        if tag > 0xFFFFFFFF or pos - start > 5:
            raise WireError("a tag over 32 bits")
    number = tag >> 3
    if not in_group and (number == 0 or number > _MAX_FIELD):
        raise WireError(f"invalid field number {number}")
    return number, tag & 7, pos


def _skip(data: bytes, pos: int, end: int, number: int, wire: int) -> int:
    """The position after a field's value (an unknown field, or a known one of another type)."""
    if wire == 0:
        return _varint(data, pos, end)[1]
    if wire == 1:
        pos += 8
    elif wire == 5:
        pos += 4
    elif wire == 2:
        length, pos = _varint(data, pos, end)
        pos += length
    elif wire == 3:  # a group: skip fields up to its end-group of the same number
        while True:
            if pos >= end:
                raise WireError("truncated group")
            inner, inner_wire, pos = _tag(data, pos, end, in_group=True)
            if inner_wire == 4:
                if inner != number:
                    raise WireError("mismatched end-group")
                return pos
            pos = _skip(data, pos, end, inner, inner_wire)
    else:  # 4, an end-group outside a group; 6 and 7 do not exist
        raise WireError(f"unexpected wire type {wire}")
    if pos > end:
        raise WireError("truncated field")
    return pos


def _bytes(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(start, stop) of a length-delimited value at `pos`."""
    length, pos = _varint(data, pos, end)
    stop = pos + length
    if stop > end:
        raise WireError("truncated field")
    return pos, stop


def _text(data: bytes, start: int, stop: int) -> str:
    try:
        return data[start:stop].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("a string that is not UTF-8") from None


# The readers below are written out for speed (a fleet's details leader decodes every live
# server's ServerInfo each interval): one-byte tags, lengths and varints are read inline, and
# anything longer through the helpers above.


def _queue_entry(data: bytes, pos: int, end: int) -> tuple[str, int] | None:
    """A map entry's (key, value); None for an entry with any other field (protobuf keeps such
    an entry among the unknown fields, out of the map)."""
    key, value, other = "", 0, False
    while pos < end:
        tag = data[pos]
        if tag == 0x0A or tag == 0x10:  # 1: key, string; 2: value, int32
            pos += 1
            number, wire = tag >> 3, tag & 7
        else:
            number, wire, pos = _tag(data, pos, end)
        if number == 1 and wire == 2:
            start, pos = _bytes(data, pos, end)
            key = _text(data, start, pos)
        elif number == 2 and wire == 0:
            raw, pos = _varint(data, pos, end)
            value = _int32(raw)
        else:
            pos = _skip(data, pos, end, number, wire)
            other = True
    return None if other else (key, value)


def _timestamp(data: bytes, pos: int, end: int, seconds: int, nanos: int) -> tuple[int, int]:
    while pos < end:
        number, wire, pos = _tag(data, pos, end)
        if number == 1 and wire == 0:
            raw, pos = _varint(data, pos, end)
            seconds = _int64(raw)
        elif number == 2 and wire == 0:
            raw, pos = _varint(data, pos, end)
            nanos = _int32(raw)
        else:
            pos = _skip(data, pos, end, number, wire)
    return seconds, nanos


def server_info(data: bytes) -> ServerInfoFields:
    """Every field of a ServerInfo; raises WireError when `data` is not one."""
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray)):
            raise WireError(f"expected bytes, not {type(data).__name__}")
        data = bytes(data)
    host = server_id = status = ""
    pid = concurrency = active = 0
    strict = False
    queues: dict[str, int] = {}
    start_time: tuple[int, int] | None = None
    pos, end = 0, len(data)
    while pos < end:
        tag = data[pos]
        if tag < 0x80:
            pos += 1
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise WireError("invalid field number 0")
        else:
            number, wire, pos = _tag(data, pos, end)
        if wire == 2 and number < 9 and number != 2 and number != 4 and number != 6:
            if pos < end and data[pos] < 0x80:
                stop = pos + 1 + data[pos]
                pos += 1
                if stop > end:
                    raise WireError("truncated field")
            else:
                pos, stop = _bytes(data, pos, end)
            if number == 7 or number == 1 or number == 3:
                try:
                    text = data[pos:stop].decode("utf-8")
                except UnicodeDecodeError:
                    raise WireError("a string that is not UTF-8") from None
                if number == 7:
                    status = text
                elif number == 1:
                    host = text
                else:
                    server_id = text
            elif number == 5:
                entry = _queue_entry(data, pos, stop)
                if entry is not None:
                    queues[entry[0]] = entry[1]
            else:  # 8
                start_time = _timestamp(data, pos, stop, *(start_time or (0, 0)))
            pos = stop
        elif wire == 0 and (number == 2 or number == 4 or number == 6 or number == 9):
            if pos < end and data[pos] < 0x80:
                raw = data[pos]
                pos += 1
            else:
                raw, pos = _varint(data, pos, end)
                raw = raw if number == 6 else _int32(raw)
            if number == 2:
                pid = raw
            elif number == 4:
                concurrency = raw
            elif number == 6:
                strict = raw != 0
            else:
                active = raw
        else:
            pos = _skip(data, pos, end, number, wire)
    return ServerInfoFields(host, pid, server_id, concurrency, queues, strict, status, start_time, active)


def server_load(data: bytes) -> tuple[str, int, int]:
    """(status, concurrency, active_worker_count) of a ServerInfo, as `server_info` gives them.

    Fast for what asynq writes (Go's encoder: fields in number order, defaults left out, short
    strings): one check per field in that order, decoding only what is needed, but checking
    every field as protobuf would (lengths, varints, UTF-8, the map entries and the timestamp's
    structure). Anything else (another order, repeated or unknown fields, long strings) is read
    by `server_info`."""
    if type(data) is not bytes:
        f = server_info(data)
        return f.status, f.concurrency, f.active_worker_count
    end = len(data)
    concurrency = active = 0
    status = ""
    try:
        pos = 0
        if data[0] == 0x0A:  # host
            pos = 2 + data[1]
            if data[1] >= 0x80 or pos > end:
                raise _Unusual
            data[2:pos].decode("utf-8")
        if pos < end and data[pos] == 0x10:  # pid: checked, not needed
            pos = _skip_varint(data, pos + 1, end)
        if pos < end and data[pos] == 0x1A:  # server_id
            stop = pos + 2 + data[pos + 1]
            if data[pos + 1] >= 0x80 or stop > end:
                raise _Unusual
            data[pos + 2:stop].decode("utf-8")
            pos = stop
        if pos < end and data[pos] == 0x20:  # concurrency
            concurrency = data[pos + 1]
            if concurrency < 0x80:
                pos += 2
            else:
                concurrency, pos = _varint(data, pos + 1, end)
                concurrency = _int32(concurrency)
        while pos < end and data[pos] == 0x2A:  # queues: entries "0a len key 10 value"
            stop = pos + 2 + data[pos + 1]
            key_stop = pos + 4 + data[pos + 3]
            if (data[pos + 1] >= 0x80 or stop > end or data[pos + 2] != 0x0A or data[pos + 3] >= 0x80
                    or key_stop + 2 > stop or data[key_stop] != 0x10):
                raise _Unusual
            data[pos + 4:key_stop].decode("utf-8")
            if _skip_varint(data, key_stop + 1, stop) != stop:
                raise _Unusual
            pos = stop
        if pos < end and data[pos] == 0x30:  # strict_priority
            pos = _skip_varint(data, pos + 1, end)
        if pos < end and data[pos] == 0x3A:  # status
            stop = pos + 2 + data[pos + 1]
            if data[pos + 1] >= 0x80 or stop > end:
                raise _Unusual
            status = data[pos + 2:stop].decode("utf-8")
            pos = stop
        if pos < end and data[pos] == 0x42:  # start_time: "08 seconds [10 nanos]"
            stop = pos + 2 + data[pos + 1]
            if data[pos + 1] >= 0x80 or stop > end:
                raise _Unusual
            pos += 2
            if pos < stop and data[pos] == 0x08:
                pos = _skip_varint(data, pos + 1, stop)
            if pos < stop and data[pos] == 0x10:
                pos = _skip_varint(data, pos + 1, stop)
            if pos != stop:
                raise _Unusual
        if pos < end and data[pos] == 0x48:  # active_worker_count
            active = data[pos + 1]
            if active < 0x80:
                pos += 2
            else:
                active, pos = _varint(data, pos + 1, end)
                active = _int32(active)
        if pos != end:
            raise _Unusual
    except (_Unusual, IndexError, WireError, UnicodeDecodeError):
        f = server_info(data)  # exact, and raises WireError for what protobuf refuses
        return f.status, f.concurrency, f.active_worker_count
    return status, concurrency, active


def _skip_varint(data: bytes, pos: int, end: int) -> int:
    """The position after the varint at `pos` (raises _Unusual past `end` or 10 bytes)."""
    stop = pos + 10
    while data[pos] >= 0x80:
        pos += 1
        if pos >= stop:
            raise _Unusual
    pos += 1
    if pos > end:
        raise _Unusual
    return pos


class _Unusual(Exception):
    """Not the layout asynq writes: read the general way."""
