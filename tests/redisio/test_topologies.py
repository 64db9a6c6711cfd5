"""Redis as teams run it, each against real local servers: TLS with client certificates, an ACL
user whose password comes from a file (and never shows), a master found through Sentinel
(including failovers during a cleanup) and a three-node Redis Cluster.

Every deployment gets the same exercise: the scrape's counts pipeline, the details watcher,
a dead worker's cleanup, `audit`, the emulator and `sweep`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import redis as redis_sync
import redis.cluster

from exporter.asynq import model as asynq
from exporter.cleanup.sweep import Sweeper
from exporter.devtools.emulator import Emulator
from exporter.devtools.redis_server import RedisServerError, free_port
from exporter.lifecycle.tracker import Disconnected, Exited, Hello, State
from exporter.redisio.connect import connect
from exporter.redisio.health import RedisHealth
from exporter.registrations.audit import read_report
from exporter.server.sidecar import Sidecar
from exporter.settings import CleanupConfig, EmulatorConfig, RedisConfig
from tests.support.helpers import eventually, register_server, scrape, value, wait_until
from tests.support.pki import PKI
from tests.support.redis_topologies import ClusterSetup, SentinelSetup, TLSRedis
from tests.support.tools import IN_CI, require_tool

#: A worker shares its pod's host name with the sidecar (the sidecar cleans up nothing for another host).
HOST = socket.gethostname()

#: The ACL that docs/redis-topologies.md recommends, less the password (Redis Cluster adds
#: +cluster|slots). Every test below that logs in as a user gives it exactly these rules.
SIDECAR_ACL = ("on", "resetkeys", "~asynq:servers*", "~asynq:workers*", "~asynq:schedulers*",
               "~asynq-sidecar:*", "~asynq:queues", "~asynq:{*}:active", "~asynq:{*}:lease",
               "resetchannels", "-@all", "+@read", "+@write", "+@scripting", "+@connection",
               "-@dangerous", "+time")
USER = "asynq-sidecar"


def add_acl_user(client: redis_sync.Redis, password: str, *extra: str, user: str = USER) -> None:
    client.execute_command("ACL", "SETUSER", user, "reset", *SIDECAR_ACL, *extra, f">{password}")


def gone(client, m: asynq.Member) -> bool:
    w = m.sibling("workers")
    return (client.zscore(asynq.SERVERS, m.key) is None and client.zscore(asynq.WORKERS, w.key) is None
            and not client.exists(m.key) and not client.exists(w.key))


def metric(sc: Sidecar, name: str, **labels: str) -> float:
    v = sc.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


async def start_worker(sc: Sidecar, client, pid: int, sid: str, host: str = HOST,
                       expires_in: float = 10) -> tuple[int, asynq.Member]:
    """A worker says hello and registers; wait until the sidecar has seen it running."""
    conn = sc.new_conn_id()
    sc.submit(Hello(conn, pid=pid, host=host, started_at=time.time()))
    m = register_server(client, host, pid, sid, time.time() + expires_in)
    await eventually(lambda: conn in sc.tracker.workers and sc.tracker.workers[conn].state is State.RUNNING,
                     what="the worker to be running via its registration")
    return conn, m


def in_flight(client, m: asynq.Member, queue: str, task_id: str) -> None:
    """A task that the server `m` runs, as asynq's dequeue and heartbeat leave it."""
    info = asynq.WorkerInfo(host=m.host, pid=m.pid, server_id=m.ident, task_id=task_id, task_type="t",
                            queue=queue, start_time=time.time(), deadline=None)
    client.hset(m.sibling("workers").key, task_id, asynq.encode_worker_info(info))
    client.lpush(f"asynq:{{{queue}}}:active", task_id)
    client.zadd(f"asynq:{{{queue}}}:lease", {task_id: int(time.time()) + 30})


async def exercise(redis_cfg: RedisConfig, client, make_config, *, fleet: int = 12) -> None:
    """Everything the sidecar does with Redis, on one deployment; `client` arranges and checks."""
    now = time.time()
    live = [register_server(client, f"live-{i}", 1, f"id-{i}", now + 10, concurrency=3, active=1)
            for i in range(fleet)]  # per-server keys in many slots: on every node of a cluster
    leaked = register_server(client, "dead-pod", 1, "gone", now - 300, with_keys=False)
    # Stale tasks in two queues (two hash tags: two slots on a cluster).
    client.sadd("asynq:queues", "q1", "q2")
    client.lpush("asynq:{q1}:active", "orphan-1")
    client.lpush("asynq:{q2}:active", "expired-1")
    client.zadd("asynq:{q2}:lease", {"expired-1": int(now) - 50})

    cleanup = CleanupConfig(host_pids_unique=True, recover_tasks="on")
    async with Sidecar(make_config(redis=redis_cfg, cleanup=cleanup)) as sc:
        sc.task_recovery.orphan_confirm_after = 0.3
        await eventually(lambda: sc.watcher.latest, what="a details read")
        text = await scrape(sc.http_url)
        assert value(text, "asynq_queue_active_tasks", queue="q1") == 1
        assert value(text, "asynq_queue_lease_expired_tasks", queue="q2") == 1
        assert value(text, "asynq_sidecar_redis_up") == 1
        for set_name in ("servers", "workers"):
            assert value(text, "asynq_registry_entries", set=set_name, state="live") == fleet
            assert value(text, "asynq_registry_entries", set=set_name, state="expired") == 1
        assert value(text, "asynq_registry_concurrency") == 3 * fleet  # every slot: pipelined GETs on a cluster
        assert value(text, "asynq_registry_active_tasks") == fleet

        conn, dying = await start_worker(sc, client, 42, "dying")
        in_flight(client, dying, "q1", "running-1")
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone(client, dying), what="the dead worker's registration removed")
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1
        await eventually(lambda: metric(sc, "asynq_sidecar_tasks_recovered_total", reason="worker_death") == 1,
                         what="its task handed to asynq's recoverer")
        await eventually(lambda: metric(sc, "asynq_sidecar_tasks_recovered_total", reason="orphan") == 1,
                         what="the orphan repaired by the details leader")
        assert client.zscore("asynq:{q1}:lease", "running-1") < client.time()[0] - 60
        assert client.zscore("asynq:{q1}:lease", "orphan-1") < client.time()[0] - 60
        assert metric(sc, "asynq_sidecar_cleanups_pending") == 0
    assert all(client.zscore(asynq.SERVERS, m.key) is not None for m in live)  # never a live one

    redis = connect(redis_cfg)
    try:
        report = await read_report(redis, time.time(), redis_cfg.display_url)
        states = {(r.set, r.host, r.state) for r in report.registrations}
        assert ("servers", "dead-pod", "expired") in states and ("servers", "live-0", "live") in states
        assert report.counts()["servers"] == {"live": fleet, "expired": 1}
        assert sum(1 for r in report.registrations if r.status == "active" and r.set == "servers") == fleet

        emulator = Emulator(redis, EmulatorConfig("emu-pod", 7, "emu", tasks=2, drain=0.0))
        await emulator.start()
        assert client.zscore(asynq.SERVERS, emulator.server_member.key) is not None
        assert client.hlen(emulator.workers_member.key) == 2
        assert await emulator.shutdown()  # drains, then ClearServerState
        assert gone(client, emulator.server_member)

        swept = await Sweeper(redis, RedisHealth(redis_cfg.display_url), grace=60).sweep_once()
        assert [r.member for r in swept.sets["servers"].members] == [leaked.key]
        assert gone(client, leaked)
        assert all(client.zscore(asynq.SERVERS, m.key) is not None for m in live)
    finally:
        await redis.aclose()


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(("args", "needle"), [
    (["--redis-tls-ca-file", "/etc/hostname"], "--redis-tls-ca-file needs TLS: give --redis-url with scheme rediss://"),
    (["--redis-url", "rediss://r:6380/0", "--redis-tls-cert-file", "/etc/hostname"],
     "--redis-tls-cert-file and --redis-tls-key-file go together"),
    (["--redis-sentinel", "s1:26379"], "--redis-sentinel and --redis-sentinel-master go together"),
    (["--redis-sentinel", "s1:26379,nope", "--redis-sentinel-master", "m"],
     "--redis-sentinel: invalid value 's1:26379,nope': expected HOST:PORT[,HOST:PORT...]"),
    (["--redis-sentinel-password-file", "/etc/hostname"], "--redis-sentinel-password-file needs --redis-sentinel"),
    (["--redis-cluster", "--redis-sentinel", "s:1", "--redis-sentinel-master", "m"], "exclude each other"),
    (["--redis-cluster", "--redis-url", "redis://r:6379/3"], "Redis Cluster has database 0 only"),
    (["--redis-cluster", "--redis-url", "unix:///run/redis.sock"], "a unix:// socket cannot be used"),
    (["--redis-tls-key-file", "/nonexistent"], "--redis-tls-key-file: invalid value '/nonexistent': cannot read it"),
])
def test_redis_options_that_do_not_go_together_exit_2(args, needle):
    proc = subprocess.run([sys.executable, "-m", "exporter", "audit", *args], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr


def test_display_url_and_repr_never_show_a_secret():
    cfg = RedisConfig(url="rediss://u:inurl@r:6380/2", password="filepw", sentinel_password="sentpw",
                      sentinels=(("s1", 26379), ("s2", 26379)), sentinel_master="mymaster")
    assert cfg.display_url == "rediss+sentinel://u@s1:26379,s2:26379/mymaster/2"
    cluster = RedisConfig(url="redis://u:inurl@r:7000/0", cluster=True)
    assert cluster.display_url == "redis://u:***@r:7000/0 (cluster)"
    for text in (repr(cfg), cfg.display_url, repr(cluster), cluster.display_url):
        assert "inurl" not in text and "filepw" not in text and "sentpw" not in text


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_redis(pki):  # noqa: F811 - pytest fixture argument
    server = TLSRedis(pki)
    try:
        server.start()
    except RedisServerError as e:
        if "tls" not in str(e).lower():
            raise
        if IN_CI:
            pytest.fail(f"this redis-server has no TLS support: {e}")
        pytest.skip(f"this redis-server has no TLS support: {e}")
    yield server
    server.close()


@pytest.fixture
def tls_client(tls_redis):
    client = redis_sync.Redis.from_url(tls_redis.plain_url)
    client.flushall()
    yield client
    client.close()


def tls_config(tls: TLSRedis, pki: PKI, password: str, **overrides) -> RedisConfig:  # noqa: F811
    values = dict(url=tls.tls_url(user=USER), password=password, timeout=2.0,
                  tls_ca_file=str(pki.ca.cert), tls_cert_file=str(pki.client.cert),
                  tls_key_file=str(pki.client.key))
    values.update(overrides)
    return RedisConfig(**values)


async def test_tls_with_a_client_certificate_and_an_acl_user(tls_redis, tls_client, pki, make_config):  # noqa: F811
    password = secrets.token_urlsafe(16)
    add_acl_user(tls_client, password)
    await exercise(tls_config(tls_redis, pki, password), tls_client, make_config)
    users = {c["user"] for c in tls_client.client_list() if c.get("name") == "asynq-sidecar"}
    assert users <= {USER}


@pytest.mark.parametrize("what", ["no client certificate", "a CA that did not sign the server",
                                  "a certificate from another CA", "a wrong password"])
async def test_tls_refusals_show_as_redis_down_and_never_show_the_password(
        what, tls_redis, tls_client, pki, make_config, caplog):  # noqa: F811
    password = secrets.token_urlsafe(16)
    add_acl_user(tls_client, password)
    cfg = {
        "no client certificate": dict(tls_cert_file=None, tls_key_file=None),
        "a CA that did not sign the server": dict(tls_ca_file=str(pki.stranger_ca.cert)),
        "a certificate from another CA": dict(tls_cert_file=str(pki.stranger.cert),
                                              tls_key_file=str(pki.stranger.key)),
        "a wrong password": {},
    }[what]
    given = "not-" + password if what == "a wrong password" else password
    async with Sidecar(make_config(redis=tls_config(tls_redis, pki, given, timeout=1.0, **cfg))) as sc:
        text = await scrape(sc.http_url)
        assert value(text, "asynq_sidecar_redis_up") == 0
        assert value(text, "asynq_sidecar_redis_errors_total") >= 1
    assert "Redis down" in caplog.text
    assert password not in caplog.text and password not in text


async def test_insecure_skip_verify_connects_without_the_ca(tls_redis, tls_client, pki, make_config):  # noqa: F811
    password = secrets.token_urlsafe(16)
    add_acl_user(tls_client, password)
    # The system's CAs do not know our test CA: verification fails unless it is skipped.
    for skip, up in ((False, 0), (True, 1)):
        cfg = tls_config(tls_redis, pki, password, tls_ca_file=None, tls_insecure_skip_verify=skip, timeout=1.0)
        async with Sidecar(make_config(redis=cfg)) as sc:
            assert value(await scrape(sc.http_url), "asynq_sidecar_redis_up") == up


# ---------------------------------------------------------------- ACL and the password file


@pytest.mark.parametrize("given", ["file", "url-query"])
def test_the_password_never_shows_in_argv_environment_logs_metrics_or_audit(redis_server, tmp_path, given):
    """From --redis-password-file, or in the URL's query string (redis-py reads ?password=): in
    neither case does it show in the logs, /metrics, audit, sweep's JSON or an error; from a file
    it is not in argv or the environment either."""
    admin = redis_sync.Redis.from_url(redis_server.url)
    user = f"leak-test-{secrets.token_hex(4)}"
    password = "pw-" + secrets.token_hex(12)
    add_acl_user(admin, password, user=user)
    admin.flushall()
    register_server(admin, "dead-pod", 1, "gone", time.time() - 300, with_keys=False)
    pw_file = tmp_path / "redis-password"
    pw_file.write_text(password + "\n")
    wrong_file = tmp_path / "wrong-password"
    wrong_file.write_text("wrong-" + password + "\n")
    base = f"redis://{user}@127.0.0.1:{redis_server.port}/0"
    if given == "file":
        url, auth, wrong = base, ["--redis-password-file", str(pw_file)], [base, "--redis-password-file", str(wrong_file)]
    else:
        url, auth, wrong = f"{base}?password={password}", [], [f"{base}?password=wrong-{password}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    seen: dict[str, str] = {}
    try:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "serve", "--redis-url", url, *auth,
             "--listen", f"127.0.0.1:{port}", "--socket", str(tmp_path / "l.sock"),
             "--log-level", "debug"], stderr=subprocess.PIPE, text=True, env=env)
        try:
            def metrics() -> str | None:
                try:
                    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
                except OSError:
                    return None
                return body if "asynq_sidecar_redis_up 1.0" in body else None

            seen["/metrics"] = wait_until(metrics, timeout=10, what="serve to log in and scrape")
            if given == "file":
                with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                    seen["argv"] = f.read().decode(errors="replace")
                with open(f"/proc/{proc.pid}/environ", "rb") as f:
                    seen["environment"] = f.read().decode(errors="replace")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        finally:
            proc.kill()
            seen["serve log"] = proc.communicate()[1]
        for name, args in {"audit": ["audit"], "audit --json": ["audit", "--json"],
                           "sweep --json": ["sweep", "--dry-run", "--json"]}.items():
            out = subprocess.run([sys.executable, "-m", "exporter", *args, "--redis-url", url, *auth],
                                 capture_output=True, text=True, env=env, timeout=30)
            assert out.returncode in (0, 1), out.stderr  # it logged in
            seen[name] = out.stdout + out.stderr
        refused = subprocess.run([sys.executable, "-m", "exporter", "audit", "--redis-url", *wrong],
                                 capture_output=True, text=True, env=env, timeout=30)
        assert refused.returncode == 2 and "cannot read Redis" in refused.stderr
        seen["refused audit"] = refused.stdout + refused.stderr
        bad = subprocess.run([sys.executable, "-m", "exporter", "audit", "--redis-url",
                              url.replace(str(redis_server.port), "99999")],
                             capture_output=True, text=True, env=env, timeout=30)
        assert bad.returncode == 2 and "--redis-url" in bad.stderr
        seen["bad flag"] = bad.stdout + bad.stderr
    finally:
        admin.acl_deluser(user)
        admin.close()
    assert "dead-pod" in seen["audit"] and '"redis_url"' in seen["audit --json"]
    assert '"redis_url"' in seen["sweep --json"]
    for where, text in seen.items():
        assert password not in text, f"the password shows in {where}"


# ---------------------------------------------------------------- Sentinel


@pytest.fixture
def sentinel():
    require_tool("redis-sentinel")
    setup = SentinelSetup(sentinel_password="sentinel-" + secrets.token_hex(6)).start()
    yield setup
    setup.close()


def sentinel_config(setup: SentinelSetup, **overrides) -> RedisConfig:
    # A Sentinel that is down comes first: the client must move on to the next one.
    values = dict(url="redis://ignored:6379/0", timeout=1.0,
                  sentinels=(("127.0.0.1", free_port()),
                             *(("127.0.0.1", p) for p in setup.sentinel_ports)),
                  sentinel_master=setup.name, sentinel_password=setup.sentinel_password)
    values.update(overrides)
    return RedisConfig(**values)


async def test_sentinel_finds_the_master(sentinel, make_config):
    client = sentinel.client_of(sentinel.master_port())
    await exercise(sentinel_config(sentinel), client, make_config)
    client.close()


async def test_sentinel_over_tls_with_client_certificates(pki, make_config):  # noqa: F811
    """Sentinels, master and replica all speak TLS and require client certificates; the
    Sentinels report the TLS ports, and the sidecar speaks TLS to both."""
    require_tool("redis-sentinel")
    setup = SentinelSetup(tls=pki).start()
    client = setup.client_of(setup.master_port())
    try:
        cfg = sentinel_config(setup, url="rediss://ignored:6380/0", sentinel_password=None,
                              tls_ca_file=str(pki.ca.cert), tls_cert_file=str(pki.client.cert),
                              tls_key_file=str(pki.client.key))
        await exercise(cfg, client, make_config)
    finally:
        client.close()
        setup.close()


async def test_a_cleanup_pending_while_the_master_is_dead_completes_on_the_promoted_replica(
        sentinel, make_config):
    old = sentinel.master_port()
    master = sentinel.client_of(old)
    bystander = register_server(master, "live-pod", 1, "beating", time.time() + 120)
    async with Sidecar(make_config(redis=sentinel_config(sentinel))) as sc:
        conn, m = await start_worker(sc, master, 7, "doomed")
        sentinel.wait_replicated()
        sentinel.master.stop()  # SIGKILL: the master is gone, the Sentinel will promote the replica
        sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: metric(sc, "asynq_sidecar_cleanups_pending") == 1,
                         what="the cleanup to wait for Redis")
        new = await asyncio.to_thread(sentinel.wait_for_new_master, old)
        promoted = sentinel.client_of(new)
        await eventually(lambda: gone(promoted, m), timeout=15, what="the cleanup done on the new master")
        assert metric(sc, "asynq_sidecar_cleanups_pending") == 0
        assert metric(sc, "asynq_sidecar_cleanup_errors_total") >= 1
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1
    assert promoted.zscore(asynq.SERVERS, bystander.key) is not None
    promoted.close()
    master.close()


async def test_a_sentinel_failover_while_a_cleanup_waits_for_the_expiry(sentinel, make_config):
    """A lost connection: the cleanup reads the scores on the old master, waits for the expiry
    plus `settle` by Redis's clock, and must check again and remove on the new one, SENTINEL
    FAILOVER having happened meanwhile."""
    old = sentinel.master_port()
    master = sentinel.client_of(old)
    settle = 2.0
    cfg = make_config(redis=sentinel_config(sentinel), cleanup=CleanupConfig(settle=settle))
    async with Sidecar(cfg) as sc:
        conn, m = await start_worker(sc, master, 8, "lost", expires_in=2)
        sentinel.wait_replicated()
        sc.submit(Disconnected(conn))
        await eventually(lambda: conn not in sc.tracker.workers, what="the loss to be applied")
        new = await asyncio.to_thread(sentinel.failover)
        assert new != old
        promoted = sentinel.client_of(new)
        seconds, micros = promoted.time()
        expiry = promoted.zscore(asynq.SERVERS, m.key)
        assert expiry is not None, "replicated, not yet removed"
        assert seconds + micros / 1e6 < expiry + settle, "the failover took longer than expiry + settle"
        await eventually(lambda: gone(promoted, m), timeout=15, what="the cleanup done on the new master")
        assert metric(sc, "asynq_sidecar_registrations_removed_total", reason="worker_exit") == 1
    promoted.close()
    master.close()


# ---------------------------------------------------------------- Cluster


@pytest.fixture(scope="module")
def cluster(pki):  # noqa: F811 - pytest fixture argument
    """One cluster for both tests: Redis 7 reports plain ports to plain connections and TLS
    ports to TLS ones, so it serves redis:// and rediss:// clients alike."""
    setup = ClusterSetup(require_tool("redis-cli"), tls=pki).start()
    yield setup
    setup.close()


def cluster_acl_user(cluster: ClusterSetup) -> str:
    cluster.flushall()
    password = secrets.token_urlsafe(16)
    for node in cluster.nodes:  # ACLs are per node; a cluster does not propagate them
        with redis_sync.Redis(port=node.port) as r:
            add_acl_user(r, password, "+cluster|slots")
    return password


async def test_cluster_with_an_acl_user(cluster, make_config):
    password = cluster_acl_user(cluster)
    slots = {cluster.node_of(k) for k in (asynq.SERVERS, asynq.WORKERS, asynq.SCHEDULERS)}
    assert len(slots) == 3  # the three sets live on three different nodes
    client = redis_sync.cluster.RedisCluster.from_url(cluster.nodes[0].url, socket_timeout=5)
    try:
        cfg = RedisConfig(url=cluster.nodes[0].url.replace("redis://", f"redis://{USER}@"),
                          password=password, timeout=2.0, cluster=True)
        await exercise(cfg, client, make_config)
    finally:
        client.close()


async def test_cluster_over_tls_with_client_certificates(cluster, pki, make_config):  # noqa: F811
    password = cluster_acl_user(cluster)
    client = cluster.client()  # TLS too
    try:
        cfg = RedisConfig(url=cluster.url.replace("rediss://", f"rediss://{USER}@"), password=password,
                          timeout=2.0, cluster=True, tls_ca_file=str(pki.ca.cert),
                          tls_cert_file=str(pki.client.cert), tls_key_file=str(pki.client.key))
        await exercise(cfg, client, make_config)
    finally:
        client.close()


# ---------------------------------------------------------------- a removal that a failover undoes


async def test_a_removal_undone_by_a_failover_is_redone_but_a_live_one_is_not(rdb, make_config):
    """Replication is asynchronous: a master that acknowledged a removal and was then replaced
    took the write with it, and the registration is back as it was. It is read back later and
    removed again; one that beat since (a live server) is left alone."""
    async with Sidecar(make_config(cleanup=CleanupConfig(host_pids_unique=True))) as sc:
        sc.cleanup.confirmations.after = 2.0  # after the exits' cleanups have stopped looking
        lost_conn, lost = await start_worker(sc, rdb, 11, "lost-write")
        kept_conn, kept = await start_worker(sc, rdb, 12, "beats-again")
        scores = {m.key: rdb.zscore(asynq.SERVERS, m.key) for m in (lost, kept)}
        for conn in (lost_conn, kept_conn):
            sc.submit(Exited(conn, signal="SIGKILL"))
        await eventually(lambda: gone(rdb, lost) and gone(rdb, kept), what="both removed")
        await eventually(lambda: sc.cleanup.idle, what="the exits' cleanups done")
        # The failover: the new master never saw the removals.
        register_server(rdb, HOST, 11, "lost-write", scores[lost.key])
        register_server(rdb, HOST, 12, "beats-again", scores[kept.key] + 5)  # a later beat
        await eventually(lambda: gone(rdb, lost), what="the undone removal redone")
        await eventually(lambda: not any(t.get_name().startswith("confirm-") for t in sc._tasks),
                         what="both confirmations done")
        assert rdb.zscore(asynq.SERVERS, kept.key) == scores[kept.key] + 5
