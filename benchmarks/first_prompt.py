"""What the first prompt of each length costs a server: a bundle's engine and routed policy (an untrained router
of the encoder its router.json names: results/ keep no router weights, and routing time does not depend on them),
warmed up as `pudding serve` warmed them before (decode graphs of every set and the router's up to 128 tokens; a
pre-fill graph is captured when a prompt of a new length bucket, guess or resume point first comes) and as it does now
(`Engine.warm_up` with `prefill_up_to`: every pre-fill graph of the context and the router's graphs of every length it
reads captured at start-up; speculation runs only captured graphs, and those it went without are captured between
prompts, `defer_captures`). Per prompt length: the time to first token of the first prompt of that length and of the next one (same
length, new text), and the start-up time of each.

    PYTHONPATH=src python benchmarks/first_prompt.py --bundle results/smollm2-h100 --output first-prompt.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from provenance import provenance, save

from pudding.bench.timing import router_text
from pudding.bundle import Bundle
from pudding.engine import open_engine
from pudding.policy import RoutedPolicy
from pudding.router import untrained_router
from pudding.storage import read_json


def first_and_next(engine, policy, length: int) -> dict:
    """TTFT (ms) of the first prompt of about `length` tokens, then the median of the next three of that length;
    between prompts, an engine that defers captures captures what they went without (a server's idle moments)."""
    def ttft(words: int, seed: int) -> float:
        text = router_text(words + seed).split(" ", seed)[-1]  # a new text for each seed
        ids = engine.with_bos(engine.text_tokens(text)[: length - 1])
        ms = engine.generate(ids, policy.pending(text), max_new_tokens=1).timings.ttft_ms
        engine.capture_wanted(limit=1000)
        return ms

    return {"first_ms": ttft(length, 0), "next_ms": statistics.median(ttft(length, s) for s in (1, 2, 3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--lengths", default="100,200,400,1000,2000")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    report = {**provenance(args), "arms": {}}
    for warm in (False, True):  # each arm a fresh engine (compiled kernels are shared within the process)
        started = time.perf_counter()
        bundle = Bundle.open(args.bundle)
        engine = open_engine(bundle.model_ref(), args.device, max_len=args.max_len)
        encoder = read_json(bundle.router_dir() / "router.json", "router config")["settings"]["encoder"]
        policy = RoutedPolicy(untrained_router(encoder, bundle.omission_sets(), args.device,
                                               decoder_tokenizer=engine.tokenizer))
        engine.warm_up(policy.sets_to_prepare(), prefill_up_to=args.max_len if warm else 0, ahead=policy.shared)
        engine.defer_captures = warm
        if warm:
            policy.warm_up()  # the router's graphs of every length it reads
        else:  # as before: its graphs of up to 128 tokens
            policy.router.warm_up(range(1, 129))
        arm = {"start_up_s": time.perf_counter() - started, "graphs": 0, "lengths": {}}
        for length in (int(n) for n in args.lengths.split(",")):
            arm["lengths"][length] = first_and_next(engine, policy, length)
        arm["graphs"] = len(engine._graphs)
        report["arms"]["pre-fill graphs at start-up" if warm else "pre-fill graphs on first use"] = arm
        print(warm, arm, flush=True)
        del engine, policy
        if args.device == "cuda":
            torch.cuda.empty_cache()
    save(report, args.output)


if __name__ == "__main__":
    main()
