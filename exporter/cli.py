"""The `asynq-sidecar` command line: one subcommand per job, options from exporter.config.

Each subcommand lives in its own module with a `run(values, args) -> int` function that is
imported only when that subcommand runs, so `--help` and the launcher start fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from exporter import __version__
from exporter.config import GROUPS, SERVE_OPTIONS, ConfigError, add_options, resolve

# command -> (module, help, option names)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "serve": ("exporter.sidecar",
              "Run the sidecar: /metrics, the lifecycle socket, the cleanup of dead workers.",
              SERVE_OPTIONS),
    "audit": ("exporter.audit",
              "List every registration in Redis, live or expired, and each queue's stale tasks "
              "(lease expired, orphaned), without changing anything. Exit 0: no registration "
              "expired; 1: expired registrations exist; 2: Redis cannot be read.",
              GROUPS["redis"] + ("json", "log-level", "log-format")),
    "sweep": ("exporter.sweep",
              "Remove registrations expired for longer than --grace from asynq:servers, "
              "asynq:workers and asynq:schedulers, with their per-server keys, in short batches "
              "under a lock; with --repair-tasks, also give each orphaned task an expired lease for "
              "asynq's recoverer. Exit 0: swept, or another sweep holds the lock (nothing done); "
              "1: the lock was lost mid-sweep; 2: Redis cannot be reached.",
              GROUPS["redis"] + ("grace", "sweep-batch", "repair-tasks", "dry-run", "json", "log-level",
                                 "log-format")),
    "run": ("exporter.launcher",
            "Start a worker (-- CMD ARGS...) and report its lifecycle: hello, stopping on "
            "SIGTERM/SIGINT, exited; forward signals; exit with its status. --serve runs the "
            "sidecar in the same process.",
            SERVE_OPTIONS + ("serve",)),
    "demo": ("exporter.demo",
             "Play the whole story on a private Redis: workers start, stop gracefully, get killed, "
             "leak their registration like asynq #979; the sidecar measures and cleans up. Exit 0 "
             "when every step behaved as expected.",
             ("listen", "hostname", "log-level", "log-format")),
    "emulate": ("exporter.emulator",
                "Run an emulated Asynq server that registers in Redis exactly as asynq does "
                "(for the demo and tests).",
                GROUPS["redis"] + GROUPS["log"]),
}

#: The options of each command, for docs/configuration.md.
COMMAND_OPTIONS: dict[str, tuple[str, ...]] = {name: spec[2] for name, spec in COMMANDS.items()}


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The parser of every command, with the options of `command` only ("*": of all; None: of
    none, for the top-level --help): a process builds what it runs, and `serve` does not hold
    the launcher's, the emulator's and the demo's code (the modules that add arguments of their
    own are imported for their command only)."""
    parser = argparse.ArgumentParser(
        prog="asynq-sidecar",
        description="Observability sidecar and Prometheus exporter for Asynq workers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text, options) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command not in ("*", name):
            continue
        add_options(p, options)
        extra = getattr(importlib.import_module(module), "add_arguments", None) if name in _EXTRA_ARGS else None
        if extra:
            extra(p)
    return parser


# Commands whose modules add arguments beyond the option table (positional CMD, etc.).
_EXTRA_ARGS: set[str] = {"demo", "emulate", "run"}


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
    module, _, options = COMMANDS[args.command]
    try:
        values = resolve(args, options)
    except ConfigError as e:
        parser.error(str(e))  # exits 2 with the usage line
    with _no_system_cas():
        command_module = importlib.import_module(module)
    return command_module.run(values, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
