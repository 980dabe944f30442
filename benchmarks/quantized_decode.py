"""Weight-only quantized PuDDing: decode speed, pre-fill and memory of bf16, int8 and int4 blocks, dense and pruned.

    python benchmarks/quantized_decode.py --device cuda --output results/quantized-decode-h200.json

On a GPU the model is LLaMA-3.1-8B's shape with random weights (speed does not depend on weight values) and the
pruned set is the paper's 7 of 32 blocks (`bench.PAPER_SET`); on a CPU a small model of the same family, to check
that the script runs. A Markdown table is written beside the JSON.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
from transformers import LlamaConfig

from provenance import provenance, save
from pudding.bench import LLAMA_31_8B, PAPER_SET, time_set, weight_bytes_per_token
from pudding.engine import Engine
from pudding.omission import OmissionSet
from pudding.storage import atomic_write_text

SMALL = dict(LLAMA_31_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024)
GOALS = {"int8": 1.7, "int4": 2.5}  # pruned decode, as a multiple of bf16 pruned decode (issue: quantized PuDDing)


def measure(config, device: str, scheme: str | None, repeats: int) -> dict:
    engine = Engine.random(config, device, quantize=scheme, max_len=1024)
    blocks = config.num_hidden_layers
    sets = {"dense": OmissionSet.dense(blocks),
            "pruned": OmissionSet(tuple(b for b in PAPER_SET if b < blocks) or (1,), blocks)}
    engine.warm_up(list(sets.values()))
    row = {"block_bytes": engine.layout.nbytes, "blocks_on_device_gb": engine.memory()["blocks"] / 1e9}
    for name, omit in sets.items():
        timed = time_set(engine, omit, name, (128, 512), 128, (128, 256), repeats)
        kept = blocks - len(omit)
        row[name] = {"decode_tok_s": round(timed.decode_tok_s, 2), "ttft_ms": timed.ttft_ms,
                     "weight_bytes_per_token": weight_bytes_per_token(engine, kept)}
    if device.startswith("cuda"):
        row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del engine
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def markdown(report: dict) -> str:
    rows = report["weights"]
    lines = [f"# Quantized PuDDing decode ({report['machine']['gpu'] or 'cpu'}, {report['date']})", "",
             f"Command: `{report['command']}`", "", f"Model: {report['model']}, batch 1, bf16 activations; pruned = "
             f"{report['pruned']}.", "",
             "| weights | block | decode dense | decode pruned | pruned vs bf16 pruned | TTFT 128 / 512, pruned | "
             "blocks on device |", "|---|---|---|---|---|---|---|"]
    base = rows["bf16"]["pruned"]["decode_tok_s"]
    for name, r in rows.items():
        ttft = r["pruned"]["ttft_ms"]
        lines.append(f"| {name} | {r['block_bytes'] / 1e6:.1f} MB | {r['dense']['decode_tok_s']:.1f} tok/s | "
                     f"{r['pruned']['decode_tok_s']:.1f} tok/s | {r['pruned']['decode_tok_s'] / base:.2f}x | "
                     f"{ttft[128]:.1f} / {ttft[512]:.1f} ms | {r['blocks_on_device_gb']:.2f} GB |")
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for goal in report["goals"]:
        lines.append(f"| {goal['figure']} | {goal['measured']:.2f}x | {'yes' if goal['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--schemes", default="int8,int4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    config = LlamaConfig(**(LLAMA_31_8B if on_gpu else SMALL))
    report = provenance(args)
    report["model"] = "LLaMA-3.1-8B shape, random weights" if on_gpu else "a small LLaMA, random weights"
    report["pruned"] = f"omit {','.join(map(str, PAPER_SET))}" if on_gpu else "omit 1"
    report["weights"] = {}
    for scheme in ["bf16", *args.schemes.split(",")]:  # saved after each, so a run cut short keeps what it measured
        report["weights"][scheme] = measure(config, args.device, None if scheme == "bf16" else scheme, args.repeats)
        base = report["weights"]["bf16"]["pruned"]["decode_tok_s"]
        report["goals"] = [{"figure": f"{s} pruned decode, of bf16 pruned decode (goal ≥ {GOALS[s]}x)",
                            "measured": report["weights"][s]["pruned"]["decode_tok_s"] / base,
                            "target": GOALS[s], "met": report["weights"][s]["pruned"]["decode_tok_s"] / base >= GOALS[s]}
                           for s in report["weights"] if s in GOALS]
        save(report, args.output)
        if args.output:
            atomic_write_text(args.output.with_suffix(".md"), markdown(report))

if __name__ == "__main__":
    main()
