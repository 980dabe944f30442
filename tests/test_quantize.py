"""Weight-only quantization: codes within half a step of the weights, the quantized product equal to the product
with the dequantized matrix, the engine equal to transformers running the same quantized modules, and the commands
that take --quantize."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_CONFIGS, assert_clean_failure, build_tiny, cli, hopper_resources, pudding
from pudding import kernels
from pudding.engine import Engine
from pudding.errors import PuddingError
from pudding.export import delete_blocks
from pudding.quantize import (CPU_INT4_KERNEL_ROWS, INT4_GROUP, QuantizedLinear, cpu_int4_form, cpu_int4_values,
                              dequantize, product_path, quantize_blocks, quantize_weight, quantized_linear, scheme_of,
                              unpack_int4)


def _weight(rows=48, cols=96, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[3] *= 40  # rows (and groups) of very different size: each gets its own scale
    w[5, :INT4_GROUP] = 0  # an all-zero group must not divide by zero
    return w


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_dequantized_weights_are_within_half_a_step(scheme):
    w = _weight()
    codes, scales = quantize_weight(w, scheme)
    error = (dequantize(codes, scales, torch.float32) - w).abs()
    if scheme == "int8":
        assert codes.dtype == torch.int8 and codes.shape == w.shape and scales.shape == (48,)
        step = scales[:, None]
    else:
        assert codes.dtype == torch.uint8 and codes.shape == (48, 48) and scales.shape == (48, 96 // INT4_GROUP)
        step = scales.repeat_interleave(INT4_GROUP, dim=1)
    assert torch.all(error <= step / 2 + 1e-6)
    assert torch.all(dequantize(codes, scales, torch.float32)[5, :INT4_GROUP] == 0)


def test_int4_codes_use_the_full_range_and_keep_their_order():
    w = torch.arange(-7, 9, dtype=torch.float32).repeat(2, 2)  # 32 columns: one group per row, largest magnitude 8
    codes, scales = quantize_weight(w, "int4")
    steps = torch.round(dequantize(codes, scales, torch.float32) / scales.repeat_interleave(INT4_GROUP, 1))
    assert torch.equal(steps, torch.round(w / scales.repeat_interleave(INT4_GROUP, 1)))  # unpacked in packing order
    assert steps.max() == 7 and steps.min() >= -8
    assert torch.all(steps[:, 1:16] >= steps[:, :15])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_product_equals_the_product_with_the_dequantized_matrix(scheme, dtype):
    w, x = _weight().to(dtype), torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(2)).to(dtype)
    codes, scales = quantize_weight(w, scheme)
    reference = torch.nn.functional.linear(x.float(), dequantize(codes, scales, torch.float32), bias.float())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(quantized_linear(x, codes, scales, bias).float(), reference, rtol=tolerance, atol=tolerance * 10)


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return {event.name for event in profile.events()}


@pytest.mark.skipif(kernels.available(torch.zeros(1)), reason="Triton's interpreter runs the kernels of kernels.py here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu_products_run_pytorch_weight_only_kernels(dtype):
    """On a CPU in half precision: one int8 row in PyTorch's int8 kernel on the codes as stored; int4, laid out in
    PyTorch's CPU packing (`cpu_int4_form`), in its int4 kernel up to CPU_INT4_KERNEL_ROWS rows and through the
    dequantized matrix beyond; each within the rounding of half precision of the product with the dequantized matrix.
    fp32 and several int8 rows keep the other paths."""
    w = _weight(rows=64, cols=96)
    generator = torch.Generator().manual_seed(3)
    int4_kernel = "aten::_weight_int4pack_mm_for_cpu"
    for scheme, rows, path in [("int8", 1, "torch-cpu"), ("int4", 1, "torch-cpu"), ("int4", 7, "torch-cpu"),
                               ("int4", CPU_INT4_KERNEL_ROWS + 1, "dequantized")]:
        codes, scales = quantize_weight(w.to(dtype), scheme)
        laid_out = cpu_int4_form(codes, scales) if scheme == "int4" else (codes, scales)
        x = torch.randn(rows, 96, generator=generator).to(dtype)
        matrix = dequantize(codes, scales, torch.float32)
        bound = torch.nn.functional.linear(x.float().abs(), matrix.abs())  # a dot product's rounding scales with this
        got = quantized_linear(x, *laid_out)
        assert product_path(x, *laid_out) == path and got.dtype == dtype and got.shape == (rows, 64)
        error = (got.float() - torch.nn.functional.linear(x.float(), matrix)).abs()
        assert torch.all(error <= 1e-2 * bound), f"{scheme} {rows} rows: {(error / bound).max():.1e}"
        ops = _ops_run(lambda x=x, laid_out=laid_out: quantized_linear(x, *laid_out))
        kernel = "aten::_weight_int8pack_mm" if scheme == "int8" else int4_kernel
        assert (kernel in ops) == (path == "torch-cpu")
    codes, scales = quantize_weight(w, "int4")  # the packing itself, checked where the kernel rounds nothing (fp32)
    x = torch.randn(5, 96, generator=generator)
    error = (quantized_linear(x, *cpu_int4_form(codes, scales)) - torch.nn.functional.linear(x, dequantize(codes, scales, torch.float32))).abs()
    assert torch.all(error <= 1e-5 * torch.nn.functional.linear(x.abs(), dequantize(codes, scales, torch.float32).abs()))
    codes, scales = quantize_weight(w, "int8")
    assert product_path(torch.randn(1, 96), codes, scales) == "codes"  # fp32: the kernels were 3-5x slower there
    assert product_path(torch.randn(3, 96).to(dtype), codes, scales.to(dtype)) == "dequantized"


def test_pytorchs_cpu_int4_packing_unpacks_to_the_codes():
    """`cpu_int4_values` undoes PyTorch's CPU packing (one and three blocks of 64 rows), so the dequantized matrix of
    the CPU form is the module form's, bit for bit, in bf16 and fp32."""
    for rows in (64, 192):
        codes, scales = quantize_weight(_weight(rows=rows, cols=96).to(torch.bfloat16), "int4")
        packed, pairs = cpu_int4_form(codes, scales)
        assert torch.equal(cpu_int4_values(packed), unpack_int4(codes))
        for dtype in (torch.bfloat16, torch.float32):
            assert torch.equal(dequantize(packed, pairs, dtype), dequantize(codes, scales, dtype))


@pytest.mark.skipif(kernels.available(torch.zeros(1)), reason="Triton's interpreter runs the kernels of kernels.py here")
def test_a_half_precision_cpu_engine_runs_int4_in_pytorchs_packing():
    """A bf16 engine on a CPU lays its int4 matrices out in PyTorch's CPU packing (scales as (groups, out, 2) pairs)
    and decodes and pre-fills short prompts in that kernel, longer ones through the dequantized matrices, as close to
    the same quantized model run in fp32 (same codes and scales) as transformers running it in bf16 is; a fp32 engine
    keeps the module's own layout."""
    model = build_tiny("llama", init=0.2).to(torch.bfloat16)
    quantize_blocks(model, "int4")
    reference = __import__("copy").deepcopy(model).float()
    engine = Engine.from_model(model, max_len=96)
    assert engine.layout.entries["down_scales"][0] == (96 // INT4_GROUP, 64, 2)
    assert Engine.from_model(reference, max_len=96).layout.entries["down_scales"][0] == (64, 96 // INT4_GROUP)
    generator = torch.Generator().manual_seed(2)
    for blocks, length in [((), 11), ((1, 4), 11), ((1, 4), CPU_INT4_KERNEL_ROWS + 6)]:
        prompt = torch.randint(3, 200, (length,), generator=generator).tolist()
        omit = engine.omission(blocks)
        engine.use(omit)
        in_kernel = "aten::_weight_int4pack_mm_for_cpu" in _ops_run(lambda prompt=prompt: engine.prefill(prompt))
        assert in_kernel == (length <= CPU_INT4_KERNEL_ROWS)
        logits = engine.prefill(prompt).reshape(-1).float()
        step = engine.decode_step(logits.argmax().view(1, 1), len(prompt)).reshape(-1).float()
        ids = torch.tensor([prompt + [int(logits.argmax())]])
        expected = delete_blocks(reference, omit)(ids).logits[0, -2:]
        in_bf16 = delete_blocks(model, omit)(ids).logits[0, -2:].float()  # bf16's own distance from fp32
        for got, want, rounded in ((logits, expected[0], in_bf16[0]), (step, expected[1], in_bf16[1])):
            assert (got - want).abs().max() <= 1.5 * (rounded - want).abs().max(), blocks


def test_int4_refuses_matrices_that_do_not_split_into_groups():
    with pytest.raises(PuddingError, match="multiple of 32"):
        quantize_weight(torch.randn(8, 40), "int4")


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_linear_layer_of_the_blocks_is_replaced_and_nothing_else(family):
    model = build_tiny(family)
    head = model.get_output_embeddings().weight.clone()
    replaced = quantize_blocks(model, "int8")
    assert replaced == sum(isinstance(m, QuantizedLinear) for m in model.modules()) > 0
    assert not any(type(m) is torch.nn.Linear for m in model.model.decoder.layers.modules()) if family == "opt" else \
        not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())
    assert scheme_of(model) == "int8" and scheme_of(build_tiny(family)) is None
    assert torch.equal(model.get_output_embeddings().weight, head)
    model(torch.tensor([[3, 4, 5]]))  # transformers runs the quantized modules


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_quantized_engine_matches_transformers_with_the_quantized_modules(family, scheme):
    model = build_tiny(family, init=0.2)
    quantize_blocks(model, scheme)
    engine = Engine.from_model(model, max_len=64)
    prompt = torch.randint(3, 200, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    for blocks in [(), (1, 4)]:
        omit = engine.omission(blocks)
        ours = engine.generate(prompt, omit, max_new_tokens=8, stop_ids=[])
        pruned = delete_blocks(model, omit)
        reference = pruned.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert ours.tokens == reference[0, len(prompt):].tolist()
        engine.use(omit)
        expected = pruned(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(engine.prefill(prompt).reshape(-1).float(), expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8+head", "int4+head"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_head_scheme_quantizes_the_output_head_too(family, scheme):
    """`int8+head` / `int4+head`: the blocks as with int8 / int4, and the output head too (the input embeddings stay):
    the engine generates what transformers generates with the same modules, reads the head's codes (a quarter to
    an eighth of its bytes), and its logits are not those of blocks-only quantization (the head really changed)."""
    model = build_tiny(family, init=0.2)
    embeddings = model.get_input_embeddings().weight.clone()
    blocks_only = __import__("copy").deepcopy(model)
    assert quantize_blocks(model, scheme) == quantize_blocks(blocks_only, scheme.removesuffix("+head")) + 1
    assert isinstance(model.lm_head, QuantizedLinear) and torch.equal(model.get_input_embeddings().weight, embeddings)
    assert scheme_of(model) == scheme.removesuffix("+head")
    engine, reference = Engine.from_model(model, max_len=64), Engine.from_model(blocks_only, max_len=64)
    assert engine.head_bytes < reference.head_bytes / 3
    prompt = torch.randint(3, 200, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    omit = engine.omission((1, 4))
    ours = engine.generate(prompt, omit, max_new_tokens=8, stop_ids=[])
    pruned = delete_blocks(model, omit)
    expected = pruned.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ours.tokens == expected[0, len(prompt):].tolist()
    for e in (engine, reference):
        e.use(omit)
    logits = engine.prefill(prompt).reshape(-1).clone()
    torch.testing.assert_close(logits, pruned(torch.tensor([prompt])).logits[0, -1].float(), rtol=1e-4, atol=1e-4)
    assert (logits - reference.prefill(prompt).reshape(-1)).abs().max() > 1e-3


@pytest.mark.skipif(kernels.available(torch.zeros(1)), reason="Triton's interpreter runs the kernels of kernels.py here")
def test_a_half_precision_cpu_engine_runs_an_int4_head_in_pytorchs_packing():
    """The head of `int4+head` takes the blocks' CPU form too (a decode step's head product in PyTorch's kernel)."""
    model = build_tiny("llama", init=0.2).to(torch.bfloat16)
    quantize_blocks(model, "int4+head")
    engine = Engine.from_model(model, max_len=32)
    assert engine.head_scales.shape == (64 // INT4_GROUP, model.config.vocab_size, 2)
    engine.use(engine.omission(()))
    logits = engine.prefill([3, 4, 5]).reshape(-1).float()
    assert "aten::_weight_int4pack_mm_for_cpu" in _ops_run(lambda: engine.decode_step(logits.argmax().view(1, 1), 3))
    with torch.no_grad():
        expected = model(torch.tensor([[3, 4, 5]])).logits[0, -1].float()
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()


def test_quantized_blocks_take_a_quarter_of_the_bytes_and_swap_like_the_others():
    model = build_tiny("llama", init=0.2)
    full = Engine.from_model(model, max_len=64).layout.nbytes
    quantize_blocks(model, "int8")
    engine = Engine.from_model(model, max_len=64, budget=4)
    assert engine.layout.nbytes < full / 3  # fp32 weights -> int8 codes + a scale per row
    assert engine.layout.params * 4 == sum(p.numel() for p in build_tiny("llama").model.layers[0].parameters()) * 4
    prompt = list(range(3, 12))
    first = engine.generate(prompt, engine.omission((0, 3)), max_new_tokens=5, stop_ids=[])
    second = engine.generate(prompt, engine.omission((1, 3)), max_new_tokens=5, stop_ids=[])
    assert second.timings.swap["copied"] == 1
    resident = Engine.from_model(model, max_len=64)
    assert first.tokens == resident.generate(prompt, resident.omission((0, 3)), max_new_tokens=5, stop_ids=[]).tokens
    assert second.tokens == resident.generate(prompt, resident.omission((1, 3)), max_new_tokens=5, stop_ids=[]).tokens


def test_random_engine_builds_quantized_layouts():
    model = build_tiny("llama")
    for scheme, codes_dtype in (("int8", torch.int8), ("int4", torch.uint8), ("int8+head", torch.int8)):
        engine = Engine.random(model.config, "cpu", dtype=torch.float32, quantize=scheme, max_len=32)
        views = engine.blocks.views[0]
        assert views["qkv"].dtype == codes_dtype and views["qkv_scales"].dtype == torch.float32
        assert (engine.head.dtype, engine.head_scales is None) == ((torch.int8, False) if "+head" in scheme else
                                                                   (torch.float32, True))
        assert len(engine.generate([3, 4, 5], engine.omission(()), max_new_tokens=3, stop_ids=[]).tokens) == 3


@pytest.mark.slow
def test_eval_and_generate_take_quantize(tmp_path):
    out = tmp_path / "int8.json"
    result = cli("eval", "--tasks", "piqa", "--limit", "12", "--quantize", "int8", "--omit", "3,7", "--output", str(out))
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["model"]["quantize"] == "int8"
    assert 0 <= document["tasks"]["piqa"]["metrics"]["acc"] <= 1
    generated = cli("generate", "--quantize", "int4", "--omit", "3,7", "--max-new-tokens", "4", "The capital of France is")
    assert generated.returncode == 0 and "omit 3,7" in generated.stderr, generated.stderr
    assert "--dtype bfloat16" in generated.stderr  # fp32 on a CPU: told where quantized blocks are fast
    in_bf16 = cli("generate", "--quantize", "int4", "--dtype", "bfloat16", "--max-new-tokens", "4", "The capital of France is")
    assert in_bf16.returncode == 0 and "--dtype bfloat16" not in in_bf16.stderr, in_bf16.stderr


@pytest.mark.slow
def test_unknown_scheme_is_one_line():
    for command in (["eval", "--tasks", "piqa", "--limit", "1"], ["generate", "hello"], ["bench", "--output", "x.json", "--shape", ""]):
        assert_clean_failure(pudding(*command, "--quantize", "int3"), "unknown --quantize 'int3' (use int8 or int4, with "
                                                                     "+head to quantize the output head too)")
    assert_clean_failure(pudding("export", "--format", "gguf", "--omit", "3", "--quantize", "int4+head", "--output", "x.gguf"),
                         "llama-quantize --output-tensor-type")


@pytest.mark.slow
def test_the_lm_eval_model_takes_quantize():
    from pudding.harness.model import PuddingLM

    lm = PuddingLM(model="smollm2-135m", omit="3,7", device="cpu", quantize="int4")
    assert scheme_of(lm.loaded.model) == "int4" and lm.loaded.info()["quantize"] == "int4"
    with pytest.raises(PuddingError, match="unknown quantize= 'fp3'"):
        PuddingLM(model="smollm2-135m", device="cpu", quantize="fp3")


def test_bench_compares_block_weights_on_one_shape():
    """`pudding bench --weights int8,int4,lora`: bf16, each scheme and an unmerged LoRA update timed on the same shape,
    with the blocks' bytes."""
    from transformers import LlamaConfig

    from pudding.bench.report import markdown
    from pudding.bench.suites import benchmark_weights

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    compared = benchmark_weights(config, "cpu", ["int8", "int4", "int4+head", "lora"], repeats=1, prompt_lengths=(16, 32),
                                 log=lambda m: None)
    rows = compared["weights"]
    assert list(rows) == ["bf16", "int8", "int4", "int4+head", "bf16 + LoRA r8 (unmerged)"]
    assert rows["int4+head"]["head_bytes"] < rows["int4"]["head_bytes"] / 3 and "gemv" not in rows["int4+head"]
    assert rows["bf16 + LoRA r8 (unmerged)"]["block_bytes"] > rows["bf16"]["block_bytes"]
    assert rows["int8"]["block_bytes"] < rows["bf16"]["block_bytes"] / 1.8
    assert rows["int4"]["block_bytes"] < rows["int8"]["block_bytes"] / 1.5  # on a CPU int4's scales pair with zeros
    assert all(r[name]["decode_tok_s"] > 0 and set(r[name]["ttft_ms"]) == {16, 32} for r in rows.values() for name in ("dense", "pruned"))
    assert [g["figure"].split()[0] for g in compared["goals"]] == ["int8", "int4", "int4+head"]
    for scheme in ("int8", "int4"):  # the one-row product checked against the dequantized one (triton on a GPU)
        check = rows[scheme]["gemv"]
        assert check["kernel"] == "torch-cpu" and check["shape"] == [64, 128] and check["max_relative_error"] < 1e-2
        assert check["dequantized_us_per_call"] > 0
    table = markdown({"device": "cpu", "date": "today", "command": "pudding bench", "settings": {}, "weights": compared})
    assert "| int4 |" in table and "int8 pruned decode, of bf16 pruned decode" in table and "One-row product alone" in table


# On a GPU the checks below run two tilings of each one-row kernel and one of the tiled product: every tiling
# compiles for every new autotune key, and with the full lists each check took minutes on an H100. Every tiling is
# compiled for sm_90 on the CPU by test_the_gpu_kernels_compile_for_hopper_without_spilling; PUDDING_ALL_TILINGS=1
# runs them all here too.
GPU_TILINGS = r"""
if device != "cpu" and os.environ.get("PUDDING_ALL_TILINGS") != "1":
    kernels._int8_tuned.configs = kernels._int8_tuned.configs[:2]
    kernels._int4_tuned.configs = kernels._int4_tuned.configs[:2]
    kernels._mm_tuned.configs = kernels._mm_tuned.configs[:1]
"""

KERNEL_CHECK = r"""
import os
import sys
import torch
from pudding import kernels
from pudding.quantize import dequantize, quantize_weight, quantized_linear

device = sys.argv[1]
""" + GPU_TILINGS + r"""
assert kernels.available(torch.zeros(1, device=device)), f"the kernels should run on {device}"
generator = torch.Generator().manual_seed(0)
for scheme, rows, cols in [("int8", 37, 100), ("int8", 9, 1030), ("int8", 64, 4096), ("int4", 37, 96), ("int4", 70, 608),
                           ("int4", 64, 4096)]:
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(rows, cols, generator=generator)
        w[3] *= 40
        x = torch.randn(1, 1, cols, generator=generator).to(dtype)
        codes, scales = quantize_weight(w.to(dtype), scheme)
        matrix = dequantize(codes, scales, torch.float32)
        reference = torch.nn.functional.linear(x.float(), matrix)
        # a dot product's rounding is bounded relative to the sum of its terms' sizes, not to its (cancelling) value
        bound = torch.nn.functional.linear(x.float().abs(), matrix.abs())
        x, codes, scales = x.to(device), codes.to(device), scales.to(device)
        direct = kernels.gemv(x.reshape(-1), codes, scales)
        routed = quantized_linear(x, codes, scales)  # one row: the dispatch takes the kernel
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # fp32: summation order; bf16: the output's own rounding
        for got in (direct.view(1, 1, -1), routed):
            assert got.dtype == dtype and got.shape == (1, 1, rows)
            error = (got.float().cpu() - reference).abs()
            assert torch.all(error <= tolerance * bound), f"{scheme} {rows}x{cols} {dtype}: {(error / bound).max():.1e}"
one_row = (x, codes, scales)
# several rows (pre-fill, scoring): the tiled product, rows and outputs that do not fill the last tile; 2 x 150 rows
# is past INT8_KERNEL_ROWS, where int8 goes through the dequantized matrix and int4 stays in the kernel
for scheme, tokens, rows, cols in [("int8", 5, 37, 100), ("int8", 19, 70, 160), ("int8", 150, 37, 100),
                                   ("int4", 5, 37, 96), ("int4", 18, 70, 224), ("int4", 150, 37, 96)]:
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(rows, cols, generator=generator)
        w[3] *= 40
        x = torch.randn(2, tokens, cols, generator=generator).to(dtype)
        codes, scales = quantize_weight(w.to(dtype), scheme)
        matrix = dequantize(codes, scales, torch.float32)
        if dtype == torch.bfloat16 and scheme == "int4":  # int4 widens to the activations' dtype, as dequantize does
            matrix = dequantize(codes, scales, dtype).float()
        reference = torch.nn.functional.linear(x.float(), matrix)
        bound = torch.nn.functional.linear(x.float().abs(), matrix.abs())
        x, codes, scales = x.to(device), codes.to(device), scales.to(device)
        direct = kernels.mm(x.reshape(-1, cols), codes, scales).view(2, tokens, rows)
        routed = quantized_linear(x, codes, scales)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        for got in (direct, routed):
            assert got.dtype == dtype and got.shape == (2, tokens, rows)
            error = (got.float().cpu() - reference).abs()
            assert torch.all(error <= tolerance * bound), f"mm {scheme} {tokens}x{rows}x{cols} {dtype}: {(error / bound).max():.1e}"
compiled = torch.compile(lambda x, c, s: quantized_linear(x, c, s) * 2, fullgraph=True)
for args in (one_row, (x, codes, scales)):  # torch.compile keeps each kernel as one op
    torch.testing.assert_close(compiled(*args), quantized_linear(*args) * 2)
print("ok")
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the PTX form of the kernels needs an NVIDIA GPU"))])
def test_low_bit_kernels_equal_the_reference_product(tmp_path, device):
    """The Triton kernels (kernels.py), one row (a decode step) and several (pre-fill): int8 and int4, fp32 and bf16,
    shapes that do not fill the last block, called directly, through `quantized_linear`, and inside torch.compile. On the CPU Triton's
    interpreter runs them with the codes widened in Triton; on a GPU they widen the codes in PTX."""
    import os
    import subprocess
    import sys

    script = tmp_path / "kernel_check.py"
    script.write_text(KERNEL_CHECK)
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else dict(os.environ)
    result = subprocess.run([sys.executable, str(script), device], capture_output=True, text=True, timeout=600, env=env,
                            check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


FUSED_CHECK = r"""
import os
import sys
import torch
from pudding import kernels
from pudding.engine import Engine
from pudding.omission import OmissionSet
from pudding.quantize import dequantize, quantize_blocks, quantize_weight
sys.path.insert(0, sys.argv[2])
from conftest import build_tiny
from test_engine import _hf_greedy

device = sys.argv[1]
""" + GPU_TILINGS + r"""
generator = torch.Generator().manual_seed(0)
# One row with the gate after the product or the residual added, against the unfused ops (odd output counts: a
# program's last outputs fall outside)
for scheme, rows, cols in [("int8", 38, 100), ("int4", 38, 96), ("int8", 64, 1024), ("int4", 70, 608)]:
    for dtype in (torch.float32, torch.bfloat16):
        for activation, residual in [("silu", False), ("gelu_tanh", False), ("", True), ("silu", True)]:
            w = torch.randn(rows, cols, generator=generator)
            x = (torch.randn(cols, generator=generator) * 3).to(dtype)
            codes, scales = quantize_weight(w.to(dtype), scheme)
            matrix = dequantize(codes, scales, torch.float32)
            product = torch.nn.functional.linear(x.float(), matrix)
            bound = torch.nn.functional.linear(x.float().abs(), matrix.abs())
            expected = product
            if activation:  # rounded where the unfused ops round; the bound carries the gate's slope (<= 1.13)
                gate, up = product.to(dtype).chunk(2)
                if activation == "silu":
                    expected = (torch.nn.functional.silu(gate) * up).float()
                else:
                    expected = (torch.nn.functional.gelu(gate, approximate="tanh") * up).float()
                bound = bound[: rows // 2] * (up.float().abs() + 1.2 * gate.float().abs() + 1)
            skip = torch.randn(expected.shape[0], generator=generator).to(dtype)
            if residual:
                expected = expected.to(dtype).float() + skip.float()
            got = kernels.gemv(x.to(device), codes.to(device), scales.to(device), activation,
                               skip.to(device) if residual else None)
            tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # fp32: summation order; bf16: the output's rounding
            error = (got.float().cpu() - expected).abs()
            assert got.dtype == dtype and got.shape == expected.shape
            assert torch.all(error <= tolerance * bound), f"{scheme} {rows}x{cols} {dtype} {activation} {residual}"

# A fused QKV product (q, k, v rows of every head stacked, with or without a bias) with q and k rotated and k, v
# written to the caches at the position: only that position's cache rows change
def rotate(t, cos, sin, sign=-1):  # rotate-half, as block._rotate (sign 1 with sizes: a bound of the rotated values)
    half = t.shape[-1] // 2
    return t * cos + torch.cat((sign * t[..., half:], t[..., :half]), -1) * sin
for scheme, heads, kv_heads, dim, cols, biased in [("int8", 6, 2, 16, 100, False), ("int4", 6, 2, 16, 96, True),
                                                   ("int8", 4, 4, 32, 64, True), ("int4", 3, 1, 64, 608, False)]:
    for dtype in (torch.float32, torch.bfloat16):
        rows = (heads + 2 * kv_heads) * dim
        codes, scales = quantize_weight(torch.randn(rows, cols, generator=generator).to(dtype), scheme)
        matrix = dequantize(codes, scales, torch.float32)
        x = (torch.randn(cols, generator=generator) * 3).to(dtype)
        cos, sin = torch.randn(2, dim, generator=generator).to(dtype)
        bias = (torch.randn(rows, generator=generator) * 5).to(dtype) if biased else None
        qkv = torch.nn.functional.linear(x.float(), matrix).to(dtype)  # rounded where the unfused ops round
        qkv = (qkv if bias is None else qkv + bias).float()
        size = torch.nn.functional.linear(x.float().abs(), matrix.abs())  # the terms' sizes, rotated as the values are
        expected = torch.cat([rotate(qkv[: -kv_heads * dim].view(-1, dim), cos.float(), sin.float()).flatten(),
                              qkv[-kv_heads * dim :]])
        size = size + qkv.abs()
        bound = torch.cat([rotate(size[: -kv_heads * dim].view(-1, dim), cos.float().abs(), sin.float().abs(), 1).flatten(),
                           size[-kv_heads * dim :]]) + expected.abs()
        caches = torch.randn(2, kv_heads, 9, dim, generator=generator).to(dtype)
        k_cache, v_cache = caches.clone().to(device)
        position = torch.tensor([5])
        q = kernels.gemv_rotary(x.to(device), codes.to(device), scales.to(device), cos.to(device), sin.to(device),
                                position.to(device), k_cache, v_cache, None if bias is None else bias.to(device))
        got = torch.cat([q.cpu(), k_cache[:, 5].flatten().cpu(), v_cache[:, 5].flatten().cpu()]).float()
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert q.dtype == dtype and q.shape == (heads * dim,)
        assert torch.all((got - expected).abs() <= tolerance * bound), f"rotary {scheme} {heads}/{kv_heads}x{dim} {dtype} {biased}"
        others = [p for p in range(9) if p != 5]
        assert torch.equal(k_cache[:, others].cpu(), caches[0][:, others]), "another position of the K cache changed"
        assert torch.equal(v_cache[:, others].cpu(), caches[1][:, others]), "another position of the V cache changed"

# The engine's decode of quantized blocks runs the fused forms and gives transformers' tokens (with the same
# quantized modules): gate and residual fused where the family allows (Gemma 3's sandwich norms keep the residual
# adds apart), the rotation and cache writes where q and k have no norm of their own (not Gemma 3; Qwen 2's QKV bias
# added in the kernel)
fused = []
plain, plain_rotary = kernels.gemv, kernels.gemv_rotary
def counting(x, codes, scales, activation="", residual=None):
    fused.append((bool(activation), residual is not None))
    return plain(x, codes, scales, activation, residual)
def counting_rotary(*args):
    fused.append("rotary")
    return plain_rotary(*args)
def with_biases(model):  # a config-built model's biases start at zero, which would hide a bias left out
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5, generator=torch.Generator().manual_seed(3))
    return model
for family, scheme in [("llama", "int4+head"), ("gemma3", "int8"), ("qwen2", "int8")]:
    model = with_biases(build_tiny(family, init=0.2))
    quantize_blocks(model, scheme)
    prompt = torch.randint(3, 200, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    interpreter = os.environ.pop("TRITON_INTERPRET", None)  # transformers' modules take PyTorch's path (faster here)
    theirs = _hf_greedy(model, prompt, OmissionSet((1, 4), 6), 4)
    if interpreter:
        os.environ["TRITON_INTERPRET"] = interpreter
    engine = Engine.from_model(model, device=device, max_len=64, compile=False, graphs=False)
    fused.clear()
    kernels.gemv, kernels.gemv_rotary = counting, counting_rotary
    try:
        ours = engine.generate(prompt, engine.omission((1, 4)), max_new_tokens=4, stop_ids=[]).tokens
    finally:
        kernels.gemv, kernels.gemv_rotary = plain, plain_rotary
    assert ours == theirs, (family, scheme, ours, theirs)
    steps, blocks = 3, 4  # the first token comes from the pre-fill
    calls = {form: fused.count(form) for form in set(fused)}
    assert calls.get((True, False), 0) == steps * blocks, calls
    assert calls.get((False, True), 0) == steps * blocks * (0 if family == "gemma3" else 2), calls
    assert calls.get("rotary", 0) == steps * blocks * (0 if family == "gemma3" else 1), calls

# Compiled (what a GPU runs: the caches written inside a custom op, functionalized by torch.compile; CUDA graphs on a
# GPU), the same decode gives the eager engine's tokens; Qwen 2's QKV has a bias, which the fused form adds
model = with_biases(build_tiny("qwen2", init=0.2))
quantize_blocks(model, "int8")
engines = [Engine.from_model(model, device=device, max_len=64, compile=compiled, buckets=True) for compiled in (False, True)]
for omit in [(), (1, 4)]:
    eager, compiled = [e.generate(prompt, e.omission(omit), max_new_tokens=5, stop_ids=[]).tokens for e in engines]
    assert compiled == eager, (omit, compiled, eager)
print("ok")
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the PTX form of the kernels needs an NVIDIA GPU"))])
def test_one_row_kernels_take_in_the_work_around_them(tmp_path, device):
    """A decode step's low-bit products with the element-wise work after them fused in (`kernels.gemv`: SiLU / GELU
    of the gate times the up half, the residual add) equal the unfused ops, and a quantized engine's decode runs them
    and gives transformers' tokens (Llama with its head quantized; Gemma 3, whose sandwich norms keep the residual
    adds apart); the QKV product with q, k rotated and the caches written (`kernels.gemv_rotary`) likewise, and a
    compiled engine decodes as the eager one. On the CPU under Triton's interpreter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "fused_check.py"
    script.write_text(FUSED_CHECK)
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else dict(os.environ)
    tests = str(Path(__file__).parent)
    result = subprocess.run([sys.executable, str(script), device, tests], capture_output=True, text=True, timeout=900,
                            env=env, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed")
def test_the_gpu_kernels_compile_for_hopper_without_spilling():
    """The GPU form of the kernels (PTX widening, tensor-core dot), which the CPU interpreter never compiles: every
    tiling the autotuner may pick compiles for sm_90 here, for the 8B shape's largest matrices and both schemes,
    keeping everything in registers (a spill would put the weights' stream through local memory), with the one-row
    kernels' fused forms too. A typo in the widening PTX fails it here, where the interpreter's tests cannot see it."""
    import itertools

    forms = []
    for config in kernels._int8_tuned.configs:
        forms.append((kernels._gemv_int8_kernel, {"x_ptr": "*bf16", "codes_ptr": "*i8", "scales_ptr": "*bf16",
                                                  "out_ptr": "*bf16"}, {"N": 14336, "K": 4096, "PACKED": True}, config))
    for x_type, config in itertools.product(("*bf16", "*fp16"), kernels._int4_tuned.configs):  # fp16: exact widening
        forms.append((kernels._gemv_int4_kernel, {"x_ptr": x_type, "codes_ptr": "*u8", "scales_ptr": "*bf16",
                                                  "out_ptr": x_type},
                      {"N": 14336, "HALF": 2048, "GROUPS": 128, "GROUP": 32, "PACKED": True}, config))
    # a decode step's fused forms (`kernels.gemv`, `kernels.gemv_rotary`): the down product with its residual; the
    # gate/up product with its gate and the QKV product with its rotation and cache writes, a program reading BLOCK_N
    # pairs of rows (at most 8: `kernels._paired_tilings`)
    for int4, kernel, tuner in ((False, kernels._gemv_int8_kernel, kernels._int8_tuned),
                                (True, kernels._gemv_int4_kernel, kernels._int4_tuned)):
        signature = {"x_ptr": "*bf16", "codes_ptr": "*u8" if int4 else "*i8", "scales_ptr": "*bf16", "out_ptr": "*bf16",
                     "res_ptr": "*bf16"}
        down = {"N": 4096, "HALF": 7168, "GROUPS": 448, "GROUP": 32} if int4 else {"N": 4096, "K": 14336}
        gate_up = {"N": 28672, "HALF": 2048, "GROUPS": 128, "GROUP": 32} if int4 else {"N": 28672, "K": 4096}
        qkv = {"N": 6144, "HALF": 2048, "GROUPS": 128, "GROUP": 32} if int4 else {"N": 6144, "K": 4096}
        rotary = {**signature, "cos_ptr": "*bf16", "sin_ptr": "*bf16", "pos_ptr": "*i64", "k_ptr": "*bf16",
                  "v_ptr": "*bf16", "cache_stride": "i32"}
        biased = {**rotary, "bias_ptr": "*bf16"}
        for config in tuner.configs:
            forms.append((kernel, signature, {**down, "RESIDUAL": True, "PACKED": True}, config))
            if config.kwargs["BLOCK_N"] <= 8:
                forms.append((kernel, signature, {**gate_up, "GATE": 1, "PACKED": True}, config))
                for qkv_signature in (rotary, biased):
                    forms.append((kernel, qkv_signature, {**qkv, "ROTARY": True, "D": 128, "Q_ROWS": 4096, "PACKED": True},
                                  config))
    for int4, config in itertools.product((False, True), kernels._mm_tuned.configs):
        mm = {"x_ptr": "*bf16", "codes_ptr": "*u8" if int4 else "*i8", "scales_ptr": "*bf16", "out_ptr": "*bf16",
              "M": "i32", "M_BUCKET": "i32"}
        forms.append((kernels._mm_lowbit_kernel, mm, {"N": 4096, "K": 14336, "GROUPS": 448, "GROUP": 32, "INT4": int4,
                                                      "FP32": False}, config))
    for fn, signature, constants, config in forms:
        used = hopper_resources(fn, signature, constants, config)
        assert used["STACK"] == 0 and used["REG"] <= 255, (fn.__name__, config, used)
