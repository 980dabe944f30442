#!/usr/bin/env bash
# On the GPU machine: add router variants to one rate of a committed sweep, as a background job that outlives the call.
# The rate's bundle comes from results/accuracy-sweep/MODEL (router weights are not committed, so the main router is
# trained again first); each list of variants is one `pudding sweep --only K` run, in order, so that the first list's
# rows and deployed policy exist even if a later, longer list does not finish. A list waits for the models it needs.
#
#   bash scripts/gpu/variants.sh MODEL K "LIST [LIST ...]" [pudding sweep options...]
#   e.g. bash scripts/gpu/variants.sh qwen2.5-1.5b 8 "margin margin,mpnet" --blocks 5,8,11 --limit 1000 ...
#
# Called again, it prints where the job is. Results stay in /root/sweep/MODEL.
set -u
model=$1; k=$2; lists=$3; shift 3
root=/root/sweep/$model
logs=$root/logs
if [ ! -d "$root" ]; then
    mkdir -p /root/sweep && cp -r "results/accuracy-sweep/$model" "$root"
    rm -rf "$root/k$k/router"
fi
name=variants-k$k
if ! pgrep -f "pudding-job=$logs/$name " >/dev/null && [ ! -f "$logs/$name.done" ]; then
    runs=""
    for list in $lists; do
        wait_for=""
        case "$list" in *mpnet*) wait_for="until [ -f \$PUDDING_MODELS_DIR/mpnet-base.zip ]; do sleep 5; done;" ;; esac
        runs="$runs $wait_for echo '== variants $list' && python3 -m pudding.cli sweep --model $model --output $root --only $k --variants-at $k --variants $list $* &&"
    done
    setsid nohup bash -c ": pudding-job=$logs/$name ; $runs touch $logs/$name.done" > "$logs/$name.log" 2>&1 < /dev/null &
    echo "started $model $name"
fi
state=running; [ -f "$logs/$name.done" ] && state=done
pgrep -f "pudding-job=$logs/$name " >/dev/null || [ "$state" = done ] || state=stopped
echo "== $model $name ($state): $(grep -v 'it/s' "$logs/$name.log" | tail -n 2 | cut -c1-200 | tr '\n' ' ')"
