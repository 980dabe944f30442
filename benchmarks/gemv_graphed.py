"""The products of a decode step alone, as the engine runs them (20 calls captured in one CUDA graph, 10 replays):
bf16 `F.linear` against `quantized_linear` int8 and int4 (the Triton kernels of kernels.py on a GPU) on the four
matrix shapes of a LLaMA-3.1-8B block, with the bandwidth reached on the bytes each reads and the tiling the autotuner
chose (the smaller matrices may stay in L2 across the 20 calls; benchmarks/int8_gemv_variants.py cycles weights past
it). Its output on the H200 is in results/quantized-decode-h200-88339e2.md (2026-12-03) and
results/quantized-decode-h200-1947Z.md (2026-12-04).

With `--library`, PyTorch's own weight-only kernels on the same matrices, at one row (decode) and at each of `--rows`
(pre-fill), against pudding's paths (one row: the GEMV kernels; several: the tiled low-bit product, beside the
dequantize-then-multiply path it replaced): `_weight_int8pack_mm` (int8 codes, per-row scales) and tinygemm's
`_weight_int4pack_mm` (int4, groups of 32, bf16 scales; pudding's codes repacked into its tiled layout, zero points
0). Every product is checked against the dequantized matrix's product; a kernel this torch build lacks is reported
as missing. Needs a GPU.

    PYTHONPATH=src python benchmarks/gemv_graphed.py [--library] [--rows 128,512,2048]
"""

import argparse

import torch

from pudding import kernels
from pudding.bench.timing import seconds_per_call
from pudding.quantize import INT4_GROUP, dequantize, quantize_weight, quantized_linear

SHAPES = [(4096, 14336), (14336, 4096), (1024, 4096), (4096, 4096)]  # FFN down, gate/up, k/v, q/o (out x in)


def engine_kernels() -> None:
    torch.manual_seed(0)
    for n, k in SHAPES:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        bf16 = seconds_per_call(lambda i: torch.nn.functional.linear(x, weight), "cuda")
        line = f"{n}x{k}: bf16 {bf16 * 1e6:.1f}us {n * k * 2 / bf16 / 1e9:.0f}GB/s"
        for scheme in ("int8", "int4"):
            codes, scales = quantize_weight(weight, scheme)
            seconds = seconds_per_call(lambda i: quantized_linear(x, codes, scales), "cuda")
            moved = codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
            tuner = kernels._int8_tuned if scheme == "int8" else kernels._int4_tuned
            line += (f" | {scheme} {seconds * 1e6:.1f}us {moved / seconds / 1e9:.0f}GB/s x{bf16 / seconds:.2f} "
                     f"best={tuner.best_config}")
        print(line, flush=True)


def tinygemm_operands(codes: torch.Tensor, scales: torch.Tensor, inner_k_tiles: int = 8):
    """pudding's int4 (low nibble = even input, offset 8, per-group scales) in tinygemm's form: the nibbles swapped
    (it wants the even input high), tiled by `_convert_weight_to_int4pack`, scales beside zero points of 0."""
    swapped = ((codes & 0x0F) << 4) | (codes >> 4)
    packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles)
    s = scales.to(torch.bfloat16)
    scales_and_zeros = torch.stack((s, torch.zeros_like(s)), dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros


def library_kernels(rows: list[int]) -> None:
    torch.manual_seed(0)
    for n, k in SHAPES:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in (1, *rows):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = seconds_per_call(lambda i: torch.nn.functional.linear(x, weight), "cuda")
            line = f"{n}x{k} rows={m}: bf16 {bf16 * 1e6:.1f}us"
            for scheme in ("int8", "int4"):
                codes, scales = quantize_weight(weight, scheme)
                reference = torch.nn.functional.linear(x.float(), dequantize(codes, scales, torch.float32))
                candidates = {"pudding": lambda: quantized_linear(x, codes, scales)}
                if m > 1:
                    candidates["dequantized"] = lambda x=x, c=codes, s=scales: torch.nn.functional.linear(x, dequantize(c, s, x.dtype))
                try:
                    if scheme == "int8":
                        candidates["torch"] = lambda: torch.ops.aten._weight_int8pack_mm(x, codes, scales)
                    else:
                        packed, sz = tinygemm_operands(codes, scales)
                        candidates["tinygemm"] = lambda: torch.ops.aten._weight_int4pack_mm(x, packed, INT4_GROUP, sz)
                except Exception as error:  # noqa: BLE001 - a kernel this build lacks is a result too
                    line += f" | {scheme} library missing ({type(error).__name__}: {str(error)[:80]})"
                for name, fn in candidates.items():
                    try:
                        got = fn().float()
                        error = ((got - reference).abs().max() / reference.abs().max()).item()
                        seconds = seconds_per_call(lambda i, fn=fn: fn(), "cuda")
                        line += f" | {scheme} {name} {seconds * 1e6:.1f}us x{bf16 / seconds:.2f} err={error:.1e}"
                    except Exception as failure:  # noqa: BLE001
                        line += f" | {scheme} {name} failed ({type(failure).__name__}: {str(failure)[:80]})"
            if m > 1:
                line += f" | mm tiling {kernels._mm_tuned.best_config}"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", action="store_true", help="compare with PyTorch's own weight-only kernels")
    parser.add_argument("--rows", default="128", help="rows of the pre-fill-sized products, comma-separated (--library)")
    args = parser.parse_args()
    library_kernels([int(r) for r in args.rows.split(",")]) if args.library else engine_kernels()


if __name__ == "__main__":
    main()
