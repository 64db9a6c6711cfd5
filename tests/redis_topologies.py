"""Real Redis deployments for tests: a TLS server, a Sentinel-managed master with a replica, and
a three-node Redis Cluster made with `redis-cli --cluster create`. Each runs as child processes
on free loopback ports in temporary directories, and is torn down by `close()`.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis as redis_sync
from redis.cluster import RedisCluster as SyncRedisCluster

from exporter.redis_server import RedisServer, RedisServerError, free_port
from tests.helpers import wait_until
from tests.pki import PKI


def free_port_pair() -> tuple[int, int]:
    """Two distinct free ports (a cluster node's client port and bus port)."""
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


class TLSRedis:
    """A redis-server with a TLS port that requires client certificates from `pki.ca`, and a
    plain port (on loopback) that tests use to arrange and inspect state."""

    def __init__(self, pki: PKI, extra_args: tuple[str, ...] = ()) -> None:
        self.tls_port = free_port()
        self.server = RedisServer(extra_args=(
            "--tls-port", str(self.tls_port),
            "--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key),
            "--tls-ca-cert-file", str(pki.ca.cert), "--tls-auth-clients", "yes",
            *extra_args))

    def start(self) -> TLSRedis:
        self.server.start()
        return self

    @property
    def plain_url(self) -> str:
        return self.server.url

    def tls_url(self, host: str = "localhost", user: str = "") -> str:
        return f"rediss://{user + '@' if user else ''}{host}:{self.tls_port}/0"

    def close(self) -> None:
        self.server.close()


class SentinelSetup:
    """A master, one replica and `sentinels` Sentinels watching them as `name` (quorum 1).

    `down_after_ms` is how long the master must be unreachable before a Sentinel fails over.
    """

    def __init__(self, name: str = "mymaster", sentinels: int = 1, down_after_ms: int = 500,
                 sentinel_password: str | None = None) -> None:
        self.name = name
        self.down_after_ms = down_after_ms
        self.sentinel_password = sentinel_password  # the Sentinels' requirepass
        self.binary = shutil.which("redis-sentinel") or ""
        # No diskless-sync delay: a replica is in sync in milliseconds, not after the default 5 s.
        fast_sync = ("--repl-diskless-sync-delay", "0")
        self.master = RedisServer(extra_args=fast_sync)
        self.replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(self.master.port), *fast_sync))
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.dir = Path(tempfile.mkdtemp(prefix="asynq-sidecar-sentinel-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def addresses(self) -> str:
        """The --redis-sentinel value."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def start(self) -> SentinelSetup:
        self.master.start()
        self.replica.start()
        wait_until(lambda: _info(self.replica.port, "replication").get("master_link_status") == "up",
                   timeout=10, what="the replica to sync with the master")
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 1\n"
                f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.name} 10000\n"
                + (f"requirepass {self.sentinel_password}\n" if self.sentinel_password else ""))
            self.procs.append(subprocess.Popen(
                [self.binary, str(conf), "--loglevel", "warning"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True))
        for port in self.sentinel_ports:
            wait_until(lambda port=port: self._knows_replica(port), timeout=15,
                       what=f"sentinel {port} to know the replica")
        return self

    def _knows_replica(self, port: int) -> bool:
        try:
            with self._sentinel(port) as s:
                replicas = s.sentinel_slaves(self.name)
        except redis_sync.RedisError:
            return False
        return any(not (r["is_sdown"] or r["is_odown"] or r.get("is_disconnected")) for r in replicas)

    def master_port(self) -> int:
        """The master's port as the first Sentinel sees it now."""
        with self._sentinel(self.sentinel_ports[0]) as s:
            _, port = s.sentinel_get_master_addr_by_name(self.name)
        return int(port)

    def wait_replicated(self) -> None:
        """Block until the replica has every write the master acknowledged so far."""
        with redis_sync.Redis(port=self.master_port(), socket_timeout=5) as m:
            assert m.wait(1, 5000) >= 1, "the replica did not acknowledge the writes"

    def failover(self) -> int:
        """SENTINEL FAILOVER; returns the new master's port once the Sentinels name it."""
        old = self.master_port()
        with self._sentinel(self.sentinel_ports[0]) as s:
            s.execute_command("SENTINEL", "FAILOVER", self.name)
        return self.wait_for_new_master(old)

    def wait_for_new_master(self, old: int, timeout: float = 20.0) -> int:
        def promoted() -> int | None:
            try:
                port = self.master_port()
            except redis_sync.RedisError:
                return None
            if port == old:
                return None
            return port if _info(port, "replication").get("role") == "master" else None

        return wait_until(promoted, timeout=timeout, interval=0.05, what="a new master")

    def _sentinel(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(port=port, password=self.sentinel_password, socket_timeout=2)

    def client_of(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(port=port, socket_timeout=5)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self.master.close()
        self.replica.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ClusterSetup:
    """Three masters, no replicas, all 16384 slots covered, created by `redis-cli --cluster create`."""

    def __init__(self, redis_cli: str, nodes: int = 3) -> None:
        self.redis_cli = redis_cli
        self.nodes: list[RedisServer] = []
        for _ in range(nodes):
            port, bus = free_port_pair()
            self.nodes.append(RedisServer(port=port, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus), "--cluster-node-timeout", "2000")))

    @property
    def url(self) -> str:
        """--redis-url for the sidecar: one node; the client discovers the others."""
        return self.nodes[0].url

    def start(self) -> ClusterSetup:
        for node in self.nodes:
            node.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        proc = subprocess.run([self.redis_cli, "--cluster", "create", *addrs, "--cluster-replicas", "0",
                               "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed: {proc.stdout[-500:]} {proc.stderr}")
        for node in self.nodes:
            wait_until(lambda node=node: _info_cluster(node.port), timeout=15,
                       what=f"cluster node {node.port} to see every slot covered")
        return self

    def client(self) -> SyncRedisCluster:
        return SyncRedisCluster.from_url(self.url, socket_timeout=5)

    def node_of(self, key: str) -> int:
        """The port of the node that holds `key`'s slot."""
        with redis_sync.Redis(port=self.nodes[0].port) as r:
            slot = r.cluster("keyslot", key)
            for start, end, (host, port, *_), *_ in r.cluster("slots"):
                if start <= slot <= end:
                    return int(port)
        raise AssertionError(f"no node serves {key}")

    def flushall(self) -> None:
        for node in self.nodes:
            with redis_sync.Redis(port=node.port) as r:
                r.flushall()

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _info(port: int, section: str) -> dict:
    try:
        with redis_sync.Redis(port=port, socket_timeout=1) as r:
            return r.info(section)
    except redis_sync.RedisError:
        return {}


def _info_cluster(port: int) -> bool:
    try:
        with redis_sync.Redis(port=port, socket_timeout=1) as r:
            info = r.cluster("info")
    except redis_sync.RedisError:
        return False
    return info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == 16384 \
        and int(info.get("cluster_known_nodes", 0)) >= 3

