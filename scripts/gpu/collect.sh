#!/usr/bin/env bash
# On the GPU machine: bring back what the jobs have made so far under $OUT: one archive per sweep (/root/sweep/*), one
# of the LoRA tables (/root/lora), one of the benchmark and accuracy-table results (/root/results). Left out: model,
# adapter and router weights, label tables, held-out prompts (task text) and checkpoints, which are not committed
# (and each file that comes back must stay under 16 MiB).
#   bash scripts/gpu/collect.sh
set -u
mkdir -p "$OUT"
skip=(--exclude='*/encoder' --exclude='*.safetensors' --exclude='*.partial*' --exclude='*/model' --exclude='*.tmp'
      --exclude='labels.parquet' --exclude='heldout.json')
archive() {  # archive NAME DIR ITEM...: tar ITEMs of DIR into $OUT/NAME.tgz
    local name=$1 dir=$2; shift 2
    tar czf "$OUT/$name.tgz" -C "$dir" "${skip[@]}" "$@" 2>/dev/null
    ls -la "$OUT/$name.tgz" | awk '{print $5, $9}'
}
for root in /root/sweep/*/; do
    [ -d "$root" ] && archive "$(basename "$root")" /root/sweep "$(basename "$root")"
done
[ -d /root/lora ] && archive lora /root lora
[ -d /root/results ] && archive results /root results
ls "$OUT"
