"""Retrying work that cannot reach Redis: one backoff loop for every caller."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

from exporter.redisio.health import REDIS_FAILURES


async def retry_with_backoff(what: Callable[[], Awaitable[Any]], *, on_failure: Callable[[BaseException, float], None],
                             first: float = 0.1, cap: float = 5.0) -> Any:
    """Call `what` until it does not fail with a Redis failure, waiting a jittered, doubling
    delay (from `first` to `cap` seconds) between attempts; `on_failure(error, delay)` first."""
    delay = first
    while True:
        try:
            return await what()
        except REDIS_FAILURES as e:
            on_failure(e, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, cap)
