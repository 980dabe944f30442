"""Decode attention alone: the one-kernel form (`pudding.attention`, several launch settings) against the PyTorch
ops it replaced (`block.grouped_attention`, compiled as the engine compiles its decode step), LLaMA-3.1-8B shape (32
query heads, 8 KV heads of 128), batch 1, bf16, one new token at 60% of its context bucket. Timed as 32 calls (one per
block, each its own cache, so none is served from L2) in one CUDA graph; also the largest difference from an fp32
reference. Needs a GPU; writes decode-attention.json under $OUT (or --output).

    PYTHONPATH=src python benchmarks/decode_attention.py

Output on the H100 (2026-12-06, three leases, the kernel revised between them): results/decode-attention-ab-h100.md.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import transformers

from pudding import attention
from pudding.bench.suites import LLAMA_31_8B
from pudding.bench.timing import seconds_per_call
from pudding.block import Shape, grouped_attention

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--buckets", default="256,1024,4096", help="context buckets (keys read per step)")
parser.add_argument("--settings", default="64:16:8,64:16:4,64:8:8,128:16:8,32:16:8",
                    help="kernel launch settings to time, BLOCK_N:MAX_SPLITS:NUM_WARPS each")
parser.add_argument("--device", default="cuda",
                    help="cpu runs the kernel under TRITON_INTERPRET=1 (a check, not a timing)")
parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
args = parser.parse_args()

torch._inductor.config.coordinate_descent_tuning = True
shape = Shape.from_config(transformers.LlamaConfig(**LLAMA_31_8B))
blocks, max_len = 32, 4096
device = args.device
generator = torch.Generator(device).manual_seed(0)
caches = [torch.randn(2, 1, shape.kv_heads, max_len, shape.head_dim, generator=generator, device=device,
                      dtype=torch.bfloat16) for _ in range(blocks)]
q = torch.randn(1, shape.heads, 1, shape.head_dim, generator=generator, device=device, dtype=torch.bfloat16)
compiled_ops = torch.compile(grouped_attention, fullgraph=True, dynamic=False)


def reference(mask: torch.Tensor, keys: int) -> torch.Tensor:
    k, v = (c[0, :, :keys].float() for c in caches[0])
    qg = q.float().view(shape.kv_heads, -1, shape.head_dim)
    scores = torch.einsum("hgd,hnd->hgn", qg, k) * shape.attn_scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hgn,hnd->hgd", probs, v).reshape(shape.heads, -1)


results = {"shape": "LLaMA-3.1-8B", "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
           "torch": torch.__version__, "buckets": {}}
for keys in map(int, args.buckets.split(",")):
    position = int(0.6 * keys)
    mask = (torch.arange(keys, device=device) <= position)[None]
    expected = reference(mask[0], keys)
    row = {"position": position}

    def ops(i, mask=mask):
        return compiled_ops(q, caches[i % blocks][0], caches[i % blocks][1], mask, shape)

    def kernel(i, mask=mask):
        return attention.decode_attention(q.view(shape.heads, -1), caches[i % blocks][0][0], caches[i % blocks][1][0],
                                          mask[0], shape.attn_scale)

    row["pytorch_ops_us"] = seconds_per_call(ops, device, calls=blocks) * 1e6
    row["pytorch_ops_error"] = (ops(0).view(shape.heads, -1).float() - expected).abs().max().item()
    for setting in args.settings.split(","):
        attention.BLOCK_N, attention.MAX_SPLITS, attention.NUM_WARPS = map(int, setting.split(":"))
        error = (kernel(0).float() - expected).abs().max().item()
        row[f"kernel {setting}"] = {"us": seconds_per_call(kernel, device, calls=blocks) * 1e6, "error": error}
    results["buckets"][keys] = row
    print(keys, json.dumps(row), flush=True)
args.output.mkdir(parents=True, exist_ok=True)
(args.output / "decode-attention.json").write_text(json.dumps(results, indent=1))
