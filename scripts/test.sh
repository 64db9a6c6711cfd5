#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: set-up first (idempotent), then pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k socket -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,demo
# Tools installed from PyPI (hadolint, kubernetes-validate) live in .venv/bin.
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
