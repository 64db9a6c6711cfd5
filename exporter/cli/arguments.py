"""Arguments of commands beyond the option table: they have no environment variable, because they
say what to run (`run`'s worker command, `emulate`'s emulated server, `demo`'s length)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from exporter.cli import parsers
from exporter.settings import EmulatorConfig


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Adapt a value parser to argparse, which then names the flag and the bad value."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except parsers.ConfigError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's command line, after `--`."""
    parser.usage = "%(prog)s [--socket PATH] [--serve ...] -- CMD [ARGS...]"
    parser.add_argument("worker_command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                        help="The worker to run, and its arguments.")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=_checked(parsers.seconds_or_zero), default=None, metavar="SECONDS",
                        help="Stop after this many seconds (the story included) and exit 0 if every "
                             "step behaved as expected, 1 otherwise. Default: run until Ctrl-C.")
    parser.add_argument("--no-color", action="store_true",
                        help="Plain output (also the default when stdout is not a terminal).")


def add_emulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulated server (the Redis and log flags come from the option table)."""
    d = EmulatorConfig
    g = parser.add_argument_group("emulated server")
    g.add_argument("--host", type=_checked(parsers.nonempty), default=None, metavar="NAME",
                   help="Host name to register under [default: this machine's host name]")
    g.add_argument("--pid", type=_checked(parsers.pid), default=None, metavar="PID",
                   help="PID to register under [default: this process's pid]")
    g.add_argument("--server-id", type=_checked(parsers.nonempty), default=None, metavar="ID",
                   help="Server id [default: a new random UUID]")
    g.add_argument("--concurrency", type=_checked(parsers.positive_int), default=d.concurrency, metavar="N",
                   help=f"Concurrency written in ServerInfo [default: {d.concurrency}]")
    g.add_argument("--queues", type=_checked(parsers.queues), default=None, metavar="Q=P,...",
                   help="Queues and priorities, e.g. default=1,critical=6 [default: default=1]")
    g.add_argument("--strict-priority", action="store_true", help="Set strict_priority in ServerInfo")
    g.add_argument("--heartbeat", type=_checked(parsers.positive_seconds), default=d.heartbeat, metavar="SECONDS",
                   help=f"Seconds between beats [default: {d.heartbeat:g}, as asynq]")
    g.add_argument("--ttl", type=_checked(parsers.whole_seconds), default=d.ttl, metavar="SECONDS",
                   help=f"Registration lifetime: score = now + TTL, key TTLs [default: {d.ttl}, as asynq]")
    g.add_argument("--tasks", type=_checked(parsers.count), default=d.tasks, metavar="N",
                   help=f"In-flight tasks to keep in the workers hash while running [default: {d.tasks}]")
    g.add_argument("--drain", type=_checked(parsers.seconds_or_zero), default=d.drain, metavar="SECONDS",
                   help=f"Seconds to drain after SIGTERM/SIGINT, with status closed [default: {d.drain:g}]")
    g.add_argument("--on-exit", type=_checked(parsers.one_of("clear", "leak", "late-beat")), default=d.on_exit,
                   metavar="MODE",
                   help="After draining: clear the registration like ClearServerState; leak it and "
                        "exit 0; or late-beat: clear it, then beat once more 50 ms later and exit 0 "
                        f"(the heartbeat that races Shutdown in asynq #979) [default: {d.on_exit}]")
    g.add_argument("--leases", action="store_true",
                   help="Also write the in-flight tasks' queue keys as asynq's dequeue does (asynq:queues, "
                        "the active list, the lease, extended at every beat, and the task hash state); "
                        "a graceful shutdown requeues them to pending")
    g.add_argument("--socket", default=None, metavar="PATH",
                   help="Also report this server's life to a sidecar's lifecycle socket, as a worker "
                        "speaking the protocol does: hello, registered (its server id), ready, "
                        "stopping, and bye once Shutdown returned [default: do not report]")
    g.add_argument("--no-report-id", action="store_true",
                   help="With --socket, do not send the server id (as a worker that cannot know it)")
