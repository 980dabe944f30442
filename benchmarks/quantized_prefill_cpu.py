"""CPU pre-fill of quantized blocks: how the dequantized product's forms compare, and where PyTorch's int4 kernel
stops paying.

Two measurements on one engine per (shape, scheme), random weights, the paper-style pruned set, bf16 activations:
* forms: the engine's pre-fill with `quantize.dequantize` as it is against the previous form (kept below: the codes
  multiplied by the scales with type promotion, int4 unpacked by a transposing copy), with a bf16 engine's pre-fill
  timed in the same loop; the arms take turns at every repeat, so the machine's drift hits them alike;
* int4 rows: the same pre-fill with every int4 product in PyTorch's CPU kernel against every one dequantized, per
  prompt length (what `quantize.CPU_INT4_KERNEL_ROWS` is set from).

    python benchmarks/quantized_prefill_cpu.py --output results/quantized-prefill-cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from provenance import provenance, save
from transformers import AutoConfig

from pudding import quantize
from pudding.bench.suites import PAPER_SET
from pudding.bench.timing import prompt_ids
from pudding.engine import Engine
from pudding.models import resolve_model
from pudding.omission import OmissionSet

CURRENT = quantize.dequantize


def previous_dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quantize.dequantize` before 2026-12-05 (9582484): int8 codes times dtype scales (the multiply widens the codes
    into a temporary), int4 in PyTorch's CPU packing unpacked into (out, in) order by a transposing copy."""
    if codes.dtype == torch.int8:
        return codes.to(dtype) * scales.to(dtype)[:, None]
    if scales.dim() != 3:
        return CURRENT(codes, scales, dtype)
    out_features, in_features = codes.shape[0], codes.shape[1] * 2
    blocks = out_features // quantize.CPU_INT4_ROWS
    low = ((codes & 0x0F).view(torch.int8) - 8).view(blocks, in_features, quantize.CPU_INT4_ROWS // 2)
    high = ((codes >> 4).view(torch.int8) - 8).view(blocks, in_features, quantize.CPU_INT4_ROWS // 2)
    values = torch.stack((low, high), dim=1).transpose(2, 3).reshape(out_features, in_features)
    scales = scales[..., 0].t()
    grouped = values.view(out_features, scales.shape[1], in_features // scales.shape[1])
    return torch.mul(grouped, scales.to(dtype)[..., None]).view(out_features, in_features)


def pruned_engine(config, scheme: str | None) -> Engine:
    engine = Engine.random(config, "cpu", quantize=scheme, max_len=1024)
    blocks = config.num_hidden_layers
    engine.use(OmissionSet(tuple(b for b in PAPER_SET if b < blocks), blocks))
    return engine


def take_turns(arms: dict, ids: list[int], repeats: int) -> dict[str, dict]:
    """Median and minimum ms of each arm's pre-fill; an arm is (engine, setup run before each call)."""
    samples = {name: [] for name in arms}
    for _ in range(repeats + 1):  # the first round warms up
        for name, (engine, setup) in arms.items():
            setup()
            started = time.perf_counter()
            engine.prefill(ids).argmax(-1)
            samples[name].append(1000 * (time.perf_counter() - started))
    return {name: {"median_ms": statistics.median(s[1:]), "min_ms": min(s[1:])} for name, s in samples.items()}


def use_dequantize(fn):
    def setup():
        quantize.dequantize = fn
    return setup


def use_int4_kernel_rows(rows: int):
    def setup():
        quantize.dequantize = CURRENT
        quantize.CPU_INT4_KERNEL_ROWS = rows
    return setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2.5-0.5b,smollm2-135m")
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--int4-lengths", default="32,48,64,96,128")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    kernel_rows = quantize.CPU_INT4_KERNEL_ROWS
    report = {**provenance(args), "forms": {}, "int4_rows": {}}
    for shape in args.shapes.split(","):
        config = AutoConfig.from_pretrained(resolve_model(shape).directory)
        bf16 = pruned_engine(config, None)
        for scheme in ("int8", "int4"):
            engine = pruned_engine(config, scheme)
            arms = {"previous": (engine, use_dequantize(previous_dequantize)), "current": (engine, use_dequantize(CURRENT)),
                    "bf16": (bf16, use_dequantize(CURRENT))}
            for length in map(int, args.lengths.split(",")):
                ids = prompt_ids(length, config.vocab_size)
                timed = take_turns(arms, ids, args.repeats)
                report["forms"][f"{shape} {scheme} {length}"] = timed
                print(f"{shape} {scheme} pruned pre-fill {length} tokens: " + ", ".join(
                    f"{name} {t['median_ms']:.0f} ms (min {t['min_ms']:.0f})" for name, t in timed.items()), flush=True)
            if scheme == "int4":
                arms = {"kernel": (engine, use_int4_kernel_rows(1 << 20)), "dequantized": (engine, use_int4_kernel_rows(0))}
                for length in map(int, args.int4_lengths.split(",")):
                    timed = take_turns(arms, prompt_ids(length, config.vocab_size), args.repeats)
                    report["int4_rows"][f"{shape} {length}"] = timed
                    print(f"{shape} int4 pre-fill {length} tokens, every product in PyTorch's int4 kernel / dequantized: "
                          f"{timed['kernel']['median_ms']:.0f} / {timed['dequantized']['median_ms']:.0f} ms", flush=True)
            quantize.dequantize, quantize.CPU_INT4_KERNEL_ROWS = CURRENT, kernel_rows
            engine = None
    save(report, args.output)


if __name__ == "__main__":
    main()
