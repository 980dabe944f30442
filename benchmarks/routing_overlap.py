"""How much of the router's time hides behind pre-fill? The engine (LLaMA-3.1-8B shape, random bf16 weights, batch 1)
pre-fills the blocks every candidate set keeps while the router (MiniLM-L6, untrained: its time does not depend on
its weights) reads the prompt on its own CUDA stream (`Engine.start` with `Policy.pending`). Measured per prompt
length and per number of blocks pre-filled ahead (0: route, then pre-fill), with the router's stream at the given
priorities (`--priorities`), next to the pruned pre-fill alone and the router alone on an idle GPU, and a profile of
the router (tokenizing, graph replay, kernels); once per encoder dtype (`--router-dtypes`: bf16, the GPU default,
and fp32).

Usage (GPU): PYTHONPATH=src python benchmarks/routing_overlap.py --output results/routing-overlap-h200.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers

from provenance import provenance, save
from pudding.bench.suites import LLAMA_31_8B, PAPER_SET, ROUTER_POOL
from pudding.bench.timing import Clock, prompt_ids, routed_prefill, router_text
from pudding.engine import Engine
from pudding.omission import OmissionSet
from pudding.policy import RoutedPolicy, shared_blocks
from pudding.router import LoadedRouter


def router_profile(policy, words: int, repeats: int) -> dict:
    """Where the router's time goes for a prompt of about `words` words: tokenizing (CPU), the graph replay alone
    (GPU events, idle GPU), the whole choice, and the encoder's kernels run eagerly (a graph hides them)."""
    from torch.profiler import ProfilerActivity, profile

    router = policy.router
    text = router_text(words)
    ids = router._tokenize([text])[0][0]
    tokenize_ms = statistics.median(_wall(lambda: router._tokenize([text])) for _ in range(repeats))
    policy.choose_one(text)  # its graph for this length
    static_ids, _, graph = router._graphs.graphs[len(ids)]
    replay_ms = Clock("cuda").median(graph.replay, repeats)
    batch = torch.tensor([ids], device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            router.router(batch)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                router.router(batch)
            torch.cuda.synchronize()
    kernels = {e.key: (e.count / 10, getattr(e, "device_time_total", 0) / 10) for e in prof.key_averages() if e.count}
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:10]
    return {"words": words, "tokens": len(ids), "tokenize_ms": tokenize_ms, "graph_replay_ms": replay_ms,
            "choose_ms": statistics.median(policy.choose_one(text).ms for _ in range(repeats)),
            "kernels": sum(c for c, _ in kernels.values()), "gpu_busy_us": sum(t for _, t in kernels.values()),
            "top_kernels": [{"name": k[:100], "launches": c, "us": t} for k, (c, t) in top]}


def _wall(fn) -> float:
    started = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - started)


def overlap(engine: Engine, policy, lengths: list[int], args) -> dict:
    """One router: alone on an idle GPU, its profile, and beside pre-fill at each stream priority."""
    policy.warm_up()
    for n in lengths:  # the router alone on an idle GPU, reading a prompt of about n words (up to 256 tokens)
        policy.choose_one(router_text(n))
    out = {"router_alone_ms": {n: statistics.median(policy.choose_one(router_text(n)).ms for _ in range(args.repeats))
                               for n in lengths},
           "router_profile": [router_profile(policy, words, args.repeats) for words in (15, 128, 2048)], "runs": {}}
    for prof in out["router_profile"]:
        print("router profile", {k: v for k, v in prof.items() if k != "top_kernels"}, flush=True)
    for priority in (int(p) for p in args.priorities.split(",")):
        policy.router._graphs.stream = torch.cuda.Stream(priority=priority)
        policy.router._graphs.graphs.clear()  # captured again on the new stream (captures keep their stream's workspace)
        policy.warm_up()
        out["runs"][priority] = routed_prefill(engine, policy, lengths, [int(a) for a in args.ahead.split(",")], args.repeats)
        print("priority", priority, out["runs"][priority], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="128,256,512,2048")
    parser.add_argument("--ahead", default="0,4,8,18", help="blocks pre-filled ahead of the choice")
    parser.add_argument("--priorities", default="0", help="CUDA stream priorities of the router (lower is higher)")
    parser.add_argument("--router-dtypes", default="bfloat16,float32", help="what the router's encoder computes in")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.device = "cuda"
    lengths = [int(n) for n in args.lengths.split(",")]
    blocks = LLAMA_31_8B["num_hidden_layers"]
    pool = [OmissionSet(s, blocks) for s in ROUTER_POOL]
    engine = Engine.random(transformers.LlamaConfig(**LLAMA_31_8B), "cuda", max_len=4096)
    engine.warm_up(pool)
    clock = Clock("cuda")
    report = {**provenance(args), "pool_shared_blocks": shared_blocks(pool), "routers": {}}
    engine.use(OmissionSet(PAPER_SET, blocks))
    report["pruned_prefill_ms"] = {n: clock.median(lambda n=n: engine.prefill(prompt_ids(n, engine.shape.vocab)).argmax(-1), args.repeats)
                                   for n in lengths}
    for dtype in args.router_dtypes.split(","):
        policy = RoutedPolicy(LoadedRouter.untrained("minilm-l6", pool, "cuda", dtype))
        report["routers"][dtype] = measured = overlap(engine, policy, lengths, args)
        print(dtype, "router alone", measured["router_alone_ms"], flush=True)
    print("pruned pre-fill", report["pruned_prefill_ms"], flush=True)
    save(report, args.output)


if __name__ == "__main__":
    main()
