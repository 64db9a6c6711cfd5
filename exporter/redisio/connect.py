"""Building the redis-py asyncio client from the Redis part of the configuration: a single
server (redis://, rediss://, unix://), a master found through Sentinels, or a Redis Cluster."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from exporter.settings import RedisConfig

log = logging.getLogger("exporter.redis")


class SentinelMaster(Redis):
    """The master's client; closing it also closes the connections to the Sentinels.

    redis-py asks the Sentinels for the master only when it opens a connection, so pooled
    connections would keep talking to a demoted master, which accepts writes (and later
    discards them) until the Sentinels reconfigure it. `follow_master` closes them instead.
    """

    sentinel: Sentinel | None = None  # type: ignore[assignment]  # redis-py's command of that name

    async def follow_master(self, interval: float) -> None:
        """Ask the Sentinels which server is the master every `interval` seconds; when it has
        moved, drop every connection (idle or in use) so that the next command goes to the new
        one. Runs until cancelled; errors here are left to the commands' own handling."""
        assert self.sentinel is not None
        pool: SentinelConnectionPool = self.connection_pool  # type: ignore[assignment]  # master_for made it
        while True:
            try:
                address = await self.sentinel.discover_master(pool.service_name)
            except (RedisError, OSError):
                address = None  # mid-failover, or no Sentinel answers: commands will say so
            if address is not None and pool.master_address not in (None, address):
                log.warning("Sentinel moved master %s from %s:%s to %s:%s: reconnecting",
                            pool.service_name, *pool.master_address, *address)
                pool.master_address = address
                await pool.disconnect(inuse_connections=True)
            await asyncio.sleep(interval)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinel is not None:
                for client in self.sentinel.sentinels:
                    await client.aclose()


def _quick_retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1)


def tls_kwargs(cfg: RedisConfig) -> dict[str, Any]:
    """redis-py's ssl_* arguments; empty unless the URL is rediss://."""
    if not cfg.tls:
        return {}
    kwargs: dict[str, Any] = {"ssl_ca_certs": cfg.tls_ca_file, "ssl_certfile": cfg.tls_cert_file,
                              "ssl_keyfile": cfg.tls_key_file}
    if cfg.tls_insecure_skip_verify:
        kwargs.update(ssl_cert_reqs="none", ssl_check_hostname=False)
    return kwargs


def connect(cfg: RedisConfig) -> Redis:
    """A client (connections are made lazily). One quick retry covers a connection that
    Redis closed since its last use; outages are the callers' business (they count and back
    off), so the client itself never waits long.

    Every topology gets the same commands: a RedisCluster routes each by its key's slot and
    splits pipelines by node, and a Sentinel-managed client asks the Sentinels for the master
    again whenever a connection to it fails (after a failover)."""
    kwargs: dict[str, Any] = dict(
        socket_timeout=cfg.timeout,
        socket_connect_timeout=cfg.timeout,
        retry=_quick_retry(),
        health_check_interval=30,
        client_name="asynq-sidecar",
        **tls_kwargs(cfg),
    )
    if cfg.password is not None:
        kwargs["password"] = cfg.password
    if cfg.username is not None:
        kwargs["username"] = cfg.username
    if cfg.cluster:
        # Two retries: the first may only refresh a stale slot map after a node failed over.
        kwargs["retry"] = Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2)
        return RedisCluster.from_url(cfg.url, **kwargs)  # type: ignore[return-value]
    if cfg.sentinels:
        return _sentinel_master(cfg, kwargs)
    return Redis.from_url(cfg.url, **kwargs)


def _sentinel_master(cfg: RedisConfig, kwargs: dict[str, Any]) -> Redis:
    """The master named --redis-sentinel-master. The URL gives the scheme (TLS), user, password
    and database; the Sentinels are spoken to with the same TLS settings and their own password."""
    parts = urlsplit(cfg.url)
    if parts.username and "username" not in kwargs:
        kwargs["username"] = unquote(parts.username)
    if parts.password and "password" not in kwargs:
        kwargs["password"] = unquote(parts.password)
    db = parts.path.strip("/")
    kwargs["db"] = int(db) if db.isdigit() else 0
    if cfg.tls:
        kwargs["ssl"] = True
    sentinel_kwargs: dict[str, Any] = dict(
        socket_timeout=cfg.timeout, socket_connect_timeout=cfg.timeout, retry=_quick_retry(),
        **({"ssl": True, **tls_kwargs(cfg)} if cfg.tls else {}))
    if cfg.sentinel_password is not None:
        sentinel_kwargs["password"] = cfg.sentinel_password
    sentinel = Sentinel(list(cfg.sentinels), sentinel_kwargs=sentinel_kwargs, **kwargs)
    assert cfg.sentinel_master is not None  # resolve() requires it with --redis-sentinel
    client = sentinel.master_for(cfg.sentinel_master, redis_class=SentinelMaster)
    client.sentinel = sentinel
    return client


async def redis_time(redis: Redis) -> float:
    """Redis's clock (TIME), Unix seconds: what asynq's scores are compared with when a decision
    must not depend on this machine's clock. A Cluster client asks one node."""
    reply: Any = await redis.time()
    if isinstance(reply, dict):  # a Cluster client asked several nodes: any one will do
        reply = next(iter(reply.values()))
    seconds, micros = reply
    return int(seconds) + int(micros) / 1e6
