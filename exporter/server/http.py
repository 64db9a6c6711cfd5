"""The HTTP endpoints: `/` (links), `/metrics`, `/healthz` (process works), `/readyz` (the lifecycle
socket listens and Redis is reachable)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from exporter import __version__

LANDING = """<!doctype html>
<html><head><meta charset="utf-8"><title>asynq-sidecar</title></head>
<body><h1>asynq-sidecar {version}</h1>
<p>Observability sidecar and Prometheus exporter for Asynq workers.</p>
<ul>
<li><a href="metrics">/metrics</a>: Prometheus metrics (OpenMetrics when asked)</li>
<li><a href="healthz">/healthz</a>: the process works</li>
<li><a href="readyz">/readyz</a>: the lifecycle socket listens and Redis is reachable</li>
</ul></body></html>
"""


def build_app(registry: CollectorRegistry, *, before_scrape: Callable[[], Awaitable[None]],
              redis_ready: Callable[[], Awaitable[bool]],
              socket_listening: Callable[[], bool] = lambda: True,
              middlewares: Sequence[Any] = ()) -> web.Application:
    """`before_scrape` refreshes what a scrape must show fresh (O(1) Redis reads);
    `redis_ready` answers whether Redis can be reached now; `socket_listening` whether workers
    can connect to the lifecycle socket now; `middlewares` (from --web-config-file) wrap every
    path."""

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=LANDING.format(version=__version__), content_type="text/html")

    async def metrics(request: web.Request) -> web.Response:
        await before_scrape()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if not socket_listening():
            return web.Response(status=503, text="not ready: the lifecycle socket is not listening\n")
        try:
            ok = await redis_ready()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - any failure means not ready
            ok = False
        if ok:
            return web.Response(text="ok: redis reachable\n")
        return web.Response(status=503, text="not ready: redis unreachable\n")

    app = web.Application(middlewares=list(middlewares))
    app.router.add_get("/", index)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
