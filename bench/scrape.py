"""Scrapes of a real `asynq-sidecar serve`: latency at 10 and at 100,000 registrations, and the
Redis commands one scrape costs (INFO stats total_commands_processed before and after).

Latency is measured from a keep-alive HTTP/1.1 client (as Prometheus keeps its connection), from
the request written to the whole body read. Each fleet is compared with a sidecar on 10
registrations *at the same time*: two Redis servers, two sidecars, and scrapes alternating
between them, so that the load of a shared machine weighs on both sides of the ratio alike.
Scrapes are spaced so that a run spans more than one details-watcher read (every 10 s by
default): a scrape that arrives while the watcher is decoding a page waits for it, and the
percentiles show it. Each fleet is then scraped alone with the watcher quiet
(--watch-interval 3600) to separate the scrape path itself from that interference.
"""

from __future__ import annotations

import contextlib
import time

from bench.core import (
    INFO_OVERHEAD,
    MISS,
    PASS,
    BenchError,
    Report,
    Row,
    Scraper,
    ServeProcess,
    commands_processed,
    load_registrations,
    median,
    metric_sum,
    percentile,
    private_redis,
    workdir,
)

P50_MS, P99_MS, RATIO = 3.0, 10.0, 1.3


def _wait_details(sc: ServeProcess, n: int, timeout: float) -> None:
    """Until the watcher's first full read has seen all n servers (start-up work is over)."""
    deadline = time.monotonic() + timeout
    while metric_sum(sc.scrape(), "asynq_registry_servers") != n:
        if time.monotonic() > deadline:
            raise BenchError(f"the watcher did not read {n} servers within {timeout}s:\n{sc.tail()}")
        time.sleep(0.1)


@contextlib.contextmanager
def _serving(url: str, wd: str, live: int, args: list[str]):
    with ServeProcess(url, wd, args=args) as sc:
        sc.wait_served()
        _wait_details(sc, live, 60 + live / 2_000)
        scraper = Scraper(sc.port)
        try:
            for _ in range(20):  # warm-up: connection, code paths
                scraper.timed()
            yield scraper
        finally:
            scraper.close()


def _alternate(scrapers: list[Scraper], scrapes: int, gap: float) -> list[list[float]]:
    """`scrapes` rounds; in each, one scrape of every scraper (in turn), then a pause."""
    out: list[list[float]] = [[] for _ in scrapers]
    for i in range(scrapes):
        order = range(len(scrapers)) if i % 2 == 0 else reversed(range(len(scrapers)))
        for k in order:
            out[k].append(scrapers[k].timed() * 1000)
        time.sleep(gap)
    return out


def _load(client, live: int, expired: int) -> None:
    client.flushall()
    load_registrations(client, live, expires_in=86_400)
    if expired:
        load_registrations(client, expired, expires_in=-3600, key_ttl=None, pid_base=10_000_000)


def latency(quick: bool) -> Report:
    big = 10_000 if quick else 100_000
    scrapes, gap = (100, 0.01) if quick else (500, 0.025)
    # (label, live servers, expired registrations, judged, follower): a leak, and fleets. With
    # details sharing, the sidecar measured alone holds the lease and reads the whole fleet (the
    # one leader of a fleet); as a follower, another sidecar on the same Redis holds it.
    scenarios = [(f"{big:,} expired registrations (leaked) + 10 live", 10, big, True, False)]
    if not quick:
        scenarios.append(("10,000 live registrations", 10_000, 0, False, False))
    scenarios.append((f"{big:,} live registrations", big, 0, True, False))
    scenarios.append((f"{big:,} live registrations, as a follower", big, 0, True, True))
    target = f"p50 <= {P50_MS:g} ms, p99 <= {P99_MS:g} ms"
    rows: list[Row] = []
    ratios: list[Row] = []
    with private_redis() as (base_server, base_client), private_redis() as (server, client), \
            workdir() as wd:
        _load(base_client, 10, 0)
        with _serving(base_server.url, wd, 10, []) as base:
            for label, live, expired, judged, follower in scenarios:
                if not follower:
                    _load(client, live, expired)
                with contextlib.ExitStack() as stack:
                    if follower:
                        # The leader first: it takes the lease at its first tick, reads the fleet
                        # once and publishes it, then idles (--watch-interval 3600: its lease and
                        # the aggregate outlive the run). In a fleet the leader is in another pod;
                        # here its reads would compete for the same two cores.
                        stack.enter_context(_serving(server.url, wd, live, ["--watch-interval", "3600"]))
                    other = stack.enter_context(_serving(server.url, wd, live, []))
                    base_ms, ms = _alternate([base, other], scrapes, gap)
                if not rows:
                    ok = median(base_ms) <= P50_MS and percentile(base_ms, 99) <= P99_MS
                    rows.append(Row("scrape-latency", f"10 live registrations, default config (watcher "
                                                      f"every 10 s), {scrapes} scrapes {gap * 1000:g} ms "
                                                      f"apart", base_ms, "ms", target, PASS if ok else MISS))
                ok = median(ms) <= P50_MS and percentile(ms, 99) <= P99_MS
                row = Row("scrape-latency", f"{label}, default config, alternating with the one on 10",
                          ms, "ms")
                if judged:
                    row.target, row.verdict = target, PASS if ok else MISS
                rows.append(row)
                if live > 10 and not follower:
                    with _serving(server.url, wd, live, ["--watch-interval", "3600"]) as quiet:
                        rows.append(Row("scrape-latency", f"{label}, watcher quiet (--watch-interval "
                                                          f"3600), alone", _alternate([quiet], scrapes, gap)[0],
                                        "ms"))
                if judged:
                    ratio = percentile(ms, 99) / percentile(base_ms, 99)
                    ratios.append(Row("scrape-latency", f"p99 with {label} / p99 with 10 at the same time "
                                                        f"({percentile(base_ms, 99):.2f} ms)", [ratio], "x",
                                      f"<= {RATIO:g}x", PASS if ratio <= RATIO else MISS))
    return Report(rows + ratios)


def _commands_per_scrape(url: str, wd: str, client, n: int, reps: int) -> list[float]:
    # The watcher reads once at start and then sleeps; no worker is connected, so the observer
    # sends nothing: what Redis counts between two INFOs is the scrape's own work.
    with ServeProcess(url, wd, args=["--watch-interval", "3600"]) as sc:
        sc.wait_served()
        _wait_details(sc, n, 60 + n / 2_000)
        time.sleep(0.5)  # the start-up scan of the sidecar's host has finished
        scraper = Scraper(sc.port)
        try:
            scraper.get()
            out = []
            for _ in range(reps):
                before = commands_processed(client)
                scraper.get()
                out.append(commands_processed(client) - before - INFO_OVERHEAD)
            idle_before = commands_processed(client)
            time.sleep(0.2)
            idle = commands_processed(client) - idle_before - INFO_OVERHEAD
            if idle:
                raise BenchError(f"{idle} Redis commands in 0.2 s with no scrape: the count is not clean")
            # Redis' own time per scrape: the commands' execution (commandstats usec) over many.
            client.config_resetstat()
            for _ in range(reps * 4):
                scraper.get()
            usec = sum(v["usec"] for k, v in client.info("commandstats").items()
                       if k in ("cmdstat_zcount", "cmdstat_zrange"))
            return out, usec / (reps * 4)
        finally:
            scraper.close()


def commands(quick: bool) -> Report:
    sizes = (10, 10_000) if quick else (10, 100_000)
    reps = 10 if quick else 50
    counts: dict[int, list[float]] = {}
    usec: dict[int, float] = {}
    with private_redis() as (server, client), workdir() as wd:
        for n in sizes:
            client.flushall()
            load_registrations(client, n, expires_in=86_400)
            counts[n], usec[n] = _commands_per_scrape(server.url, wd, client, n, reps)
    rows = []
    for n in sizes:
        rows.append(Row("scrape-commands", f"Redis commands per scrape, {n:,} live registrations",
                        counts[n], "cmds"))
        rows.append(Row("scrape-commands", f"Redis execution time per scrape (commandstats usec of "
                                           f"ZCOUNT + ZRANGE, mean of {reps * 4}), {n:,} live", [usec[n]], "us"))
    distinct = sorted({c for values in counts.values() for c in values})
    rows.append(Row("scrape-commands", f"distinct counts over both sizes: {distinct}",
                    [float(len(distinct))], "count", "1 (constant)", PASS if len(distinct) == 1 else MISS))
    return Report(rows)
