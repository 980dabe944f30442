#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one worker per core, a test file to a worker (its module fixtures are built once), longest files first (conftest.py)
exec .venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder "$@"
