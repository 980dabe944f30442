"""Why was the int8 GEMV at 1.4x bf16 and not 2x? Forms of the one-row int8 product, each on the four matrix shapes
of a LLaMA-3.1-8B block, weights cycled past L2 (copies summing to > 200 MB), 20 calls per CUDA graph:

* `kernels.py`: the engine's kernel (since 2026-12-05: several rows a thread, codes widened to 1 + (c + 128)/32768 by
  one byte permute each, no subtraction; the comment above `kernels._int8_biased` says why; autotuned tiling);
* `triton-widening`: the same kernel with the codes widened in Triton arithmetic, the form the CPU interpreter runs;
* `previous`: the engine's kernel of 2026-12-04 (one to 8 rows a program, codes widened in PTX by a byte permute and
  a subtraction each);
* `even`: the Triton-widened form of 2026-12-03 without masks (every shape divides its tile) and one integer add for
  the exponent trick (c + 0x4B000080 is the float 2^23 + 128 + c's bits) instead of an add and an OR;
* `fp16-route`: PTX widening through half precision (two codes per permute under the fp16 exponent of 1024, a packed
  fp16 subtraction, then fp16 -> fp32 per code);
* `dot-native` / `dot-magic`: the multiply-adds on tensor cores: a tile of codes widened to bf16 (exact: |c| <= 127)
  times the activation chunk broadcast to 16 columns, accumulated in fp32 by `tl.dot`; widened by a plain
  conversion, or by the exponent trick then a float-to-bf16 rounding.

Prints one line per shape and form: time per call, GB/s on codes + scales, speed-up over bf16 `F.linear` on the same
cycled weights, max error relative to the largest output of the dequantized product, and the chosen tiling. Its
output on the H200 is in results/quantized-decode-h200.md. With `--profile`, one call of the FFN down product in a
few fixed tilings between cudaProfilerStart/Stop, for `ncu --profile-from-start off` (reports in
results/int8-gemv-variants-h200/). On a CPU (TRITON_INTERPRET=1) it checks the Triton forms' arithmetic on a small
matrix (the interpreter runs no PTX).

    PYTHONPATH=src python benchmarks/int8_gemv_variants.py [--profile] [--only kernels.py,previous]
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from gemv_timing import relative_error, time_forms

from pudding import kernels
from pudding.kernels import _int8_values
from pudding.quantize import dequantize, quantize_weight

SHAPES = [(4096, 14336), (14336, 4096), (1024, 4096), (4096, 4096)]  # FFN down, gate/up, k/v, q/o (out x in)


@triton.jit
def _even_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols).to(tl.float32)
        w = tl.load(codes_ptr + rows[:, None] * K + cols[None, :])
        acc += ((w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0) * x[None, :]
    total = tl.sum(acc, axis=1) * tl.load(scales_ptr + rows).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty))


@triton.jit
def _dot_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                MAGIC: tl.constexpr, DOT: tl.constexpr = tl.bfloat16):
    # DOT is bf16 on the GPU; the CPU interpreter's bf16 dot is wrong (numpy has no bf16), so it checks in fp16
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols)
        xs = tl.broadcast_to(x[:, None], (BLOCK_K, 16)).to(DOT)
        w = tl.load(codes_ptr + rows[:, None] * K + cols[None, :])
        if MAGIC:
            wf = ((w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0).to(DOT)
        else:
            wf = w.to(DOT)
        acc = tl.dot(wf, xs, acc)
    total = tl.sum(tl.where(lanes[None, :] == 0, acc, 0.0), axis=1) * tl.load(scales_ptr + rows).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty))


# The fp16 route: flipping each byte's sign bit gives b = c + 128 in [1, 255]; a byte permute puts two of them under
# the fp16 exponent of 1024 (0x64XX is the half 1024 + b), a packed fp16 subtraction of 1152 gives c exactly, and each
# half is widened to fp32 (cvt.f32.f16) for the fp32 multiply-add.
_FP16_ROUTE = tl.constexpr("""
    {
    .reg .b32 t, lo, hi, k;
    .reg .b16 h0, h1, h2, h3;
    xor.b32 t, $4, 0x80808080;
    prmt.b32 lo, t, 0x64646464, 0x5140;
    prmt.b32 hi, t, 0x64646464, 0x7362;
    mov.b32 k, 0x64806480;
    sub.f16x2 lo, lo, k;
    sub.f16x2 hi, hi, k;
    mov.b32 {h0, h1}, lo;
    mov.b32 {h2, h3}, hi;
    cvt.f32.f16 $0, h0;
    cvt.f32.f16 $1, h1;
    cvt.f32.f16 $2, h2;
    cvt.f32.f16 $3, h3;
    }
    """)


@triton.jit
def _fp16_route_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        w = tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=(cols < K)[None, :], other=0)
        f = tl.inline_asm_elementwise(_FP16_ROUTE, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
        acc += f * x[None, :]
    total = tl.sum(acc, axis=1) * tl.load(scales_ptr + rows).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty))


def _configs(key: str, sizes) -> list:
    return [triton.Config({"BLOCK_N": n, key: k}, num_warps=w, num_stages=s) for n, k, w, s in sizes]


_even_tuned = triton.autotune(_configs("BLOCK_K", [(2, 1024, 4, 3), (4, 512, 4, 3), (4, 1024, 4, 3), (8, 512, 4, 3),
                                                   (8, 1024, 8, 3), (16, 256, 4, 3), (4, 2048, 8, 3),
                                                   (8, 512, 4, 1), (8, 1024, 8, 4), (8, 2048, 8, 3), (16, 1024, 8, 3),
                                                   (16, 2048, 16, 3), (32, 512, 8, 3),
                                                   (8, 2048, 16, 3)]), key=["K"])(_even_kernel)
_dot_tuned = triton.autotune(_configs("BLOCK_K", [(16, 128, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (32, 128, 4, 3),
                                                  (32, 256, 4, 3), (32, 256, 8, 3), (64, 128, 4, 3), (64, 256, 8, 3),
                                                  (16, 256, 4, 4), (32, 128, 4, 5)]), key=["K", "MAGIC"])(_dot_kernel)
_fp16_route_tuned = triton.autotune(_configs("BLOCK_K", [(n, k, w, 1) for n, k, w in [
    (1, 512, 2), (1, 512, 4), (1, 1024, 2), (1, 1024, 4), (1, 2048, 4), (1, 2048, 8), (1, 4096, 4), (1, 4096, 8),
    (1, 8192, 8), (2, 512, 4), (2, 1024, 4), (2, 2048, 4), (2, 2048, 8), (2, 4096, 8), (4, 512, 4), (4, 1024, 4),
    (4, 2048, 8), (4, 4096, 8), (8, 1024, 8)]]), key=["N", "K"])(_fp16_route_kernel)
_triton_widening_tuned = triton.autotune(kernels._int8_tuned.configs, key=["N", "K"])(kernels._gemv_int8_kernel)


@triton.jit
def _previous_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PACKED: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0)
        acc += _int8_values(w, PACKED) * x[None, :]
    total = tl.sum(acc, axis=1) * tl.load(scales_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)


_previous_tuned = triton.autotune(kernels._tilings("BLOCK_K", [
    (1, 512, 2), (1, 512, 4), (1, 1024, 4), (1, 2048, 8), (2, 1024, 4), (2, 2048, 8), (2, 4096, 8), (4, 1024, 4),
    (4, 2048, 8), (4, 4096, 8), (8, 1024, 8)]), key=["N", "K"])(_previous_kernel)


def run_variant(name: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (n // meta["BLOCK_N"],)  # every shape here divides every tiling's rows
    if name == "kernels.py":
        return kernels.gemv(x, codes, scales)
    if x.is_cuda:
        if name == "triton-widening":
            _triton_widening_tuned[grid](x, codes, scales, out, n, k, PACKED=False)
        elif name == "previous":
            _previous_tuned[grid](x, codes, scales, out, n, k, PACKED=True)
        elif name == "even":
            _even_tuned[grid](x, codes, scales, out, k)
        elif name == "fp16-route":
            _fp16_route_tuned[grid](x, codes, scales, out, n, k)
        else:
            _dot_tuned[grid](x, codes, scales, out, k, MAGIC=name == "dot-magic")
        return out
    if name == "triton-widening":
        kernels._gemv_int8_kernel[(n // 4,)](x, codes, scales, out, n, k, BLOCK_N=4, BLOCK_K=64, PACKED=False)
    elif name == "previous":
        _previous_kernel[(n // 4,)](x, codes, scales, out, n, k, BLOCK_N=4, BLOCK_K=64, PACKED=False)
    elif name == "even":
        _even_kernel[(n // 4,)](x, codes, scales, out, k, BLOCK_N=4, BLOCK_K=64)
    else:
        _dot_kernel[(n // 16,)](x, codes, scales, out, k, BLOCK_N=16, BLOCK_K=64, MAGIC=name == "dot-magic",
                                DOT=tl.float16)
    return out


TUNERS = {"triton-widening": _triton_widening_tuned, "previous": _previous_tuned, "even": _even_tuned,
          "fp16-route": _fp16_route_tuned, "dot-native": _dot_tuned, "dot-magic": _dot_tuned,
          "kernels.py": kernels._int8_tuned}
VARIANTS = tuple(TUNERS)
CPU_VARIANTS = ("triton-widening", "previous", "even", "dot-native", "dot-magic")  # the interpreter runs no PTX


def best_config(name: str) -> str:
    return str(getattr(TUNERS[name], "best_config", ""))


def check_on_cpu() -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 256, dtype=torch.bfloat16)
    x = torch.randn(256, dtype=torch.bfloat16)
    codes, scales = quantize_weight(weight, "int8")
    reference = dequantize(codes, scales, torch.float32) @ x.float()
    for name in CPU_VARIANTS:
        print(f"{name}: max relative error {relative_error(run_variant(name, x, codes, scales), reference):.1e}")


def measure_on_gpu(variants=VARIANTS) -> None:
    time_forms(SHAPES, "int8", variants, run_variant, best_config)


def profile_on_gpu() -> None:
    """One call each of the FFN down product in fixed tilings (4 rows x 1024 inputs, 4 warps; and one row), and of
    inductor's bf16 product, between cudaProfilerStart/Stop, for `ncu --profile-from-start off`."""
    n, k = SHAPES[0]
    torch._inductor.config.coordinate_descent_tuning = True
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    codes, scales = quantize_weight(weight, "int8")
    out = torch.empty(n, dtype=x.dtype, device="cuda")
    bf16 = torch.compile(lambda x, w: torch.nn.functional.linear(x, w))

    def kernel(rows: int, packed: bool):
        return lambda: kernels._gemv_int8_kernel[(n // rows,)](x, codes, scales, out, n, k, BLOCK_N=rows, BLOCK_K=1024,
                                                               PACKED=packed, num_warps=4)

    calls = [kernel(4, False), kernel(4, True), kernel(1, True), lambda: bf16(x, weight)]
    for call in calls:
        call(), call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    import sys
    if os.environ.get("TRITON_INTERPRET") == "1":
        check_on_cpu()
    else:
        only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else VARIANTS
        profile_on_gpu() if "--profile" in sys.argv else measure_on_gpu(only)
