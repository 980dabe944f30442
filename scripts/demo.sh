#!/usr/bin/env bash
# Set up if needed, then run the main job end to end on the packaged SmolLM2-135M and the shared task data, on CPU:
# the whole PuDDing pipeline at small sizes (candidate sets, static baselines, evaluations, labels, router, routed
# evaluation, report), about a quarter of an hour on 2 cores. Rerunning resumes; the report is OUT/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-runs/demo}
pudding pipeline --small --model smollm2-135m --device cpu --output "$out"
echo "report: $out/report.md"
