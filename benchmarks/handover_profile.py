"""Where a routed pre-fill's time goes beyond the pruned pre-fill's (LLaMA-3.1-8B shape, random bf16 weights, batch
1, one GPU). `pudding bench` found, with the encoder-free router (0.07 ms), routing-then-pre-fill 0.29 ms slower than
the pruned pre-fill plus the router, and 18 blocks pre-filled ahead 0.18 ms slower than the pruned pre-fill although
the router's time hides behind them (`results/bench-h200-embeddings.md`). This profiles `Engine.start` per case
(pruned pre-fill of a chosen set; pending choice with 0 and with the shared blocks ahead) with the CUDA timeline and
the host's runtime calls, and says per case: time to first token (CUDA events, as the bench), the host's time before
the device's first kernel, the device's busy time and its idle gaps between the first and the last kernel, with the
host call under way when each gap began.

    PYTHONPATH=src python benchmarks/handover_profile.py --routers embeddings,minilm-l6 --output handover.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import transformers
from provenance import provenance, save

from pudding.bench.suites import LLAMA_31_8B, PAPER_SET, ROUTER_POOL
from pudding.bench.timing import Clock, _router_tokens, prompt_ids, router_text
from pudding.engine import Engine
from pudding.models import load_tokenizer, resolve_model
from pudding.omission import OmissionSet
from pudding.policy import Pending, RoutedPolicy, shared_blocks
from pudding.router import untrained_router

GAP_US = 3.0  # idle time between kernels shorter than this is the device's own scheduling, not a wait


def timeline(trace: dict, marker: str) -> list[dict]:
    """Per iteration (a user annotation named `marker`): the host's runtime calls and the device's kernels and copies
    it caused (matched by correlation id), in microseconds from the iteration's start."""
    events = trace["traceEvents"]
    marks = sorted((e for e in events if e.get("cat") == "user_annotation" and e.get("name") == marker),
                   key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver"]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_correlation = {}
    for e in device:
        by_correlation.setdefault(e.get("args", {}).get("correlation"), []).append(e)
    out = []
    for mark in marks:
        begin, end = mark["ts"], mark["ts"] + mark["dur"]
        calls = sorted((e for e in runtime if begin <= e["ts"] <= end), key=lambda e: e["ts"])
        work = sorted((d for c in calls for d in by_correlation.get(c.get("args", {}).get("correlation"), [])),
                      key=lambda e: e["ts"])
        out.append({"begin": begin, "calls": calls, "work": work})
    return out


def summary(iteration: dict) -> dict:
    """Host lead, device busy and idle time, and the gaps with the host call running when each began."""
    begin, calls, work = iteration["begin"], iteration["calls"], iteration["work"]
    if not work:
        return {}
    gaps, busy, reach = [], 0.0, work[0]["ts"]
    for e in work:
        if e["ts"] - reach > GAP_US:
            during = [c["name"] for c in calls if c["ts"] <= reach <= c["ts"] + c["dur"]]
            launched = next((c["name"] for c in calls if c.get("args", {}).get("correlation") == e.get("args", {}).get("correlation")), "?")
            gaps.append({"at_us": round(reach - begin, 1), "us": round(e["ts"] - reach, 1),
                         "host_during": during[-1] if during else "(host between calls)", "next_launched_by": launched})
        busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], reach))
        reach = max(reach, e["ts"] + e["dur"])
    host = {}
    for c in calls:
        host.setdefault(c["name"], [0, 0.0])
        host[c["name"]][0] += 1
        host[c["name"]][1] += c["dur"]
    return {"first_device_work_us": work[0]["ts"] - begin, "last_device_work_us": reach - begin, "busy_us": busy,
            "idle_us": reach - work[0]["ts"] - busy, "gaps": sorted(gaps, key=lambda g: -g["us"])[:6],
            "host_calls": {name: {"count": n, "us": round(us, 1)} for name, (n, us) in
                           sorted(host.items(), key=lambda kv: -kv[1][1])[:8]}}


def profiled(run, repeats: int) -> list[dict]:
    """`repeats` iterations of `run` under the profiler, each from an idle device as the bench times them."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            torch.cuda.synchronize()
            with record_function("handover-iteration"):
                run()
                torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return [summary(i) for i in timeline(trace, "handover-iteration")]


def median_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r]
    return statistics.median(values) if values else None  # None: no device work (a router on the host)


def cases(engine: Engine, policy, length: int, shared: int) -> dict:
    text = router_text(length)
    tokens = _router_tokens(policy, text, length)  # as the bench: a router on the decoder's ids reads the engine's
    ids = [t % engine.shape.vocab for t in tokens] if tokens else prompt_ids(length, engine.shape.vocab)
    decide = policy.pending(text, tokens).decide
    chosen = decide().omit
    pruned = lambda: (engine.use(chosen), engine.prefill(ids).argmax(-1))
    return {"pruned pre-fill (set chosen before)": pruned,
            "route, then pre-fill (0 ahead)": lambda: engine.start(ids, Pending(0, decide))[2].argmax(-1),
            f"{shared} blocks ahead": lambda: engine.start(ids, Pending(shared, decide))[2].argmax(-1),
            "router alone": lambda: decide()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--routers", default="embeddings,minilm-l6", help="untrained routers (their speed is the trained one's)")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="whose tokenizer the embeddings router reads with")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.device = "cuda"
    blocks = LLAMA_31_8B["num_hidden_layers"]
    pool = [OmissionSet(s, blocks) for s in ROUTER_POOL]
    shared = shared_blocks(pool)
    engine = Engine.random(transformers.LlamaConfig(**LLAMA_31_8B), "cuda", max_len=4096)
    tokenizer = load_tokenizer(resolve_model(args.tokenizer))
    engine.speculate = False
    engine.warm_up(pool)
    report = {**provenance(args), "pool_shared_blocks": shared, "paper_set": list(PAPER_SET), "routers": {}}
    clock = Clock("cuda")
    for name in args.routers.split(","):
        policy = RoutedPolicy(untrained_router(name, pool, "cuda", decoder_tokenizer=tokenizer))
        policy.warm_up()
        report["routers"][name] = by_length = {}
        for length in (int(n) for n in args.lengths.split(",")):
            by_length[length] = rows = {}
            for case, run in cases(engine, policy, length, shared).items():
                for _ in range(3):
                    run()  # graphs for this case, warm caches
                ttft = clock.median(run, args.repeats)
                iterations = profiled(run, args.repeats)
                rows[case] = {"ttft_ms": ttft,
                              "first_device_work_us": median_of(iterations, "first_device_work_us"),
                              "busy_us": median_of(iterations, "busy_us"), "idle_us": median_of(iterations, "idle_us"),
                              "last_device_work_us": median_of(iterations, "last_device_work_us"),
                              "example": iterations[len(iterations) // 2]}
                print(name, length, case, {k: v for k, v in rows[case].items() if k != "example"}, flush=True)
    save(report, args.output)


if __name__ == "__main__":
    main()
