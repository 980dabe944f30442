#!/usr/bin/env bash
# Set up if needed, then run the main job on the packaged SmolLM2-135M and the shared task data, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-runs/demo}
tasks=arc_challenge,arc_easy,boolq,hellaswag,piqa,winogrande
pudding eval --model smollm2-135m --tasks "$tasks" --limit 100 --device cpu --output "$out/dense.json"
pudding eval --model smollm2-135m --tasks "$tasks" --limit 100 --device cpu --omit 11,17,20 --output "$out/omit-11-17-20.json"
