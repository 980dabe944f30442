#!/usr/bin/env bash
# What every call on the GPU machine starts with: move what the call carried out of the tree, join the models whose
# pieces are all there, and run the rest of the command line with pudding importable from a snapshot of this call's
# source (jobs started now keep running from it when a later call brings other code).
#   bash scripts/gpu/call.sh [command ...]
set -u
cd "$(dirname "$0")/../.."
bash scripts/gpu/receive.sh >/dev/null
python3 scripts/gpu/assemble.py >/dev/null || exit 1
snap=/root/snap/$(find src scripts -name '*.py' -o -name '*.yaml' -o -name '*.sh' | sort | xargs cat | sha256sum | cut -c1-12)
[ -d "$snap" ] || { mkdir -p "$snap" && cp -r src scripts benchmarks results tests "$snap"/; }
export PUDDING_MODELS_DIR=/root/models PUDDING_DATA_DIR=/root/data/data HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$snap/src:/tmp/site PYTHONUNBUFFERED=1
echo "models: $(ls /root/models 2>/dev/null | tr '\n' ' ')"
cd "$snap" && "$@"
