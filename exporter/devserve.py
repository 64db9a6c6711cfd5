"""`python -m exporter.devserve`: `serve` against a private Redis that it starts itself.

What the README's first command runs until the demo lands: a sidecar on 127.0.0.1:10050 (or
the given `serve` flags) scraping a throw-away Redis, stopped with Ctrl-C.
"""

from __future__ import annotations

import sys

from exporter.cli import main
from exporter.redis_server import RedisServer


def devserve(argv: list[str]) -> int:
    with RedisServer() as redis:
        print(f"private Redis at {redis.url}; serving metrics on http://127.0.0.1:10050/metrics "
              "(Ctrl-C to stop)", file=sys.stderr, flush=True)
        args = ["serve", "--redis-url", redis.url, "--listen", "127.0.0.1:10050",
                "--socket", f"{redis.dir}/lifecycle.sock", *argv]
        return main(args)


if __name__ == "__main__":
    sys.exit(devserve(sys.argv[1:]))
