#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# --durations: the slowest tests in every CI log, to keep the suite inside its time budget
exec .venv/bin/python -m pytest -q -ra --durations=30 "$@"
