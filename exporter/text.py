"""Text from Redis: replies as bytes or str whichever way the client decodes them, made safe to
print; and the durations and times the commands print. Pure."""

from __future__ import annotations

import time


def as_bytes(value: bytes | str) -> bytes:
    """A Redis reply (a member, a key, a task id) as bytes, whether or not the client decodes
    responses."""
    return value if isinstance(value, bytes) else value.encode()


def as_text(value: bytes | str) -> str:
    """A Redis reply as text; bytes that are not UTF-8 become backslash escapes."""
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def printable(text: str, limit: int = 80) -> str:
    """Text from Redis made safe for a terminal: control characters escaped, length bounded."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def duration(seconds: float) -> str:
    """7s, 2m05s, 3h04m, 5d02h: short and sortable by eye (negative counts as 0)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def utc(t: float) -> str:
    """A Unix time as ISO 8601 UTC to the second: 2026-11-29T18:22:14Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
