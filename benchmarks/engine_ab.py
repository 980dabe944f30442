"""A/B of engine revisions on one GPU lease: each run builds the engine of the source tree on PYTHONPATH (LLaMA-3.1-8B
shape, random weights, bf16 or weight-only quantized blocks, dense or the paper-style pruned set) and records, through
`bench.timing.time_set`, graphed pre-fill TTFT per prompt length (median of 15), the graphs' pool after them, decode
tok/s (128-token prompt, 256 new tokens, median of 7) and the kernel profile of a 128-token pre-fill or of a decode
step (`bench.references`). One build per process, so revisions do not share compiled code:

    git archive REV src | tar -x -C ab/NAME          # once per revision (one holding src/pudding/bench/)
    PYTHONPATH=ab/NAME/src python benchmarks/engine_ab.py NAME RUN [--quantize int4 --omit paper --profile decode]
                                                     # writes $OUT/ab-NAME-RUN.json (or --output DIR)

Run alternately per revision (A, B, C, C, B, A) while a lease lasts. Output of 2026-12-04 (commit e86d35a, which timed
decode with `Engine.generate`, median of 3): results/fused-add-norm-h200.md."""

import argparse
import json
import os
import time
from pathlib import Path

import transformers

from pudding.bench.memory import graph_pool_bytes
from pudding.bench.references import profile_decode, profile_prefill
from pudding.bench.suites import LLAMA_31_8B, PAPER_SET
from pudding.bench.timing import time_set
from pudding.engine import Engine
from pudding.omission import OmissionSet

parser = argparse.ArgumentParser(description="One arm of an engine A/B (see the module's docstring).")
parser.add_argument("name")
parser.add_argument("run")
parser.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantized blocks (default: bf16)")
parser.add_argument("--omit", choices=("none", "paper"), default="none", help="dense, or the paper-style 7-of-32 set")
parser.add_argument("--context", type=int, default=4096, help="the engine's max_len")
parser.add_argument("--lengths", default="128,512,2048", help="pre-fill prompt lengths")
parser.add_argument("--profile", choices=("prefill", "decode"), default="prefill")
parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", ".")))
args = parser.parse_args()

config = transformers.LlamaConfig(**LLAMA_31_8B)
engine = Engine.random(config, "cuda", max_len=args.context, quantize=args.quantize)
blocks = config.num_hidden_layers
omit = OmissionSet(PAPER_SET if args.omit == "paper" else (), blocks)
started = time.perf_counter()
engine.warm_up([omit])
out = {"name": args.name, "quantize": args.quantize, "omit": omit.label(), "context": args.context,
       "warm_s": time.perf_counter() - started}
timed = time_set(engine, omit, args.omit, tuple(map(int, args.lengths.split(","))), 128, (256,), repeats=15)
out.update(prefill_ms=timed.ttft_ms, pool_gb=graph_pool_bytes() / 1e9, decode_tok_s=timed.decode_tok_s)
profile = profile_decode(engine, omit) if args.profile == "decode" else profile_prefill(engine, omit)
out[f"{args.profile}_profile"] = {k: v for k, v in profile.items() if not isinstance(v, (list, dict))}
out[f"{args.profile}_top"] = profile.get("top_kernels", [])[:12]
print(json.dumps(out))
args.output.mkdir(parents=True, exist_ok=True)
with open(args.output / f"ab-{args.name}-{args.run}.json", "w") as f:
    json.dump(out, f, indent=1)
