"""A/B of engine revisions on one GPU lease: each run builds the engine of the source tree on PYTHONPATH (LLaMA-3.1-8B
shape, random bf16 weights, dense, 4096 context) and records graphed pre-fill TTFT at 128 / 512 / 2048 tokens (median
of 15), the graphs' pool after them, decode tok/s (128-token prompt, 256 new tokens, median of 3) and the 128-token
pre-fill's kernel profile (`bench.profile_prefill`). One build per process, so revisions do not share compiled code:

    git archive REV src | tar -x -C ab/NAME          # once per revision
    PYTHONPATH=ab/NAME/src python benchmarks/engine_ab.py NAME RUN    # writes $OUT/ab-NAME-RUN.json

Run alternately per revision (A, B, C, C, B, A) while a lease lasts; output of 2026-12-04: results/fused-add-norm-h200.md."""
import json, os, statistics, sys, time
import torch, transformers
from pudding.bench import LLAMA_31_8B, Clock, _prompt, graph_pool_bytes, profile_prefill
from pudding.engine import Engine
from pudding.omission import OmissionSet

name = sys.argv[1]
config = transformers.LlamaConfig(**LLAMA_31_8B)
engine = Engine.random(config, "cuda", max_len=4096)
dense = OmissionSet.dense(32)
started = time.perf_counter()
engine.warm_up([dense])
out = {"name": name, "warm_s": time.perf_counter() - started}
clock = Clock("cuda")
engine.use(dense)
out["prefill_ms"] = {}
for n in (128, 512, 2048):
    ids = _prompt(n, config.vocab_size)
    out["prefill_ms"][n] = clock.median(lambda: engine.prefill(ids).argmax(-1), 15, warmup=3)
out["pool_gb"] = graph_pool_bytes() / 1e9
ids = _prompt(128, config.vocab_size)
rates = []
for _ in range(3):
    g = engine.generate(ids, dense, max_new_tokens=257, stop_ids=[])
    rates.append(g.timings.tokens_per_second)
out["decode_tok_s"] = statistics.median(rates)
prof = profile_prefill(engine, dense)
out["prefill_profile"] = {k: v for k, v in prof.items() if not isinstance(v, (list, dict))}
out["prefill_top"] = (prof.get("kernels") or prof.get("top_kernels") or [])[:12]
print(json.dumps(out))
json.dump(out, open(os.path.join(os.environ["OUT"], f"ab-{name}-{sys.argv[2]}.json"), "w"), indent=1)
