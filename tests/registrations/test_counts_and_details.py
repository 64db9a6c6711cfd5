"""`serve`: registry metrics against a real Redis, HTTP endpoints, Redis outages, clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp

from exporter.devtools.redis_server import RedisServer, free_port
from exporter.server.sidecar import Sidecar
from exporter.settings import RedisConfig
from tests.support.helpers import Watched, eventually, register_server, samples, scrape, value, wait_until
from tests.support.tools import require_tool


async def test_counts_and_details_match_what_is_registered(rdb, make_config):
    now = time.time()
    register_server(rdb, "a", 1, "s1", now + 10, status="active", concurrency=10, active=3)
    register_server(rdb, "a", 2, "s2", now + 8, status="closed", concurrency=5, active=1)
    register_server(rdb, "b", 1, "s3", now - 30, with_keys=False)  # leaked 30 s ago
    register_server(rdb, "b", 2, "s4", now - 300, with_keys=False)  # leaked 5 min ago
    rdb.zadd("asynq:schedulers", {"asynq:schedulers:{a:1:sch}": now + 20})
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: sc.watcher.latest, what="a details read")
        text = await scrape(sc.http_url)
    assert value(text, "asynq_registry_entries", set="servers", state="live") == 2
    assert value(text, "asynq_registry_entries", set="servers", state="expired") == 2
    assert value(text, "asynq_registry_entries", set="workers", state="expired") == 2
    assert value(text, "asynq_registry_entries", set="schedulers", state="live") == 1
    assert value(text, "asynq_registry_entries", set="schedulers", state="expired") == 0
    assert 300 <= value(text, "asynq_registry_oldest_expired_seconds", set="servers") < 305
    assert value(text, "asynq_registry_oldest_expired_seconds", set="schedulers") == 0
    assert value(text, "asynq_registry_servers", status="active") == 1
    assert value(text, "asynq_registry_servers", status="closed") == 1
    assert value(text, "asynq_registry_concurrency") == 15
    assert value(text, "asynq_registry_active_tasks") == 4
    assert 0 <= value(text, "asynq_registry_snapshot_age_seconds") < 5
    assert value(text, "asynq_sidecar_redis_up") == 1
    assert value(text, "asynq_sidecar_build_info", version=__import__("exporter").__version__) == 1


async def test_undecodable_values_are_counted_once_each_and_skipped(rdb, make_config):
    """Every read meets the same bad values again; each is counted once, not once per read."""
    now = time.time()
    register_server(rdb, "a", 1, "ok", now + 30, concurrency=4)
    rdb.zadd("asynq:servers", {f"garbage-member-{i}": now + 30 for i in range(3)})
    for i in (2, 3):
        rdb.zadd("asynq:servers", {f"asynq:servers:{{a:{i}:bad}}": now + 30})
        rdb.set(f"asynq:servers:{{a:{i}:bad}}", b"\xff\xff\xff")
    watched = Watched()
    async with Sidecar(make_config(), hooks=watched.hooks) as sc:
        await eventually(lambda: watched.full_reads >= 3, what="three details reads")
        text = await scrape(sc.http_url)
    assert value(text, "asynq_registry_concurrency") == 4
    assert value(text, "asynq_sidecar_undecodable_values_total", kind="member") == 3
    assert value(text, "asynq_sidecar_undecodable_values_total", kind="server_info") == 2


async def test_output_passes_promtool_check_metrics_and_openmetrics_on_request(rdb, make_config):
    promtool = require_tool("promtool")
    register_server(rdb, "a", 1, "s1", time.time() + 10)
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: sc.watcher.latest, what="a details read")
        text = await scrape(sc.http_url)
        om = await scrape(sc.http_url, accept="application/openmetrics-text; version=1.0.0")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stderr
    assert om.rstrip().endswith("# EOF")


async def test_redis_commands_per_scrape_do_not_grow_with_registrations_or_tasks(rdb, make_config):
    """9 for the three sets, SMEMBERS asynq:queues, and 3 per queue, in one round trip."""
    async def commands_for_one_scrape(sc) -> int:
        before = int(rdb.info("stats")["total_commands_processed"])
        await scrape(sc.http_url)
        return int(rdb.info("stats")["total_commands_processed"]) - before - 1  # less the INFO itself

    now = time.time()
    rdb.sadd("asynq:queues", "default", "critical")
    async with Sidecar(make_config(watch_interval=3600)) as sc:
        await eventually(lambda: sc.watcher.latest, what="a details read")
        # The first scrape meets the two queues: 9 + 1, then a second round trip of 3 per queue.
        first = await commands_for_one_scrape(sc)
        small = await commands_for_one_scrape(sc)
        pipe = rdb.pipeline()
        for i in range(2000):
            pipe.zadd("asynq:servers", {f"asynq:servers:{{h:{i}:x}}": now + (10 if i % 2 else -10)})
            pipe.lpush("asynq:{default}:active", f"t{i}")
            pipe.zadd("asynq:{default}:lease", {f"t{i}": now + (30 if i % 2 else -30)})
        pipe.execute()
        large = await commands_for_one_scrape(sc)
    assert first == (9 + 1) + 3 * 2
    assert small == large == 9 + 1 + 3 * 2


async def test_healthz_readyz_and_landing_page(make_config):
    async with Sidecar(make_config()) as sc, aiohttp.ClientSession() as s:
        async with s.get(sc.http_url + "/healthz") as r:
            assert r.status == 200
        async with s.get(sc.http_url + "/readyz") as r:
            assert r.status == 200
        async with s.get(sc.http_url + "/") as r:
            page = await r.text()
    assert 'href="metrics"' in page and 'href="readyz"' in page


async def test_redis_down_at_start_then_up_keeps_serving_and_recovers(make_config, tmp_path):
    port = free_port()
    cfg = make_config(redis=RedisConfig(url=f"redis://127.0.0.1:{port}/0", timeout=0.3))
    async with Sidecar(cfg) as sc, aiohttp.ClientSession() as s:
        text = await scrape(sc.http_url)
        assert value(text, "asynq_sidecar_redis_up") == 0
        assert value(text, "asynq_sidecar_redis_errors_total") >= 1
        assert value(text, "asynq_registry_entries", set="servers", state="live") is None  # no stale counts
        async with s.get(sc.http_url + "/readyz") as r:
            assert r.status == 503
        async with s.get(sc.http_url + "/healthz") as r:
            assert r.status == 200
        with RedisServer(port=port):
            async def recovered():
                t = await scrape(sc.http_url)
                return value(t, "asynq_sidecar_redis_up") == 1 and t
            text = await eventually(recovered, what="redis_up back to 1")
            assert value(text, "asynq_registry_entries", set="servers", state="live") == 0
            async with s.get(sc.http_url + "/readyz") as r:
                assert r.status == 200


def test_serve_process_stops_within_a_second_on_sigterm(redis_url, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "serve", "--redis-url", redis_url,
         "--listen", f"127.0.0.1:{port}", "--socket", str(tmp_path / "l.sock"), "--log-format", "json"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        import urllib.request

        def up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status == 200
            except OSError:
                return False

        wait_until(up, timeout=10, what="serve to answer /healthz")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 1.0
    finally:
        proc.kill()
        proc.wait()
    stderr = proc.stderr.read()
    assert '"message": "stopping"' in stderr


async def test_scrape_shows_exactly_what_emulated_asynq_servers_registered(ardb, make_config):
    """Servers registered by the emulator (asynq's heartbeat, byte for byte): three live, two
    whose last beat was long ago (killed: their ZSET members stay, their keys expired)."""
    from exporter.devtools.emulator import Emulator
    from exporter.settings import EmulatorConfig

    live = [Emulator(ardb, EmulatorConfig(host="pod-a", pid=i, server_id=f"live-{i}", concurrency=5 * i,
                                          tasks=i)) for i in (1, 2, 3)]
    dead = [Emulator(ardb, EmulatorConfig(host="pod-b", pid=i, server_id=f"dead-{i}"),
                     clock=lambda: time.time() - 120) for i in (1, 2)]
    for e in live + dead:
        await e.start()
    for e in dead:  # their per-server keys would have expired 110 s ago
        await ardb.delete(e.server_member.key, e.workers_member.key)
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: sc.watcher.latest, what="a details read")
        text = await scrape(sc.http_url)
    for set_name in ("servers", "workers"):
        assert value(text, "asynq_registry_entries", set=set_name, state="live") == 3
        assert value(text, "asynq_registry_entries", set=set_name, state="expired") == 2
    assert 109 <= value(text, "asynq_registry_oldest_expired_seconds", set="servers") <= 112
    assert value(text, "asynq_registry_servers", status="active") == 3
    assert value(text, "asynq_registry_concurrency") == 5 + 10 + 15
    assert value(text, "asynq_registry_active_tasks") == 1 + 2 + 3


async def test_server_status_label_values_stay_bounded(rdb, make_config):
    now = time.time()
    register_server(rdb, "a", 1, "s1", now + 10, status="active")
    for i in range(5):  # values asynq never writes must not each become a series
        register_server(rdb, "x", i, f"odd-{i}", now + 10, status=f"weird-{i}")
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: sc.watcher.latest, what="a details read")
        text = await scrape(sc.http_url)
    statuses = {labels[0][1] for (name, labels) in samples(text) if name == "asynq_registry_servers"}
    assert statuses == {"new", "active", "stopped", "closed", "unknown"}
    assert value(text, "asynq_registry_servers", status="unknown") == 5


async def test_one_sidecar_of_the_fleet_reads_the_details_and_the_others_share_them(rdb, make_config, tmp_path):
    from exporter.settings import SocketConfig

    now = time.time()
    for i in range(5):
        register_server(rdb, "a", i, f"s{i}", now + 10, concurrency=4, active=1)
    # A lease of 2.5 intervals: long enough that a busy machine does not hand it over mid-test.
    configs = [make_config(socket=SocketConfig(path=str(tmp_path / f"{i}.sock")), watch_interval=0.5)
               for i in range(3)]
    watched = [Watched() for _ in configs]
    async with Sidecar(configs[0], hooks=watched[0].hooks) as first, \
            Sidecar(configs[1], hooks=watched[1].hooks) as second, \
            Sidecar(configs[2], hooks=watched[2].hooks) as third:
        fleet = (first, second, third)
        await eventually(lambda: all(sc.watcher.latest for sc in fleet), what="details everywhere")
        leaders = [sc for sc in fleet if sc.watcher.leader]
        assert len(leaders) == 1
        reads_before = [w.full_reads for w in watched]
        lead = fleet.index(leaders[0])
        await eventually(lambda: watched[lead].full_reads >= reads_before[lead] + 2,
                         what="two more reads by the leader")
        for sc in fleet:
            text = await scrape(sc.http_url)
            assert value(text, "asynq_registry_concurrency") == 20
            assert value(text, "asynq_registry_active_tasks") == 5
            assert value(text, "asynq_registry_servers", status="active") == 5
            assert value(text, "asynq_sidecar_details_leader") == (1 if sc is leaders[0] else 0)
            assert value(text, "asynq_registry_snapshot_age_seconds") < 2
        for i, sc in enumerate(fleet):  # followers never made a full read after the first tick
            if sc is not leaders[0]:
                assert watched[i].full_reads == reads_before[i] <= 1
    # The leader stops: its exit hands the lease back and the other takes over the full read.
    successor_watched = Watched()
    successor = Sidecar(configs[1], hooks=successor_watched.hooks)
    async with Sidecar(configs[0]) as leader:
        await eventually(lambda: leader.watcher.leader, what="the first one to lead")
        await successor.__aenter__()
        try:
            await eventually(lambda: successor.watcher.latest, what="the follower's first read")
            assert not successor.watcher.leader
        except BaseException:
            await successor.__aexit__(None, None, None)
            raise
    try:
        await eventually(lambda: successor.watcher.leader, timeout=3, what="the other to take over")
        assert successor_watched.full_reads >= 1
    finally:
        await successor.__aexit__(None, None, None)


async def test_sharing_off_makes_every_sidecar_read_for_itself(rdb, make_config, tmp_path):
    from exporter.settings import SocketConfig

    register_server(rdb, "a", 1, "s", time.time() + 10)
    cfgs = [make_config(details_sharing=False, socket=SocketConfig(path=str(tmp_path / f"{i}.sock")))
            for i in range(2)]
    watched = [Watched(), Watched()]
    async with Sidecar(cfgs[0], hooks=watched[0].hooks), Sidecar(cfgs[1], hooks=watched[1].hooks):
        await eventually(lambda: watched[0].full_reads >= 2 and watched[1].full_reads >= 2,
                         what="both reading")
        assert not rdb.exists("asynq-sidecar:details")


async def test_the_full_read_in_pages_and_chunks_counts_every_server_once(rdb, ardb):
    from collections import Counter

    from exporter.registrations.details import read_details

    now = time.time()
    for i in range(23):
        register_server(rdb, "a", i, f"s{i}", now + 10, concurrency=2, active=1,
                        status="active" if i % 3 else "closed")
    rdb.set("asynq:servers:{a:5:s5}", b"\xff\xff")  # one undecodable value mid-chunk
    bad: Counter[str] = Counter()
    d = await read_details(ardb, now, lambda kind, key: bad.update([kind]), page=7, chunk=3)
    assert (d.servers, d.concurrency, d.active_tasks) == (22, 44, 22)
    assert d.by_status == {"active": 14, "closed": 8}
    assert bad == {"server_info": 1}


async def test_the_full_read_steps_aside_while_a_scrape_is_in_flight(rdb, ardb):
    from exporter.registrations.details import ScrapesFirst, read_details

    now = time.time()
    for i in range(12):
        register_server(rdb, "a", i, f"s{i}", now + 10, concurrency=1)
    gate = ScrapesFirst(limit=60.0)
    turns = 0

    async def turn() -> None:
        nonlocal turns
        turns += 1
        await gate.turn()

    with gate.scraping():
        read = asyncio.ensure_future(read_details(ardb, now, lambda kind: None, page=5, turn=turn))
        await eventually(lambda: turns == 1, what="the read's first step")
        for _ in range(50):  # the loop is free; the read still waits for the scrape to end
            await asyncio.sleep(0)
        assert (turns, read.done()) == (1, False)
    d = await asyncio.wait_for(read, 10)
    assert (d.servers, d.concurrency) == (12, 12)
    assert turns == 6  # after each of 3 pages' ZRANGE and each of their MGETs


async def test_a_client_that_never_stops_scraping_slows_the_read_but_cannot_stop_it(rdb, ardb):
    from exporter.registrations.details import ScrapesFirst, read_details

    now = time.time()
    for i in range(12):
        register_server(rdb, "a", i, f"s{i}", now + 10, concurrency=1)
    gate = ScrapesFirst(limit=0.01)
    with gate.scraping():
        d = await asyncio.wait_for(read_details(ardb, now, lambda kind: None, page=5, turn=gate.turn), 10)
    assert d.servers == 12
