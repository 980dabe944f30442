"""Low-bit kernels (Triton) for weight-only quantized blocks: matrix-vector products for decode, and a tiled
matrix product for pre-fill (at the end of this file).

A decode step multiplies one activation row by every weight matrix of the kept blocks, so its time is the bytes of
weights read. Dequantize-then-multiply reads the codes, writes a bf16 copy and reads it again (int8 decode was 1.21x
bf16 instead of ~2x; int4 0.32x); these kernels read each code once, widen it in registers and accumulate in fp32
(H200, 8B shape, pruned decode: int8 367-390 tok/s, int4 359-373, bf16 270-289, results/quantized-decode-h200*.md;
int4 461 since the one-row kernels hold several rows a thread, results/lowbit-rows-h200.md):

* int8: codes (N, K) int8, one scale per output row, applied once to the row's sum.
* int4: codes (N, K/2) uint8, two per byte (low nibble first, offset 8), one scale per group of 32 inputs, applied to
  the group's sum of products.

Each program owns one or several output rows and walks the inputs in chunks, keeping a 2-D accumulator that is reduced
once at the end (a reduction per chunk would cost more than the loads). In a decode step the gate/up product ends with
SiLU(gate) x up and the output and down products with the residual add, in the same kernel (`gemv`'s `activation` and
`residual`: 2 kernels a block fewer, int4 decode +2.5% on an H100, results/fused-gemv-ab-h100.md), and the QKV
product with q and k rotated and k, v written to the caches (`gemv_rotary`: 3 kernels a block fewer, int8 decode +3%
on an H100, results/fused-rotary-ab-h100.md). They are registered
as torch custom ops, so that `torch.compile` keeps them as single kernels and CUDA graphs capture them. Triton runs on
NVIDIA GPUs, and on the CPU under TRITON_INTERPRET=1, which is how the tests check them against the reference arithmetic
of `quantize.py` (the GPU form, whose codes are widened in PTX, is checked by the same test where a GPU is present).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: `available` is False and quantize.py keeps its reference path
    triton = None

INT4_GROUP = 32


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on x's device (Triton present; a GPU, or the interpreter on the CPU)."""
    return available_on(x.device)


def available_on(device: torch.device | str) -> bool:
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _rows_per_program(n: int) -> int:
    return 4 if n <= 4096 else 8  # enough programs to fill every SM on the small (k, v) matrices too


if triton is not None:

    # Codes become floats by the exponent trick rather than a conversion instruction: an integer c in [0, 2^23) put
    # in the mantissa of 2^23 (bits 0x4B000000 | c) is the float 2^23 + c, so a subtraction gives c exactly.
    # Integer-to-float conversions issue at a quarter of the rate of integer and float arithmetic on an SM. On a GPU
    # the bits are built four codes (one 32-bit register) at a time in PTX: one byte permute (prmt) per code picks the
    # code's byte and three bytes of 0x4B000000; written in Triton the same took a sign extension, an add and an OR
    # per code, and the integer pipe bounded the kernel (H200, ncu: ALU busiest pipe, 62% of issue slots; int8's FFN
    # product 21.8 -> 18.3 us; benchmarks/int8_gemv_variants.py). Triton's CPU interpreter runs no PTX: there
    # (PACKED false) the same arithmetic is written in Triton, which is what the CPU tests check; the GPU test runs
    # the PTX.
    @triton.jit
    def _exact_float(c, offset: tl.constexpr):
        """c - offset as fp32, for int32 c with 0 <= c < 2^23."""
        return (c | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)

    def _bytes_as_floats(register: str, first: int, offset: str) -> str:
        """PTX: the four bytes of `register` as the floats 2^23 + byte - offset, into outputs $first .. $first + 3
        (selector 0x754j: byte j of the register, then bytes 0x00, 0x00, 0x4B of the constant)."""
        permutes = [f"prmt.b32 ${first + j}, {register}, 0x4B000000, 0x754{j};" for j in range(4)]
        return "\n".join(permutes + [f"sub.f32 ${first + j}, ${first + j}, {offset};" for j in range(4)])

    # int8 (input $4): flipping each byte's sign bit gives c + 128 in [1, 255]; 2^23 + 128 is 0f4B000080.
    _INT8_PTX = tl.constexpr("{\n.reg .b32 t;\nxor.b32 t, $4, 0x80808080;\n"
                             + _bytes_as_floats("t", 0, "0f4B000080") + "\n}")
    # int4 (input $8): the low and the high nibble of each byte, offset 8 (2^23 + 8 is 0f4B000008); $0-$3 low, $4-$7 high.
    _INT4_PTX = tl.constexpr("{\n.reg .b32 lo, hi;\nand.b32 lo, $8, 0x0F0F0F0F;\nshr.u32 hi, $8, 4;\n"
                             "and.b32 hi, hi, 0x0F0F0F0F;\n" + _bytes_as_floats("lo", 0, "0f4B000008") + "\n"
                             + _bytes_as_floats("hi", 4, "0f4B000008") + "\n}")

    @triton.jit
    def _int8_values(w, PACKED: tl.constexpr):
        """int8 codes as exact fp32 values."""
        if PACKED:
            return tl.inline_asm_elementwise(_INT8_PTX, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
        else:
            return _exact_float(w.to(tl.int32) + 128, 128.0)

    @triton.jit
    def _int4_values(packed, PACKED: tl.constexpr):
        """(low nibble - 8, high nibble - 8) of each packed byte, as exact fp32 values."""
        if PACKED:
            return tl.inline_asm_elementwise(_INT4_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                             dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            widened = packed.to(tl.int32)
            return _exact_float(widened & 0xF, 8.0), _exact_float(widened >> 4, 8.0)

    # One row (a decode step) is bound by the instructions each weight costs as much as by its bytes: an H200 issues
    # ~7 thread instructions per byte of bandwidth, and the first forms of these kernels spent 4.4-8.5 per int8 weight
    # and 12-17.6 per int4 byte (results/kernel-sass-sm90.md; int4's down product took 22.3 us against int8's 18.9).
    # Three things cut that to ~3-4 a weight at 8-16 rows a program:
    # * no subtraction per code: a byte permute puts the code in the mantissa of a float near 1 (int4: the nibble c
    #   in bits 16-23 of 0x3F000000, 0.5 + c/256; int8: c + 128 in bits 8-15 of 0x3F800000, 1 + (c + 128)/32768),
    #   and the offset leaves each run of 8 inputs through the activations' sum, shared by every row. The cancellation
    #   costs ~1e-6 (int4) / ~1e-4 (int8) of a run's value, far below bf16's rounding of the output; other
    #   activation dtypes keep the exact widening;
    # * several rows a thread, each thread holding one run (4 int4 bytes, 8 int8 bytes) of every row its program owns,
    #   so one widened activation serves them all; `tl.max_contiguous` holds each code load to its run (Triton would
    #   load 16 bytes and give the activations another layout, converted through shared memory in every iteration);
    # * bf16 activations read as int32 pairs (a bf16 is the top half of an fp32: one shift or mask each), and a run's
    #   8 products summed in one chain of multiply-adds before one scale.
    # H200 (results/lowbit-rows-h200.md): int4's down product 23.8 -> 15.1 us, int8's 18.4 -> 16.4 us.
    # int4 selector 0x7j54: bytes 0, 1 from the constant (0x00), byte 2 = byte j of the nibbles, byte 3 0x3F.
    _INT4_BIASED_PTX = tl.constexpr(
        "{\n.reg .b32 lo, hi;\nand.b32 lo, $8, 0x0F0F0F0F;\nshr.u32 hi, $8, 4;\nand.b32 hi, hi, 0x0F0F0F0F;\n"
        + "\n".join(f"prmt.b32 ${j}, lo, 0x3F000000, 0x7{j}54;" for j in range(4)) + "\n"
        + "\n".join(f"prmt.b32 ${4 + j}, hi, 0x3F000000, 0x7{j}54;" for j in range(4)) + "\n}")
    # selector 0x76j4: byte 0 from the constant (0x00), byte 1 = byte j of t, bytes 2, 3 from the constant (0x80, 0x3F)
    _INT8_BIASED_PTX = tl.constexpr("{\n.reg .b32 t;\nxor.b32 t, $4, 0x80808080;\n"
                                    + "\n".join(f"prmt.b32 ${j}, t, 0x3F800000, 0x76{j}4;" for j in range(4)) + "\n}")

    @triton.jit
    def _int4_biased(packed, PACKED: tl.constexpr):
        """(0.5 + low nibble / 256, 0.5 + high nibble / 256) of each packed byte, as exact fp32 values."""
        if PACKED:
            return tl.inline_asm_elementwise(_INT4_BIASED_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                             dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            w = packed.to(tl.int32)
            return ((((w & 0xF) << 16) | 0x3F000000).to(tl.float32, bitcast=True),
                    (((w >> 4) << 16) | 0x3F000000).to(tl.float32, bitcast=True))

    @triton.jit
    def _int8_biased(w, PACKED: tl.constexpr):
        """1 + (c + 128) / 32768 for each int8 code c, as exact fp32 values."""
        if PACKED:
            return tl.inline_asm_elementwise(_INT8_BIASED_PTX, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True,
                                             pack=4)
        else:
            return (((w.to(tl.int32) + 128) << 8) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _quarters(t):
        """The four values of each run of four along the last axis, as four tensors (a thread holds each run)."""
        a, b = tl.split(tl.reshape(t, t.shape[:-1] + (t.shape[-1] // 4, 2, 2)))
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        return a0, b0, a1, b1

    @triton.jit
    def _pairs(ptr, j, n: tl.constexpr):
        """Entries 2j and 2j + 1 of a vector of length n, as fp32: bf16 read as int32 pairs (a bf16 is the top half
        of an fp32), other dtypes (or an odd length) by two strided loads."""
        if ptr.dtype.element_ty == tl.bfloat16 and n % 2 == 0:
            pair = tl.load(ptr.to(tl.pointer_type(tl.int32), bitcast=True) + j, mask=j < n // 2, other=0)
            return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)
        else:
            return (tl.load(ptr + 2 * j, mask=2 * j < n, other=0.0).to(tl.float32),
                    tl.load(ptr + 2 * j + 1, mask=2 * j + 1 < n, other=0.0).to(tl.float32))

    @triton.jit
    def _finish(total, up, rows, row_ok, out_ptr, res_ptr, GATE: tl.constexpr, RESIDUAL: tl.constexpr):
        """Store a program's row sums (rows,): with GATE, act(total) * up, up being the sums of the matching rows of
        the matrix's second half (1: SiLU, 2: GELU, tanh form); plus the residual row; rounded to the output's dtype
        where the unfused ops round."""
        dtype = out_ptr.dtype.element_ty
        if GATE:
            gate, up = total.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32)
            if GATE == 1:
                act = gate * tl.sigmoid(gate)
            else:  # 0.5 g (1 + tanh(u)) = g sigmoid(2u)
                act = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
            total = act.to(dtype).to(tl.float32) * up
        if RESIDUAL:
            total = total.to(dtype).to(tl.float32) + tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, total.to(dtype), mask=row_ok)

    @triton.jit
    def _finish_rotary(a, b, rows, row_ok, out_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, cache_stride,
                       D: tl.constexpr, Q_ROWS: tl.constexpr, KV_ROWS: tl.constexpr):
        """Store a fused QKV product's row pairs (j, j + D/2 of a head; sums a, b): plus the bias where there is one,
        q and k rotated by the position's cos / sin (rotate-half), q to the output, k and v to the caches at the
        position. The product and its bias add are rounded to the output's dtype as the unfused ops round; the
        rotation is computed in fp32 and rounded once, as inductor computes the unfused one."""
        dtype = out_ptr.dtype.element_ty
        a, b = a.to(dtype).to(tl.float32), b.to(dtype).to(tl.float32)
        if bias_ptr is not None:
            a = (a + tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            b = (b + tl.load(bias_ptr + rows + D // 2, mask=row_ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
        j = rows % D
        cos_a = tl.load(cos_ptr + j, mask=row_ok, other=0.0).to(tl.float32)
        sin_a = tl.load(sin_ptr + j, mask=row_ok, other=0.0).to(tl.float32)
        cos_b = tl.load(cos_ptr + j + D // 2, mask=row_ok, other=0.0).to(tl.float32)
        sin_b = tl.load(sin_ptr + j + D // 2, mask=row_ok, other=0.0).to(tl.float32)
        is_v = rows >= Q_ROWS + KV_ROWS
        a, b = tl.where(is_v, a, a * cos_a - b * sin_a), tl.where(is_v, b, b * cos_b + a * sin_b)
        is_q = rows < Q_ROWS
        tl.store(out_ptr + rows, a.to(dtype), mask=row_ok & is_q)
        tl.store(out_ptr + rows + D // 2, b.to(dtype), mask=row_ok & is_q)
        # k rows Q_ROWS .. Q_ROWS + KV_ROWS, then v rows: (KV head, j) -> that head's cache row at the position
        kv_row = tl.where(is_v, rows - Q_ROWS - KV_ROWS, rows - Q_ROWS)
        slot = (kv_row // D) * cache_stride + tl.load(pos_ptr) * D + j
        cached = row_ok & ~is_q
        tl.store(k_ptr + slot, a.to(dtype), mask=cached & ~is_v)
        tl.store(k_ptr + slot + D // 2, b.to(dtype), mask=cached & ~is_v)
        tl.store(v_ptr + slot, a.to(dtype), mask=cached & is_v)
        tl.store(v_ptr + slot + D // 2, b.to(dtype), mask=cached & is_v)

    @triton.jit
    def _row_pairs(N: tl.constexpr, BLOCK_N: tl.constexpr, GATE: tl.constexpr, ROTARY: tl.constexpr,
                   D: tl.constexpr):
        """The output rows a program owns, (rows, second rows, valid). Plain: BLOCK_N consecutive rows. GATE: rows of
        the gate half and the matching rows of the up half. ROTARY: BLOCK_N pairs (j, j + D/2) of heads' rows."""
        index = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        if ROTARY:
            rows = (index // (D // 2)) * D + index % (D // 2)
            return rows, rows + D // 2, index < N // 2
        if GATE:
            return index, index + N // 2, index < N // 2
        return index, index, index < N

    @triton.jit
    def _run_sums(x_even, x_odd):
        """The activations' sum over each run of 8 inputs (4 pairs)."""
        e0, e1, e2, e3 = _quarters(x_even)
        o0, o1, o2, o3 = _quarters(x_odd)
        return ((e0 + o0) + (e1 + o1)) + ((e2 + o2) + (e3 + o3))

    @triton.jit
    def _run_products(even, odd, x_even, x_odd, init):
        """init + each row's products over each run of 8 inputs (weights of the even and of the odd inputs, (rows,
        pairs); activations (pairs,)), in one chain of multiply-adds: (rows, runs)."""
        w0, w1, w2, w3 = _quarters(even)
        v0, v1, v2, v3 = _quarters(odd)
        e0, e1, e2, e3 = _quarters(x_even)
        o0, o1, o2, o3 = _quarters(x_odd)
        run = w0 * e0[None, :] + init
        run = v0 * o0[None, :] + run
        run = w1 * e1[None, :] + run
        run = v1 * o1[None, :] + run
        run = w2 * e2[None, :] + run
        run = v2 * o2[None, :] + run
        run = w3 * e3[None, :] + run
        return v3 * o3[None, :] + run

    @triton.jit
    def _int8_chunk(codes_ptr, rows, row_ok, cols, K: tl.constexpr, x_even, x_odd, init, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BIASED: tl.constexpr, PACKED: tl.constexpr):
        """The rows' products with one chunk of inputs, a sum per run of 8: (BLOCK_N, BLOCK_K // 8)."""
        w = tl.load(codes_ptr + rows[:, None] * K + tl.max_contiguous(cols, 8)[None, :],
                    mask=row_ok[:, None] & (cols < K)[None, :], other=0)
        values = _int8_biased(w, PACKED) if BIASED else _int8_values(w, PACKED)
        even, odd = tl.split(tl.reshape(values, (BLOCK_N, BLOCK_K // 2, 2)))
        return _run_products(even, odd, x_even, x_odd, init)

    @triton.jit
    def _gemv_int8_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PACKED: tl.constexpr, res_ptr=None,
                          GATE: tl.constexpr = 0, RESIDUAL: tl.constexpr = False, cos_ptr=None, sin_ptr=None,
                          pos_ptr=None, k_ptr=None, v_ptr=None, cache_stride=0, bias_ptr=None,
                          ROTARY: tl.constexpr = False, D: tl.constexpr = 2, Q_ROWS: tl.constexpr = 0):
        # BLOCK_K inputs (code bytes) per chunk, in runs of 8; one scale per row, applied once to its sum. With GATE
        # or ROTARY a program owns BLOCK_N pairs of rows (`_row_pairs`), a sum for each, combined at the end.
        BIASED: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16  # codes widened to 1 + (c + 128)/32768
        PAIRED: tl.constexpr = True if GATE else ROTARY
        rows, rows2, row_ok = _row_pairs(N, BLOCK_N, GATE, ROTARY, D)
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x_even, x_odd = _pairs(x_ptr, start // 2 + tl.arange(0, BLOCK_K // 2), K)
            if BIASED:
                init = (-32896.0 / 32768.0) * _run_sums(x_even, x_odd)[None, :]
            else:
                init = tl.zeros((1, BLOCK_K // 8), dtype=tl.float32)
            acc += _int8_chunk(codes_ptr, rows, row_ok, cols, K, x_even, x_odd, init, BLOCK_N, BLOCK_K, BIASED, PACKED)
            if PAIRED:
                acc_up += _int8_chunk(codes_ptr, rows2, row_ok, cols, K, x_even, x_odd, init, BLOCK_N, BLOCK_K, BIASED,
                                      PACKED)
        unit = 32768.0 if BIASED else 1.0
        total = tl.sum(acc, axis=1) * tl.load(scales_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * unit
        up = total
        if PAIRED:
            up_scale = tl.load(scales_ptr + rows2, mask=row_ok, other=0.0).to(tl.float32)
            up = tl.sum(acc_up, axis=1) * up_scale * unit
        if ROTARY:
            _finish_rotary(total, up, rows, row_ok, out_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr,
                           cache_stride, D, Q_ROWS, (N - Q_ROWS) // 2)
        else:
            _finish(total, up, rows, row_ok, out_ptr, res_ptr, GATE, RESIDUAL)

    @triton.jit
    def _int4_chunk(codes_ptr, scales_ptr, rows, row_ok, start, HALF: tl.constexpr, GROUPS: tl.constexpr,
                    GROUP: tl.constexpr, x_even, x_odd, init, BLOCK_B: tl.constexpr, BIASED: tl.constexpr,
                    PACKED: tl.constexpr):
        """The rows' products with one chunk of inputs (BLOCK_B bytes), each run of 8 scaled by its group's scale:
        (rows, BLOCK_B // 4)."""
        cols = start + tl.arange(0, BLOCK_B)
        packed = tl.load(codes_ptr + rows[:, None] * HALF + tl.max_contiguous(cols, 4)[None, :],
                         mask=row_ok[:, None] & (cols < HALF)[None, :], other=0x88)
        low, high = _int4_biased(packed, PACKED) if BIASED else _int4_values(packed, PACKED)
        runs = start // 4 + tl.arange(0, BLOCK_B // 4)
        scale = tl.load(scales_ptr + rows[:, None] * GROUPS + (runs // (GROUP // 8))[None, :],
                        mask=row_ok[:, None] & (runs < HALF // 4)[None, :], other=0.0)
        return _run_products(low, high, x_even, x_odd, init) * scale.to(tl.float32)

    @triton.jit
    def _gemv_int4_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, N: tl.constexpr, HALF: tl.constexpr,
                          GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, GROUP: tl.constexpr,
                          PACKED: tl.constexpr, res_ptr=None, GATE: tl.constexpr = 0,
                          RESIDUAL: tl.constexpr = False, cos_ptr=None, sin_ptr=None, pos_ptr=None, k_ptr=None,
                          v_ptr=None, cache_stride=0, bias_ptr=None, ROTARY: tl.constexpr = False,
                          D: tl.constexpr = 2, Q_ROWS: tl.constexpr = 0):
        # BLOCK_B bytes = 2 * BLOCK_B inputs per chunk; byte j holds inputs 2j (low nibble) and 2j + 1 (high). Runs of
        # 4 bytes (8 inputs) never straddle a group (GROUP // 2 bytes, a multiple of 4). GATE, ROTARY: as in the int8
        # kernel.
        BIASED: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16  # codes widened to 0.5 + c/256
        PAIRED: tl.constexpr = True if GATE else ROTARY
        rows, rows2, row_ok = _row_pairs(N, BLOCK_N, GATE, ROTARY, D)
        acc = tl.zeros((BLOCK_N, BLOCK_B // 4), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_B // 4), dtype=tl.float32)
        for start in range(0, HALF, BLOCK_B):
            x_even, x_odd = _pairs(x_ptr, start + tl.arange(0, BLOCK_B), 2 * HALF)
            if BIASED:
                init = (-136.0 / 256.0) * _run_sums(x_even, x_odd)[None, :]
            else:
                init = tl.zeros((1, BLOCK_B // 4), dtype=tl.float32)
            acc += _int4_chunk(codes_ptr, scales_ptr, rows, row_ok, start, HALF, GROUPS, GROUP, x_even, x_odd, init,
                               BLOCK_B, BIASED, PACKED)
            if PAIRED:
                acc_up += _int4_chunk(codes_ptr, scales_ptr, rows2, row_ok, start, HALF, GROUPS, GROUP, x_even, x_odd,
                                      init, BLOCK_B, BIASED, PACKED)
        unit = 256.0 if BIASED else 1.0
        total = tl.sum(acc, axis=1) * unit
        up = total
        if PAIRED:
            up = tl.sum(acc_up, axis=1) * unit
        if ROTARY:
            _finish_rotary(total, up, rows, row_ok, out_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr,
                           cache_stride, D, Q_ROWS, (N - Q_ROWS) // 2)
        else:
            _finish(total, up, rows, row_ok, out_ptr, res_ptr, GATE, RESIDUAL)

    # On the GPU each matrix shape gets the fastest of a few tilings, measured on its first call (the engine's
    # warm-up, before any CUDA graph is captured); the interpreter runs the fixed tiling below. The rows a program owns
    # trade instructions per weight (fewer with more rows) against programs, so bytes in flight (more with fewer).
    def _tilings(chunk: str, sizes) -> list:
        return [triton.Config({"BLOCK_N": n, chunk: c}, num_warps=w, num_stages=1) for n, c, w in sizes]

    def _paired_tilings(configs, named_args, **kwargs) -> list:
        """With GATE or ROTARY a program reads BLOCK_N pairs of rows: at most 8 (16 spill)."""
        return [c for c in configs if not (kwargs.get("GATE") or kwargs.get("ROTARY")) or c.kwargs["BLOCK_N"] <= 8]

    # Each thread holds one run of every row its program owns: BLOCK_K = 8 int8 bytes x 32 threads a warp (x 1 or 2);
    # BLOCK_B = 4 int4 bytes x 32 a warp.
    _int8_tuned = triton.autotune(_tilings("BLOCK_K", [(4, 256, 1), (8, 256, 1), (16, 256, 1), (8, 512, 2), (16, 512, 2),
                                                       (1, 1024, 4), (2, 1024, 4), (4, 1024, 4), (8, 1024, 4),
                                                       (16, 1024, 4), (8, 2048, 8), (16, 2048, 8), (4, 2048, 4),
                                                       (8, 1024, 2)]),
                                  key=["N", "K", "GATE", "ROTARY"], prune_configs_by={"early_config_prune": _paired_tilings})(
                                      _gemv_int8_kernel)
    _int4_tuned = triton.autotune(_tilings("BLOCK_B", [(4, 128, 1), (8, 128, 1), (16, 128, 1), (4, 256, 2), (8, 256, 2),
                                                       (16, 256, 2), (1, 512, 4), (2, 512, 4), (4, 512, 4), (8, 512, 4),
                                                       (16, 512, 4), (8, 1024, 8), (16, 1024, 8), (4, 1024, 4),
                                                       (8, 512, 2)]),
                                  key=["N", "HALF", "GATE", "ROTARY"], prune_configs_by={"early_config_prune": _paired_tilings})(
                                      _gemv_int4_kernel)

_GATES = {"": 0, "silu": 1, "gelu_tanh": 2}  # `gemv`'s activation, as the kernels' constant


def _launch(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, programs_of: int,
            fused: dict) -> torch.Tensor:
    """Run the one-row kernel of the codes' scheme with the fused work `fused` (the kernels' optional arguments),
    a program for every BLOCK_N of `programs_of` rows or row pairs."""
    x, codes, scales = x.contiguous(), codes.contiguous(), scales.contiguous()
    n = codes.shape[0]
    if codes.dtype == torch.int8:
        shape = (n, codes.shape[1])
        kernel, tuned, fixed = _gemv_int8_kernel, _int8_tuned, {"BLOCK_K": 256}
    else:
        shape = (n, codes.shape[1], scales.shape[1])
        kernel, tuned = _gemv_int4_kernel, _int4_tuned
        fixed = {"BLOCK_B": 128}
        fused = {**fused, "GROUP": codes.shape[1] * 2 // scales.shape[1]}
    if x.is_cuda:
        tuned[lambda meta: (triton.cdiv(programs_of, meta["BLOCK_N"]),)](x, codes, scales, out, *shape, PACKED=True,
                                                                          **fused)
    else:  # the interpreter: one fixed tiling
        block_n = _rows_per_program(programs_of)
        kernel[(triton.cdiv(programs_of, block_n),)](x, codes, scales, out, *shape, BLOCK_N=block_n, **fixed,
                                                     PACKED=False, **fused)
    return out


@torch.library.custom_op("pudding::gemv_lowbit", mutates_args=())
def gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, activation: str = "",
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized matrix times one activation row x of length K: a vector of length N, in x's dtype. The scheme
    is read from the codes (int8: (N, K) int8 with per-row scales; int4: (N, K/2) uint8 with per-group scales).

    The element-wise work after a decode step's product can run in the same kernel, one launch instead of two:
    with `activation` ("silu", "gelu_tanh") the matrix stacks [gate; up] and the result is act(gate) * up (length
    N / 2); with `residual`, that row is added to the result. Both round where the unfused ops round.
    (The RMS norm before a product stays a kernel of its own: multiplying every program's activations by the norm's
    weight made the int4 products 15% slower, more than the launch it saved; H100, results/fused-gemv-ab-h100.md.)"""
    outputs = codes.shape[0] // 2 if activation else codes.shape[0]
    out = torch.empty(outputs, dtype=x.dtype, device=x.device)
    residual = None if residual is None else residual.contiguous()
    fused = {"res_ptr": out if residual is None else residual, "GATE": _GATES[activation],
             "RESIDUAL": residual is not None}
    return _launch(x, codes, scales, out, outputs, fused)


@gemv.register_fake
def _(x, codes, scales, activation="", residual=None):
    return x.new_empty(codes.shape[0] // 2 if activation else codes.shape[0])


@torch.library.custom_op("pudding::gemv_lowbit_rotary", mutates_args=("k_cache", "v_cache"))
def gemv_rotary(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step's fused QKV product (`gemv` of a matrix stacking the q, k and v rows of every head, plus `bias`)
    with the work after it in the same kernel: q and k rotated by the position's `cos` and `sin` (rotate-half,
    length head_dim), k and v written to the caches (kv_heads, max_len, head_dim) at `position` (one int64).
    Returns q (heads x head_dim, rotated). What it saves is the three small kernels after the product (q's rotation,
    k's rotation and cache write, v's cache write)."""
    kv_heads, _, dim = k_cache.shape
    if k_cache.stride()[1:] != (dim, 1) or v_cache.stride() != k_cache.stride():
        raise ValueError("gemv_rotary writes K and V caches laid out (kv_heads, positions, head_dim), alike")
    q_rows = codes.shape[0] - 2 * kv_heads * dim
    out = torch.empty(q_rows, dtype=x.dtype, device=x.device)
    fused = {"cos_ptr": cos.contiguous(), "sin_ptr": sin.contiguous(), "pos_ptr": position, "k_ptr": k_cache,
             "v_ptr": v_cache, "cache_stride": k_cache.stride(0), "ROTARY": True, "D": dim, "Q_ROWS": q_rows,
             "bias_ptr": None if bias is None else bias.contiguous()}
    return _launch(x, codes, scales, out, codes.shape[0] // 2, fused)


@gemv_rotary.register_fake
def _(x, codes, scales, cos, sin, position, k_cache, v_cache, bias=None):
    return x.new_empty(codes.shape[0] - 2 * k_cache.shape[0] * k_cache.shape[2])


# ---------------------------------------------------------------------------------------------------------------------
# Several rows (pre-fill, scoring): a matrix product that widens the codes tile by tile in registers. Dequantizing the
# whole matrix first writes and re-reads a bf16 copy of it (int4 pre-fill of the 8B shape: 30 ms TTFT at 128 tokens
# against 4.6 ms in bf16; results/quantized-decode-h200-f471f2f.md); here each program widens the (BLOCK_N, BLOCK_K)
# tile of codes it needs, scales it (int4: per group of inputs) and feeds it to the tensor cores in the activations'
# dtype.
# int8 codes are exact in bf16, so int8 multiplies the codes and applies the row scale once to the output.
# On Hopper the kernel reaches 0.3-0.7x of cuBLAS's bf16 speed on the 8B shape's matrices, so for int8 beyond a few
# hundred rows dequantize-then-cuBLAS wins (`quantize.INT8_KERNEL_ROWS`; results/quantized-prefill-h200.md).

if triton is not None:

    @triton.jit
    def _mm_lowbit_kernel(x_ptr, codes_ptr, scales_ptr, out_ptr, M, N: tl.constexpr, K: tl.constexpr,
                          GROUPS: tl.constexpr, GROUP: tl.constexpr, M_BUCKET, INT4: tl.constexpr,
                          FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SWIZZLE: tl.constexpr):
        # Programs are ordered so that SWIZZLE consecutive ones share a column of weight tiles (kept in L2).
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        band = pid // (SWIZZLE * tiles_m)
        first_n = band * SWIZZLE
        width = min(tiles_n - first_n, SWIZZLE)
        tile_n = first_n + (pid % (SWIZZLE * tiles_m)) % width
        tile_m = (pid % (SWIZZLE * tiles_m)) // width
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        outs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, out_ok = rows < M, outs < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
            if INT4:
                HALF: tl.constexpr = K // 2
                pairs = start // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(codes_ptr + outs[:, None] * HALF + pairs[None, :],
                                 mask=out_ok[:, None] & (pairs < HALF)[None, :], other=0x88)
                low = (packed & 0xF).to(tl.float32) - 8.0
                high = (packed >> 4).to(tl.float32) - 8.0
                values = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K // GROUP, GROUP))  # byte j: inputs 2j, 2j + 1
                groups = start // GROUP + tl.arange(0, BLOCK_K // GROUP)
                scale = tl.load(scales_ptr + outs[:, None] * GROUPS + groups[None, :],
                                mask=out_ok[:, None] & (groups < GROUPS)[None, :], other=0.0).to(tl.float32)
                w = tl.reshape(values * scale[:, :, None], (BLOCK_N, BLOCK_K)).to(x.dtype)  # rounded as dequantize does
            else:
                w = tl.load(codes_ptr + outs[:, None] * K + cols[None, :], mask=out_ok[:, None] & (cols < K)[None, :],
                            other=0)
            if FP32:  # fp32 activations, or the interpreter (whose dot does not take bf16): exact fp32 products
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        if not INT4:
            acc = acc * tl.load(scales_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + outs[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & out_ok[None, :])

    def _mm_tilings() -> list:
        sizes = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 4, 4),
                 (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3), (128, 64, 64, 4, 4),
                 (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SWIZZLE": 8}, num_warps=w, num_stages=s)
                for m, n, k, w, s in sizes]

    # Tuned per (rows rounded up to a power of two, matrix shape, scheme), on the first call of each: the engine's
    # warm-up pre-fills every length bucket before it captures graphs.
    _mm_tuned = triton.autotune(_mm_tilings(), key=["M_BUCKET", "N", "K", "INT4"])(_mm_lowbit_kernel)


@torch.library.custom_op("pudding::mm_lowbit", mutates_args=())
def mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) times the quantized (N, K) matrix, transposed: (M, N) in x's dtype (scheme read from the codes, as
    for `gemv`)."""
    x, codes, scales = x.contiguous(), codes.contiguous(), scales.contiguous()
    m, k = x.shape
    n = codes.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    int4 = codes.dtype != torch.int8
    groups = scales.shape[1] if int4 else 1
    args = {"GROUPS": groups, "GROUP": k // groups, "M_BUCKET": triton.next_power_of_2(m), "INT4": int4,
            "FP32": x.dtype == torch.float32 or not x.is_cuda}
    if x.is_cuda:
        _mm_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            x, codes, scales, out, m, n, k, **args)
    else:  # the interpreter: one small tiling
        tiles = triton.cdiv(m, 16) * triton.cdiv(n, 32)
        _mm_lowbit_kernel[(tiles,)](x, codes, scales, out, m, n, k, **args, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64,
                                    SWIZZLE=2)
    return out


@mm.register_fake
def _(x, codes, scales):
    return x.new_empty(x.shape[0], codes.shape[0])


# ---------------------------------------------------------------------------------------------------------------------
# The GPU form checked without a GPU: Triton compiles a kernel for Hopper (sm_90) on any machine with its own ptxas,
# and its cuobjdump reads the machine code back (tests/test_quantize.py: no spills; benchmarks/kernel_sass.py:
# instructions per weight).
def compile_for_hopper(fn, signature: dict, constants: dict, config) -> bytes:
    """The cubin of a Triton kernel for sm_90. `signature`: the types of the runtime arguments (the rest are
    constants); pointers are marked 16-byte aligned, as the launcher marks torch's allocations (without the mark the
    same kernel compiles without vector loads or asynchronous copies)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    constants = {**constants, **config.kwargs}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature.get(n, "").startswith("*")}
    source = ASTSource(fn=fn, signature={n: signature.get(n, "constexpr") for n in names},
                       constexprs={(names.index(n),): v for n, v in constants.items()}, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled.asm["cubin"]


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """Triton's own cuobjdump run on a cubin (e.g. `--dump-resource-usage`, `-sass`)."""
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return subprocess.run([str(tool), *flags, str(path)], capture_output=True, text=True, check=True).stdout
