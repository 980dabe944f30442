#!/usr/bin/env bash
# On the GPU machine: bring back what the jobs have made so far, as one archive per sweep (and the benchmark's files)
# under $OUT, without model weights, router weights or checkpoints (each file must stay under 16 MiB).
#   bash scripts/gpu/collect.sh
set -u
mkdir -p "$OUT"
for root in /root/sweep/*/; do
    name=$(basename "$root")
    tar czf "$OUT/$name.tgz" -C /root/sweep --exclude='*/encoder' --exclude='head.safetensors' --exclude='*.partial*' \
        --exclude='*/model' --exclude='*.tmp' "$name" 2>/dev/null
    ls -la "$OUT/$name.tgz" | awk '{print $5, $9}'
done
[ -d /root/results ] && cp /root/results/*.json /root/results/*.md "$OUT"/ 2>/dev/null
ls "$OUT"
