"""Decode attention in one kernel (attention.py) gives what the PyTorch ops it replaces give, alone, inside
torch.compile and in the engine's decoding (Triton's interpreter on the CPU; the GPU form where a GPU is present)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import hopper_resources
from pudding import attention, kernels

ATTENTION_CHECK = r"""
import sys
import torch
import transformers
from pudding import attention
from pudding.block import Shape, cache_attention, grouped_attention
from pudding.engine import Engine
from pudding.omission import OmissionSet

device = sys.argv[1]
sys.path.insert(0, sys.argv[2])
from conftest import build_tiny
from test_engine import _hf_greedy

generator = torch.Generator().manual_seed(0)
# (query heads, KV heads, head size, cache length, keys read, position, sliding window): groups of 1, 3, 4 and 7 query
# heads a KV head; keys that do not fill the last slice or iteration; a window; the first position (one key)
for heads, kv_heads, dim, max_len, keys, position, window in [
        (32, 8, 128, 300, 256, 153, None), (9, 3, 64, 1100, 1024, 700, None), (14, 2, 64, 70, 70, 69, None),
        (8, 8, 32, 200, 130, 100, None), (8, 2, 64, 2048, 2048, 1500, 512), (6, 1, 16, 5, 5, 0, None)]:
    config = transformers.LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads)
    shape = Shape.from_config(config)
    mask = torch.arange(keys) <= position
    if window:
        mask &= torch.arange(keys) > position - window
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, heads, 1, dim, generator=generator).to(dtype)
        k_cache, v_cache = (torch.randn(1, kv_heads, max_len, dim, generator=generator).to(dtype) for _ in range(2))
        k_cache *= 3  # spread the scores
        qg = q.float().view(kv_heads, heads // kv_heads, dim)
        scores = torch.einsum("hgd,hnd->hgn", qg, k_cache[0, :, :keys].float()) * shape.attn_scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        expected = torch.einsum("hgn,hnd->hgd", probs, v_cache[0, :, :keys].float()).reshape(1, heads, 1, dim)
        args = [t.to(device) for t in (q, k_cache, v_cache, mask[None])]
        ops = grouped_attention(*args, shape)
        kernel = cache_attention(*args, shape)
        assert attention.supported(args[0], heads, kv_heads, dim) and kernel.dtype == dtype
        ops_error = (ops.float().cpu() - expected).abs().max().item()
        error = (kernel.float().cpu() - expected).abs().max().item()
        # fp32: summation order; bf16: the ops round the scores and the output, the kernel the weights and the output
        bound = 1e-5 if dtype == torch.float32 else 2 * ops_error + 2 ** -8 * expected.abs().max().item()
        assert error <= bound, (heads, kv_heads, dim, keys, dtype, error, ops_error)
compiled = torch.compile(cache_attention, fullgraph=True, dynamic=False)  # stays one op inside a compiled step
torch.testing.assert_close(compiled(*args, shape), kernel)

# The engine's decoding (tiny models; Mistral's and Gemma 3's sliding windows are 4 tokens) gives transformers' tokens,
# with the kernel doing every decode step's attention
calls = []
counted = attention.decode_attention
for family, omit in [("llama", (0, 3)), ("mistral", ()), ("gemma3", (1, 2))]:
    model = build_tiny(family, init=0.2)
    prompt = torch.randint(3, 200, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    theirs = _hf_greedy(model, prompt, OmissionSet(omit, 6), 8)
    # compiled and graphed on a GPU (as served), then eager with the kernel's calls counted (a counter inside a
    # compiled step would recompile it at every call)
    for compiled in ([True, False] if device == "cuda" else [False]):
        engine = Engine.from_model(model, device=device, max_len=64, compile=compiled, graphs=compiled)
        attention.decode_attention = counted if compiled else lambda *a: calls.append(1) or counted(*a)
        before = len(calls)
        ours = engine.generate(prompt, engine.omission(omit), max_new_tokens=8, stop_ids=[]).tokens
        assert ours == theirs, (family, compiled)
        if not compiled:  # every block of every step after the pre-fill's
            assert len(calls) - before == 7 * (6 - len(omit)), (family, len(calls) - before)
print("ok")
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the kernel's GPU form needs an NVIDIA GPU"))])
@pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed")
def test_decode_attention_kernel_equals_the_pytorch_ops(tmp_path, device):
    """The kernel against an fp32 reference, as close as the PyTorch ops it replaces (fp32, bf16; grouped query
    heads, a sliding window, keys that do not fill the last slice), inside torch.compile, and in the engine's decode
    of tiny models, whose tokens are transformers' (Triton's interpreter runs it on the CPU)."""
    script = tmp_path / "attention_check.py"
    script.write_text(ATTENTION_CHECK)
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else dict(os.environ)
    tests = str(Path(__file__).parent)
    result = subprocess.run([sys.executable, str(script), device, tests], check=False, capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_decode_attention_is_left_to_pytorch_where_the_kernel_does_not_run():
    """A CPU without Triton's interpreter (the default CPU path) has no kernel, and head sizes that are no power of two
    (Phi-2's 80) do not fit its tiles: the decode step keeps the PyTorch ops there."""
    assert attention.supported(torch.zeros(1, 8, 1, 64), 8, 2, 64) == kernels.available_on("cpu")
    assert not attention.supported(torch.zeros(1, 8, 1, 80), 8, 2, 80)


@pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed")
def test_decode_attention_compiles_for_hopper_without_spilling():
    """The GPU form (tensor-core products, the atomic ticket), which the interpreter never compiles, builds for sm_90
    here for every head size the engine meets and slices from one iteration to many, in registers only."""
    signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*u8", "out_ptr": "*bf16",
                 "partial_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32", "tickets_ptr": "*i32",
                 "scale": "fp32", "keys": "i32", "cache_stride": "i32"}
    import triton

    # LLaMA-3.1-8B, SmolLM2, Qwen2.5-0.5B, Gemma 3 (256-wide heads), 64 query heads a KV head; one slice (no
    # combination) to many keys; and the fp32 form once
    forms = [(geometry, keys, False) for geometry, keys in itertools.product(
        [(32, 8, 128), (9, 3, 64), (14, 2, 64), (8, 4, 256), (64, 1, 128)], (5, 256, 32768))]
    for (heads, kv_heads, dim), keys, fp32 in forms + [((14, 2, 64), 4096, True)]:
        constants = {**attention.launch_settings(heads, kv_heads, dim, keys), "FP32": fp32}
        if fp32:
            signature = {**signature, **{name: "*fp32" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}}
        used = hopper_resources(attention._decode_attention_kernel, signature, constants,
                                triton.Config({}, num_warps=attention.NUM_WARPS))
        assert used["STACK"] == 0 and used["REG"] <= 255, (constants, used)
