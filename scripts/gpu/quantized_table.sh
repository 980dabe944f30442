#!/usr/bin/env bash
# On the GPU machine: the Table 14 analogue (dense, SLEB, deployed, deployed and dense with int8 / int4 blocks) for
# one rate of a committed sweep, as a background job that outlives the call. The unquantized rows are the sweep's own
# evaluations (same documents, same bf16 model), so only the four quantized rows run.
#   bash scripts/gpu/quantized_table.sh MODEL K [LIMIT]
# Called again, it prints where the job is. Results: /root/results/quantized-accuracy-MODEL-h200.{json,md} and folder.
set -u
model=$1; k=$2; limit=${3:-1000}
bundle=results/accuracy-sweep/$model/k$k
out=/root/results/quantized-accuracy-$model-h200
mkdir -p "$out"
for row in dense sleb deployed; do [ -f "$out/$row.json" ] || cp "$bundle/evals/$row.json" "$out/$row.json"; done
log=/root/results/quantized-$model.log
if ! pgrep -f "pudding-job=$out " >/dev/null && [ ! -f "$out.md" ]; then
    setsid nohup bash -c ": pudding-job=$out ; python3 benchmarks/accuracy_table.py --table quantized --bundle $bundle \
        --limit $limit --device cuda --output $out.json" > "$log" 2>&1 < /dev/null &
    echo "started quantized table ($model, k = $k)"
fi
echo "== quantized $model: $(ls "$out" | tr '\n' ' ') · $(grep -v 'it/s' "$log" | tail -n 1 | cut -c1-160)"
