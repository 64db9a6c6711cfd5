"""The `asynq-sidecar` command line: one subcommand per job.

Each subcommand's code lives in its own module with a `run(config) -> int` function; the module
is imported (by name, through `importlib`) only when that subcommand runs, so `--help` and the
launcher start fast. Everything before that, parsing and building the typed config, uses only the
option table (`exporter.cli.options`), the arguments of `exporter.cli.arguments` and the settings.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from exporter import __version__, logs
from exporter.cli import arguments, configs
from exporter.cli.options import GROUPS, SERVE_OPTIONS, ConfigError, add_options, resolve
from exporter.settings import LogConfig


@dataclass(frozen=True)
class Command:
    module: str  # has run(config) -> int
    help: str
    options: tuple[str, ...]  # from the option table
    config: Callable[[Any, argparse.Namespace], Any]  # resolved values and arguments -> its config
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None  # beyond the table


COMMANDS: dict[str, Command] = {
    "serve": Command("exporter.server.sidecar",
                     "Run the sidecar: /metrics, the lifecycle socket, the cleanup of dead workers.",
                     SERVE_OPTIONS, configs.serve_config),
    "audit": Command("exporter.registrations.audit",
                     "List every registration in Redis, live or expired, and each queue's stale tasks "
                     "(lease expired, orphaned), without changing anything. Exit 0: no registration "
                     "expired; 1: expired registrations exist; 2: Redis cannot be read.",
                     GROUPS["redis"] + ("json", "log-level", "log-format"), configs.audit_config),
    "sweep": Command("exporter.cleanup.sweep",
                     "Remove registrations expired for longer than --grace from asynq:servers, "
                     "asynq:workers and asynq:schedulers, with their per-server keys, in short batches "
                     "under a lock; with --repair-tasks, also give each orphaned task an expired lease for "
                     "asynq's recoverer. Exit 0: swept, or another sweep holds the lock (nothing done); "
                     "1: the lock was lost mid-sweep; 2: Redis cannot be reached.",
                     GROUPS["redis"] + ("grace", "sweep-batch", "repair-tasks", "dry-run", "json", "log-level",
                                        "log-format"),
                     configs.sweep_config),
    "run": Command("exporter.lifecycle.launcher",
                   "Start a worker (-- CMD ARGS...) and report its lifecycle: hello, stopping on "
                   "SIGTERM/SIGINT, exited; forward signals; exit with its status. --serve runs the "
                   "sidecar in the same process.",
                   SERVE_OPTIONS + ("serve",), configs.launch_config, arguments.add_run_arguments),
    "demo": Command("exporter.devtools.demo",
                    "Play the whole story on a private Redis: workers start, stop gracefully, get killed, "
                    "leak their registration like asynq #979; the sidecar measures and cleans up. Exit 0 "
                    "when every step behaved as expected.",
                    ("listen", "hostname", "log-level", "log-format"), configs.demo_config,
                    arguments.add_demo_arguments),
    "emulate": Command("exporter.devtools.emulator",
                       "Run an emulated Asynq server that registers in Redis exactly as asynq does "
                       "(for the demo and tests).",
                       GROUPS["redis"] + GROUPS["log"], configs.emulate_config, arguments.add_emulate_arguments),
}

#: The options of each command, for docs/configuration.md.
COMMAND_OPTIONS: dict[str, tuple[str, ...]] = {name: c.options for name, c in COMMANDS.items()}


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The parser of every command, with the options of `command` only ("*": of all; None: of
    none, for the top-level --help)."""
    parser = argparse.ArgumentParser(
        prog="asynq-sidecar",
        description="Observability sidecar and Prometheus exporter for Asynq workers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, c in COMMANDS.items():
        p = sub.add_parser(name, help=c.help, description=c.help)
        if command not in ("*", name):
            continue
        add_options(p, c.options)
        if c.add_arguments is not None:
            c.add_arguments(p)
    return parser


@contextmanager
def _no_system_cas() -> Iterator[None]:
    """While a command's module is imported, point OpenSSL's default CA file and directory at
    nothing. aiohttp builds its HTTP client's default TLS contexts when it is imported, loading
    every CA certificate of the system: about 2 MiB and 0.1 s in every sidecar, for a client
    that no command uses (the sidecar only serves HTTP). The environment is restored as soon as
    the import is done, so Redis over TLS, and anything else later, load the CAs as usual."""
    names = ("SSL_CERT_FILE", "SSL_CERT_DIR")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, os.devnull))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option: the top level has only -h and --version.
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "*")
    args = parser.parse_args(argv)
    c = COMMANDS[args.command]
    try:
        config = c.config(resolve(args, c.options), args)
    except ConfigError as e:
        parser.error(str(e))  # exits 2 with the usage line
    # The demo's story is its output: its own log says only what went wrong unless asked.
    log = getattr(config, "log", None) or LogConfig(level="error")
    logs.setup(log.level, log.format)
    with _no_system_cas():
        command_module = importlib.import_module(c.module)
    return int(command_module.run(config))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
