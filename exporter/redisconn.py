"""Building the redis-py asyncio client from the Redis part of the configuration."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from exporter.config import RedisConfig


def connect(cfg: RedisConfig) -> Redis:
    """A client (connections are made lazily). One quick retry covers a connection that
    Redis closed since its last use; outages are the callers' business (they count and back
    off), so the client itself never waits long."""
    kwargs = dict(
        socket_timeout=cfg.timeout,
        socket_connect_timeout=cfg.timeout,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
        health_check_interval=30,
        client_name="asynq-sidecar",
    )
    if cfg.password is not None:
        kwargs["password"] = cfg.password
    return Redis.from_url(cfg.url, **kwargs)
