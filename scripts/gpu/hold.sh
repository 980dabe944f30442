#!/usr/bin/env bash
# On the GPU machine: keep a call (and so the lease) alive for SECONDS while a sweep runs, restarting what is ready
# every minute and printing where the jobs are.
#   bash scripts/gpu/hold.sh SECONDS MODEL ROOT BLOCKS [sweep options...]
set -u
seconds=$1; shift
end=$((SECONDS + seconds))
while [ $SECONDS -lt $end ]; do
    bash scripts/gpu/sweep.sh "$@" | grep -v "(done)"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    sleep $(( end - SECONDS < 60 ? (end - SECONDS > 0 ? end - SECONDS : 0) : 60 ))
done
bash scripts/gpu/sweep.sh "$@"
