"""A/B of engine revisions on one GPU lease: each run builds the engine of the source tree on PYTHONPATH (LLaMA-3.1-8B
shape, random bf16 weights, dense, 4096 context) and records, through `bench.time_set`, graphed pre-fill TTFT at
128 / 512 / 2048 tokens (median of 15), the graphs' pool after them, decode tok/s (128-token prompt, 256 new tokens,
median of 7) and the 128-token pre-fill's kernel profile (`bench.profile_prefill`). One build per process, so
revisions do not share compiled code:

    git archive REV src | tar -x -C ab/NAME          # once per revision
    PYTHONPATH=ab/NAME/src python benchmarks/engine_ab.py NAME RUN    # writes $OUT/ab-NAME-RUN.json

Run alternately per revision (A, B, C, C, B, A) while a lease lasts. Output of 2026-12-04 (commit e86d35a, which timed
decode with `Engine.generate`, median of 3): results/fused-add-norm-h200.md."""

import json
import os
import sys
import time

import transformers

from pudding.bench.memory import graph_pool_bytes
from pudding.bench.references import profile_prefill
from pudding.bench.suites import LLAMA_31_8B
from pudding.bench.timing import time_set
from pudding.engine import Engine
from pudding.omission import OmissionSet

name, run = sys.argv[1], sys.argv[2]
config = transformers.LlamaConfig(**LLAMA_31_8B)
engine = Engine.random(config, "cuda", max_len=4096)
dense = OmissionSet.dense(config.num_hidden_layers)
started = time.perf_counter()
engine.warm_up([dense])
out = {"name": name, "warm_s": time.perf_counter() - started}
timed = time_set(engine, dense, "dense", (128, 512, 2048), 128, (256,), repeats=15)
out.update(prefill_ms=timed.ttft_ms, pool_gb=graph_pool_bytes() / 1e9, decode_tok_s=timed.decode_tok_s)
profile = profile_prefill(engine, dense)
out["prefill_profile"] = {k: v for k, v in profile.items() if not isinstance(v, (list, dict))}
out["prefill_top"] = profile.get("top_kernels", [])[:12]
print(json.dumps(out))
with open(os.path.join(os.environ["OUT"], f"ab-{name}-{run}.json"), "w") as f:
    json.dump(out, f, indent=1)
