"""Typed settings built from resolved option values (`options.resolve`) and a command's own
arguments: every command receives one frozen config, never the raw values."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import uuid
from collections.abc import Mapping
from typing import Any

from exporter.cli.options import OPTIONS
from exporter.settings import (
    AuditConfig,
    CleanupConfig,
    DemoConfig,
    EmulateConfig,
    EmulatorConfig,
    LaunchConfig,
    LogConfig,
    RedisConfig,
    ServeConfig,
    SocketConfig,
    SweepConfig,
)

Values = Mapping[str, Any]


def _read_secret(path: str | None) -> str | None:
    """A password file's content without its trailing line break."""
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip("\r\n")


def redis_config(v: Values) -> RedisConfig:
    return RedisConfig(url=v["redis_url"], password=_read_secret(v.get("redis_password_file")),
                       timeout=v["redis_timeout"], username=v.get("redis_username"),
                       tls_ca_file=v.get("redis_tls_ca_file"), tls_cert_file=v.get("redis_tls_cert_file"),
                       tls_key_file=v.get("redis_tls_key_file"),
                       tls_insecure_skip_verify=bool(v.get("redis_tls_insecure_skip_verify")),
                       sentinels=v.get("redis_sentinel") or (), sentinel_master=v.get("redis_sentinel_master"),
                       sentinel_password=_read_secret(v.get("redis_sentinel_password_file")),
                       cluster=bool(v.get("redis_cluster")))


def log_config(v: Values) -> LogConfig:
    return LogConfig(level=v["log_level"], format=v["log_format"])


def socket_config(v: Values) -> SocketConfig:
    return SocketConfig(path=v["socket"], mode=v["socket_mode"], max_connections=v["max_connections"],
                        hello_timeout=v["hello_timeout"], allow_uids=v.get("socket_allow_uid") or ())


def cleanup_config(v: Values) -> CleanupConfig:
    return CleanupConfig(mode=v["cleanup"], settle=v["settle"], host_pids_unique=v["host_pids"] == "unique",
                         sweep_interval=v["sweep_interval"], sweep_grace=v["grace"], sweep_batch=v["sweep_batch"],
                         recover_tasks=v["recover_tasks"])


def serve_config(v: Values, args: argparse.Namespace | None = None) -> ServeConfig:
    return ServeConfig(redis=redis_config(v), listen=v["listen"], socket=socket_config(v), log=log_config(v),
                       cleanup=cleanup_config(v), hostname=v["hostname"], watch_interval=v["watch_interval"],
                       details_sharing=v["details_sharing"] == "on", poll_interval=v["poll_interval"],
                       shutdown_budget=v["shutdown_budget"], stop_timeout=v["stop_timeout"],
                       web=v.get("web_config_file"))


def audit_config(v: Values, args: argparse.Namespace | None = None) -> AuditConfig:
    return AuditConfig(redis=redis_config(v), log=log_config(v), json=v["json"])


def sweep_config(v: Values, args: argparse.Namespace | None = None) -> SweepConfig:
    return SweepConfig(redis=redis_config(v), log=log_config(v), grace=v["grace"], batch=v["sweep_batch"],
                       repair_tasks=v["repair_tasks"], dry_run=v["dry_run"], json=v["json"])


def launch_config(v: Values, args: argparse.Namespace) -> LaunchConfig:
    command = list(args.worker_command)
    if command[:1] == ["--"]:
        command = command[1:]
    return LaunchConfig(command=tuple(command), hostname=v["hostname"], socket=v["socket"], log=log_config(v),
                        serve=serve_config(v) if v["serve"] else None)


def _given(args: argparse.Namespace, name: str, environ: Mapping[str, str]) -> bool:
    """Whether option `name` was set by its flag or its variable (not left at its default)."""
    opt = OPTIONS[name]
    return getattr(args, opt.dest, None) is not None or opt.env in environ


def demo_config(v: Values, args: argparse.Namespace) -> DemoConfig:
    # The demo picks a free port and prints only its story unless told otherwise.
    return DemoConfig(hostname=v["hostname"],
                      listen=v["listen"] if _given(args, "listen", os.environ) else None,
                      log=log_config(v) if _given(args, "log-level", os.environ) else None,
                      duration=args.duration,
                      color=sys.stdout.isatty() and not args.no_color and not os.environ.get("NO_COLOR"))


def emulate_config(v: Values, args: argparse.Namespace) -> EmulateConfig:
    server = EmulatorConfig(host=args.host or socket.gethostname(), pid=args.pid or os.getpid(),
                            server_id=args.server_id or str(uuid.uuid4()), concurrency=args.concurrency,
                            strict_priority=args.strict_priority, heartbeat=args.heartbeat, ttl=args.ttl,
                            tasks=args.tasks, drain=args.drain, on_exit=args.on_exit, leases=args.leases,
                            **({"queues": args.queues} if args.queues else {}))
    return EmulateConfig(redis=redis_config(v), log=log_config(v), server=server, socket=args.socket,
                         report_id=not args.no_report_id)
