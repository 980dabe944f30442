"""Why is the int8 GEMV at 1.4x bf16 and not 2x? Variants of kernels.py's one-row int8 product, each on the four
matrix shapes of a LLaMA-3.1-8B block, weights cycled past L2 (copies summing to > 200 MB), 20 calls per CUDA graph:

* `current`: kernels.py's kernel (codes widened by the exponent trick, fp32 multiply-add per code, masks);
* `even`: the same arithmetic without masks (every shape divides its tile) and one integer add for the exponent
  trick (c + 0x4B000080 is the float 2^23 + 128 + c's bits) instead of an add and an OR;
* `dot`: the multiply-adds on tensor cores: a tile of codes widened to bf16 (exactly: |c| <= 127) times the
  activation chunk broadcast to 16 columns, accumulated in fp32 by `tl.dot`; `dot-native` widens with a plain
  conversion, `dot-magic` with the exponent trick then a float-to-bf16 rounding (exact here).

Prints one line per shape and variant: time per call, GB/s on codes + scales, speed-up over bf16 `F.linear` on the
same cycled weights, max error relative to the largest output of the dequantized product, and the chosen tiling.
On a CPU (TRITON_INTERPRET=1) it only checks the variants' arithmetic on a small matrix.

    PYTHONPATH=src python benchmarks/int8_gemv_variants.py
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pudding import kernels
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


# Codes to floats with packed instructions, four codes (one 32-bit register) at a time: flipping each byte's sign bit
# gives b = c + 128 in [1, 255]; a byte permute puts two of them under the fp16 exponent of 1024 (0x64XX is the half
# 1024 + b), two permutes per four codes; then either a packed fp16 subtraction of 1152 gives c exactly (`asm-exact`)
# or the 1152 is left in and taken off the row's sum at the end as 1152 * sum(x) (`asm-fold`); each half is widened
# to fp32 (cvt.f32.f16) for the fp32 multiply-add.
_TO_HALVES_START = """
    {
    .reg .b32 t, lo, hi, k;
    .reg .b16 h0, h1, h2, h3;
    xor.b32 t, $4, 0x80808080;
    prmt.b32 lo, t, 0x64646464, 0x5140;
    prmt.b32 hi, t, 0x64646464, 0x7362;
    """
_SUBTRACT = """
    mov.b32 k, 0x64806480;
    sub.f16x2 lo, lo, k;
    sub.f16x2 hi, hi, k;
    """
_WIDEN = """
    mov.b32 {h0, h1}, lo;
    mov.b32 {h2, h3}, hi;
    cvt.f32.f16 $0, h0;
    cvt.f32.f16 $1, h1;
    cvt.f32.f16 $2, h2;
    cvt.f32.f16 $3, h3;
    }
    """
# The same in fp32, one permute per code: bytes [b, 0, 0, 0x4B] are the float 2^23 + b, minus 2^23 + 128 is c.
_TO_FLOATS = tl.constexpr("""
    {
    .reg .b32 t;
    xor.b32 t, $4, 0x80808080;
    prmt.b32 $0, t, 0x4B000000, 0x7540;
    prmt.b32 $1, t, 0x4B000000, 0x7541;
    prmt.b32 $2, t, 0x4B000000, 0x7542;
    prmt.b32 $3, t, 0x4B000000, 0x7543;
    sub.f32 $0, $0, 0f4B000080;
    sub.f32 $1, $1, 0f4B000080;
    sub.f32 $2, $2, 0f4B000080;
    sub.f32 $3, $3, 0f4B000080;
    }
    """)
_TO_HALVES_EXACT = tl.constexpr(_TO_HALVES_START + _SUBTRACT + _WIDEN)
_TO_HALVES_FOLD = tl.constexpr(_TO_HALVES_START + _WIDEN)


@triton.jit
def _asm_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                FOLD: tl.constexpr, FP32: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        w = tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=(cols < K)[None, :], other=0)
        if FP32:
            f = tl.inline_asm_elementwise(_TO_FLOATS, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
        elif FOLD:
            f = tl.inline_asm_elementwise(_TO_HALVES_FOLD, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
            xsum += x
        else:
            f = tl.inline_asm_elementwise(_TO_HALVES_EXACT, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
        acc += f * x[None, :]
    total = tl.sum(acc, axis=1)
    if FOLD:
        total -= 1152.0 * tl.sum(xsum, axis=0)
    total *= tl.load(scales_ptr + rows).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefetch_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    # asm-fp32 with the next chunk's codes loaded before this chunk's products: two loads in flight per thread
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = codes_ptr + rows[:, None] * K + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w_next = tl.load(w_ptrs)
    for start in range(0, K - BLOCK_K, BLOCK_K):
        w = w_next
        w_next = tl.load(w_ptrs + start + BLOCK_K)
        x = tl.load(x_ptr + start + cols).to(tl.float32)
        f = tl.inline_asm_elementwise(_TO_FLOATS, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
        acc += f * x[None, :]
    x = tl.load(x_ptr + K - BLOCK_K + cols).to(tl.float32)
    f = tl.inline_asm_elementwise(_TO_FLOATS, "=r,=r,=r,=r,r", [w_next], dtype=tl.float32, is_pure=True, pack=4)
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
_asm_tuned = triton.autotune(_configs("BLOCK_K", [(n, k, w, 1) for n, k, w in [
    (1, 512, 2), (1, 512, 4), (1, 1024, 2), (1, 1024, 4), (1, 2048, 4), (1, 2048, 8), (1, 4096, 4), (1, 4096, 8),
    (1, 8192, 8), (2, 512, 4), (2, 1024, 4), (2, 2048, 4), (2, 2048, 8), (2, 4096, 8), (4, 512, 4), (4, 1024, 4),
    (4, 2048, 8), (4, 4096, 8), (8, 1024, 8)]]),
                             key=["N", "K", "FOLD", "FP32"])(_asm_kernel)
_prefetch_tuned = triton.autotune(_configs("BLOCK_K", [(1, 512, 4, 1), (1, 1024, 4, 1), (1, 2048, 4, 1), (1, 2048, 8, 1),
                                                       (2, 512, 4, 1), (2, 1024, 4, 1), (2, 2048, 8, 1), (4, 512, 4, 1),
                                                       (4, 1024, 4, 1), (4, 2048, 8, 1), (8, 512, 4, 1),
                                                       (8, 1024, 8, 1), (1, 512, 2, 1), (1, 1024, 2, 1),
                                                       (2, 512, 2, 1)]), key=["N", "K"])(_prefetch_kernel)


def run_variant(name: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    interpret = not x.is_cuda
    if name == "current":
        return kernels.gemv(x, codes, scales)
    if name == "even":
        if interpret:
            _even_kernel[(n // 4,)](x, codes, scales, out, k, BLOCK_N=4, BLOCK_K=64)
        else:
            _even_tuned[lambda meta: (n // meta["BLOCK_N"],)](x, codes, scales, out, k)
        return out
    if name == "prefetch":
        _prefetch_tuned[lambda meta: (n // meta["BLOCK_N"],)](x, codes, scales, out, n, k)
        return out
    if name.startswith("asm"):
        _asm_tuned[lambda meta: (n // meta["BLOCK_N"],)](x, codes, scales, out, n, k, FOLD=name == "asm-fold",
                                                          FP32=name == "asm-fp32")
        return out
    magic = name == "dot-magic"
    if interpret:
        _dot_kernel[(n // 16,)](x, codes, scales, out, k, BLOCK_N=16, BLOCK_K=64, MAGIC=magic, DOT=tl.float16)
    else:
        _dot_tuned[lambda meta: (n // meta["BLOCK_N"],)](x, codes, scales, out, k, MAGIC=magic)
    return out


def best_config(name: str) -> str:
    tuner = {"even": _even_tuned, "dot-native": _dot_tuned, "dot-magic": _dot_tuned, "asm-exact": _asm_tuned,
             "asm-fold": _asm_tuned, "asm-fp32": _asm_tuned,
             "prefetch": _prefetch_tuned}.get(name)
    return str(getattr(tuner, "best_config", "")) if tuner else ""


VARIANTS = ("current", "asm-exact", "asm-fp32")
CPU_VARIANTS = ("current", "even", "dot-native", "dot-magic")  # the interpreter runs no inline assembly


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.float() - reference).abs().max() / reference.abs().max()).item()


def check_on_cpu() -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 256, dtype=torch.bfloat16)
    x = torch.randn(256, dtype=torch.bfloat16)
    codes, scales = quantize_weight(weight, "int8")
    reference = dequantize(codes, scales, torch.float32) @ x.float()
    for name in CPU_VARIANTS:
        print(f"{name}: max relative error {relative_error(run_variant(name, x, codes, scales), reference):.1e}")


def cycled_seconds(step, copies: int, calls: int = 20, replays: int = 10) -> float:
    """Seconds per call of step(i), i cycling over the weight copies, `calls` calls in one CUDA graph."""
    def steps():
        for i in range(calls):
            step(i % copies)

    from pudding.bench import Clock, graphed
    return Clock("cuda").median(graphed(steps, "cuda"), replays) / 1000 / calls


def measure_on_gpu() -> None:
    torch.manual_seed(0)
    for n, k in SHAPES:
        copies = max(2, -(-200_000_000 // (n * k)))  # int8 copies > 200 MB: every call reads from HBM, not L2
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(min(copies, 4))]
        weights *= -(-copies // len(weights))
        bf16_copies = max(2, -(-400_000_000 // (2 * n * k)))
        bf16_weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(bf16_copies)]
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        bf16 = cycled_seconds(lambda i, x=x, w=bf16_weights: torch.nn.functional.linear(x, w[i]), bf16_copies)
        print(f"{n}x{k}: bf16 {bf16 * 1e6:.1f}us {2 * n * k / bf16 / 1e9:.0f}GB/s", flush=True)
        quantized = [quantize_weight(w, "int8") for w in weights[: min(copies, 4)]]
        quantized = [(c.clone(), s.clone()) for c, s in (quantized * (-(-copies // len(quantized))))[:copies]]
        reference = dequantize(*quantized[0], torch.float32) @ x.float()
        moved = n * k + 2 * n
        for name in VARIANTS:
            try:
                error = relative_error(run_variant(name, x, *quantized[0]), reference)
                seconds = cycled_seconds(lambda i, name=name, x=x, q=quantized: run_variant(name, x, *q[i]), copies)
                print(f"  {name:10s} {seconds * 1e6:6.1f}us {moved / seconds / 1e9:5.0f}GB/s x{bf16 / seconds:.2f} "
                      f"err={error:.1e} {best_config(name)}", flush=True)
            except Exception as failure:  # noqa: BLE001 - a variant that fails to compile is a result too
                print(f"  {name:10s} failed: {type(failure).__name__}: {str(failure)[:300]}", flush=True)


def profile_on_gpu() -> None:
    """One call each of the current int8 kernel (fixed tiling), the unmasked one and inductor's bf16 product on the
    FFN down matrix, between cudaProfilerStart/Stop, for `ncu --profile-from-start off`."""
    n, k = SHAPES[0]
    torch._inductor.config.coordinate_descent_tuning = True
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    codes, scales = quantize_weight(weight, "int8")
    out = torch.empty(n, dtype=x.dtype, device="cuda")
    bf16 = torch.compile(lambda x, w: torch.nn.functional.linear(x, w))
    calls = {
        "current": lambda: kernels._gemv_int8_kernel[(n // 4,)](x, codes, scales, out, n, k, BLOCK_N=4, BLOCK_K=1024,
                                                                num_warps=4),
        "even": lambda: _even_kernel[(n // 4,)](x, codes, scales, out, k, BLOCK_N=4, BLOCK_K=1024, num_warps=4),
        "asm-exact": lambda: _asm_kernel[(n // 4,)](x, codes, scales, out, n, k, BLOCK_N=4, BLOCK_K=1024, FOLD=False,
                                                    num_warps=4),
        "asm-fold": lambda: _asm_kernel[(n // 4,)](x, codes, scales, out, n, k, BLOCK_N=4, BLOCK_K=1024, FOLD=True,
                                                   num_warps=4),
        "asm-fp32": lambda: _asm_kernel[(n // 4,)](x, codes, scales, out, n, k, BLOCK_N=4, BLOCK_K=1024, FOLD=False,
                                                   FP32=True, num_warps=4),
        "prefetch-1": lambda: _prefetch_kernel[(n,)](x, codes, scales, out, n, k, BLOCK_N=1, BLOCK_K=1024,
                                                     num_warps=4),
        "prefetch-2": lambda: _prefetch_kernel[(n // 2,)](x, codes, scales, out, n, k, BLOCK_N=2, BLOCK_K=2048,
                                                          num_warps=8),
        "asm-fp32-1": lambda: _asm_kernel[(n,)](x, codes, scales, out, n, k, BLOCK_N=1, BLOCK_K=1024, FOLD=False,
                                                FP32=True, num_warps=4),
        "asm-fp32-wide": lambda: _asm_kernel[(n,)](x, codes, scales, out, n, k, BLOCK_N=1, BLOCK_K=4096, FOLD=False,
                                                   FP32=True, num_warps=4),
        "bf16-inductor": lambda: bf16(x, weight),
    }
    for call in calls.values():
        call(), call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls.values():
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    import sys
    if os.environ.get("TRITON_INTERPRET") == "1":
        check_on_cpu()
    else:
        profile_on_gpu() if "--profile" in sys.argv else measure_on_gpu()
