"""Every option of every command, in one table, and the frozen configs built from it.

Each option has a flag and an `ASYNQ_SIDECAR_*` environment variable (the flag wins).
A value is validated once, here; a bad one is reported with the flag or variable, the value
and what is accepted, and the command exits 2. docs/configuration.md is generated from this
table (`python -m exporter.config --markdown`) and a test keeps the two in sync.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

ENV_PREFIX = "ASYNQ_SIDECAR_"


class ConfigError(ValueError):
    """A value that is not accepted; the message says what is accepted."""


# ---------------------------------------------------------------- value parsers


def parse_redis_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("expected a URL with scheme redis://, rediss:// or unix://")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError("a unix:// URL needs a socket path, e.g. unix:///run/redis.sock")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError("expected a host, e.g. redis://redis:6379/0")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError("the port is not a number from 1 to 65535") from None
    return text


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError("expected HOST:PORT, e.g. 0.0.0.0:10050 or [::]:10050")
    host = host.strip("[]")
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ConfigError("expected an IP address or localhost as HOST") from None
    if _digits(port_text) is None or not 0 <= int(port_text) <= 65535:
        raise ConfigError("expected a port from 0 to 65535 (0 picks a free one)")
    return host or "0.0.0.0", int(port_text)


def _digits(text: str) -> int | None:
    """The number in `text` when it is ASCII digits only (str.isdigit() also takes "²", which
    int() refuses) and short enough to convert; else None."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("expected a number of seconds, e.g. 5 or 0.5") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError("expected a number of seconds greater than 0")
    return value


def seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("expected a number of seconds (0 turns it off)") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError("expected a number of seconds, 0 or more")
    return value


def positive_int(text: str) -> int:
    value = _digits(text)
    if value is None or value < 1:
        raise ConfigError("expected a whole number of 1 or more")
    return value


def int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _digits(text)
        if value is None or not low <= value <= high:
            raise ConfigError(f"expected a whole number from {low} to {high}")
        return value

    return parse


def file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError("expected an octal file mode, e.g. 0660") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError("expected an octal file mode from 0000 to 0777")
    return mode


def uid_list(text: str) -> tuple[int, ...]:
    """`1000` or `1000,1001` -> (1000, 1001): numeric user ids (names need a passwd file that
    a distroless image lacks)."""
    uids = []
    for part in text.split(","):
        uid = _digits(part)
        if uid is None or uid > 2**32 - 2:
            raise ConfigError("expected numeric user ids separated by commas, e.g. 1000 or 1000,1001")
        uids.append(uid)
    return tuple(dict.fromkeys(uids))


def nonempty(text: str) -> str:
    if not text.strip():
        raise ConfigError("must not be empty")
    return text


def readable_file(text: str) -> str:
    try:
        with open(text, encoding="utf-8") as f:
            f.read(1)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ConfigError(f"cannot read it: {getattr(e, 'strerror', None) or e}") from None
    return text


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ConfigError("expected one of " + ", ".join(choices))
        return text

    parse.choices = choices  # type: ignore[attr-defined]
    return parse


def boolean(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError("expected true or false (1/0, yes/no, on/off)")


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """`sentinel-0:26379,sentinel-1:26379` -> ((host, port), ...)."""
    found = []
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or _digits(port) is None or not 1 <= int(port) <= 65535:
            raise ConfigError("expected HOST:PORT[,HOST:PORT...], e.g. sentinel-0:26379,sentinel-1:26379")
        found.append((host, int(port)))
    return tuple(found)


def web_config_file(text: str) -> Any:
    """Read and check an exporter-toolkit web config file (see exporter.webconfig)."""
    from exporter.webconfig import WebConfigError, load

    if "\0" in text:
        raise ConfigError("cannot read it: a NUL byte in the path")
    try:
        return load(text)
    except WebConfigError as e:
        raise ConfigError(str(e)) from None


# ---------------------------------------------------------------- the option table


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


def _hostname() -> str:
    return socket.gethostname()


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        # Redis
        Option("redis-url", parse_redis_url, "redis://127.0.0.1:6379/0",
               "Redis of the Asynq deployment (redis://, rediss:// or unix://). A password may be "
               "in the URL; it is never printed.", "URL"),
        Option("redis-password-file", readable_file, None,
               "Read the Redis password from this file (overrides one in the URL). Keeps it out of "
               "argv and the environment.", "PATH"),
        Option("redis-timeout", positive_seconds, 2.0,
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
        Option("listen", parse_listen, ("0.0.0.0", 10050),
               "Address of the HTTP server (/metrics, /healthz, /readyz).", "HOST:PORT"),
        Option("web-config-file", web_config_file, None,
               "TLS and basic auth of the HTTP server, in the Prometheus exporter-toolkit format "
               "(tls_server_config, basic_auth_users); read once at start. /healthz stays open "
               "to probes without basic auth (docs/endpoint-security.md).", "PATH"),
        # lifecycle socket
        Option("socket", nonempty, "/run/asynq-sidecar/lifecycle.sock",
               "Unix socket on which workers and launchers report their lifecycle.", "PATH"),
        Option("socket-mode", file_mode, 0o660,
               "File mode of the lifecycle socket (octal).", "MODE"),
        Option("max-connections", positive_int, 64,
               "Most lifecycle connections read at once; more wait up to --hello-timeout for a "
               "slot, which quiet connections not proven to be asynq workers give up "
               "(docs/protocol.md).", "N"),
        Option("hello-timeout", positive_seconds, 10.0,
               "Close a lifecycle connection that sends no hello within this many seconds.", "SECONDS"),
        Option("socket-allow-uid", uid_list, None,
               "Accept lifecycle connections only from processes running as these user ids "
               "(checked with SO_PEERCRED, Linux); others are closed at once and counted as "
               "peer_not_allowed. Root (0) is not implied. Default: whoever the socket's file "
               "mode lets connect.", "UID,..."),
        # identity and timing
        Option("hostname", nonempty, _hostname,
               "Host name that the worker registers under (os.Hostname() of the worker; in "
               "Kubernetes the pod name). Default: this machine's host name.", "NAME"),
        Option("watch-interval", positive_seconds, 10.0,
               "How often the full details of live servers (status, concurrency, active tasks) are "
               "read from Redis.", "SECONDS"),
        Option("details-sharing", one_of("on", "off"), "on",
               "on: one sidecar of the fleet (the holder of a lease in Redis) reads every live "
               "server's details and publishes the aggregate, the others read that; off: every "
               "sidecar reads them all (Redis load grows with pods x servers).", "MODE"),
        Option("poll-interval", positive_seconds, 1.0,
               "How often the registration of each watched worker is checked (O(1) commands).",
               "SECONDS"),
        Option("stop-timeout", seconds_or_zero, 20.0,
               "On SIGTERM (and in `run --serve` once the worker has exited), keep watching and "
               "serving until every worker has exited, its cleanup is done and one more scrape has "
               "read the final state; at most this many seconds (0: stop at once).", "SECONDS"),
        Option("shutdown-budget", positive_seconds, 25.0,
               "The time a shutdown should fit in (a 30 s pod grace period minus a margin).",
               "SECONDS"),
        # cleanup
        Option("cleanup", one_of("on", "off", "dry-run"), "on",
               "Remove a dead worker's registration: on, off, or dry-run (log and count only).",
               "MODE"),
        Option("settle", positive_seconds, 6.0,
               "A registration that is not proven the dead worker's is removed only once Redis's "
               "clock is past its expiry by more than this many seconds (asynq itself calls it "
               "dead at its expiry; the margin covers a stalled worker and clock error).", "SECONDS"),
        Option("host-pids", one_of("shared", "unique"), "shared",
               "unique: on this host name only one process at a time can hold a given pid (an "
               "ordinary pod with one worker container), so a worker whose exit its launcher "
               "reported owns every registration of its host and pid started within its life, "
               "and that is removed at once. shared (the safe default; hostNetwork pods, several "
               "worker containers in one pod): without a reported server id, a dead worker's "
               "registration is removed only once expired.", "MODE"),
        Option("recover-tasks", one_of("off", "dry-run", "on"), "dry-run",
               "Hand stale tasks back to asynq's own recoverer (docs/stale-tasks.md): on a proven "
               "worker death, expire the leases of the tasks its last heartbeat listed; the "
               "fleet's details leader gives an orphaned task (active, no lease, run by no live "
               "server for two heartbeats) an expired lease. The sidecar never retries, requeues "
               "or archives a task itself. dry-run: count and log only; off: neither.", "MODE"),
        Option("repair-tasks", boolean, False,
               "Also give every orphaned task (active, no lease, run by no live server at two looks "
               "10 s apart) an expired lease, so that asynq's recoverer retries it; with --dry-run, "
               "only count them.", switch=True),
        Option("sweep-interval", seconds_or_zero, 0.0,
               "Run a fleet sweep every this many seconds (0: off).", "SECONDS"),
        Option("grace", seconds_or_zero, 60.0,
               "Sweep only registrations expired for longer than this many seconds.", "SECONDS"),
        Option("sweep-batch", int_between(1, 1000), 500,
               "Members a sweep selects and removes per batch; each Redis command of the sweep "
               "handles at most this many, which keeps it short (at 100,000 members a batch of "
               "1,000 runs about 7 ms in Redis; 2,000 already passes 10 ms).", "N"),
        Option("dry-run", boolean, False, "Report what would be removed; change nothing.",
               switch=True),
        Option("json", boolean, False, "Print machine-readable JSON.", switch=True),
        # launcher
        Option("serve", boolean, False,
               "Also run the whole sidecar in this process (the bundled, single-container mode); "
               "every `serve` flag applies.", switch=True),
        # logging
        Option("log-level", one_of("debug", "info", "warning", "error"), "info",
               "Least severe log level printed.", "LEVEL"),
        Option("log-format", one_of("text", "json"), "text",
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
        shown = "this host's name" if opt.default is _hostname else _show(opt.default, octal=opt.parse is file_mode)
        help_text = f"{opt.help} [env {opt.env}; default {shown}]"
        if opt.switch:
            parser.add_argument(opt.flag, dest=opt.dest, action="store_const", const="true",
                                default=None, help=help_text)
        else:
            parser.add_argument(opt.flag, dest=opt.dest, metavar=opt.metavar, default=None,
                                help=help_text)


def _show(value: Any, octal: bool = False) -> str:
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
            shown = _mask_url(raw) if opt.parse is parse_redis_url else raw  # a URL may hold a password
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


# ---------------------------------------------------------------- typed configs


#: Query parameters of a Redis URL whose values are never shown: redis-py reads `password`
#: (and a Sentinel's) from the query string as well as from the userinfo.
_SECRET_PARAMS = ("pass", "secret", "token", "auth", "key")


def _mask_url(url: str) -> str:
    """The URL with the userinfo password and every secret-looking query value replaced by ***."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port, as a bad URL must
    except ValueError:
        return "(a malformed URL, not shown: it may hold a password)"
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:" if parts.username else ":"
        parts = parts._replace(netloc=f"{user}***@{netloc}")
    if parts.query:
        query = [(name, "***" if any(word in name.lower() for word in _SECRET_PARAMS) else value)
                 for name, value in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


@dataclass(frozen=True)
class RedisConfig:
    url: str = field(repr=False)
    password: str | None = field(default=None, repr=False)
    timeout: float = 2.0
    username: str | None = None  # overrides a user in the URL
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_insecure_skip_verify: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()  # non-empty: find the master through these
    sentinel_master: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    cluster: bool = False

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    @property
    def display_url(self) -> str:
        """The URL with any password replaced by ***: the only form that is ever logged."""
        if self.sentinels:
            parts = urlsplit(self.url)
            user = self.username or parts.username
            addrs = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            db = parts.path.strip("/") or "0"
            return f"{parts.scheme}+sentinel://{user + '@' if user else ''}{addrs}/{self.sentinel_master}/{db}"
        return _mask_url(self.url) + (" (cluster)" if self.cluster else "")

    def __repr__(self) -> str:  # never show a secret
        return (f"RedisConfig(url={self.display_url!r}, password={'***' if self.password else None}, "
                f"timeout={self.timeout}, username={self.username!r}, tls={self.tls}, "
                f"sentinel_password={'***' if self.sentinel_password else None}, cluster={self.cluster})")

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> RedisConfig:
        return cls(url=v["redis_url"], password=_read_secret(v.get("redis_password_file")),
                   timeout=v["redis_timeout"], username=v.get("redis_username"),
                   tls_ca_file=v.get("redis_tls_ca_file"), tls_cert_file=v.get("redis_tls_cert_file"),
                   tls_key_file=v.get("redis_tls_key_file"),
                   tls_insecure_skip_verify=bool(v.get("redis_tls_insecure_skip_verify")),
                   sentinels=v.get("redis_sentinel") or (), sentinel_master=v.get("redis_sentinel_master"),
                   sentinel_password=_read_secret(v.get("redis_sentinel_password_file")),
                   cluster=bool(v.get("redis_cluster")))


def _read_secret(path: str | None) -> str | None:
    """A password file's content without its trailing line break."""
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip("\r\n")


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> LogConfig:
        return cls(level=v["log_level"], format=v["log_format"])


@dataclass(frozen=True)
class SocketConfig:
    path: str = "/run/asynq-sidecar/lifecycle.sock"
    mode: int = 0o660
    max_connections: int = 64
    hello_timeout: float = 10.0
    max_line: int = 64 * 1024  # protocol v1: a line of at most 64 KiB
    line_timeout: float = 10.0  # a line, once begun, must end within this many seconds
    allow_uids: tuple[int, ...] = ()  # --socket-allow-uid; empty: the file mode decides

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> SocketConfig:
        return cls(path=v["socket"], mode=v["socket_mode"], max_connections=v["max_connections"],
                   hello_timeout=v["hello_timeout"], allow_uids=v.get("socket_allow_uid") or ())


@dataclass(frozen=True)
class CleanupConfig:
    mode: str = "on"  # on | off | dry-run
    settle: float = 6.0
    host_pids_unique: bool = False  # --host-pids unique
    sweep_interval: float = 0.0
    sweep_grace: float = 60.0
    sweep_batch: int = 500
    recover_tasks: str = "dry-run"  # off | dry-run | on

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> CleanupConfig:
        return cls(mode=v["cleanup"], settle=v["settle"], host_pids_unique=v["host_pids"] == "unique",
                   sweep_interval=v["sweep_interval"],
                   sweep_grace=v["grace"], sweep_batch=v["sweep_batch"],
                   recover_tasks=v.get("recover_tasks", "dry-run"))


@dataclass(frozen=True)
class ServeConfig:
    redis: RedisConfig
    listen: tuple[str, int]
    socket: SocketConfig
    log: LogConfig
    cleanup: CleanupConfig
    hostname: str
    watch_interval: float = 10.0
    details_sharing: bool = True
    poll_interval: float = 1.0
    shutdown_budget: float = 25.0
    stop_timeout: float = 20.0
    web: Any = None  # exporter.webconfig.WebConfig from --web-config-file, or None

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> ServeConfig:
        return cls(
            redis=RedisConfig.from_values(v),
            listen=v["listen"],
            socket=SocketConfig.from_values(v),
            log=LogConfig.from_values(v),
            cleanup=CleanupConfig.from_values(v),
            hostname=v["hostname"],
            watch_interval=v["watch_interval"],
            details_sharing=v["details_sharing"] == "on",
            poll_interval=v["poll_interval"],
            shutdown_budget=v["shutdown_budget"],
            stop_timeout=v["stop_timeout"],
            web=v.get("web_config_file"),
        )


# ---------------------------------------------------------------- docs


def markdown(commands: Mapping[str, Sequence[str]]) -> str:
    """docs/configuration.md: every option, its variable, default and meaning, per command."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `python -m exporter.config --markdown > docs/configuration.md`; "
        "tests/test_config.py fails when it is out of date. -->",
        "",
        "Every flag has an environment variable; the flag wins when both are set. A bad value "
        "stops the command with exit status 2 and a message naming the flag or variable, the "
        "value and what is accepted.",
        "",
        "| flag | variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for opt in OPTIONS.values():
        default = "this host's name" if opt.default is _hostname else _show(opt.default, octal=opt.parse is file_mode)
        value = "" if opt.switch else f" {opt.metavar}"
        lines.append(f"| `{opt.flag}{value}` | `{opt.env}` | `{default}` | {opt.help} |")
    lines += ["", "## Options by command", ""]
    for command, names in commands.items():
        lines.append(f"- `asynq-sidecar {command}`: " + ", ".join(f"`--{n}`" for n in names))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["--markdown"]:
        from exporter.cli import COMMAND_OPTIONS

        sys.stdout.write(markdown(COMMAND_OPTIONS))
    else:
        sys.exit("usage: python -m exporter.config --markdown")
