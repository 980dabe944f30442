"""Why was the int4 GEMV no faster than int8, and is the rows-a-thread form in kernels.py faster? Forms of the one-row
int4 product (codes (N, K/2) uint8, low nibble first, offset 8, one bf16 scale per 32 inputs), each on the four matrix
shapes of a LLaMA-3.1-8B block, weights cycled past L2, 20 calls per CUDA graph:

* `kernels.py`: the engine's kernel: several rows a thread sharing each widened activation, codes widened to
  0.5 + c/256 by one byte permute each (no subtraction), bf16 activations read as int32 pairs, a run of 8 products
  summed in one chain of multiply-adds (the comment above `_gemv_int4_kernel` says why each).
* `groups`: the form before it (to 2026-12-05): one to 16 rows a program, codes widened by a permute and a
  subtraction each, the activations split into even and odd inputs, each group's sum reduced across the threads that
  hold it; its own autotuned tilings.

Instructions a thread issues per weight in the loop (SASS compiled here for sm_90, `benchmarks/kernel_sass.py`):
groups 6.0-8.8 (12-17.6 per byte), kernels.py 3.5-7.0 (3.5 at 16 rows). Prints one line per shape and form: time per
call, GB/s on codes + scales, speed-up over bf16 `F.linear` on the same shape, max error relative to the largest
output of the dequantized product, the chosen tiling. On a CPU (TRITON_INTERPRET=1) it checks both forms' arithmetic.

    PYTHONPATH=src python benchmarks/int4_gemv_variants.py
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from gemv_timing import relative_error, time_forms

from pudding import kernels
from pudding.kernels import _int4_values
from pudding.quantize import dequantize, quantize_weight

SHAPES = [(4096, 14336), (14336, 4096), (1024, 4096), (4096, 4096)]  # FFN down, gate/up, k/v, q/o (out x in)


@triton.jit
def _groups_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, N: tl.constexpr, HALF: tl.constexpr,
                      GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, GROUP: tl.constexpr,
                      PACKED: tl.constexpr):
    # BLOCK_B bytes = 2 * BLOCK_B inputs per chunk; byte j holds inputs 2j (low nibble) and 2j + 1 (high). A group
    # of GROUP inputs is GROUP // 2 consecutive bytes: its products are summed first and scaled once.
    GROUP_BYTES: tl.constexpr = GROUP // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_B // GROUP_BYTES), dtype=tl.float32)
    for start in range(0, HALF, BLOCK_B):
        cols = start + tl.arange(0, BLOCK_B)
        col_ok = cols < HALF
        both = row_ok[:, None] & col_ok[None, :]
        packed = tl.load(codes_ptr + rows[:, None] * HALF + cols[None, :], mask=both, other=0x88)
        inputs = 2 * start + tl.arange(0, 2 * BLOCK_B)  # one contiguous load, split into even and odd inputs
        x = tl.load(x_ptr + inputs, mask=inputs < 2 * HALF, other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_B, 2)))
        low, high = _int4_values(packed, PACKED)
        products = low * x_even[None, :] + high * x_odd[None, :]
        sums = tl.sum(tl.reshape(products, (BLOCK_N, BLOCK_B // GROUP_BYTES, GROUP_BYTES)), axis=2)
        groups = start // GROUP_BYTES + tl.arange(0, BLOCK_B // GROUP_BYTES)
        scale = tl.load(scales_ptr + rows[:, None] * GROUPS + groups[None, :],
                        mask=row_ok[:, None] & (groups < GROUPS)[None, :], other=0.0)
        acc += sums * scale.to(tl.float32)
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)


_groups_tuned = triton.autotune(kernels._tilings("BLOCK_B", [(1, 256, 2), (1, 512, 4), (1, 1024, 4), (1, 2048, 8),
                                                             (2, 512, 4), (2, 1024, 4), (4, 256, 4), (4, 512, 4),
                                                             (4, 1024, 8), (8, 256, 4), (8, 512, 8), (16, 128, 4)]),
                                key=["N", "HALF"])(_groups_kernel)


def run_variant(name: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if name == "kernels.py":
        return kernels.gemv(x, codes, scales)
    n, half = codes.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    args = (x, codes, scales, out, n, half, scales.shape[1])
    if x.is_cuda:
        _groups_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, GROUP=kernels.INT4_GROUP, PACKED=True)
    else:
        _groups_kernel[(triton.cdiv(n, 4),)](*args, BLOCK_N=4, BLOCK_B=256, GROUP=kernels.INT4_GROUP, PACKED=False)
    return out


VARIANTS = ("kernels.py", "groups")
TUNERS = {"kernels.py": kernels._int4_tuned, "groups": _groups_tuned}


def check_on_cpu() -> None:
    torch.manual_seed(0)
    for n, k in [(64, 256), (20, 384)]:  # the second: rows not a multiple of the tile, inputs not of 128 bytes
        codes, scales = quantize_weight(torch.randn(n, k, dtype=torch.bfloat16), "int4")
        x = torch.randn(k, dtype=torch.bfloat16)
        reference = dequantize(codes, scales, torch.float32) @ x.float()
        errors = ", ".join(f"{name} {relative_error(run_variant(name, x, codes, scales), reference):.1e}"
                           for name in VARIANTS)
        print(f"{n}x{k}: max relative error {errors} (the output's bf16 rounding "
              f"{relative_error(reference.bfloat16(), reference):.1e})")


def measure_on_gpu() -> None:
    time_forms(SHAPES, "int4", VARIANTS, run_variant, lambda name: str(TUNERS[name].best_config))


if __name__ == "__main__":
    if torch.cuda.is_available():
        measure_on_gpu()
    elif os.environ.get("TRITON_INTERPRET") == "1":
        check_on_cpu()
    else:
        raise SystemExit("needs a GPU, or TRITON_INTERPRET=1 for the CPU check")
