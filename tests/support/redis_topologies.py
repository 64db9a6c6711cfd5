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

from exporter.devtools.redis_server import RedisServer, RedisServerError, free_port
from tests.support.helpers import wait_until
from tests.support.pki import PKI


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
    With `tls`, the master, the replica and the Sentinels also listen with TLS (client
    certificates from `tls.ca` required), replicate and monitor over it, and report the TLS
    ports; `sentinel_ports` are then their TLS ports. Tests arrange and check state through
    the plain ports (`client_of` maps a reported port to its plain one).
    """

    def __init__(self, name: str = "mymaster", sentinels: int = 1, down_after_ms: int = 500,
                 sentinel_password: str | None = None, tls: PKI | None = None) -> None:
        self.name = name
        self.down_after_ms = down_after_ms
        self.sentinel_password = sentinel_password  # the Sentinels' requirepass
        self.tls = tls
        self.binary = shutil.which("redis-sentinel") or ""
        # No diskless-sync delay: a replica is in sync in milliseconds, not after the default 5 s.
        fast_sync = ("--repl-diskless-sync-delay", "0")
        self.plain: dict[int, int] = {}  # a port that the Sentinels report -> the plain port
        master_tls, replica_tls = (), ()
        if tls is not None:
            master_tls, replica_tls = self._tls_args(free_port()), self._tls_args(free_port())
        self.master = RedisServer(extra_args=(*fast_sync, *master_tls))
        self.monitored = int(master_tls[1]) if master_tls else self.master.port
        self.replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(self.monitored),
                                               *fast_sync, *replica_tls))
        for server, args in ((self.master, master_tls), (self.replica, replica_tls)):
            self.plain[server.port] = server.port
            if args:
                self.plain[int(args[1])] = server.port
        self.sentinel_plain_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_ports = ([free_port() for _ in range(sentinels)] if tls is not None
                               else list(self.sentinel_plain_ports))
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
        for port, tls_port in zip(self.sentinel_plain_ports, self.sentinel_ports, strict=False):
            conf = self.dir / f"sentinel-{port}.conf"
            tls_conf = ""
            if self.tls is not None:
                args = self._tls_args(tls_port)
                tls_conf = "".join(f"{args[i][2:]} {args[i + 1]}\n" for i in range(0, len(args), 2))
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n{tls_conf}"
                f"sentinel monitor {self.name} 127.0.0.1 {self.monitored} 1\n"
                f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.name} 10000\n"
                + (f"requirepass {self.sentinel_password}\n" if self.sentinel_password else ""))
            self.procs.append(subprocess.Popen(
                [self.binary, str(conf), "--loglevel", "warning"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True))
        for port in self.sentinel_plain_ports:
            wait_until(lambda port=port: self._knows_replica(port), timeout=15,
                       what=f"sentinel {port} to know the replica")
        return self

    def _tls_args(self, tls_port: int) -> tuple[str, ...]:
        assert self.tls is not None
        return ("--tls-port", str(tls_port), "--tls-cert-file", str(self.tls.server.cert),
                "--tls-key-file", str(self.tls.server.key), "--tls-ca-cert-file", str(self.tls.ca.cert),
                "--tls-replication", "yes")

    def _knows_replica(self, port: int) -> bool:
        try:
            with self._sentinel(port) as s:
                replicas = s.sentinel_slaves(self.name)
        except redis_sync.RedisError:
            return False
        return any(not (r["is_sdown"] or r["is_odown"] or r.get("is_disconnected")) for r in replicas)

    def master_port(self) -> int:
        """The master's port as the first Sentinel sees it now."""
        with self._sentinel(self.sentinel_plain_ports[0]) as s:
            _, port = s.sentinel_get_master_addr_by_name(self.name)
        return int(port)

    def wait_replicated(self) -> None:
        """Block until the replica has every write the master acknowledged so far."""
        with self.client_of(self.master_port()) as m:
            assert m.wait(1, 5000) >= 1, "the replica did not acknowledge the writes"

    def failover(self) -> int:
        """SENTINEL FAILOVER; returns the new master's port once the Sentinels name it."""
        old = self.master_port()
        with self._sentinel(self.sentinel_plain_ports[0]) as s:
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
            return port if _info(self.plain.get(port, port), "replication").get("role") == "master" else None

        return wait_until(promoted, timeout=timeout, interval=0.05, what="a new master")

    def _sentinel(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(port=port, password=self.sentinel_password, socket_timeout=2)

    def client_of(self, port: int) -> redis_sync.Redis:
        """A plain client of the server that the Sentinels report at `port`."""
        return redis_sync.Redis(port=self.plain.get(port, port), socket_timeout=5)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self.master.close()
        self.replica.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ClusterSetup:
    """Three masters, no replicas, all 16384 slots covered, created by `redis-cli --cluster create`.

    With `tls`, clients and the cluster bus use TLS (client certificates from `tls.ca`
    required), the cluster reports TLS ports, and `url` is a rediss:// URL; each node keeps a
    plain port too, which `flushall` and `node_of` use.
    """

    def __init__(self, redis_cli: str, nodes: int = 3, tls: PKI | None = None) -> None:
        self.redis_cli = redis_cli
        self.tls = tls
        self.nodes: list[RedisServer] = []
        self.tls_ports: list[int] = []
        for _ in range(nodes):
            port, bus = free_port_pair()
            tls_args: tuple[str, ...] = ()
            if tls is not None:
                self.tls_ports.append(free_port())
                tls_args = ("--tls-port", str(self.tls_ports[-1]), "--tls-cert-file", str(tls.server.cert),
                            "--tls-key-file", str(tls.server.key), "--tls-ca-cert-file", str(tls.ca.cert),
                            "--tls-cluster", "yes", "--tls-replication", "yes")
            self.nodes.append(RedisServer(port=port, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus), "--cluster-node-timeout", "2000", *tls_args)))

    @property
    def url(self) -> str:
        """--redis-url for the sidecar: one node; the client discovers the others."""
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.tls_ports[0]}/0"
        return self.nodes[0].url

    def tls_kwargs(self) -> dict[str, str]:
        assert self.tls is not None
        return {"ssl_ca_certs": str(self.tls.ca.cert), "ssl_certfile": str(self.tls.client.cert),
                "ssl_keyfile": str(self.tls.client.key)}

    def start(self) -> ClusterSetup:
        for node in self.nodes:
            node.start()
        if self.tls is not None:
            addrs = [f"127.0.0.1:{p}" for p in self.tls_ports]
            tls = ["--tls", "--cacert", str(self.tls.ca.cert), "--cert", str(self.tls.client.cert),
                   "--key", str(self.tls.client.key)]
        else:
            addrs, tls = [f"127.0.0.1:{n.port}" for n in self.nodes], []
        proc = subprocess.run([self.redis_cli, *tls, "--cluster", "create", *addrs, "--cluster-replicas", "0",
                               "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed: {proc.stdout[-500:]} {proc.stderr}")
        for node in self.nodes:
            wait_until(lambda node=node: _info_cluster(node.port), timeout=15,
                       what=f"cluster node {node.port} to see every slot covered")
        return self

    def client(self) -> SyncRedisCluster:
        return SyncRedisCluster.from_url(self.url, socket_timeout=5,
                                         **(self.tls_kwargs() if self.tls is not None else {}))

    def node_of(self, key: str) -> int:
        """The port of the node that holds `key`'s slot."""
        with redis_sync.Redis(port=self.nodes[0].port) as r:
            slot = r.cluster("keyslot", key)
            for start, end, (_host, port, *_), *_ in r.cluster("slots"):
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

