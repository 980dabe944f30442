#!/usr/bin/env bash
# On the GPU machine, when the lease is running out: let the middle rate skip its no-cap variant (labels of every
# training prompt, a long training) and go straight to choosing and evaluating the deployed policy.
#   bash scripts/gpu/skip_nocap.sh MODEL ROOT BLOCKS K [extra options]
set -u
model=$1; root=$2; blocks=$3; k=$4; shift 4
log=$root/logs/k$k.log
setsid nohup bash -c ": pudding-job=$root/logs/k$k-select ;
    until grep -q 'every training prompt\|router nocap' $log || [ -f $root/logs/k$k.done ]; do sleep 2; done;
    pkill -f '[p]udding-job=$root/logs/k$k '; pkill -f '[-]-only $k\$'; sleep 2;
    python3 -m pudding.cli sweep --model $model --output $root --blocks $blocks --only $k --stages select,deployed,report \
        --device cuda $* > $root/logs/k$k-select.log 2>&1 && touch $root/logs/k$k-select.done" >/dev/null 2>&1 < /dev/null &
echo "watching k$k of $model"
