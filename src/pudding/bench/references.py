"""What pudding's pre-fill and decode are put against, measured in the same run (the matrix products alone, plain
transformers, the plain eager pre-fill), and the kernel profiles that say where a step's time goes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..block import block_step
from ..engine import Engine
from ..omission import OmissionSet
from .timing import Clock, graphed, prompt_ids, weight_bytes_per_token


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

    from ..export import delete_blocks

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    model = delete_blocks(model, omit) if len(omit) else model
    clock, out = Clock(device), {}
    with torch.inference_mode():
        for length in lengths:
            ids = torch.tensor([prompt_ids(length, config.vocab_size)], device=device)
            out[length] = clock.median(lambda: model(ids, use_cache=False, logits_to_keep=1).logits.argmax(-1), repeats, warmup=2)
    model = None  # freed before the next engine is built
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
    token = engine.prefill(prompt_ids(128, engine.shape.vocab)).argmax(-1)

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
        ids = prompt_ids(length, engine.shape.vocab)
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
            ids = prompt_ids(length - 3, engine.shape.vocab)  # not a bucket size: the padding is exercised
            graphed_logits = engine.prefill(ids).clone()
            compiled, engine._prefill_block = engine._prefill_block, block_step
            try:
                engine._load_prompt(ids, exact=True)
                plain = engine._prefill_padded(len(ids)).clone()
            finally:
                engine._prefill_block = compiled
            out.append({"set": omit.label(), "length": len(ids), "max_abs_logit_diff": float((graphed_logits - plain).abs().max()),
                        "same_next_token": bool(graphed_logits.argmax() == plain.argmax())})
    return out
