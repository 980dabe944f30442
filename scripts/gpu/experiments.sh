#!/usr/bin/env bash
# On the GPU machine: a model's PuDDing experiments as background jobs that survive between calls, each resuming
# from what its bundle already holds. Call it again to start the jobs whose inputs are now ready; it prints progress.
#   [PIPELINE_ARGS="--limit 500 ..."] bash scripts/gpu/experiments.sh MODEL ROOT [ablations]
# Each job is its own process group (setsid): stop one with its python too by
#   kill -- -$(pgrep -f "pudding-job=ROOT/logs/NAME ")     (killing the bash alone leaves python running)
set -u
model=$1; root=$2; with_ablations=${3:-}
bundle=$root/bundle; logs=$root/logs
mkdir -p "$logs"

start() {  # start job NAME (unless running or done) with pudding arguments
    local name=$1; shift
    [ -f "$logs/$name.done" ] && return
    pgrep -f "pudding-job=$logs/$name " >/dev/null && return  # the root is in the tag: two models' jobs may run
    setsid nohup bash -c ": pudding-job=$logs/$name ; python3 -m pudding.cli $* > $logs/$name.log 2>&1 && touch $logs/$name.done" \
        >/dev/null 2>&1 < /dev/null &
    echo "started $name"
}

common="--model $model --output $bundle --device cuda ${PIPELINE_ARGS:-}"
start main pipeline $common
if [ -n "$with_ablations" ]; then
    start sets-30 pipeline $common --stages none --ablations sets-30
    start ppl pipeline $common --stages none --ablations ppl-candidates
    [ -f "$bundle/candidates.json" ] && start sets-5 pipeline $common --stages none --ablations sets-5
    [ -f "$bundle/router/router.json" ] && start objectives pipeline $common --stages none --ablations objectives
fi
for log in "$logs"/*.log; do
    [ -f "$log" ] || continue
    state=running; [ -f "${log%.log}.done" ] && state=done
    echo "== $(basename "$log" .log) ($state): $(grep -v 'it/s' "$log" | tail -n 1)"
done
