"""Which kernels should a decode step's matrix-vector products run in? The engine's decode step (LLaMA-3.1-8B
shape, random bf16 weights, batch 1, one CUDA graph per step) built three ways:

- inductor: the engine's default, `torch.compile` with coordinate-descent tuning, which lowers a one-row product to a
  reduction and fuses the RMSNorm before it into the same kernel;
- cublas: the same compile without coordinate descent, so the products stay cuBLAS GEMVs and the norms their own
  kernels;
- eager: the step uncompiled (cuBLAS products, every elementwise operation its own kernel), still graphed.

A variant name ending in `-whole` (e.g. `inductor-whole`) attends over the whole context at every step instead of the
context bucket holding the step's position (`engine.DECODE_BUCKETS`), as the engine did before the buckets.

For each: decode tokens/s (dense and 7 of 32 blocks pruned) against the bandwidth ceiling measured in the same run,
and the step's kernels (profiled eagerly: a graph hides them): how many, and how long the products and the rest
take. Usage (GPU): PYTHONPATH=src python benchmarks/decode_kernels.py --output results/decode-kernels-h200.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from provenance import provenance, save
from pudding.bench.references import profile_decode
from pudding.bench.suites import LLAMA_31_8B, PAPER_SET
from pudding.bench.timing import Clock, measure_bandwidth, weight_bytes_per_token
from pudding.block import block_step
from pudding.engine import Engine
from pudding.omission import OmissionSet


def build(variant: str, max_len: int) -> Engine:
    torch._dynamo.reset()
    whole = variant.endswith("-whole")
    variant = variant.removesuffix("-whole")
    engine = Engine.random(transformers.LlamaConfig(**LLAMA_31_8B), "cuda", max_len=max_len, buckets=not whole,
                           compile=variant != "eager")  # eager: nothing compiled, the steps only graphed
    # The comparison swaps the engine's per-block decode function for another build of the same block_step; the
    # engine captures whatever _decode_block is when it graphs a stack, so this is all a variant needs.
    if variant == "cublas":
        engine._decode_block = torch.compile(block_step, fullgraph=True, dynamic=False,
                                             options={"coordinate_descent_tuning": False})
    return engine


def decode_ms_per_token(engine: Engine, omit: OmissionSet, prompt: int, steps: int, repeats: int) -> float:
    engine.use(omit)
    ids = list(range(10, 10 + prompt))
    clock = Clock("cuda")

    def run() -> None:
        token = engine.prefill(ids).argmax(-1)
        for i in range(steps):
            token = engine.decode_step(token, prompt + i).argmax(-1)

    total = clock.median(run, repeats)
    prefill = clock.median(lambda: engine.prefill(ids).argmax(-1), repeats)
    return (total - prefill) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="inductor,cublas,eager")
    parser.add_argument("--max-len", type=int, default=4096, help="the engine's context (decode attends over it)")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.device = "cuda"
    bandwidth = measure_bandwidth("cuda")
    report = {**provenance(args), "hbm_bandwidth_gb_s": bandwidth / 1e9, "variants": {}}
    sets = {"dense": OmissionSet.dense(LLAMA_31_8B["num_hidden_layers"]), "pruned": OmissionSet(PAPER_SET, LLAMA_31_8B["num_hidden_layers"])}
    for variant in args.variants.split(","):
        engine = build(variant, args.max_len)
        rows = {}
        for name, omit in sets.items():
            ms = decode_ms_per_token(engine, omit, 128, args.steps, args.repeats)
            ceiling = bandwidth / weight_bytes_per_token(engine, len(omit.kept()))
            profile = profile_decode(engine, omit)
            rows[name] = {"tok_s": 1000 / ms, "of_ceiling": 1000 / ms / ceiling, "ms_per_token": ms,
                          "kernels_per_step": profile.get("kernels_per_step"),
                          "products_us_per_step": profile.get("matmul_us_per_step"),
                          "products_gb_s": profile.get("matmul_bandwidth_gb_s"),
                          "other_kernels_us_per_step": profile.get("gpu_us_per_step", 0) - profile.get("matmul_us_per_step", 0),
                          "top_kernels": profile.get("top_kernels", [])[:6]}
            print(variant, name, {k: v for k, v in rows[name].items() if k != "top_kernels"}, flush=True)
        report["variants"][variant] = rows
        del engine
        torch.cuda.empty_cache()
    save(report, args.output)


if __name__ == "__main__":
    main()
