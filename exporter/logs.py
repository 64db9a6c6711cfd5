"""Logging set-up (text or JSON lines on stderr) and a rate limiter for log lines about bad input."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    _STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s",
                                      "%Y-%m-%dT%H:%M:%S")
        handler.setFormatter(formatter)
    logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp logs every request at INFO; the sidecar logs lifecycle edges, not scrapes.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class RateLimiter:
    """Allows one event per key per `interval` seconds and counts the ones it held back.

    Used for log lines about bad runtime input, so that a hostile peer cannot flood the log:
    `if (n := limiter.allow(key)) is not None: log.warning("... (%d more suppressed)", n)`.
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 1024) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._max_keys = max_keys

    def allow(self, key: str) -> int | None:
        """None when the event should not be logged; else how many were suppressed before it."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        if last is None and len(self._last) >= self._max_keys:
            self._last.clear()  # keys are reasons, not peers; this bound is a backstop
            self._suppressed.clear()
        self._last[key] = now
        return self._suppressed.pop(key, 0)
