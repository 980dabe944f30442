#!/usr/bin/env bash
# One GPU lease, called at every step (through call.sh): starts each job as soon as its inputs are on the machine,
# and says where every job is. The speed benchmarks run first, alone on the GPU (timings need a quiet device): the 8B
# shape in bf16, the profile of a routed pre-fill's hand-over and the first prompts' cost
# (benchmarks/handover_profile.py, first_prompt.py), the packaged models with their bundles, the 8B shape's quantized
# blocks, then the GPU checks. The accuracy sweeps start when they are done, if SWEEPS=1 (FORCE=1: at once). To leave
# out: NO_HANDOVER=1 the two benchmarks, NO_QUANT=1 the quantized bench, NO_CHECKS=1 the GPU checks; NO_QWEN=1 waits
# for no Qwen2.5-0.5B (not carried). EMBEDDINGS=1 adds, last, the 8B bench with the encoder-free router. Everything
# runs in the background and survives the call.
#   SWEEPS=1 bash scripts/gpu/call.sh bash scripts/gpu/lease.sh
set -u
out=/root/results  # not $OUT: the device tool empties that before every call
mkdir -p "$out" /root/sweep
models=/root/models

bench_running() { pgrep -f "pudding-job=bench " >/dev/null; }
if [ -d $models/minilm-l6 ] && [ ! -f $out/bench.started ]; then
    touch $out/bench.started
    setsid nohup bash -c ": pudding-job=bench ;
        python3 -m pudding.cli bench --output $out/bench-h200.json --repeats 3 > $out/bench.log 2>&1;
        for i in \$(seq 60); do [ -f $models/smollm2-135m.gguf ] && { [ -n \"${NO_QWEN:-}\" ] || [ -f $models/qwen2.5-0.5b.gguf ]; } && break; sleep 5; done;
        [ -n \"${NO_HANDOVER:-}\" ] || python3 benchmarks/handover_profile.py --output $out/handover-h200.json > $out/handover.log 2>&1;
        [ -n \"${NO_HANDOVER:-}\" ] || python3 benchmarks/first_prompt.py --bundle results/smollm2-h100 --output $out/first-prompt-h200.json > $out/first-prompt.log 2>&1;
        bundles='--bundle results/smollm2-h100'; [ -f $models/qwen2.5-0.5b.gguf ] && bundles=\"\$bundles --bundle results/qwen2.5-0.5b-h100\";
        python3 -m pudding.cli bench --shape '' \$bundles --output $out/bench-models-h200.json --repeats 3 > $out/bench-models.log 2>&1;
        [ -n \"${NO_QUANT:-}\" ] || python3 -m pudding.cli bench --weights int8,int4,int8+head,int4+head --device cuda \
            --repeats 3 --output $out/quantized-decode-h200.json > $out/quantized.log 2>&1;
        [ -n \"${NO_CHECKS:-}\" ] || python3 -m pytest -q tests/test_quantize.py tests/test_engine.py -k cuda > $out/gpu-checks.log 2>&1;
        [ -z \"${EMBEDDINGS:-}\" ] || python3 -m pudding.cli bench --router-encoder embeddings --output $out/bench-h200-embeddings.json \
            --repeats 3 > $out/bench-embeddings.log 2>&1;
        touch $out/bench.done" >/dev/null 2>&1 < /dev/null &
    echo "started bench"
fi

common="--limit 1000 --baseline-samples 32"
if { [ -f $out/bench.done ] && [ -n "${SWEEPS:-}" ]; } || [ -n "${FORCE:-}" ]; then
    [ -f $models/smollm2-135m.gguf ] && bash scripts/gpu/sweep.sh smollm2-135m /root/sweep/smollm2-135m 5,8,12 \
        $common --label-limit 2000 --variants nocap | grep -v "^== .*(done)"
    [ -f $models/qwen2.5-0.5b.gguf ] && bash scripts/gpu/sweep.sh qwen2.5-0.5b /root/sweep/qwen2.5-0.5b 4,6,9 \
        $common --label-limit 2000 --variants nocap --multidomain-at 6 | grep -v "^== .*(done)"
    [ -f $models/qwen2.5-1.5b.gguf ] && bash scripts/gpu/sweep.sh qwen2.5-1.5b /root/sweep/qwen2.5-1.5b 5,8,11 \
        $common --label-limit 1000 --samples 64 | grep -v "^== .*(done)"
fi
echo "bench: $(bench_running && echo running || echo idle) · $(tail -c 300 $out/bench.log 2>/dev/null | tr '\n' ' ' | tail -c 200)"
ls /root/sweep/*/logs/*.done 2>/dev/null | sed 's#/root/sweep/##' | tr '\n' ' '; echo
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
