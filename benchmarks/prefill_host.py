"""Where a graphed pre-fill's time to first token goes besides the device's kernels (LLaMA-3.1-8B shape, random bf16
weights, dense, batch 1, one GPU): TTFT as `pudding bench` times it (CUDA events, from an idle device, prompt loading
and launch included) against the captured graph's replay alone with the prompt already on the device, and the host
time of each step of `Engine.prefill` (median of 25, each from an idle device). Reads the engine's private steps
(`_load_prompt`, `_prefill_graph`): it is a diagnostic of their cost.

    PYTHONPATH=src python benchmarks/prefill_host.py [--lengths 128,512]   # writes $OUT/host.json (or --output)

Output of 2026-12-06 (H100, engine before and after commit 1417a3e): results/prompt-load-ab-h100.md."""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers

from pudding.bench.suites import LLAMA_31_8B
from pudding.bench.timing import Clock, prompt_ids
from pudding.engine import Engine
from pudding.omission import OmissionSet

parser = argparse.ArgumentParser(description="Host-side cost of a graphed pre-fill (see the module's docstring).")
parser.add_argument("--lengths", default="128,512", help="prompt lengths")
parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", ".")))
args = parser.parse_args()

config = transformers.LlamaConfig(**LLAMA_31_8B)
engine = Engine.random(config, "cuda", max_len=4096)
dense = OmissionSet((), config.num_hidden_layers)
engine.warm_up([dense])
engine.use(dense)
clock = Clock("cuda")


def host_ms(fn, repeats: int = 25) -> float:
    """Median host time of fn from an idle device."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    torch.cuda.synchronize()
    return statistics.median(times)


def measure(length: int) -> dict:
    ids = prompt_ids(length, config.vocab_size)
    engine.prefill(ids)  # captures the bucket's graph
    padded = engine._load_prompt(ids)
    graph, logits = engine._prefill_graph(padded)
    torch.cuda.synchronize()
    return {"ttft_ms": clock.median(lambda: engine.prefill(ids).argmax(-1), 25, warmup=3),
            "replay_only_ms": clock.median(lambda: (graph.replay(), logits.argmax(-1)), 25, warmup=3),
            "host_prefill_ms": host_ms(lambda: engine.prefill(ids)),
            "host_load_prompt_ms": host_ms(lambda: engine._load_prompt(ids)),
            "host_tensor_from_list_ms": host_ms(lambda: torch.tensor(list(ids))),
            "host_graph_lookup_ms": host_ms(lambda: engine._prefill_graph(padded)),
            "host_replay_ms": host_ms(graph.replay),
            "host_argmax_ms": host_ms(lambda: logits.argmax(-1)),
            # two pre-fills back to back: the second's host work overlaps the first's kernels
            "two_prefills_ms": clock.median(lambda: (engine.prefill(ids), engine.prefill(ids).argmax(-1)), 15, warmup=2)}


results = {}
for length in map(int, args.lengths.split(",")):
    results[length] = measure(length)
    print(length, json.dumps(results[length]), flush=True)
args.output.mkdir(parents=True, exist_ok=True)
with open(args.output / "host.json", "w") as f:
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1)
