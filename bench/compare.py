"""Side by side with the naive reading that asynq's own inspector does, at 10 to 100,000 servers.

asynq's `Inspector.Servers()` calls `RDB.ListServers()` (internal/rdb/inspect.go): one script that
returns every live member of asynq:servers (ZRANGEBYSCORE now +inf) and removes the expired ones
(ZREMRANGEBYSCORE -inf now-1), then one GET per member, each a round trip of its own, each value
decoded. `inspector_servers` below does exactly that. An exporter built on it pays that on every
scrape. Ours pays, per scrape, one pipeline of 9 O(log N) commands (`read_counts`), and reads the
details in the watcher, in pages of 250 with one MGET each (`read_details`).

All three run in this process with the same client library (redis-py asyncio), against the same
private Redis holding N live servers, so the ratios compare the approaches, not the languages.
Commands are counted by Redis (INFO stats total_commands_processed; a script's inner commands
count one each).
"""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from bench.core import (
    INFO_OVERHEAD,
    Report,
    commands_processed,
    load_registrations,
    median,
    private_redis,
)
from exporter.asynq import model as asynq
from exporter.registrations.counts import read_counts
from exporter.registrations.details import read_details

#: asynq's listServerKeysCmd, verbatim.
LIST_SERVER_KEYS = """
local now = tonumber(ARGV[1])
local keys = redis.call("ZRANGEBYSCORE", KEYS[1], now, "+inf")
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now-1)
return keys"""


async def inspector_servers(redis: Redis, script, now: float) -> list[asynq.ServerInfo]:
    """asynq's RDB.ListServers: list the live members, then GET and decode each, one at a time."""
    keys = await script(keys=[asynq.SERVERS], args=[int(now)])
    servers = []
    for key in keys:
        data = await redis.get(key)
        if data is None:
            continue  # skip bad data, as asynq does
        try:
            servers.append(asynq.decode_server_info(data))
        except asynq.UndecodableError:
            continue
    return servers


async def _measure(url: str, sync_client, n: int, reps: int) -> dict[str, tuple[float, float]]:
    """{approach: (median seconds, median commands)} for one fleet size."""
    redis = Redis.from_url(url)
    script = redis.register_script(LIST_SERVER_KEYS)

    async def naive() -> None:
        servers = await inspector_servers(redis, script, time.time())
        if len(servers) != n:
            raise RuntimeError(f"naive listing found {len(servers)} of {n}")

    async def counts() -> None:
        snap = await read_counts(redis, time.time())
        if snap.sets["servers"].live != n:
            raise RuntimeError(f"counts found {snap.sets['servers'].live} of {n}")

    async def details() -> None:
        d = await read_details(redis, time.time(), lambda kind: None)
        if d.servers != n:
            raise RuntimeError(f"read_details found {d.servers} of {n}")

    out = {}
    try:
        for name, fn, times in (("naive", naive, reps), ("counts", counts, max(reps, 20)),
                                ("details", details, reps)):
            await fn()  # warm-up: connection, script cache
            secs, cmds = [], []
            for _ in range(times):
                before = commands_processed(sync_client)
                started = time.perf_counter()
                await fn()
                secs.append(time.perf_counter() - started)
                cmds.append(commands_processed(sync_client) - before - INFO_OVERHEAD)
            out[name] = (median(secs), median(cmds))
    finally:
        await redis.aclose()
    return out


def _t(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _x(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def compare(quick: bool) -> Report:
    sizes = (10, 1_000) if quick else (10, 1_000, 10_000, 100_000)
    results = {}
    with private_redis() as (server, client):
        for n in sizes:
            client.flushall()
            load_registrations(client, n, expires_in=86_400)
            reps = 3 if quick else (5 if n <= 10_000 else 2)
            results[n] = asyncio.run(_measure(server.url, client, n, reps))
    lines = [
        "### Side by side: asynq's Inspector.Servers listing (one GET per live member) vs the sidecar",
        "",
        "| live servers | naive listing | its commands | our scrape (counts) | its commands | "
        "time naive / scrape | commands naive / scrape | our details read | its commands | "
        "time naive / details | commands naive / details |",
        "|" + "---|" * 11,
    ]
    for n in sizes:
        r = results[n]
        (nt, nc), (ct, cc), (dt, dc) = r["naive"], r["counts"], r["details"]
        lines.append(f"| {n:,} | {_t(nt)} | {nc:,.0f} | {_t(ct)} | {cc:,.0f} | {_x(nt / ct)} | "
                     f"{_x(nc / cc)} | {_t(dt)} | {dc:,.0f} | {_x(nt / dt)} | {_x(nc / dc)} |")
    return Report(rows=[], extra=["\n".join(lines)])
