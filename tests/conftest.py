"""Shared fixtures: a real redis-server on a private port, a sidecar config factory, and (through
`pytest_plugins`) those of tests/support/."""

from __future__ import annotations

import logging
import socket

import pytest
import redis as redis_sync
import redis.asyncio as redis_async

from exporter.devtools.redis_server import RedisServer
from exporter.settings import CleanupConfig, LogConfig, RedisConfig, ServeConfig, SocketConfig

# Fixtures of the support modules, for every test: a test names them as parameters, never imports them.
# Their asserts are rewritten too (they import one another, so not all load as plugins first).
pytest.register_assert_rewrite("tests.support")
pytest_plugins = [
    "tests.support.faults",
    "tests.support.gobuild",
    "tests.support.lifecycle",
    "tests.support.pki",
    "tests.support.prom",
]

@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the session's Redis, emptied before each test."""
    if not redis_server.ping():  # a test that stopped it: bring it back
        redis_server.start()
    client = redis_sync.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def rdb(redis_url):
    """A synchronous client of the test Redis, for arranging and checking state."""
    client = redis_sync.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def ardb(redis_url):
    client = redis_async.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def tmp_socket(tmp_path_factory) -> str:
    # AF_UNIX paths are limited to ~107 bytes: keep it short.
    d = tmp_path_factory.mktemp("s", numbered=True)
    return str(d / "l.sock")


@pytest.fixture
def make_config(redis_url, tmp_socket):
    def make(**overrides) -> ServeConfig:
        values = dict(
            redis=RedisConfig(url=redis_url, timeout=1.0),
            listen=("127.0.0.1", 0),
            socket=SocketConfig(path=tmp_socket),
            log=LogConfig(level="debug"),
            cleanup=CleanupConfig(),
            hostname=socket.gethostname(),
            watch_interval=0.2,
            poll_interval=0.1,
        )
        values.update(overrides)
        return ServeConfig(**values)

    return make


@pytest.fixture
def keep_logging():
    """A command's `main` sets up logging for the process; put the test process's logging back
    afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
