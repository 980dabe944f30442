"""Weight-only quantization of the transformer blocks (paper Table 14): int8 and int4 weights, bf16/fp32 activations.

* int8: one scale per output row, codes in [-127, 127]; the product runs on the codes and the row scale is applied to
  the output (the form gpt-fast uses: no dequantized copy of the matrix is needed).
* int4: one scale per group of 32 inputs (as llama.cpp's Q4_0), codes in [-8, 7] stored two per byte.

On a GPU the products run in the low-bit kernels of kernels.py, which widen each code in registers: a matrix-vector
kernel for one activation row (a decode step), a tiled matrix product for several (pre-fill, scoring; int8 only up
to a few hundred rows). On a CPU in bf16 or fp16, decode runs in PyTorch's own weight-only kernels, which also read
each code once: int8 as stored, int4 in that kernel's packing, made once when the engine lays its blocks out
(`cpu_int4_form`); dequantizing the matrix at every step made int4 decode slower than the unquantized model's.
Elsewhere the matrix is dequantized and multiplied in the activations' dtype. `product_path` says which runs.

Both are symmetric (no zero point) and computed from the model's own weights at load time, so there is no
calibration data. The same `quantized_linear` serves the scorer (transformers modules, `QuantizedLinear`) and the
engine (`block.block_step` reads codes and scales from the block's flat buffer), so a quantized evaluation and a
quantized generation run the same arithmetic (but for the engine's int4 on a CPU in half precision: the same values,
rounded by PyTorch's kernel). Embeddings and norms stay in the model's dtype; so does the output head (the paper's
Table 14 quantizes the blocks), unless the scheme ends in "+head" (`int8+head`, `int4+head`), as gpt-fast and
llama.cpp's quantized files do: every decode step reads the whole head, 7% of the weights of the 8B shape but 28% of
Qwen2.5-0.5B's, so the faster the blocks the more of a step it takes.
"""

from __future__ import annotations

import torch

from . import kernels
from .architectures import architecture_for, resolve
from .errors import PuddingError

SCHEMES = ("int8", "int4")
HEAD = "+head"  # a scheme's suffix: the output head quantized too
INT4_GROUP = kernels.INT4_GROUP


def check_scheme(scheme: str | None, option: str = "--quantize") -> str | None:
    if scheme is not None and split_scheme(scheme)[0] not in SCHEMES:
        raise PuddingError(f"unknown {option} '{scheme}' (use {' or '.join(SCHEMES)}, with {HEAD} to quantize the output "
                           "head too)")
    return scheme


def split_scheme(scheme: str) -> tuple[str, bool]:
    """(the blocks' scheme, whether the output head is quantized too): 'int4+head' -> ('int4', True)."""
    return (scheme.removesuffix(HEAD), True) if scheme.endswith(HEAD) else (scheme, False)


def quantized_shapes(out_features: int, in_features: int, scheme: str, dtype: torch.dtype,
                     device: torch.device | str | None = None) -> tuple[tuple, tuple]:
    """((codes shape, codes dtype), (scales shape, scales dtype)) of an (out, in) matrix; with `device`, of the form
    its products take there (int4 on a CPU: `cpu_int4_form`)."""
    if scheme == "int8":
        return ((out_features, in_features), torch.int8), ((out_features,), dtype)
    if in_features % INT4_GROUP:
        raise PuddingError(f"int4 needs matrices whose input size is a multiple of {INT4_GROUP} (this one has {in_features})")
    groups = in_features // INT4_GROUP
    if device is not None and cpu_int4_fits(out_features, device, dtype):
        return ((out_features, in_features // 2), torch.uint8), ((groups, out_features, 2), dtype)
    return ((out_features, in_features // 2), torch.uint8), ((out_features, groups), dtype)


# PyTorch's CPU int4 kernel (the one gpt-fast runs on CPUs) reads its own packing of the nibbles, made from the codes
# once (about 0.1 s for a 14336 x 4096 matrix, too slow for every product), and its scales as (groups, out, 2)
# (scale, zero) pairs, a value being (nibble - 8) * scale + zero: with zero 0, exactly this module's int4. For output
# rows in 64s the packing is simple (`cpu_int4_values` undoes it): byte i of input k's 32 bytes in a block of 64 rows
# holds rows i (low nibble) and 32 + i (high); other row counts end in a differently packed tail, so they keep the
# module's layout.
CPU_INT4_ROWS = 64
# PyTorch's CPU weight-only kernels are fast in half precision only: in fp32 they made SmolLM2-135M's decode 3-5x
# slower than the paths below (2 CPU cores), which fp32 keeps.
CPU_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# Past this many activation rows (pre-fill) the CPU int4 kernel loses to dequantize-then-multiply: it computes no
# faster per row than a bf16 product of 4 rows x 16. Pruned pre-fill on 2 cores, every product in the kernel against
# every one dequantized (results/quantized-prefill-cpu.md): Qwen2.5-0.5B's shape 348 / 364 ms at 48 tokens,
# 401 / 273 at 64; SmolLM2-135M's 82 / 86 and 107 / 92.
CPU_INT4_KERNEL_ROWS = 48


def cpu_int4_fits(out_features: int, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether an int4 matrix with this many output rows runs in PyTorch's CPU kernel on `device` with activations of
    `dtype` (a CPU where Triton's interpreter does not run the kernels of kernels.py; half precision)."""
    return (torch.device(device).type == "cpu" and not kernels.available_on(device) and dtype in CPU_KERNEL_DTYPES
            and out_features % CPU_INT4_ROWS == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def cpu_int4_form(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 (codes, scales) in the form of PyTorch's CPU kernel: (its packing of the nibbles, (scale, 0) pairs)."""
    nibbles = torch.stack((codes & 0x0F, codes >> 4), dim=-1).view(codes.shape[0], -1).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
    return packed, torch.stack((scales.t(), torch.zeros_like(scales.t())), dim=-1).contiguous()


def device_form(codes: torch.Tensor, scales: torch.Tensor, device: torch.device | str,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix's (codes, scales) in the form its products take on `device` with activations of `dtype`: int4 in
    PyTorch's CPU packing where that kernel runs (`cpu_int4_fits`), as the engine lays out its blocks."""
    if scales.dim() == 2 and codes.dtype == torch.uint8 and cpu_int4_fits(codes.shape[0], device, dtype):
        return cpu_int4_form(codes, scales)
    return codes, scales


def cpu_int4_values(packed: torch.Tensor) -> torch.Tensor:
    """The int4 values in [-8, 7], (out, in) int8, of a matrix in PyTorch's CPU packing (output rows in 64s). The
    result is the transpose of a contiguous (in, out) tensor: the packing keeps each input's 64 rows together, so the
    values come out input-major without a transposing copy (which cost as much as the rest of the unpacking)."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    by_input = packed.view(out_features // CPU_INT4_ROWS, in_features, CPU_INT4_ROWS // 2).transpose(0, 1).contiguous()
    nibbles = torch.stack((by_input & 0x0F, by_input >> 4), dim=2)  # (in, block, low / high, 32 rows)
    return nibbles.view(torch.int8).sub_(8).view(in_features, out_features).t()


def quantize_weight(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of an (out, in) matrix; scales in the weight's dtype, codes computed against the rounded scales."""
    quantized_shapes(*weight.shape, scheme, weight.dtype)  # checks int4's group size
    w = weight.detach().float()
    if scheme == "int8":
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(weight.dtype)
        codes = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return codes, scales
    out_features, in_features = w.shape
    groups = w.view(out_features, in_features // INT4_GROUP, INT4_GROUP)
    scales = (groups.abs().amax(dim=-1) / 7).clamp(min=1e-10).to(weight.dtype)
    codes = torch.round(groups / scales.float()[..., None]).clamp(-8, 7).to(torch.int16).view(out_features, in_features)
    nibbles = (codes + 8).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales


def random_codes(shape, dtype: torch.dtype, generator: torch.Generator, device) -> torch.Tensor:
    """Codes of a random quantized matrix (speed benchmarks): int8 codes in [-127, 127], packed int4 bytes in [0, 255]."""
    low, high = (-127, 128) if dtype == torch.int8 else (0, 256)
    return torch.randint(low, high, shape, dtype=dtype, device=device, generator=generator)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int4 codes in [-8, 7] from their packed bytes (two per byte, low nibble first)."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).view(packed.shape[0], packed.shape[1] * 2)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) matrix the codes stand for, in `dtype`. The scheme is read from the codes' dtype; int4 in
    PyTorch's CPU packing (`cpu_int4_form`) from its 3-D scales. The codes are widened once, into the result, and
    scaled in place: an out-of-place multiply (or one of int8 codes by `dtype` scales, which widens them into a
    temporary first) writes a second matrix; on a CPU that made pre-fill of 128 tokens up to 1.8x slower with int8
    blocks and 1.9x with int4 (results/quantized-prefill-cpu.md)."""
    if codes.dtype == torch.int8:
        return codes.to(dtype).mul_(scales.to(dtype)[:, None])
    if scales.dim() == 3:  # scaled input-major, as the values come; the (out, in) result is a transposed view
        by_input = cpu_int4_values(codes).t().to(dtype)
        # contiguous: the scales' stride-2 view made the multiply 9x slower
        by_input.view(scales.shape[0], -1, by_input.shape[1]).mul_(scales[..., 0].to(dtype).contiguous()[:, None])
        return by_input.t()
    values = unpack_int4(codes).to(dtype)
    values.view(values.shape[0], scales.shape[1], -1).mul_(scales.to(dtype)[..., None])
    return values


# Up to this many activation rows an int8 product runs in the tiled low-bit kernel; beyond, compute dominates and
# dequantize-then-multiply wins, its dequantization fused by inductor into one pass before cuBLAS (H200, 8B shape,
# 25 blocks, pre-fill TTFT at 128 / 512 / 2048 tokens: kernel 6.6 / 16.3 / 56.6 ms, dequantized 8.7 / 13.7 / 41.6,
# this rule 6.6 / 13.8 / 42.4). int4 always takes the kernel: its unpacking made the dequantized path 30 ms at 128.
INT8_KERNEL_ROWS = 256


def product_path(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> str:
    """Which implementation `quantized_linear` runs for these operands:

    * "triton": where Triton runs (kernels.py), one row (a decode step) takes the low-bit GEMV kernel and several rows
      the low-bit matrix product (int8: up to INT8_KERNEL_ROWS); each code is read once and widened in registers.
    * "torch-cpu": on a CPU in half precision, PyTorch's weight-only kernels: int8 for one row, int4 up to
      CPU_INT4_KERNEL_ROWS when its matrix was laid out in that kernel's form (`cpu_int4_form`; its scales are 3-D).
    * "codes": one int8 row elsewhere, multiplied on the codes with the row scales on the output.
    * "dequantized": anything else, by the dequantized matrix (for several int8 rows on a GPU inductor would lower the
      codes form to `_weight_int8pack_mm`, which took 15.6 ms per 8B-shape matrix at 128 tokens on an H200)."""
    rows = x.numel() // x.shape[-1]
    if scales.dim() == 3:
        return "torch-cpu" if rows <= CPU_INT4_KERNEL_ROWS else "dequantized"
    if kernels.available(x) and (codes.dtype != torch.int8 or rows <= INT8_KERNEL_ROWS):
        return "triton"
    if rows == 1 and codes.dtype == torch.int8:
        return "torch-cpu" if x.device.type == "cpu" and x.dtype in CPU_KERNEL_DTYPES else "codes"
    return "dequantized"


def quantized_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) for a quantized W, by the implementation `product_path` names."""
    path = product_path(x, codes, scales)
    flat = x.reshape(-1, x.shape[-1])
    if path == "triton":
        out = kernels.gemv(flat[0], codes, scales) if flat.shape[0] == 1 else kernels.mm(flat, codes, scales)
    elif path == "torch-cpu" and scales.dim() == 3:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), codes, INT4_GROUP, scales.to(x.dtype))
    elif path == "torch-cpu":
        out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), codes, scales.to(x.dtype))
    elif path == "codes":
        out = torch.nn.functional.linear(flat, codes.to(x.dtype)) * scales.to(x.dtype)
    else:
        out = torch.nn.functional.linear(flat, dequantize(codes, scales, x.dtype))
    out = out.view(*x.shape[:-1], codes.shape[0])
    return out if bias is None else out + bias


class QuantizedLinear(torch.nn.Module):
    """A drop-in for `nn.Linear` holding codes and scales instead of the weight (buffers `weight_codes`, `weight_scales`)."""

    def __init__(self, linear: torch.nn.Linear, scheme: str) -> None:
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scales = quantize_weight(linear.weight, scheme)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scales", scales)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight_codes, self.weight_scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def quantize_blocks(model: torch.nn.Module, scheme: str) -> int:
    """Replace every linear layer inside the model's transformer blocks by a `QuantizedLinear`, in place, and with
    a "+head" scheme the output head too (tied to the input embeddings or not: those stay as they are). Returns how
    many were replaced. Embeddings and the final norm are left as they are."""
    blocks_scheme, head = split_scheme(check_scheme(scheme))
    arch = architecture_for(model.config.model_type)
    blocks = getattr(resolve(model, arch.stack), arch.blocks)
    replaced = 0
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, QuantizedLinear(child, blocks_scheme))
                    replaced += 1
    if head:
        path, _, name = arch.head.rpartition(".")
        parent = resolve(model, path) if path else model
        setattr(parent, name, QuantizedLinear(getattr(parent, name), blocks_scheme))
        replaced += 1
    return replaced


def scheme_of(model: torch.nn.Module) -> str | None:
    """The scheme a model's blocks were quantized with (None when they were not)."""
    return next((m.scheme for m in model.modules() if isinstance(m, QuantizedLinear)), None)
