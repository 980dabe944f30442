"""The speed benchmark (paper Tables 6 and 8, done with a fast dense baseline): time to first token, pre-fill +
generation, routing, block swaps and peak memory, dense against pruned, both run by the same engine.

GPU figures are timed with CUDA events after warm-up and reported as medians. Each decode figure is also put against
the memory-bandwidth ceiling: the HBM bandwidth measured in the same run (a device-to-device copy, bytes read plus
written) over the bytes of weights read per generated token (the blocks that run, the final norm, the LM head).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .block import block_step
from .engine import Engine
from .errors import PuddingError
from .omission import OmissionSet
from .policy import Pending, shared_blocks


class Clock:
    """Wall time of a region; on GPUs with CUDA events on the current stream."""

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def time(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        started = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - started)

    def median(self, fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            self.time(fn)
        return statistics.median(self.time(fn) for _ in range(repeats))


def measure_bandwidth(device, gigabytes: float = 2.0) -> float:
    """Device memory bandwidth in bytes/s: a large copy, counting bytes read plus written."""
    numel = int(gigabytes * 1e9 / 2)
    a = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = Clock(device).median(lambda: b.copy_(a), repeats=10, warmup=3)
    return 2 * numel * 2 / (ms / 1000)


def weight_bytes_per_token(engine: Engine, kept: int) -> int:
    """Weights decode reads per generated token: the blocks that run, the final norm and the LM head."""
    size = engine.embed.element_size()
    return kept * engine.layout.nbytes + engine.final_norm.numel() * size + engine.head.numel() * size


def prefill_flops(engine: Engine, kept: int, prompt: int) -> float:
    """Matrix-multiply FLOPs of a pre-fill: every block that runs on every prompt token (attention included), and
    the LM head once (pre-fill computes only the last position's logits)."""
    s = engine.shape
    block = 2 * engine.layout.params  # one multiply-add per weight
    attention = 2 * 2 * s.heads * s.head_dim * (prompt + 1) / 2  # QK^T and PV, causal: half the square on average
    return kept * prompt * (block + attention) + 2 * engine.head.numel()


@dataclass
class SetTimings:
    label: str
    kept: int
    ttft_ms: dict[int, float]  # prompt length -> time to first token (pre-fill and first token)
    generate_ms: dict[int, float]  # new tokens -> pre-fill of the base prompt + generation
    decode_tok_s: float
    decode_ms_per_token: float


def _prompt(length: int, vocab: int) -> list[int]:
    return torch.randint(10, vocab - 10, (length,), generator=torch.Generator().manual_seed(length)).tolist()


def time_set(engine: Engine, omit: OmissionSet, label: str, prompt_lengths: Sequence[int], base_prompt: int,
             gen_lengths: Sequence[int], repeats: int) -> SetTimings:
    return time_sets(engine, [(omit, label)], prompt_lengths, base_prompt, gen_lengths, repeats)[0]


def time_sets(engine: Engine, sets: Sequence[tuple[OmissionSet, str]], prompt_lengths: Sequence[int], base_prompt: int,
              gen_lengths: Sequence[int], repeats: int) -> list[SetTimings]:
    """Time to first token per prompt length, and pre-fill of the base prompt plus generation per number of new
    tokens, for each (set, label): medians of `repeats` (generation: half as many). The sets take turns at every
    repeat, so that a machine whose speed drifts (a shared CPU, a GPU's clocks) slows them alike instead of whichever
    ran last: on two shared CPU cores, timing one set after the other put 1.17-1.56x into ratios of ~1.25x
    (results/bench-smollm2-cpu.md)."""
    clock = Clock(engine.device)
    vocab = engine.shape.vocab
    base_ids = _prompt(base_prompt, vocab)

    def prefill(ids: list[int]) -> Callable[[], object]:
        return lambda: engine.prefill(ids).argmax(-1)

    def generate(new_tokens: int) -> Callable[[], object]:
        def run() -> None:
            token = engine.prefill(base_ids).argmax(-1)
            for i in range(new_tokens - 1):
                token = engine.decode_step(token, base_prompt + i).argmax(-1)
            token.item()
        return run

    jobs = {("ttft", n): (prefill(_prompt(n, vocab)), repeats) for n in prompt_lengths}
    jobs.setdefault(("ttft", base_prompt), (prefill(base_ids), repeats))  # generation's own pre-fill, subtracted
    jobs.update({("generate", n): (generate(n), max(1, repeats // 2)) for n in gen_lengths})
    samples = {(i, key): [] for i in range(len(sets)) for key in jobs}
    for key, (fn, count) in jobs.items():
        for i, (omit, _) in enumerate(sets):  # warm-up
            engine.use(omit)
            clock.time(fn)
        for _ in range(count):
            for i, (omit, _) in enumerate(sets):
                engine.use(omit)
                samples[i, key].append(clock.time(fn))
    out = []
    longest = max(gen_lengths)
    for i, (omit, label) in enumerate(sets):
        median = {key: statistics.median(samples[i, key]) for key in jobs}
        per_token = (median["generate", longest] - median["ttft", base_prompt]) / (longest - 1)
        out.append(SetTimings(label, engine.shape.num_blocks - len(omit), {n: median["ttft", n] for n in prompt_lengths},
                              {n: median["generate", n] for n in gen_lengths}, 1000 / per_token, per_token))
    return out


def router_timing(policy, prompts: Sequence[str], repeats: int = 20) -> float:
    """Median batch-1 time a policy takes to choose (for a router: tokenization, encoder, head, choice), after
    warm-up."""
    for p in prompts[:3]:
        policy.choose_one(p)
    return statistics.median(policy.choose_one(p).ms for _ in range(repeats) for p in prompts)


def router_text(words: int) -> str:
    """A prompt of about `words` words (the router reads at most its max_length tokens of it)."""
    pool = " ".join(ROUTER_PROMPTS).split()
    return " ".join(pool[i % len(pool)] for i in range(words))


def routed_prefill(engine: Engine, policy, lengths: Sequence[int], shared_values: Sequence[int], repeats: int) -> dict:
    """Time to first token with routing included, measured rather than added: per number of blocks pre-filled ahead
    of the choice (0: route, then pre-fill), per prompt length, the median of `Engine.start` with a pending choice
    (the router reads a prompt about as long as the engine's, on its own stream; a router on the decoder's tokens
    reads the engine's prompt ids themselves, as `generate` and `serve` hand them over)."""
    clock = Clock(engine.device)
    out: dict = {"ttft_ms": {}, "issue_ms": {}, "prefill_issue_ms": {}, "max_abs_logit_diff": 0.0}
    for shared in shared_values:
        out["ttft_ms"][shared], out["issue_ms"][shared] = {}, {}
        for length in lengths:
            ids, text = _prompt(length, engine.shape.vocab), router_text(length)
            tokens = _router_tokens(policy, text, length)
            if tokens is not None:  # a router on the decoder's tokens reads the engine's own ids (`Policy.pending`)
                ids = [t % engine.shape.vocab for t in tokens]  # (a test model's small vocabulary wraps them)
            decide = policy.pending(text, tokens).decide

            def run():
                return engine.start(ids, Pending(shared, decide))

            out["ttft_ms"][shared][length] = clock.median(lambda: run()[2].argmax(-1), repeats)
            out["issue_ms"][shared][length] = _issue_ms(engine, run, repeats)
            choice, _, logits = run()  # the same logits as choosing first, then one pre-fill graph
            ahead = logits.clone()
            engine.use(choice.omit)
            diff = (engine.prefill(ids) - ahead).abs().max().item()
            out["max_abs_logit_diff"] = max(out["max_abs_logit_diff"], diff)
            out["prefill_issue_ms"][length] = _issue_ms(engine, lambda ids=ids: engine.prefill(ids), repeats)
    return out


def _issue_ms(engine: Engine, fn: Callable[[], object], repeats: int) -> float:
    """Median host time fn takes to return from an idle device: on a GPU, the host's work before the device's
    (choosing, switching, loading the prompt) and the launches, which the device waits for when it starts idle."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    sync()
    return statistics.median(times)


def _router_tokens(policy, text: str, length: int) -> list[int] | None:
    """`length` decoder tokens of `text` when the policy's router reads the decoder's tokens, else None."""
    router = getattr(policy, "router", None)
    if not hasattr(router, "route_tokens"):
        return None
    tokens = router.tokenizer(text, add_special_tokens=False)["input_ids"]
    return (tokens * (length // len(tokens) + 1))[:length]


def swap_timing(engine: Engine, base: OmissionSet, targets: dict[int, OmissionSet], prompt: int, repeats: int) -> dict:
    """Memory-budget mode: switching from `base` to sets that differ in n blocks. Reports the host→device copy time
    on its own, and how much the switch adds to the time to first token when the copies overlap pre-fill."""
    clock = Clock(engine.device)
    ids = _prompt(prompt, engine.shape.vocab)
    out = {}
    for differ, target in targets.items():
        copy_ms, ttft_switch = [], []
        for _ in range(repeats):
            engine.use(base)
            engine.prefill(ids)
            torch.cuda.synchronize()

            def switch_only():
                engine.use(target)
                for event in engine._events:
                    if event is not None:
                        torch.cuda.current_stream().wait_event(event)

            copy_ms.append(clock.time(switch_only))
            engine.use(base)
            engine.prefill(ids)
            torch.cuda.synchronize()

            def switch_and_prefill():
                engine.use(target)
                engine.prefill(ids).argmax(-1)

            ttft_switch.append(clock.time(switch_and_prefill))
        engine.use(base)
        engine.prefill(ids)
        engine.use(target)
        switched = engine.prefill(ids).clone()  # eager, waiting for the copies
        resident = clock.median(lambda: engine.prefill(ids).argmax(-1), repeats)
        out[differ] = {"copy_ms": statistics.median(copy_ms), "ttft_with_switch_ms": statistics.median(ttft_switch),
                       "ttft_resident_ms": resident,
                       "exposed_ms": statistics.median(ttft_switch) - resident,
                       "blocks_copied": differ,
                       # the pre-fill right after the switch against the graphed one of the resident stack
                       "max_abs_logit_diff": (switched - engine.prefill(ids)).abs().max().item()}
    return out


# ------------------------------------------------------------------------------------------------------------------
# References measured in the same run: the matrix products alone, and plain transformers


def graphed(fn: Callable[[], object], device) -> Callable[[], object]:
    """fn as the engine runs its kernels: on a GPU one CUDA graph of it (after warm-up calls on a side stream, where
    compilation and autotuning happen), so that timing it measures the kernels rather than their launch from Python;
    on a CPU fn itself."""
    if torch.device(device).type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def seconds_per_call(step: Callable[[int], object], device, calls: int = 20, replays: int = 10) -> float:
    """Seconds one call of step takes as the engine runs kernels: step(0) .. step(calls - 1) captured together
    (`graphed`: timed from Python, a call would measure its launch), the median of `replays` runs. The index lets a
    benchmark cycle over copies of its weights so that none is served from L2."""
    def steps():
        for i in range(calls):
            step(i)

    return Clock(device).median(graphed(steps, device), replays) / 1000 / calls


def gemm_bound(engine: Engine, omit: OmissionSet, lengths: Sequence[int], repeats: int) -> dict[int, float]:
    """Pre-fill's matrix products alone (QKV, output, gate/up and down projections of every block that runs, on the
    engine's own weights), captured in one CUDA graph per length: what pre-fill cannot go below."""
    engine.use(omit)
    shape, clock = engine.shape, Clock(engine.device)
    out = {}
    for length in lengths:
        x = torch.randn(length, shape.hidden, dtype=engine.dtype, device=engine.device)
        attn = torch.randn(length, shape.heads * shape.head_dim, dtype=engine.dtype, device=engine.device)
        act = torch.randn(length, shape.intermediate, dtype=engine.dtype, device=engine.device)

        def products():
            for w in engine.stack:
                torch.nn.functional.linear(x, w["qkv"])
                torch.nn.functional.linear(attn, w["o"])
                torch.nn.functional.linear(x, w["gate_up"])
                torch.nn.functional.linear(act, w["down"])

        out[length] = clock.median(graphed(products, engine.device), repeats, warmup=2)
    return out


def transformers_forward(config, device: str, omit: OmissionSet, lengths: Sequence[int], repeats: int) -> dict[int, float]:
    """Plain transformers, eager (sdpa), the omitted blocks deleted, no cache, logits of the last position only: the
    forward anyone can run without pudding, timed on the same GPU in the same run."""
    import gc

    from transformers import AutoModelForCausalLM

    from .export import delete_blocks

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    model = delete_blocks(model, omit) if len(omit) else model
    clock, out = Clock(device), {}
    with torch.inference_mode():
        for length in lengths:
            ids = torch.tensor([_prompt(length, config.vocab_size)], device=device)
            out[length] = clock.median(lambda: model(ids, use_cache=False, logits_to_keep=1).logits.argmax(-1), repeats, warmup=2)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def profile_decode(engine: Engine, omit: OmissionSet, steps: int = 20) -> dict:
    """What a decode step spends its time on: the compiled step run eagerly (a CUDA graph hides its kernels from
    the profiler), kernels grouped by name, with launches per step, time per step and, for the matrix-vector
    products, the bandwidth they reach on the weights they read."""
    try:
        return _profile_decode(engine, omit, steps)
    except Exception as problem:  # the profiler's API moves between torch versions: a benchmark must not die of it
        return {"error": f"{type(problem).__name__}: {problem}"}


def _profile_decode(engine: Engine, omit: OmissionSet, steps: int) -> dict:
    engine.use(omit)
    token = engine.prefill(_prompt(128, engine.shape.vocab)).argmax(-1)

    def step(i: int) -> None:
        engine._position.fill_(128 + i)
        engine._token.copy_(token.view(1, 1))
        engine._decode_eager(engine.decode_keys(128 + i))

    kernels = _kernels_per_run(step, steps)
    summary = _kernel_summary(kernels, len(engine.kept))
    gemv_us = summary["matmul_us_per_step"]
    weight_bytes = weight_bytes_per_token(engine, len(engine.kept))
    return {**summary, "matmul_bandwidth_gb_s": weight_bytes / (gemv_us * 1e-6) / 1e9 if gemv_us else None}


def profile_prefill(engine: Engine, omit: OmissionSet, length: int = 128, runs: int = 10) -> dict:
    """What a pre-fill spends its time on, like `profile_decode`: the compiled blocks run eagerly, kernels grouped
    by name, split into matrix products, attention and the rest (norms, rotary, activation, copies, the head's
    last-position product counts as a product)."""
    try:
        engine.use(omit)
        ids = _prompt(length, engine.shape.vocab)
        padded = engine._load_prompt(ids)
        kernels = _kernels_per_run(lambda i: engine._prefill_padded(padded), runs)
        summary = _kernel_summary(kernels, len(engine.kept))
        summary["attention_us"] = sum(v["us_per_step"] for k, v in kernels.items() if _is_attention(k))
        summary["length"] = length
        return summary
    except Exception as problem:  # as in profile_decode
        return {"error": f"{type(problem).__name__}: {problem}"}


def _kernels_per_run(run, runs: int) -> dict[str, dict]:
    """Kernels of `run(i)` (three unprofiled runs first), grouped by name: launches and GPU µs per run."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(3):
        run(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(runs):
            run(i)
        torch.cuda.synchronize()
    kernels: dict[str, dict] = {}
    for event in prof.key_averages():
        if event.device_type is not None and "CUDA" in str(event.device_type) and event.count:
            total = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            kernels[event.key] = {"launches_per_step": event.count / runs, "us_per_step": total / runs}
    return kernels


def _kernel_summary(kernels: dict[str, dict], kept: int) -> dict:
    launches = sum(k["launches_per_step"] for k in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_step"])[:12]
    return {"kernels_per_step": launches, "kernels_per_block": launches / kept,
            "gpu_us_per_step": sum(k["us_per_step"] for k in kernels.values()),
            "matmul_us_per_step": sum(v["us_per_step"] for k, v in kernels.items()
                                      if _is_matrix_product(k) and not _is_attention(k)),
            "top_kernels": [{"name": k[:120], **v} for k, v in top]}


def _is_attention(kernel: str) -> bool:
    name = kernel.lower()
    return any(mark in name for mark in ("flash", "fmha", "attention", "sdpa"))


def _is_matrix_product(kernel: str) -> bool:
    """cuBLAS / CUTLASS kernels, pudding's low-bit kernels (kernels.py), and inductor reductions that hold a product
    (an `mm` lowered to a reduction, often fused with the norm before it): together they read the weights. Inductor
    names a kernel after the ops it fuses, so one beside a low-bit product (`..._gemv_lowbit_mean_...`) is not one."""
    name = kernel.lower()
    if name.startswith("triton_"):
        fused = name.replace("gemv_lowbit", "").replace("mm_lowbit", "")  # the custom ops' names, not products here
        return name.startswith("triton_red") and "_mm_" in fused + "_"
    return any(mark in name for mark in ("gemv", "gemm", "cutlass", "nvjet", "sm90", "mm_lowbit"))


def graphed_equals_eager(engine: Engine, sets: Sequence[OmissionSet], lengths: Sequence[int]) -> list[dict]:
    """The graphed, bucketed, compiled pre-fill against the plain one (eager kernels, exact length) on the same
    prompt: the largest logit difference (bf16 kernels differ in rounding) and whether the next token agrees."""
    out = []
    for omit in sets:
        engine.use(omit)
        for length in lengths:
            ids = _prompt(length - 3, engine.shape.vocab)  # not a bucket size: the padding is exercised
            graphed_logits = engine.prefill(ids).clone()
            compiled, engine._prefill_block = engine._prefill_block, block_step
            try:
                engine._prompt[0, : len(ids)].copy_(torch.tensor(ids))
                engine._last.fill_(len(ids) - 1)
                plain = engine._prefill_padded(len(ids)).clone()
            finally:
                engine._prefill_block = compiled
            out.append({"set": omit.label(), "length": len(ids), "max_abs_logit_diff": float((graphed_logits - plain).abs().max()),
                        "same_next_token": bool(graphed_logits.argmax() == plain.argmax())})
    return out


def cublas_workspace_bytes() -> tuple[int, int]:
    """Memory the cuBLAS handles hold as workspaces (allocated through PyTorch's allocator), freed and measured:
    (outside the graphs' pools, inside them). A stream's workspace is allocated where its first product runs: for the
    engine's graphs' stream that may be inside their pool (the eager pre-fill after a swap), and `graph_pool_bytes`
    already counts it there."""
    torch.cuda.synchronize()
    before = _allocated_by_pool(_segments())
    torch._C._cuda_clearCublasWorkspaces()
    after = _allocated_by_pool(_segments())
    return before[False] - after[False], before[True] - after[True]


def _segments() -> list[dict]:
    """The allocator's segments: whether each belongs to a CUDA graph's private pool, its stream and kind, the bytes it
    holds from the device and the bytes allocated in it."""
    return [{"in_pool": tuple(s.get("segment_pool_id", (0, 0))) != (0, 0), "stream": s["stream"],
             "address": s.get("address"), "type": s.get("segment_type", "?"), "total": s["total_size"],
             "used": sum(b["size"] for b in s["blocks"] if b["state"] == "active_allocated")}
            for s in torch.cuda.memory_snapshot()]


def _allocated_by_pool(segments: list[dict]) -> dict[bool, int]:
    """Bytes allocated outside (False) and inside (True) the CUDA-graph private pools."""
    return {in_pool: sum(s["used"] for s in segments if s["in_pool"] == in_pool) for in_pool in (False, True)}


@dataclass(frozen=True)
class AllocatorBaseline:
    """What the device holds before an engine is built (the router, which lives beside the model): the bytes reserved,
    the graphs' pools among them, and the addresses of the segments."""

    reserved: int = 0
    pools: int = 0
    addresses: frozenset = frozenset()


def allocator_baseline() -> AllocatorBaseline:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return AllocatorBaseline(torch.cuda.memory_reserved(), graph_pool_bytes(), frozenset(s["address"] for s in _segments()))


def small_segment_slack(segments: list[dict], baseline_addresses: set) -> int:
    """Free bytes in the small-tensor segments outside the graphs' pools that appeared since the baseline. PyTorch's
    allocator serves tensors under 1 MB from 2 MB segments of their stream, so the engine's first small tensor on a
    stream costs a whole segment unless one is already there (a router's small tensors, say): a fixed cost per stream
    the engine allocates on, not growth."""
    return sum(s["total"] - s["used"] for s in segments
               if not s["in_pool"] and s["type"] == "small" and s["address"] not in baseline_addresses)


def slack_segments(segments: list[dict], top: int = 8) -> list[dict]:
    """The segments outside the graphs' pools that hold the most space nothing is allocated in: where the memory-budget
    peak's "rest" sits (rounding to segment sizes, blocks cached free, one small-block segment per stream)."""
    outside = sorted((s for s in segments if not s["in_pool"]), key=lambda s: s["used"] - s["total"])[:top]
    return [{"stream": s["stream"], "type": s["type"], "total_mb": s["total"] / 1e6, "allocated_mb": s["used"] / 1e6}
            for s in outside]


# ------------------------------------------------------------------------------------------------------------------
# The whole benchmark

LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})

# Seven of 32 blocks, in the late-middle of the stack where depth pruning of LLaMA-3.1-8B removes them (paper Fig. 4),
# and sets that differ from it in 2, 4 and 7 blocks for the swap figures.
PAPER_SET = (20, 22, 24, 26, 27, 28, 30)
SWAP_SETS = {2: (20, 22, 24, 26, 27, 29, 31), 4: (18, 19, 24, 26, 27, 29, 31), 7: (8, 9, 10, 11, 12, 13, 14)}

# The router's pool for the shape benchmark: the paper-style set and its 2- and 4-block neighbours, all in the
# late-middle of the stack, so every set keeps blocks 0-17 (routing overlaps their pre-fill: `Engine.start`).
ROUTER_POOL = (PAPER_SET, SWAP_SETS[2], SWAP_SETS[4])

ROUTER_PROMPTS = [
    "Question: Which of these would help to prevent infections from spreading?\nAnswer:",
    "A man is sitting on a roof. He",
    "Question: How do I ready a guinea pig cage for its new occupants?\nAnswer:",
    "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
]


@dataclass
class BenchSettings:
    prompt_lengths: tuple[int, ...] = (128, 256, 512, 2048)
    base_prompt: int = 128
    gen_lengths: tuple[int, ...] = (128, 256, 512)
    repeats: int = 5
    max_len: int = 4096
    compile_mode: str | None = None  # torch.compile mode of the decode block step (None: inductor's default)
    quantize: str | None = None  # weight-only quantization of the blocks (int8, int4)


def _row(t: SetTimings) -> dict:
    return {"label": t.label, "blocks_run": t.kept, "ttft_ms": t.ttft_ms, "generate_ms": t.generate_ms,
            "decode_tok_s": round(t.decode_tok_s, 2), "decode_ms_per_token": round(t.decode_ms_per_token, 4)}


def compare(engine: Engine, dense: SetTimings, pruned: SetTimings, bandwidth: float | None, router_ms: float,
            settings: BenchSettings, references: dict | None = None, routed_ttft: dict | None = None) -> dict:
    """Ratios against dense, against the ceilings and against the references measured in the same run. With
    `routed_ttft` (prompt length -> TTFT measured with routing, `routed_prefill`), the pre-fill speedup with routing
    is taken from it; otherwise the router's time is added to the pruned pre-fill."""
    references = references or {}
    bytes_dense = weight_bytes_per_token(engine, dense.kept)
    bytes_pruned = weight_bytes_per_token(engine, pruned.kept)
    out = {
        "weights_read_per_token_gb": {"dense": bytes_dense / 1e9, "pruned": bytes_pruned / 1e9},
        "decode_speedup": dense.decode_ms_per_token / pruned.decode_ms_per_token,
        "decode_ideal_speedup": bytes_dense / bytes_pruned,
        "prefill": {},
        "generate_speedup_with_router": {n: dense.generate_ms[n] / (pruned.generate_ms[n] + router_ms) for n in settings.gen_lengths},
    }
    out["decode_speedup_vs_ideal"] = out["decode_speedup"] / out["decode_ideal_speedup"]
    if bandwidth:
        for name, t, b in (("dense", dense, bytes_dense), ("pruned", pruned, bytes_pruned)):
            ceiling = bandwidth / b
            out[f"{name}_decode_ceiling_tok_s"] = ceiling
            out[f"{name}_decode_of_ceiling"] = t.decode_tok_s / ceiling
    for p in settings.prompt_lengths:
        flop_ratio = prefill_flops(engine, dense.kept, p) / prefill_flops(engine, pruned.kept, p)
        with_routing = routed_ttft[p] if routed_ttft else pruned.ttft_ms[p] + router_ms
        speedup = dense.ttft_ms[p] / with_routing
        out["prefill"][p] = {"speedup_with_router": speedup, "speedup_without_router": dense.ttft_ms[p] / pruned.ttft_ms[p],
                             "ttft_with_routing_ms": with_routing, "routing_measured": bool(routed_ttft),
                             "flop_ratio": flop_ratio, "of_flop_ratio": speedup / flop_ratio}
        for name, t in (("dense", dense), ("pruned", pruned)):
            for reference, values in (("gemm_bound", references.get(f"{name}_gemm_ms")),
                                      ("transformers", references.get(f"{name}_transformers_ms"))):
                if values and p in values:
                    out["prefill"][p][f"{name}_of_{reference}"] = t.ttft_ms[p] / values[p]
    return out


def graph_pool_bytes() -> int:
    """Bytes the CUDA-graph private memory pools hold from the device: the captured graphs' outputs and
    intermediates (a replay writes these while the allocator counts them free, since replays do not go through it),
    and the eager work the engine runs in its pool."""
    return sum(s["total"] for s in _segments() if s["in_pool"])


def peak_memory(engine: Engine, omit: OmissionSet, prompt: int, new_tokens: int,
                baseline: AllocatorBaseline = AllocatorBaseline(), switch_from: OmissionSet | None = None) -> dict:
    """Peak GPU memory the engine holds during a pre-fill + generation: the most the allocator reserved from the
    device (weights, cache, buffers, cuBLAS workspaces, the graphs' pool, rounding), beside what each of those
    parts holds. With `switch_from` the run starts from that set (memory budget: the switch copies blocks in, and
    the pre-fill that waits for them runs eagerly). `baseline`: what the router held before the engine was built."""
    ids = _prompt(prompt, engine.shape.vocab)
    if switch_from is not None:
        engine.use(switch_from)
        engine.prefill(ids)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # what earlier runs (references, other engines) left cached is not the engine's
    torch.cuda.reset_peak_memory_stats()
    engine.use(omit)
    token = engine.prefill(ids).argmax(-1)
    for i in range(new_tokens):
        token = engine.decode_step(token, prompt + i).argmax(-1)
    torch.cuda.synchronize()
    mem = engine.memory()
    segments = _segments()  # after the run: the segments' slack
    return {"outside_pools_unused_gb": sum(s["total"] - s["used"] for s in segments if not s["in_pool"]) / 1e9,
            "slack_segments": slack_segments(segments),
            "small_segments_slack_gb": small_segment_slack(segments, baseline.addresses) / 1e9,
            "engine_peak_gb": (torch.cuda.max_memory_reserved() - baseline.reserved) / 1e9,
            "reserved_gb": (torch.cuda.memory_reserved() - baseline.reserved) / 1e9,
            "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,  # the allocator's view (router included)
            "router_reserved_gb": baseline.reserved / 1e9, "switched": switch_from is not None,
            "graph_pool_gb": (sum(s["total"] for s in segments if s["in_pool"]) - baseline.pools) / 1e9,
            "engine_blocks_gb": mem["blocks"] / 1e9, "embed_head_norm_gb": mem["embed_head_norm"] / 1e9,
            "kv_cache_gb": mem["kv_cache"] / 1e9, "buffers_gb": mem["buffers"] / 1e9, "block_gb": mem["block_bytes"] / 1e9}


def benchmark_shape(config, device: str, settings: BenchSettings, policy=None, log=print) -> dict:
    """A model of this shape with random weights (speed does not depend on weight values): dense against the
    paper-style 7-of-32 set in both residency modes, routing, swaps and memory."""
    import gc

    results: dict = {"model": "random weights, shape of " + getattr(config, "_name", config.model_type),
                     "settings": settings.__dict__.copy()}
    bandwidth = measure_bandwidth(device)
    results["hbm_bandwidth_gb_s"] = bandwidth / 1e9
    log(f"HBM bandwidth (copy, read + write): {bandwidth / 1e9:.0f} GB/s")
    num_blocks = config.num_hidden_layers
    pruned_set = OmissionSet(PAPER_SET, num_blocks)
    router_ms = router_timing(policy, ROUTER_PROMPTS) if policy is not None else 0.0
    results["router_ms"] = router_ms

    baseline = allocator_baseline()
    results["router_gb"] = baseline.reserved / 1e9
    engine = Engine.random(config, device, max_len=settings.max_len, quantize=settings.quantize, compile_mode=settings.compile_mode)
    started = time.perf_counter()
    dense_set = OmissionSet.dense(num_blocks)
    warm = engine.warm_up([dense_set, pruned_set] + [OmissionSet(s, num_blocks) for s in SWAP_SETS.values()])
    results["warm_up_s"] = warm
    log(f"warm-up (compile + capture, 5 sets): {warm:.1f} s")
    dense, pruned = time_sets(engine, [(dense_set, "dense"), (pruned_set, "pruned")], settings.prompt_lengths,
                              settings.base_prompt, settings.gen_lengths, settings.repeats)
    routed = None
    if policy is not None:
        pool_shared = shared_blocks(policy.sets)
        measured = routed_prefill(engine, policy, settings.prompt_lengths, sorted({0, 8, pool_shared}), settings.repeats)
        results["routed_prefill"] = {"pool_shared_blocks": pool_shared, **measured}
        routed = measured["ttft_ms"]
        log(f"pre-fill with routing (blocks ahead -> ms): {routed}; largest logit difference from choosing first "
            f"{measured['max_abs_logit_diff']:.3g}")
    references = {"dense_gemm_ms": gemm_bound(engine, dense_set, settings.prompt_lengths, settings.repeats),
                  "pruned_gemm_ms": gemm_bound(engine, pruned_set, settings.prompt_lengths, settings.repeats)}
    log(f"GEMM-only bound: dense {references['dense_gemm_ms']}, pruned {references['pruned_gemm_ms']}")
    results["decode_profile"] = {"dense": profile_decode(engine, dense_set), "pruned": profile_decode(engine, pruned_set)}
    log(f"decode profile: {results['decode_profile']['dense'].get('kernels_per_block')} kernels per block")
    results["prefill_profile"] = {"dense": profile_prefill(engine, dense_set), "pruned": profile_prefill(engine, pruned_set)}
    results["prefill_graphs_equal_eager"] = graphed_equals_eager(engine, [dense_set, pruned_set], settings.prompt_lengths)
    references["dense_transformers_ms"] = transformers_forward(config, device, dense_set, settings.prompt_lengths, settings.repeats)
    references["pruned_transformers_ms"] = transformers_forward(config, device, pruned_set, settings.prompt_lengths, settings.repeats)
    log(f"transformers eager: dense {references['dense_transformers_ms']}, pruned {references['pruned_transformers_ms']}")
    results["all_resident"] = {"dense": _row(dense), "pruned": _row(pruned), "references": references,
                               "comparison": compare(engine, dense, pruned, bandwidth, router_ms, settings, references,
                                                     routed[pool_shared] if routed else None),
                               "memory": {name: peak_memory(engine, omit, 512, 512, baseline)
                                          for name, omit in (("dense", dense_set), ("pruned", pruned_set))}}
    switch_clock = Clock(device)
    results["all_resident"]["switch_ms"] = switch_clock.median(lambda: (engine.use(dense_set), engine.use(pruned_set)), 10)
    log(f"all resident: dense {dense.decode_tok_s:.1f} tok/s, pruned {pruned.decode_tok_s:.1f} tok/s; took {time.perf_counter() - started:.0f} s")
    engine = None  # free the all-resident engine before the memory-budget one is built
    gc.collect()
    torch._C._cuda_clearCublasWorkspaces()  # and the workspaces of the reference runs' streams: the peak is the engine's
    baseline = allocator_baseline()  # the router again: its workspace went too

    kept = num_blocks - len(PAPER_SET)
    engine = Engine.random(config, device, max_len=settings.max_len, quantize=settings.quantize, budget=kept, compile_mode=settings.compile_mode)
    engine.warm_up([pruned_set] + [OmissionSet(s, num_blocks) for s in SWAP_SETS.values()])
    # The graphs' pool after each phase: it grows with the longest pre-fill captured and not with sets or swaps
    pool_by_phase = {"warm-up (5 sets, decode graphs)": graph_pool_bytes() - baseline.pools}
    budget_pruned = time_set(engine, pruned_set, "pruned (memory budget)", settings.prompt_lengths, settings.base_prompt,
                             settings.gen_lengths, settings.repeats)
    pool_by_phase[f"pre-fill up to {max(settings.prompt_lengths)} tokens"] = workspace = graph_pool_bytes() - baseline.pools
    swaps = swap_timing(engine, pruned_set, {n: OmissionSet(s, num_blocks) for n, s in SWAP_SETS.items()},
                        max(settings.prompt_lengths), max(2, settings.repeats // 2))
    pool_by_phase["swaps (eager pre-fill after each)"] = graph_pool_bytes() - baseline.pools
    memory = peak_memory(engine, pruned_set, 512, 512, baseline,
                         switch_from=OmissionSet(SWAP_SETS[max(SWAP_SETS)], num_blocks))
    pool_by_phase["the peak's run"] = graph_pool_bytes() - baseline.pools
    outside, inside = cublas_workspace_bytes()
    memory["cublas_workspaces_gb"], memory["cublas_in_graph_pool_gb"] = outside / 1e9, inside / 1e9  # counted once
    # The allowance: the kept blocks, one spare slot for swaps, the KV cache, embeddings and head, the engine's
    # buffers, cuBLAS's workspaces (a fixed buffer per stream that runs products, the same for any model or budget),
    # the activation workspace: the graphs' pool once the longest pre-fill was captured, which every later run
    # (other sets, swaps, the eager pre-fill after a swap) must fit in, and the free space of the small-tensor
    # segments the engine's streams needed (at most 2 MB a stream). All are measured; no other rounding is allowed.
    weights_and_cache = memory["embed_head_norm_gb"] + (kept + 1) * memory["block_gb"] + memory["kv_cache_gb"]
    allowed = (weights_and_cache + memory["buffers_gb"] + memory["cublas_workspaces_gb"] + workspace / 1e9
               + memory["small_segments_slack_gb"])
    results["memory_budget"] = {"slots": kept, "pruned": _row(budget_pruned), "swaps": swaps, "memory": memory,
                                "allowed_gb": allowed, "within_allowed": memory["engine_peak_gb"] <= allowed,
                                "activation_workspace_gb": workspace / 1e9,
                                "graph_pool_by_phase_gb": {k: v / 1e9 for k, v in pool_by_phase.items()},
                                "beyond_weights_and_cache_gb": memory["engine_peak_gb"] - weights_and_cache}
    log(f"memory budget: pruned {budget_pruned.decode_tok_s:.1f} tok/s, 7-block switch {swaps[7]['copy_ms']:.1f} ms copy, "
        f"{swaps[7]['exposed_ms']:.1f} ms exposed")
    engine = None
    gc.collect()
    torch.cuda.empty_cache()
    return results


WEIGHT_GOALS = {"int8": 1.7, "int4": 2.5}  # pruned decode, as a multiple of bf16 pruned decode (issue: quantized PuDDing)
LORA_ROW, LORA_RANK = "lora", 8  # bf16 blocks with an unmerged rank-8 LoRA update (merged weights cost what bf16 costs)


def benchmark_weights(config, device: str, schemes: Sequence[str], repeats: int, prompt_lengths=(128, 512),
                      log=print, goals: bool = True) -> dict:
    """The same shape with bf16 blocks and with each weight-only scheme (paper Table 14's speed side), and, for
    `lora`, bf16 blocks running an unmerged LoRA update: decode and pre-fill, dense and the paper-style pruned set,
    and the bytes the blocks take. One engine at a time. `goals`: the issue's decode goals (set on the 8B shape)."""
    import gc

    blocks = config.num_hidden_layers
    sets = {"dense": OmissionSet.dense(blocks), "pruned": OmissionSet(tuple(b for b in PAPER_SET if b < blocks) or (1,), blocks)}
    rows = {}
    for scheme in ["bf16", *schemes]:
        lora = scheme == LORA_ROW
        engine = Engine.random(config, device, quantize=None if scheme in ("bf16", LORA_ROW) else scheme, max_len=1024,
                               lora_rank=LORA_RANK if lora else 0)
        if lora:
            engine.random_adapters(sets.values())
        engine.warm_up(list(sets.values()))
        row = {"block_bytes": engine.layout.nbytes + (engine.lora_layout.nbytes if lora else 0),
               "blocks_on_device_gb": engine.memory()["blocks"] / 1e9}
        if scheme in ("int8", "int4"):
            row["gemv"] = gemv_check(scheme, config, device)
            log(f"{scheme} GEMV: {row['gemv']}")
        timings = time_sets(engine, [(omit, name) for name, omit in sets.items()], prompt_lengths, prompt_lengths[0],
                            (128, 256), repeats)
        for name, timed in zip(sets, timings):
            row[name] = {"decode_tok_s": round(timed.decode_tok_s, 2), "ttft_ms": timed.ttft_ms,
                         "weight_bytes_per_token": weight_bytes_per_token(engine, timed.kept)}
        if torch.device(device).type == "cuda":  # where a quantized step's time goes besides its products
            row["decode_profile"] = profile_decode(engine, sets["pruned"])
        rows[f"bf16 + LoRA r{LORA_RANK} (unmerged)" if lora else scheme] = row
        log(f"{scheme} blocks: pruned decode {row['pruned']['decode_tok_s']:.1f} tok/s")
        engine = None
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    base = rows["bf16"]["pruned"]["decode_tok_s"]
    met = [{"figure": f"{s} pruned decode, of bf16 pruned decode", "measured": rows[s]["pruned"]["decode_tok_s"] / base,
            "target": f"≥ {WEIGHT_GOALS[s]}x", "met": rows[s]["pruned"]["decode_tok_s"] / base >= WEIGHT_GOALS[s]}
           for s in rows if s in WEIGHT_GOALS]
    return {"shape": getattr(config, "_name", config.model_type), "pruned": "omit " + sets['pruned'].label(),
            "weights": rows, "goals": met if goals else []}


def gemv_check(scheme: str, config, device: str) -> dict:
    """The one-row product a decode step runs, on the shape's largest matrix (FFN down), in the form the engine lays it
    out in on `device`: its largest error against the product with the dequantized matrix (relative to that product's
    largest value), which implementation ran (`quantize.product_path`), and the bandwidth it reached on the codes and
    scales, beside the time of the dequantize-then-multiply product: 20 calls captured in one CUDA graph on a GPU (as
    the engine runs them; timed from Python, a call would measure its launch), the median of 10 replays."""
    from .quantize import cpu_int4_fits, cpu_int4_form, dequantize, product_path, quantize_weight, quantized_linear

    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(config.hidden_size, config.intermediate_size, device=device, generator=generator)
    x = torch.randn(1, 1, config.intermediate_size, device=device, generator=generator).to(torch.bfloat16)
    codes, scales = quantize_weight(weight.to(torch.bfloat16), scheme)
    reference = torch.nn.functional.linear(x.float(), dequantize(codes, scales, torch.float32))
    laid_out = cpu_int4_form(codes, scales) if scheme == "int4" and cpu_int4_fits(len(codes), device, x.dtype) else (codes, scales)
    got = quantized_linear(x, *laid_out)
    error = ((got.float() - reference).abs().max() / reference.abs().max()).item()
    seconds = seconds_per_call(lambda i: quantized_linear(x, *laid_out), device)
    dequantized = seconds_per_call(lambda i: torch.nn.functional.linear(x, dequantize(codes, scales, x.dtype)), device)
    moved = codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
    return {"kernel": product_path(x, *laid_out), "max_relative_error": error, "shape": list(weight.shape),
            "us_per_call": seconds * 1e6, "gb_per_s": moved / seconds / 1e9, "dequantized_us_per_call": dequantized * 1e6}


def _weights_lines(compared: dict) -> list[str]:
    rows = compared["weights"]
    base = rows["bf16"]["pruned"]["decode_tok_s"]
    lengths = list(rows["bf16"]["pruned"]["ttft_ms"])
    lines = [f"## Weight-only quantized blocks (shape of {compared.get('shape', 'LLaMA-3.1-8B')}, random weights)", "",
             f"Pruned = {compared['pruned']}.", "",
             f"| weights | block | decode dense | decode pruned | pruned vs bf16 pruned | TTFT {' / '.join(map(str, lengths))}, "
             "pruned | blocks on device |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ttft = " / ".join(f"{v:.1f}" for v in r["pruned"]["ttft_ms"].values())
        lines.append(f"| {name} | {r['block_bytes'] / 1e6:.1f} MB | {r['dense']['decode_tok_s']:.1f} tok/s | "
                     f"{r['pruned']['decode_tok_s']:.1f} tok/s | {r['pruned']['decode_tok_s'] / base:.2f}x | {ttft} ms | "
                     f"{r['blocks_on_device_gb']:.2f} GB |")
    checks = {name: r["gemv"] for name, r in rows.items() if r.get("gemv")}
    if checks:
        lines += ["", ("One-row product alone (the FFN down matrix; error against the dequantized product, and the time "
                       "that product takes with the matrix dequantized first):"), "",
                  "| weights | kernel | max relative error | time per call | codes + scales read | dequantized first |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {c['kernel']} | {c['max_relative_error']:.1e} | {c['us_per_call']:.1f} us | "
                  f"{c['gb_per_s']:.0f} GB/s | {_optional_us(c.get('dequantized_us_per_call'))} |" for name, c in checks.items()]
    if compared["goals"]:
        lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
        lines += [f"| {g['figure']} | {g['measured']:.2f}x | {g['target']} | {_yes(g['met'])} |" for g in compared["goals"]]
    profiles = {f"{name} blocks, pruned": r["decode_profile"] for name, r in rows.items() if r.get("decode_profile")}
    return lines + [""] + (_profile_lines(profiles) if profiles else [])


def _optional_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} us"


def benchmark_bundle(bundle_dir, device: str, settings: BenchSettings, log=print, router_encoder: str | None = None) -> dict:
    """A real packaged model with a bundle's candidate sets: dense against the first set, with the time the bundle's
    policy takes to choose (a bundle whose router weights were not kept, like those under results/, is timed with an
    untrained router of the encoder its router.json names: routing time does not depend on the weights). With
    `router_encoder`, an untrained router of that encoder is timed instead (the embeddings router reads with the
    model's own tokenizer)."""
    from .bundle import Bundle
    from .engine import open_engine
    from .policy import PolicySpec, RoutedPolicy
    from .router import RouterSettings, untrained_router
    from .storage import read_json

    bundle = Bundle.open(bundle_dir)
    ref = bundle.model_ref()
    engine = open_engine(ref, device, "auto", None, settings.max_len, settings.quantize)
    sets = bundle.omission_sets()
    if router_encoder is not None:
        policy = RoutedPolicy(untrained_router(router_encoder, sets, device, decoder_tokenizer=engine.tokenizer))
        timed = f"an untrained router of the encoder asked for ({router_encoder})"
    else:
        try:
            policy, timed = PolicySpec().build(ref.num_blocks, bundle, device), "the bundle's policy"
        except PuddingError:  # no router, or its weights were not kept
            kept = bundle.router_dir() / "router.json"
            encoder = read_json(kept, "router config")["settings"]["encoder"] if kept.exists() else RouterSettings().encoder
            policy = RoutedPolicy(untrained_router(encoder, sets, device, decoder_tokenizer=engine.tokenizer))
            timed = f"an untrained router of the same encoder ({encoder})"
    dense_set = OmissionSet.dense(ref.num_blocks)
    warm = engine.warm_up([dense_set] + sets)
    policy.warm_up()
    router_ms = router_timing(policy, ROUTER_PROMPTS)
    dense, pruned = time_sets(engine, [(dense_set, "dense"), (sets[0], "set 0")], settings.prompt_lengths,
                              settings.base_prompt, settings.gen_lengths, settings.repeats)
    bandwidth = measure_bandwidth(device) if torch.device(device).type == "cuda" else None
    result = {"model": ref.name, "fingerprint": ref.fingerprint, "bundle": str(bundle_dir), "router_ms": router_ms,
              "routing_timed_with": timed, "warm_up_s": warm, "dense": _row(dense), "pruned": _row(pruned),
              "comparison": compare(engine, dense, pruned, bandwidth, router_ms, settings)}
    if torch.device(device).type == "cuda":
        result["decode_profile"] = {"dense": profile_decode(engine, dense_set)}
    log(f"{ref.name}: dense {dense.decode_tok_s:.1f} tok/s, set 0 {pruned.decode_tok_s:.1f} tok/s, router {router_ms:.2f} ms")
    return result


def _router_words(shape: dict) -> str:
    """How the shape's router ran, for the report."""
    from .router import DECODER_EMBEDDINGS

    encoder = shape.get("router_encoder", "minilm-l6")
    if encoder == DECODER_EMBEDDINGS:
        return "on the decoder's input embeddings: a tokenizer pass and a table lookup on the host"
    return f"{encoder} on the same device, in {shape.get('router_dtype', 'float32')}"


def markdown(report: dict) -> str:
    """The paper's Table 6 layout, then the ratios and targets."""
    lines = [f"# Speed benchmark ({report['device']}, {report['date']})", "", f"Command: `{report['command']}`", ""]
    shape = report.get("shape")
    if shape:
        ar = shape["all_resident"]
        settings = shape["settings"]
        weights = f"{settings['quantize']} weights, bf16 activations" if settings.get("quantize") else "bf16"
        lines += [f"## {shape['model']} ({weights}, batch 1)", "",
                  f"HBM bandwidth measured in the same run: {shape['hbm_bandwidth_gb_s']:.0f} GB/s (copy, read + write). "
                  f"Router (batch 1, {_router_words(shape)}): {shape['router_ms']:.2f} ms. Warm-up (compile + graph capture): {shape['warm_up_s']:.1f} s.", ""]
        routed = shape.get("routed_prefill")
        lines += _table(ar["dense"], ar["pruned"], shape["router_ms"], settings,
                        _key(routed["ttft_ms"], routed["pool_shared_blocks"]) if routed else None)
        lines += _routed_lines(routed, ar["pruned"], shape["router_ms"], settings)
        lines += _prefill_lines(ar, settings)
        lines += ["", "| figure | measured | target | met |", "|---|---|---|---|"]
        for goal in shape_goals(shape):
            lines.append(f"| {goal['figure']} | {goal['detail']} | {goal['target']} | {_yes(goal['met'])} |")
        mb = shape["memory_budget"]
        lines += [""] + _profile_lines(shape.get("decode_profile", {}))
        lines += _prefill_profile_lines(shape.get("prefill_profile", {}), ar)
        if shape.get("prefill_graphs_equal_eager"):
            checks = shape["prefill_graphs_equal_eager"]
            lines += [f"Graphed, bucketed, compiled pre-fill against plain eager pre-fill on the same prompts: next token "
                      f"equal in {sum(c['same_next_token'] for c in checks)} of {len(checks)}, largest logit difference "
                      f"{max(c['max_abs_logit_diff'] for c in checks):.3f} (bf16 kernels round differently).", ""]
        lines += ["", "Block swaps (memory-budget mode, pruned set to a set differing in n blocks):", "",
                  "| n | host→device copy | TTFT after switch | TTFT resident | added | logits after switch vs resident |",
                  "|---|---|---|---|---|---|"]
        for n, s in mb["swaps"].items():
            diff = f"{s['max_abs_logit_diff']:.3g}" if "max_abs_logit_diff" in s else "not checked"
            lines.append(f"| {n} | {s['copy_ms']:.1f} ms | {s['ttft_with_switch_ms']:.1f} ms | {s['ttft_resident_ms']:.1f} ms "
                         f"| {s['exposed_ms']:.1f} ms | {diff} |")
        lines += _memory_lines(ar["memory"], mb)
    if report.get("weights"):
        lines += _weights_lines(report["weights"])
    for bundle in report.get("bundles", []):
        quantized = report["settings"].get("quantize")
        lines += [f"## {bundle['model']} with its bundle{f' ({quantized} weights)' if quantized else ''}", "",
                  f"Router {bundle['router_ms']:.2f} ms (timed with {bundle.get('routing_timed_with', 'its router')}); "
                  f"decode speedup {bundle['comparison']['decode_speedup']:.3f}x "
                  f"(ideal {bundle['comparison']['decode_ideal_speedup']:.3f}x).", ""]
        lines += _table(bundle["dense"], bundle["pruned"], bundle["router_ms"], report["settings"])
        c = bundle["comparison"]
        if "dense_decode_of_ceiling" in c:
            lines += ["", f"Decode at {100 * c['dense_decode_of_ceiling']:.1f}% (dense) and {100 * c['pruned_decode_of_ceiling']:.1f}% "
                      f"(set 0) of the bandwidth ceiling ({c['dense_decode_ceiling_tok_s']:.0f} and "
                      f"{c['pruned_decode_ceiling_tok_s']:.0f} tok/s)."]
        lines += [""] + _profile_lines(bundle.get("decode_profile", {}))
    return "\n".join(lines) + "\n"


def _key(d: dict, k):
    return d[k] if k in d else d[str(k)]  # JSON turns int keys into strings


def shape_goals(shape: dict) -> list[dict]:
    """The engine's targets (issue: engine at the hardware limit), each as figure, measured, target, met."""
    ar, mb = shape["all_resident"], shape["memory_budget"]
    c, refs = ar["comparison"], ar.get("references", {})
    goals = []
    for name in ("dense", "pruned"):
        for p in (128, 512, 2048):
            bound = refs.get(f"{name}_gemm_ms", {})
            if str(p) not in {str(k) for k in bound}:
                continue
            ttft, gemm = _key(ar[name]["ttft_ms"], p), _key(bound, p)
            goals.append({"figure": f"{name} pre-fill TTFT at {p} tokens, of the GEMM-only bound", "measured": ttft / gemm,
                          "target": "≤ 1.25x", "met": ttft / gemm <= 1.25,
                          "detail": f"{ttft:.2f} ms / {gemm:.2f} ms = {ttft / gemm:.2f}x"})
    for p, v in c["prefill"].items():
        goals.append({"figure": f"pre-fill speedup at {p} tokens (routing included), of the FLOP ratio",
                      "measured": v["of_flop_ratio"], "target": "≥ 97%", "met": v["of_flop_ratio"] >= 0.97,
                      "detail": f"{v['speedup_with_router']:.3f}x of {v['flop_ratio']:.3f}x ({100 * v['of_flop_ratio']:.1f}%"
                                f"{', routing measured beside pre-fill' if v.get('routing_measured') else ''})"})
    for name in ("dense", "pruned"):
        of = c.get(f"{name}_decode_of_ceiling")
        if of is not None:
            goals.append({"figure": f"{name} decode, of the bandwidth ceiling", "measured": of, "target": "≥ 85%",
                          "met": of >= 0.85, "detail": f"{100 * of:.1f}% ({ar[name]['decode_tok_s']:.1f} of "
                                                       f"{c[name + '_decode_ceiling_tok_s']:.1f} tok/s)"})
    goals.append({"figure": "decode speedup, of the ideal weight-bytes ratio", "measured": c["decode_speedup_vs_ideal"],
                  "target": "≥ 97%", "met": c["decode_speedup_vs_ideal"] >= 0.97,
                  "detail": f"{c['decode_speedup']:.3f}x of {c['decode_ideal_speedup']:.3f}x"})
    goals.append({"figure": "routing, batch 1", "measured": shape["router_ms"], "target": "≤ 2 ms",
                  "met": shape["router_ms"] <= 2, "detail": f"{shape['router_ms']:.2f} ms"})
    mm = mb["memory"]
    goals.append({"figure": "memory-budget peak, engine", "measured": mm["engine_peak_gb"], "target": "≤ allowance",
                  "met": mb["within_allowed"],
                  "detail": f"{mm['engine_peak_gb']:.2f} GB; allowance {mb['allowed_gb']:.2f} GB ({mb['slots']} blocks + 1 "
                            f"spare slot + embeddings/head + KV + buffers + cuBLAS workspaces "
                            f"{mm.get('cublas_workspaces_gb', 0):.2f} GB"
                            + (f" + activation workspace {mb['activation_workspace_gb']:.2f} GB"
                               if "activation_workspace_gb" in mb else "")
                            + (f" + small-tensor segments' free space {mm['small_segments_slack_gb'] * 1000:.1f} MB"
                               if "small_segments_slack_gb" in mm else "") + ")"})
    return goals


def _memory_lines(all_resident: dict, mb: dict) -> list[str]:
    mm = mb["memory"]
    lines = ["", f"Memory-budget pruned decode: {mb['pruned']['decode_tok_s']:.1f} tok/s."]
    if "graph_pool_gb" not in mm:  # reports before 2026-12-04 took the allocator's peak
        return lines + [f"Peak GPU memory (allocator): memory budget {mm['peak_allocated_gb']:.2f} GB.", ""]
    parts = {f"blocks ({mb['slots']} slots + 1 spare)": mm["engine_blocks_gb"], "embeddings, head, norm": mm["embed_head_norm_gb"],
             "KV cache": mm["kv_cache_gb"], "buffers (rotary tables, inputs)": mm["buffers_gb"],
             "cuBLAS workspaces": mm["cublas_workspaces_gb"], "graphs' pool (outputs, activations)": mm["graph_pool_gb"]}
    if "small_segments_slack_gb" in mm:  # reports before 2026-12-05 left it in the rest
        parts["free space of new small-tensor segments (2 MB a stream)"] = mm["small_segments_slack_gb"]
    rest = mm["engine_peak_gb"] - sum(parts.values())
    lines += ["", "Memory-budget engine at its peak (pre-fill 512 + 512 tokens right after a swap, whose pre-fill waits for "
              "the copies and runs eagerly in the graphs' pool), GB the allocator reserved from the device:", "",
              "| part | GB |", "|---|---|"]
    lines += [f"| {name} | {gb:.3f} |" for name, gb in parts.items()]
    lines += [f"| rest (allocator rounding, anything unaccounted) | {rest:.3f} |"
              + (f" (after the run, segments outside the graphs' pools, the router's included, held {mm['outside_pools_unused_gb']:.3f} GB unused)"
                 if "outside_pools_unused_gb" in mm else ""),
              f"| **peak reserved** | **{mm['engine_peak_gb']:.3f}** |", "",
              *([("Segments outside the graphs' pools holding the most unused space after the run (MB unused of "
                  "total, segment type, stream): " + "; ".join(
                      f"{s['total_mb'] - s['allocated_mb']:.1f} of {s['total_mb']:.1f} ({s['type']}, {s['stream']})"
                      for s in mm["slack_segments"]) + "."), ""] if mm.get("slack_segments") else []),
              (f"The graphs' pool includes {mm['cublas_in_graph_pool_gb']:.3f} GB of cuBLAS workspace (its stream's "
               "first product ran in the pool); the cuBLAS row is the workspaces outside it. "
               if "cublas_in_graph_pool_gb" in mm else "")
              + "The graphs' pool after each phase (GB): " + "; ".join(
                  f"{phase} {gb:.3f}" for phase, gb in mb["graph_pool_by_phase_gb"].items()) + ".",
              "", "All resident, same run: " + ", ".join(
                  f"{name} {m['engine_peak_gb']:.2f} GB" for name, m in all_resident.items()) + " reserved at the peak.", ""]
    return lines


def _prefill_lines(ar: dict, settings: dict) -> list[str]:
    refs = ar.get("references")
    if not refs:
        return []
    lines = ["", "Pre-fill (TTFT) against the references measured in the same run: the GEMM-only bound (the four "
             "projections of every block that runs, one CUDA graph) and plain transformers (eager, sdpa, no cache, "
             "last-position logits).", "",
             "| | " + " | ".join(f"{p} tokens" for p in settings["prompt_lengths"]) + " |",
             "|---|" + "---|" * len(settings["prompt_lengths"])]
    for name in ("dense", "pruned"):
        for label, values in ((f"pudding {name}", ar[name]["ttft_ms"]), (f"GEMM-only bound, {name}", refs.get(f"{name}_gemm_ms")),
                              (f"transformers eager, {name}", refs.get(f"{name}_transformers_ms"))):
            if values:
                lines.append(f"| {label} | " + " | ".join(f"{_key(values, p):.2f} ms" for p in settings["prompt_lengths"]) + " |")
        lines.append(f"| pudding {name} / GEMM bound | " + " | ".join(
            f"{_key(ar[name]['ttft_ms'], p) / _key(refs[name + '_gemm_ms'], p):.2f}x" for p in settings["prompt_lengths"]) + " |")
        if refs.get(f"{name}_transformers_ms"):
            lines.append(f"| pudding {name} / transformers | " + " | ".join(
                f"{_key(ar[name]['ttft_ms'], p) / _key(refs[name + '_transformers_ms'], p):.2f}x" for p in settings["prompt_lengths"]) + " |")
    return lines


def _profile_lines(profile: dict) -> list[str]:
    lines = []
    for name, prof in profile.items():
        if "error" in prof:
            lines += [f"Decode step profile, {name}: not available ({prof['error']}).", ""]
            continue
        bw = prof.get("matmul_bandwidth_gb_s")
        lines += [f"Decode step profile, {name} (compiled step run eagerly, {prof['kernels_per_step']:.0f} kernels per step, "
                  f"{prof['kernels_per_block']:.1f} per block; GPU busy {prof['gpu_us_per_step']:.0f} µs per step, of which "
                  f"matrix products {prof['matmul_us_per_step']:.0f} µs" + (f" at {bw:.0f} GB/s on the weights" if bw else "") + "):", "",
                  "| kernel | launches per step | µs per step |", "|---|---|---|"]
        for k in prof["top_kernels"][:8]:
            lines.append(f"| `{k['name'][:70]}` | {k['launches_per_step']:.0f} | {k['us_per_step']:.0f} |")
        lines.append("")
    return lines


def _prefill_profile_lines(profile: dict, all_resident: dict) -> list[str]:
    lines = []
    for name, prof in profile.items():
        if "error" in prof:
            lines += [f"Pre-fill profile, {name}: not available ({prof['error']}).", ""]
            continue
        other = prof["gpu_us_per_step"] - prof["matmul_us_per_step"] - prof["attention_us"]
        graphed = _key(all_resident[name]["ttft_ms"], prof["length"]) * 1000
        lines += [f"Pre-fill profile, {name}, {prof['length']} tokens (compiled blocks run eagerly; the graphed pre-fill "
                  f"took {graphed:.0f} µs): {prof['kernels_per_step']:.0f} kernels, {prof['kernels_per_block']:.1f} per "
                  f"block; GPU busy {prof['gpu_us_per_step']:.0f} µs: matrix products {prof['matmul_us_per_step']:.0f} µs "
                  f"(the head's last-position product among them), attention {prof['attention_us']:.0f} µs, other "
                  f"kernels {other:.0f} µs.", "", "| kernel | launches | µs |", "|---|---|---|"]
        for k in prof["top_kernels"][:10]:
            lines.append(f"| `{k['name'][:70]}` | {k['launches_per_step']:.0f} | {k['us_per_step']:.0f} |")
        lines.append("")
    return lines


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _routed_lines(routed: dict | None, pruned: dict, router_ms: float, settings: dict) -> list[str]:
    if not routed:
        return []
    prompts = settings["prompt_lengths"]
    lines = ["", f"Pre-fill with routing, measured (`Engine.start` with a pending choice): the router reads the prompt on "
             f"its own stream while the blocks every set keeps pre-fill; the pool's sets all keep the first "
             f"{routed['pool_shared_blocks']} blocks (0 = route, then pre-fill). Largest logit difference from choosing "
             f"first: {routed['max_abs_logit_diff']:.3g}.", "",
             "| blocks pre-filled ahead | " + " | ".join(f"TTFT, prompt {p}" for p in prompts) + " |",
             "|---|" + "---|" * len(prompts),
             "| (pruned pre-fill + router time, added) | " + " | ".join(
                 f"{_key(pruned['ttft_ms'], p) + router_ms:.2f} ms" for p in prompts) + " |"]
    for shared, values in routed["ttft_ms"].items():
        lines.append(f"| {shared} | " + " | ".join(f"{_key(values, p):.2f} ms" for p in prompts) + " |")
    if routed.get("issue_ms"):  # runs before this measurement have no host times
        lines += ["", ("Host time until the call returns, from an idle device (choosing, switching, loading the "
                       "prompt, launching; the device waits for what comes before its first kernel):"), "",
                  "| call | " + " | ".join(f"prompt {p}" for p in prompts) + " |", "|---|" + "---|" * len(prompts),
                  "| `Engine.prefill`, the chosen set | " + " | ".join(
                      f"{_key(routed['prefill_issue_ms'], p):.3f} ms" for p in prompts) + " |"]
        for shared, values in routed["issue_ms"].items():
            lines.append(f"| `Engine.start`, {shared} blocks ahead | " + " | ".join(
                f"{_key(values, p):.3f} ms" for p in prompts) + " |")
    return lines


def _table(dense: dict, pruned: dict, router_ms: float, settings: dict, routed_ttft: dict | None = None) -> list[str]:
    """Table 6's layout. The routed row's TTFT is the measured one where given (`routed_prefill`), else pre-fill plus
    the router's time; its generation times add the router's time."""
    prompts = settings["prompt_lengths"]
    gens = settings["gen_lengths"]
    key = lambda d, k: d[k] if k in d else d[str(k)]  # noqa: E731 - JSON turns int keys into strings
    head = ["| | " + " | ".join(f"TTFT, prompt {p}" for p in prompts) + " | " +
            " | ".join(f"prompt {settings['base_prompt']} + {g} new" for g in gens) + " | decode tok/s |",
            "|---|" + "---|" * (len(prompts) + len(gens) + 1)]
    rows = []
    def ttft(row, p, extra):
        return key(routed_ttft, p) if extra and routed_ttft else key(row["ttft_ms"], p) + extra

    for row, extra in ((dense, 0.0), (pruned, router_ms)):
        cells = [f"{ttft(row, p, extra):.1f} ms" for p in prompts] + [f"{(key(row['generate_ms'], g) + extra) / 1000:.3f} s" for g in gens]
        name = row["label"] + (" + router" if extra else "")
        rows.append(f"| {name} ({row['blocks_run']} blocks) | " + " | ".join(cells) + f" | {row['decode_tok_s']:.1f} |")
    speed = [f"{key(dense['ttft_ms'], p) / ttft(pruned, p, router_ms):.2f}x" for p in prompts] + [
        f"{key(dense['generate_ms'], g) / (key(pruned['generate_ms'], g) + router_ms):.2f}x" for g in gens]
    rows.append("| speedup | " + " | ".join(speed) + f" | {dense['decode_ms_per_token'] / pruned['decode_ms_per_token']:.2f}x |")
    return head + rows
