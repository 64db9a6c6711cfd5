"""The memory floor: a bare process with aiohttp, redis-py and prometheus-client serving one /metrics.

`python -m bench.floor PORT REDIS_URL` serves until killed. The rss measurement runs it next to
`serve` so that the sidecar's own cost (serve minus floor) can be read off the same machine.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from redis.asyncio import Redis


async def main(port: int, redis_url: str) -> None:
    registry = CollectorRegistry()
    up = Gauge("floor_redis_up", "1 when Redis answered.", registry=registry)
    redis = Redis.from_url(redis_url)

    async def metrics(request: web.Request) -> web.Response:
        up.set(1 if await redis.ping() else 0)
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, handle_signals=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
