"""Health of the sidecar's link to Redis: `asynq_sidecar_redis_up` and the error counter.

Every Redis operation of the sidecar runs inside `RedisHealth.op(what)`, which records success
or failure, logs the down/up edges once each, and re-raises the error for the caller to handle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import RedisError

log = logging.getLogger("exporter.redis")

#: What a failed Redis operation raises: redis-py errors, socket errors and timeouts.
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


class RedisHealth:
    def __init__(self, display_url: str) -> None:
        self.display_url = display_url
        self.up: bool | None = None  # None until the first operation
        self.errors = 0
        self.last_error = ""

    @contextmanager
    def op(self, what: str) -> Iterator[None]:
        try:
            yield
        except REDIS_FAILURES as e:
            self.failed(what, e)
            raise
        else:
            self.succeeded()

    def failed(self, what: str, error: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{what}: {type(error).__name__}: {error}"
        if self.up is not False:
            log.warning("Redis down (%s): %s", self.display_url, self.last_error)
        self.up = False

    def succeeded(self) -> None:
        if self.up is False:
            log.info("Redis up again (%s)", self.display_url)
        elif self.up is None:
            log.info("Redis reachable (%s)", self.display_url)
        self.up = True
