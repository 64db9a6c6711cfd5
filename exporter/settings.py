"""The typed, frozen settings of each component and command, and the only place their defaults are
written: the option table (`exporter.cli.options`) takes each flag's default from here.

Pure: the standard library and asynq's constants only, so that any layer may import it and
`--help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from exporter.asynq import model as asynq

#: Where workers and launchers find the sidecar's lifecycle socket unless told otherwise.
DEFAULT_SOCKET = "/run/asynq-sidecar/lifecycle.sock"

#: Query parameters of a Redis URL whose values are never shown: redis-py reads `password`
#: (and a Sentinel's) from the query string as well as from the userinfo.
_SECRET_PARAMS = ("pass", "secret", "token", "auth", "key")


def mask_url(url: str) -> str:
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
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
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
        return mask_url(self.url) + (" (cluster)" if self.cluster else "")

    def __repr__(self) -> str:  # never show a secret
        return (f"RedisConfig(url={self.display_url!r}, password={'***' if self.password else None}, "
                f"timeout={self.timeout}, username={self.username!r}, tls={self.tls}, "
                f"sentinel_password={'***' if self.sentinel_password else None}, cluster={self.cluster})")


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"  # debug | info | warning | error
    format: str = "text"  # text | json


@dataclass(frozen=True)
class SocketConfig:
    path: str = DEFAULT_SOCKET
    mode: int = 0o660
    max_connections: int = 64
    hello_timeout: float = 10.0
    line_timeout: float = 10.0  # a line, once begun, must end within this many seconds
    allow_uids: tuple[int, ...] = ()  # --socket-allow-uid; empty: the file mode decides


@dataclass(frozen=True)
class CleanupConfig:
    mode: str = "on"  # on | off | dry-run
    settle: float = 6.0
    host_pids_unique: bool = False  # --host-pids unique
    sweep_interval: float = 0.0
    sweep_grace: float = 60.0
    sweep_batch: int = 500
    recover_tasks: str = "dry-run"  # off | dry-run | on


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
    web: Any = None  # exporter.server.webconfig.WebConfig from --web-config-file, or None


#: The HTTP address of `serve` unless told otherwise.
DEFAULT_LISTEN = ("0.0.0.0", 10050)


@dataclass(frozen=True)
class AuditConfig:
    redis: RedisConfig
    log: LogConfig
    json: bool = False


@dataclass(frozen=True)
class SweepConfig:
    redis: RedisConfig
    log: LogConfig
    grace: float = CleanupConfig.sweep_grace
    batch: int = CleanupConfig.sweep_batch
    repair_tasks: bool = False
    dry_run: bool = False
    json: bool = False


@dataclass(frozen=True)
class LaunchConfig:
    """`run`: the worker's command line, and where to report (or the sidecar to host)."""

    command: tuple[str, ...]
    hostname: str
    socket: str
    log: LogConfig
    serve: ServeConfig | None = None  # --serve: the sidecar runs in the launcher's process


@dataclass(frozen=True)
class DemoConfig:
    hostname: str
    listen: tuple[str, int] | None = None  # None: a free port on loopback
    log: LogConfig | None = None  # None: only errors (the story is the output)
    duration: float | None = None  # None: until Ctrl-C
    color: bool = False


@dataclass(frozen=True)
class EmulatorConfig:
    """Who an emulated asynq server is and how it behaves; the defaults are asynq's."""

    host: str
    pid: int
    server_id: str
    concurrency: int = 10
    queues: dict[str, int] = field(default_factory=lambda: {"default": 1})
    strict_priority: bool = False
    heartbeat: float = asynq.HEARTBEAT_INTERVAL  # seconds between beats
    ttl: int = asynq.REGISTRATION_TTL  # seconds: score = now + ttl, and the per-server keys' TTL
    tasks: int = 0  # emulated in-flight tasks while running
    drain: float = 0.5  # seconds spent draining after SIGTERM/SIGINT
    on_exit: str = "clear"  # clear | leak | late-beat
    leases: bool = False  # also write the tasks' queue keys: active list, lease, task hash


@dataclass(frozen=True)
class EmulateConfig:
    """`emulate`: the server, and the sidecar socket it reports to (None: it does not)."""

    redis: RedisConfig
    log: LogConfig
    server: EmulatorConfig
    socket: str | None = None
    report_id: bool = True  # with a socket, send the server id (`registered`)
