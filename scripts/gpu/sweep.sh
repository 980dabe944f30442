#!/usr/bin/env bash
# On the GPU machine: one model's accuracy sweep (`pudding sweep`) as background jobs that outlive the call, each
# resuming from what its bundles already hold. Call it again at any time: it starts what is ready and not running,
# and prints where every job is.
#
#   bash scripts/gpu/sweep.sh MODEL ROOT BLOCKS [extra pudding sweep options...]
#   e.g. bash scripts/gpu/sweep.sh qwen2.5-0.5b /root/sweep/qwen05 4,6,9 --limit 1000 --variants nocap
#
# Order: the largest rate's searches and baselines first (every rate's sets are their prefixes), then every rate
# at once (one process each), then, if asked for, the multi-domain bundle. MPNET=1 adds the mpnet router variant
# at the middle rate once the mpnet-base encoder is there. Stop a job and its python with
#   kill -- -$(pgrep -f "pudding-job=ROOT/logs/NAME ")
set -u
model=$1; root=$2; blocks=$3; shift 3
extra="$*"
logs=$root/logs
mkdir -p "$logs"
largest=$(echo "$blocks" | tr ',' '\n' | sort -n | tail -1)

start() {  # start job NAME (unless running or done) with pudding sweep arguments
    local name=$1; shift
    [ -f "$logs/$name.done" ] && return
    pgrep -f "pudding-job=$logs/$name " >/dev/null && return
    setsid nohup bash -c ": pudding-job=$logs/$name ; python3 -m pudding.cli sweep $* > $logs/$name.log 2>&1 && touch $logs/$name.done" \
        >/dev/null 2>&1 < /dev/null &
    echo "started $name"
}

common="--model $model --output $root --blocks $blocks --device cuda $extra"
start searches $common --only "$largest" --stages candidates,baselines
if [ -f "$logs/searches.done" ]; then
    for k in $(echo "$blocks" | tr ',' ' '); do
        start "k$k" $common --only "$k"
    done
    case "$extra" in *--multidomain-at*) start multidomain $common --only multidomain ;; esac
fi
middle=$(python3 -c "ks = sorted(map(int, '$blocks'.split(','))); print(ks[len(ks) // 2])")
if [ -n "${MPNET:-}" ] && [ -f "${PUDDING_MODELS_DIR:-/nonexistent}/mpnet-base.zip" ] && [ -f "$logs/k$middle.done" ]; then
    start mpnet $common --only "$middle" --variants nocap,mpnet
fi
for log in "$logs"/*.log; do
    [ -f "$log" ] || continue
    state=running; [ -f "${log%.log}.done" ] && state=done
    pgrep -f "pudding-job=${log%.log} " >/dev/null || [ "$state" = done ] || state=stopped
    echo "== $model $(basename "$log" .log) ($state): $(grep -v 'it/s' "$log" | tail -n 1 | cut -c1-160)"
done
