"""Timing of one-row quantized product forms, shared by int8_gemv_variants.py and int4_gemv_variants.py: each form on
each matrix shape, weights cycled past L2 (copies summing to > 200 MB of codes, > 400 MB of bf16 for the reference
`F.linear`), 20 calls per CUDA graph. Prints one line per shape and form: time per call, GB/s on codes + scales,
speed-up over bf16 `F.linear` on the same shape, max error relative to the largest output of the dequantized product,
and the tiling the form's autotuner chose."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from pudding.bench.timing import seconds_per_call
from pudding.quantize import dequantize, quantize_weight


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.float() - reference).abs().max() / reference.abs().max()).item()


def time_forms(shapes: Sequence[tuple[int, int]], scheme: str, names: Sequence[str],
               run: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
               tiling: Callable[[str], str]) -> None:
    """run(name, x, codes, scales) computes form `name`'s product; tiling(name) names its chosen tiling."""
    torch.manual_seed(0)
    for n, k in shapes:
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        bf16_weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                        for _ in range(-(-400_000_000 // (2 * n * k)) + 1)]
        bf16 = seconds_per_call(lambda i, w=bf16_weights, x=x: torch.nn.functional.linear(x, w[i % len(w)]), "cuda")
        print(f"{n}x{k}: bf16 {bf16 * 1e6:.1f}us {2 * n * k / bf16 / 1e9:.0f}GB/s", flush=True)
        del bf16_weights
        distinct = [quantize_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), scheme) for _ in range(4)]
        codes_bytes = distinct[0][0].numel()
        cycled = itertools.islice(itertools.cycle(distinct), -(-200_000_000 // codes_bytes) + 1)
        quantized = [(codes.clone(), scales.clone()) for codes, scales in cycled]
        reference = dequantize(*quantized[0], torch.float32) @ x.float()
        moved = codes_bytes + quantized[0][1].numel() * quantized[0][1].element_size()
        for name in names:
            try:
                error = relative_error(run(name, x, *quantized[0]), reference)
                seconds = seconds_per_call(lambda i, name=name, q=quantized, x=x: run(name, x, *q[i % len(q)]), "cuda")
                print(f"  {name:15s} {seconds * 1e6:6.1f}us {moved / seconds / 1e9:5.0f}GB/s x{bf16 / seconds:.2f} "
                      f"err={error:.1e} {tiling(name)}", flush=True)
            except Exception as failure:  # noqa: BLE001 - a form that fails to compile is a result too
                print(f"  {name:15s} failed: {type(failure).__name__}: {str(failure)[:300]}", flush=True)
