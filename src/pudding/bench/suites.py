"""The benchmarks `pudding bench` runs: a shape with random weights (dense against the paper-style pruned set, with
routing, references, profiles, swaps and memory), the same shape with weight-only quantized or LoRA blocks, and real
packaged models with their bundles. Each returns a JSON-ready dict; report.py turns it into Markdown.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..engine import Engine
from ..errors import PuddingError
from ..omission import OmissionSet
from ..policy import shared_blocks
from ..quantize import split_scheme
from .memory import allocator_baseline, cublas_workspace_bytes, graph_pool_bytes, peak_memory
from .references import gemm_bound, graphed_equals_eager, profile_decode, profile_prefill, transformers_forward
from .timing import (ROUTER_PROMPTS, Arm, Clock, SetTimings, measure_bandwidth, prefill_flops, routed_prefill,
                     router_timing, seconds_per_call, swap_timing, time_arms, time_set, time_sets, weight_bytes_per_token)

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
            settings: BenchSettings, references: dict | None = None, routed_ttft: dict | None = None,
            routed_dense_ttft: dict | None = None) -> dict:
    """Ratios against dense, against the ceilings and against the references measured in the same run. With
    `routed_ttft` (prompt length -> TTFT measured with routing, `routed_prefill`), the pre-fill speedup with routing
    is taken from it, against `routed_dense_ttft` (the dense pre-fill timed in turn with it) where given; otherwise
    the router's time is added to the pruned pre-fill."""
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
        dense_ms = routed_dense_ttft[p] if routed_ttft and routed_dense_ttft else dense.ttft_ms[p]
        speedup = dense_ms / with_routing
        out["prefill"][p] = {"speedup_with_router": speedup, "speedup_without_router": dense.ttft_ms[p] / pruned.ttft_ms[p],
                             "ttft_with_routing_ms": with_routing, "routing_measured": bool(routed_ttft),
                             "dense_in_turn": bool(routed_ttft and routed_dense_ttft),
                             "flop_ratio": flop_ratio, "of_flop_ratio": speedup / flop_ratio}
        for name, t in (("dense", dense), ("pruned", pruned)):
            for reference, values in (("gemm_bound", references.get(f"{name}_gemm_ms")),
                                      ("transformers", references.get(f"{name}_transformers_ms"))):
                if values and p in values:
                    out["prefill"][p][f"{name}_of_{reference}"] = t.ttft_ms[p] / values[p]
    return out


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
        measured = routed_prefill(engine, policy, settings.prompt_lengths, sorted({0, 8, pool_shared}), settings.repeats,
                                  dense=dense_set)
        results["routed_prefill"] = {"pool_shared_blocks": pool_shared, **measured}
        routed = measured["ttft_ms"]
        log(f"pre-fill with routing (blocks ahead -> ms): {routed}; largest logit difference from choosing first "
            f"{measured['max_abs_logit_diff']:.3g}")
        for guess, row in measured["speculative"].items():
            log(f"speculating, guess {guess}: {row['ttft_ms']} ms, blocks ahead {row['blocks_ahead']}")
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
                                                     routed[pool_shared] if routed else None,
                                                     measured["dense_ttft_ms"][pool_shared] if routed else None),
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
    # (other sets, swaps, the eager pre-fill after a swap) must fit in, the small-tensor segments the engine's streams
    # needed beyond its own tensors in them (2 MB a stream), and the allocator's rounding of the engine's own
    # tensors (to 512 bytes; to 2 MiB for those of 10 MiB or more). All are measured or follow the allocator's rules.
    weights_and_cache = memory["embed_head_norm_gb"] + (kept + 1) * memory["block_gb"] + memory["kv_cache_gb"]
    allowed = (weights_and_cache + memory["buffers_gb"] + memory["cublas_workspaces_gb"] + workspace / 1e9
               + memory["small_segments_gb"] + memory["allocator_rounding_gb"])
    results["memory_budget"] = {"slots": kept, "pruned": _row(budget_pruned), "swaps": swaps, "memory": memory,
                                "allowed_gb": allowed, "within_allowed": memory["engine_peak_gb"] <= allowed + 1e-9,  # a byte: float sums
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
    and the bytes the blocks take. Every engine is built first and they take turns at every repeat (`time_arms`):
    timed one after another, the schemes' ratios moved by up to 30% between runs on a shared CPU. They are resident
    together (the 8B shape with bf16, int8 and int4 blocks: about 30 GB). `goals`: the issue's decode goals (set on
    the 8B shape)."""
    import gc

    blocks = config.num_hidden_layers
    sets = {"dense": OmissionSet.dense(blocks), "pruned": OmissionSet(tuple(b for b in PAPER_SET if b < blocks) or (1,), blocks)}
    engines, rows = {}, {}
    for scheme in ["bf16", *schemes]:
        lora = scheme == LORA_ROW
        name = f"bf16 + LoRA r{LORA_RANK} (unmerged)" if lora else scheme
        engine = Engine.random(config, device, quantize=None if scheme in ("bf16", LORA_ROW) else scheme, max_len=1024,
                               lora_rank=LORA_RANK if lora else 0)
        if lora:
            engine.random_adapters(sets.values())
        engine.warm_up(list(sets.values()))
        engines[name] = engine
        rows[name] = {"block_bytes": engine.layout.nbytes + (engine.lora_layout.nbytes if lora else 0),
                      "head_bytes": engine.head_bytes, "blocks_on_device_gb": engine.memory()["blocks"] / 1e9}
        if scheme in ("int8", "int4"):  # (a +head scheme runs the same product)
            rows[name]["gemv"] = gemv_check(scheme, config, device)
            log(f"{scheme} GEMV: {rows[name]['gemv']}")
    arms = [Arm(engine, omit, f"{name}, {set_name}") for name, engine in engines.items() for set_name, omit in sets.items()]
    timings = iter(time_arms(arms, prompt_lengths, prompt_lengths[0], (128, 256), repeats))
    for name, engine in engines.items():
        row = rows[name]
        for set_name, timed in zip(sets, timings):
            row[set_name] = {"decode_tok_s": round(timed.decode_tok_s, 2), "ttft_ms": timed.ttft_ms,
                             "weight_bytes_per_token": weight_bytes_per_token(engine, timed.kept)}
        if torch.device(device).type == "cuda":  # where a quantized step's time goes besides its products
            row["decode_profile"] = profile_decode(engine, sets["pruned"])
        log(f"{name} blocks: pruned decode {row['pruned']['decode_tok_s']:.1f} tok/s")
    engines = arms = None
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    base = rows["bf16"]["pruned"]["decode_tok_s"]
    goal = {s: WEIGHT_GOALS.get(split_scheme(s)[0]) for s in rows}  # a +head scheme is held to its blocks' goal
    met = [{"figure": f"{s} pruned decode, of bf16 pruned decode", "measured": rows[s]["pruned"]["decode_tok_s"] / base,
            "target": f"≥ {goal[s]}x", "met": rows[s]["pruned"]["decode_tok_s"] / base >= goal[s]}
           for s in rows if goal[s]]
    return {"shape": getattr(config, "_name", config.model_type), "pruned": "omit " + sets['pruned'].label(),
            "weights": rows, "goals": met if goals else [], "timing": "schemes taking turns at every repeat"}


def gemv_check(scheme: str, config, device: str) -> dict:
    """The one-row product a decode step runs, on the shape's largest matrix (FFN down), in the form the engine lays it
    out in on `device`: its largest error against the product with the dequantized matrix (relative to that product's
    largest value), which implementation ran (`quantize.product_path`), and the bandwidth it reached on the codes and
    scales, beside the time of the dequantize-then-multiply product: 20 calls captured in one CUDA graph on a GPU (as
    the engine runs them; timed from Python, a call would measure its launch), the median of 10 replays."""
    from ..quantize import cpu_int4_fits, cpu_int4_form, dequantize, product_path, quantize_weight, quantized_linear

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


def benchmark_bundle(bundle_dir, device: str, settings: BenchSettings, log=print, router_encoder: str | None = None) -> dict:
    """A real packaged model with a bundle's candidate sets: dense against the first set, with the time the bundle's
    policy takes to choose (a bundle whose router weights were not kept, like those under results/, is timed with an
    untrained router of the encoder its router.json names: routing time does not depend on the weights). With
    `router_encoder`, an untrained router of that encoder is timed instead (the embeddings router reads with the
    model's own tokenizer). The pre-fill with routing is measured as `pudding generate` runs it: the blocks every set
    keeps pre-fill while the router chooses (`routed_prefill`), the dense pre-fill timed in turn with it."""
    from ..bundle import Bundle
    from ..engine import open_engine
    from ..policy import PolicySpec, RoutedPolicy
    from ..router import RouterSettings, untrained_router
    from ..storage import read_json

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
    shared = shared_blocks(sets)
    routed = routed_prefill(engine, policy, settings.prompt_lengths, [shared], settings.repeats, dense=dense_set)
    bandwidth = measure_bandwidth(device) if torch.device(device).type == "cuda" else None
    result = {"model": ref.name, "fingerprint": ref.fingerprint, "bundle": str(bundle_dir), "router_ms": router_ms,
              "routing_timed_with": timed, "warm_up_s": warm, "dense": _row(dense), "pruned": _row(pruned),
              "routed_prefill": {"pool_shared_blocks": shared, **routed},
              "comparison": compare(engine, dense, pruned, bandwidth, router_ms, settings, None,
                                    routed["ttft_ms"][shared], routed["dense_ttft_ms"][shared])}
    if torch.device(device).type == "cuda":
        result["decode_profile"] = {"dense": profile_decode(engine, dense_set)}
    log(f"{ref.name}: dense {dense.decode_tok_s:.1f} tok/s, set 0 {pruned.decode_tok_s:.1f} tok/s, router {router_ms:.2f} ms")
    return result
