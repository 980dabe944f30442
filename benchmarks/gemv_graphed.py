"""The one-row products of a decode step alone, as the engine runs them (20 calls captured in one CUDA graph, 10
replays): bf16 `F.linear` against `quantized_linear` int8 and int4 (the Triton kernels of kernels.py on a GPU) on the
four matrix shapes of a LLaMA-3.1-8B block, with the bandwidth reached on the bytes each reads and the tiling the
autotuner chose. Prints one line per shape; needs a GPU. Its output on the H200 (2026-12-03, before this file was
reformatted and the two custom ops became one; the same measurement) is in results/quantized-decode-h200.md.

    PYTHONPATH=src python benchmarks/gemv_graphed.py
"""

import torch

from pudding import kernels
from pudding.bench import Clock, graphed
from pudding.quantize import quantize_weight, quantized_linear

SHAPES = [(4096, 14336), (14336, 4096), (1024, 4096), (4096, 4096)]  # FFN down, gate/up, k/v, q/o (out x in)


def graphed_seconds(step, calls: int = 20, replays: int = 10) -> float:
    """Seconds per call of `step`: `calls` of them captured in one CUDA graph, the median of `replays` replays."""
    def steps():
        for _ in range(calls):
            step()

    return Clock("cuda").median(graphed(steps, "cuda"), replays) / 1000 / calls


def main() -> None:
    torch.manual_seed(0)
    for n, k in SHAPES:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        bf16 = graphed_seconds(lambda: torch.nn.functional.linear(x, weight))
        line = f"{n}x{k}: bf16 {bf16 * 1e6:.1f}us {n * k * 2 / bf16 / 1e9:.0f}GB/s"
        for scheme in ("int8", "int4"):
            codes, scales = quantize_weight(weight, scheme)
            seconds = graphed_seconds(lambda: quantized_linear(x, codes, scales))
            moved = codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
            tuner = kernels._int8_tuned if scheme == "int8" else kernels._int4_tuned
            line += (f" | {scheme} {seconds * 1e6:.1f}us {moved / seconds / 1e9:.0f}GB/s x{bf16 / seconds:.2f} "
                     f"best={tuner.best_config}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
