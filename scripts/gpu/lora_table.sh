#!/usr/bin/env bash
# On the GPU machine: the paper's Table 4 (LoRA per omission set) for one bundle of the accuracy sweep, as a background
# job that outlives the call. Every step resumes from what is done (labels, router, adapters, evaluated rows).
#   bash scripts/gpu/lora_table.sh BUNDLE ROOT NAME [per-task]
#   e.g. bash scripts/gpu/lora_table.sh results/accuracy-sweep/smollm2-135m/k8 /root/lora smollm2-135m-k8 2000
# The committed bundles keep no router weights and no labels: the router is trained again (`pudding label` with the
# sweep's 2000 prompts per task, then `pudding train-router`), so PuDDing's row is run again beside PuDDing + LoRA.
set -u
source_bundle=$1; root=$2; name=$3; per_task=${4:-2000}
bundle=$root/$name
mkdir -p "$root"
[ -d "$bundle" ] || { cp -r "$source_bundle" "$bundle" && rm -rf "$bundle/router"; }
log=$root/$name.log
pgrep -f "lora-job=$bundle " >/dev/null && { echo "running: $(tail -c 300 "$log" | tr '\r' '\n' | tail -n 2)"; exit 0; }
[ -f "$root/$name.done" ] && { echo "done"; exit 0; }
setsid nohup bash -c ": lora-job=$bundle ; set -e
    [ -f $bundle/labels.parquet ] || python3 -m pudding.cli label --bundle $bundle --limit 2000 --device cuda
    [ -f $bundle/router/head.safetensors ] || python3 -m pudding.cli train-router --bundle $bundle --device cuda
    python3 -m pudding.cli lora --bundle $bundle --sets candidates,sleb,shortened-ppl --per-task $per_task --micro-batch 64 --device cuda
    python3 benchmarks/accuracy_table.py --table lora --bundle $bundle --limit 1000 --device cuda --output $root/lora-accuracy-$name.json
    touch $root/$name.done" > "$log" 2>&1 < /dev/null &
echo "started $name"
