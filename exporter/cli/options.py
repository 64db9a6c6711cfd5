"""Every option of every command, in one table.

Each option has a flag and an `ASYNQ_SIDECAR_*` environment variable (the flag wins). A value
is validated once, by `resolve`; a bad one is reported with the flag or variable, the value and
what is accepted, and the command exits 2. Defaults come from the typed settings
(`exporter.settings`), where each is written once. docs/configuration.md is generated from this
table (`python -m exporter.cli.docs`) and a test keeps the two in sync.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from exporter.cli.parsers import (
    ConfigError,
    boolean,
    file_mode,
    int_between,
    nonempty,
    one_of,
    parse_listen,
    parse_redis_url,
    parse_sentinels,
    positive_int,
    positive_seconds,
    readable_file,
    seconds_or_zero,
    uid_list,
    web_config_file,
)
from exporter.settings import (
    DEFAULT_LISTEN,
    CleanupConfig,
    LogConfig,
    RedisConfig,
    ServeConfig,
    SocketConfig,
    SweepConfig,
    mask_url,
)

ENV_PREFIX = "ASYNQ_SIDECAR_"



@dataclass(frozen=True)
class Option:
    name: str  # the flag without its dashes
    parse: Callable[[str], Any]
    default: Any  # a value, or a callable returning one (computed when resolved)
    help: str
    metavar: str = "VALUE"
    switch: bool = False  # a flag that takes no value (store_true)

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


def this_host() -> str:
    return socket.gethostname()


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        # Redis
        Option("redis-url", parse_redis_url, RedisConfig.url,
               "Redis of the Asynq deployment (redis://, rediss:// or unix://). A password may be "
               "in the URL; it is never printed.", "URL"),
        Option("redis-password-file", readable_file, None,
               "Read the Redis password from this file (overrides one in the URL). Keeps it out of "
               "argv and the environment.", "PATH"),
        Option("redis-timeout", positive_seconds, RedisConfig.timeout,
               "Timeout of one Redis operation, in seconds.", "SECONDS"),
        Option("redis-username", nonempty, None,
               "Redis ACL user (overrides one in the URL); its password comes from "
               "--redis-password-file.", "NAME"),
        Option("redis-tls-ca-file", readable_file, None,
               "PEM CA certificate(s) that Redis's certificate must chain to (rediss:// only). "
               "Default: the system's CAs.", "PATH"),
        Option("redis-tls-cert-file", readable_file, None,
               "PEM client certificate, for a Redis with tls-auth-clients (rediss:// only; needs "
               "--redis-tls-key-file).", "PATH"),
        Option("redis-tls-key-file", readable_file, None,
               "PEM private key of --redis-tls-cert-file.", "PATH"),
        Option("redis-tls-insecure-skip-verify", boolean, False,
               "Do not check Redis's certificate or host name (the link is still encrypted); "
               "for tests only.", switch=True),
        Option("redis-sentinel", parse_sentinels, None,
               "Find the master through these Sentinels; --redis-url then gives only the scheme "
               "(rediss:// for TLS), user, password and database.", "HOST:PORT,..."),
        Option("redis-sentinel-master", nonempty, None,
               "Name of the master that the Sentinels monitor (with --redis-sentinel).", "NAME"),
        Option("redis-sentinel-password-file", readable_file, None,
               "Read the Sentinels' own password (their requirepass) from this file.", "PATH"),
        Option("redis-cluster", boolean, False,
               "Redis Cluster: --redis-url names one node, from which the others are discovered.",
               switch=True),
        # HTTP
        Option("listen", parse_listen, DEFAULT_LISTEN,
               "Address of the HTTP server (/metrics, /healthz, /readyz).", "HOST:PORT"),
        Option("web-config-file", web_config_file, None,
               "TLS and basic auth of the HTTP server, in the Prometheus exporter-toolkit format "
               "(tls_server_config, basic_auth_users); read once at start. /healthz stays open "
               "to probes without basic auth (docs/endpoint-security.md).", "PATH"),
        # lifecycle socket
        Option("socket", nonempty, SocketConfig.path,
               "Unix socket on which workers and launchers report their lifecycle.", "PATH"),
        Option("socket-mode", file_mode, SocketConfig.mode,
               "File mode of the lifecycle socket (octal).", "MODE"),
        Option("max-connections", positive_int, SocketConfig.max_connections,
               "Most lifecycle connections read at once; more wait up to --hello-timeout for a "
               "slot, which quiet connections not proven to be asynq workers give up "
               "(docs/protocol.md).", "N"),
        Option("hello-timeout", positive_seconds, SocketConfig.hello_timeout,
               "Close a lifecycle connection that sends no hello within this many seconds.", "SECONDS"),
        Option("socket-allow-uid", uid_list, None,
               "Accept lifecycle connections only from processes running as these user ids "
               "(checked with SO_PEERCRED, Linux); others are closed at once and counted as "
               "peer_not_allowed. Root (0) is not implied. Default: whoever the socket's file "
               "mode lets connect.", "UID,..."),
        # identity and timing
        Option("hostname", nonempty, this_host,
               "Host name that the worker registers under (os.Hostname() of the worker; in "
               "Kubernetes the pod name). Default: this machine's host name.", "NAME"),
        Option("watch-interval", positive_seconds, ServeConfig.watch_interval,
               "How often the full details of live servers (status, concurrency, active tasks) are "
               "read from Redis.", "SECONDS"),
        Option("details-sharing", one_of("on", "off"), "on" if ServeConfig.details_sharing else "off",
               "on: one sidecar of the fleet (the holder of a lease in Redis) reads every live "
               "server's details and publishes the aggregate, the others read that; off: every "
               "sidecar reads them all (Redis load grows with pods x servers).", "MODE"),
        Option("poll-interval", positive_seconds, ServeConfig.poll_interval,
               "How often the registration of each watched worker is checked (O(1) commands).",
               "SECONDS"),
        Option("stop-timeout", seconds_or_zero, ServeConfig.stop_timeout,
               "On SIGTERM (and in `run --serve` once the worker has exited), keep watching and "
               "serving until every worker has exited, its cleanup is done and one more scrape has "
               "read the final state; at most this many seconds (0: stop at once).", "SECONDS"),
        Option("shutdown-budget", positive_seconds, ServeConfig.shutdown_budget,
               "The time a shutdown should fit in (a 30 s pod grace period minus a margin).",
               "SECONDS"),
        # cleanup
        Option("cleanup", one_of("on", "off", "dry-run"), CleanupConfig.mode,
               "Remove a dead worker's registration: on, off, or dry-run (log and count only).",
               "MODE"),
        Option("settle", positive_seconds, CleanupConfig.settle,
               "A registration that is not proven the dead worker's is removed only once Redis's "
               "clock is past its expiry by more than this many seconds (asynq itself calls it "
               "dead at its expiry; the margin covers a stalled worker and clock error).", "SECONDS"),
        Option("host-pids", one_of("shared", "unique"), "unique" if CleanupConfig.host_pids_unique else "shared",
               "unique: on this host name only one process at a time can hold a given pid (an "
               "ordinary pod with one worker container), so a worker whose exit its launcher "
               "reported owns every registration of its host and pid started within its life, "
               "and that is removed at once. shared (the safe default; hostNetwork pods, several "
               "worker containers in one pod): without a reported server id, a dead worker's "
               "registration is removed only once expired.", "MODE"),
        Option("recover-tasks", one_of("off", "dry-run", "on"), CleanupConfig.recover_tasks,
               "Hand stale tasks back to asynq's own recoverer (docs/stale-tasks.md): on a proven "
               "worker death, expire the leases of the tasks its last heartbeat listed; the "
               "fleet's details leader gives an orphaned task (active, no lease, run by no live "
               "server for two heartbeats) an expired lease. The sidecar never retries, requeues "
               "or archives a task itself. dry-run: count and log only; off: neither.", "MODE"),
        Option("repair-tasks", boolean, SweepConfig.repair_tasks,
               "Also give every orphaned task (active, no lease, run by no live server at two looks "
               "10 s apart) an expired lease, so that asynq's recoverer retries it; with --dry-run, "
               "only count them.", switch=True),
        Option("sweep-interval", seconds_or_zero, CleanupConfig.sweep_interval,
               "Run a fleet sweep every this many seconds (0: off).", "SECONDS"),
        Option("grace", seconds_or_zero, CleanupConfig.sweep_grace,
               "Sweep only registrations expired for longer than this many seconds.", "SECONDS"),
        Option("sweep-batch", int_between(1, 1000), CleanupConfig.sweep_batch,
               "Members a sweep selects and removes per batch; each Redis command of the sweep "
               "handles at most this many, which keeps each one short (docs/performance.md).", "N"),
        Option("dry-run", boolean, False, "Report what would be removed; change nothing.",
               switch=True),
        Option("json", boolean, False, "Print machine-readable JSON.", switch=True),
        # launcher
        Option("serve", boolean, False,
               "Also run the whole sidecar in this process (the bundled, single-container mode); "
               "every `serve` flag applies.", switch=True),
        # logging
        Option("log-level", one_of("debug", "info", "warning", "error"), LogConfig.level,
               "Least severe log level printed.", "LEVEL"),
        Option("log-format", one_of("text", "json"), LogConfig.format,
               "Log line format.", "FORMAT"),
    ]
}

GROUPS: dict[str, tuple[str, ...]] = {
    "redis": ("redis-url", "redis-password-file", "redis-timeout", "redis-username",
              "redis-tls-ca-file", "redis-tls-cert-file", "redis-tls-key-file",
              "redis-tls-insecure-skip-verify", "redis-sentinel", "redis-sentinel-master",
              "redis-sentinel-password-file", "redis-cluster"),
    "http": ("listen", "web-config-file"),
    "socket": ("socket", "socket-mode", "max-connections", "hello-timeout", "socket-allow-uid"),
    "worker": ("hostname", "watch-interval", "details-sharing", "poll-interval", "shutdown-budget", "stop-timeout"),
    "cleanup": ("cleanup", "settle", "host-pids", "recover-tasks", "sweep-interval", "grace", "sweep-batch"),
    "log": ("log-level", "log-format"),
}
SERVE_OPTIONS = GROUPS["redis"] + GROUPS["http"] + GROUPS["socket"] + GROUPS["worker"] + GROUPS["cleanup"] + GROUPS["log"]


def add_options(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Add the named options to an argparse parser; values are validated by `resolve`."""
    for name in names:
        opt = OPTIONS[name]
        shown = "this host's name" if opt.default is this_host else show_default(opt.default, octal=opt.parse is file_mode)
        help_text = f"{opt.help} [env {opt.env}; default {shown}]"
        if opt.switch:
            parser.add_argument(opt.flag, dest=opt.dest, action="store_const", const="true",
                                default=None, help=help_text)
        else:
            parser.add_argument(opt.flag, dest=opt.dest, metavar=opt.metavar, default=None,
                                help=help_text)


def show_default(value: Any, octal: bool = False) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}:{value[1]}"
    if isinstance(value, bool):
        return "false" if not value else "true"
    if octal and isinstance(value, int):  # a file mode
        return f"0{value:o}"
    return str(value)


def resolve(ns: argparse.Namespace, names: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Turn parsed flags plus environment into validated values, keyed by dest.

    Raises ConfigError with a message naming the flag or variable, the value and what is
    accepted.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in names:
        opt = OPTIONS[name]
        raw = getattr(ns, opt.dest, None)
        source = opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None:
            values[opt.dest] = opt.default() if callable(opt.default) else opt.default
            continue
        try:
            values[opt.dest] = opt.parse(raw)
        except ConfigError as e:
            shown = mask_url(raw) if opt.parse is parse_redis_url else raw  # a URL may hold a password
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            raise ConfigError(f"{source}: invalid value {shown!r}: {e}") from None
    _check_redis_combination(values)
    return values


def _check_redis_combination(v: Mapping[str, Any]) -> None:
    """Redis options that make sense only together, or not together."""
    if "redis_url" not in v:
        return
    parts = urlsplit(v["redis_url"])
    tls_files = [f for f in ("redis-tls-ca-file", "redis-tls-cert-file", "redis-tls-key-file",
                             "redis-tls-insecure-skip-verify") if v.get(f.replace("-", "_"))]
    if tls_files and parts.scheme != "rediss":
        raise ConfigError(f"--{tls_files[0]} needs TLS: give --redis-url with scheme rediss://")
    if bool(v.get("redis_tls_cert_file")) != bool(v.get("redis_tls_key_file")):
        raise ConfigError("--redis-tls-cert-file and --redis-tls-key-file go together: give both")
    if bool(v.get("redis_sentinel")) != bool(v.get("redis_sentinel_master")):
        raise ConfigError("--redis-sentinel and --redis-sentinel-master go together: give both")
    if v.get("redis_sentinel_password_file") and not v.get("redis_sentinel"):
        raise ConfigError("--redis-sentinel-password-file needs --redis-sentinel")
    if v.get("redis_cluster") and v.get("redis_sentinel"):
        raise ConfigError("--redis-cluster and --redis-sentinel exclude each other: a cluster "
                          "fails over by itself")
    if (v.get("redis_cluster") or v.get("redis_sentinel")) and parts.scheme == "unix":
        raise ConfigError("--redis-url: a unix:// socket cannot be used with --redis-cluster or "
                          "--redis-sentinel")
    if v.get("redis_cluster") and parts.path.strip("/") not in ("", "0"):
        raise ConfigError("--redis-url: Redis Cluster has database 0 only")
