"""Standard checkpoints of pruned models, and packs: what pudding writes loads elsewhere and computes the same."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_tiny
from pudding.bundle import Bundle, CandidateSet
from pudding.decoder import PrunableDecoder
from pudding.export import export_checkpoint
from pudding.omission import OmissionSet
from conftest import assert_clean_failure, pudding

SETS = [[3, 9], [11, 20]]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, smollm2):
    path = tmp_path_factory.mktemp("export") / "bundle"
    opened = Bundle.create_or_open(path, smollm2.info(), 2, {})
    opened.write_candidates([CandidateSet(s, [{"task": "piqa", "loss": "tl"}]) for s in SETS], {})
    return path


@pytest.mark.slow
def test_exported_checkpoint_loads_in_plain_transformers_with_the_same_logits(tmp_path, smollm2):
    out = tmp_path / "pruned"
    result = pudding("export", "--model", "smollm2-135m", "--omit", "0,17,29", "--dtype", "float32", "--output", str(out))
    assert result.returncode == 0, result.stderr
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert plain.config.num_hidden_layers == 27
    ids = smollm2.tokenizer("The capital of France is Paris, and the capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = plain(ids).logits.float()
    ours = smollm2.decoder.full_logits(ids, OmissionSet([0, 17, 29], 30))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    info = json.loads((out / "pudding.json").read_text())
    assert info["omitted_blocks"] == [0, 17, 29] and info["source_fingerprint"] == smollm2.fingerprint
    assert (out / "tokenizer.json").exists() and "AutoModelForCausalLM" in (out / "README.md").read_text()


def test_deleting_blocks_shares_the_weights_and_leaves_the_model_intact(tiny_model):
    from pudding.export import delete_blocks

    model = tiny_model
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    pruned = delete_blocks(model, [1])
    assert pruned.config.num_hidden_layers == layers - 1 and model.config.num_hidden_layers == layers
    original = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in original for p in pruned.parameters())  # no second copy of any weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)  # the source model still runs every block
        torch.testing.assert_close(pruned(ids).logits.float(),
                                   PrunableDecoder(model).full_logits(ids, OmissionSet([1], layers)), rtol=1e-4, atol=1e-4)


def test_exported_gemma3_keeps_each_block_attention_type(tmp_path):
    model = build_tiny("gemma3", init=0.2)
    omit = OmissionSet([1, 2], 6)  # a full and a sliding block: the kept types must stay aligned with their blocks
    export_checkpoint(model, None, omit, tmp_path / "g", {"source_model": "tiny", "source_fingerprint": "-"})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32, attn_implementation="sdpa")
    kept_types = [model.config.layer_types[i] for i in (0, 3, 4, 5)]
    assert plain.config.layer_types == kept_types
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = plain(ids).logits.float()
    ours = PrunableDecoder(model).full_logits(ids, omit)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_export_every_set_of_a_bundle(tmp_path, bundle):
    out = tmp_path / "all"
    result = pudding("export", "--bundle", str(bundle), "--all", "--output", str(out))
    assert result.returncode == 0, result.stderr
    for i, blocks in enumerate(SETS):
        info = json.loads((out / f"set{i}" / "pudding.json").read_text())
        assert info["omitted_blocks"] == blocks and info["set"] == i
        assert json.loads((out / f"set{i}" / "config.json").read_text())["num_hidden_layers"] == 28
    again = pudding("export", "--bundle", str(bundle), "--set", "1", "--output", str(out / "set1"))
    assert_clean_failure(again, "already exists")
    assert json.loads((out / "set1" / "pudding.json").read_text())["set"] == 1  # nothing overwritten


@pytest.mark.parametrize("args, message", [
    (["--set", "5"], "set 5 does not exist"),
    (["--set", "0", "--all"], "exactly one of"),
    ([], "exactly one of"),
    (["--set", "0", "--dtype", "int3"], "unknown --dtype"),
])
def test_export_rejects_bad_requests(tmp_path, bundle, args, message):
    result = pudding("export", "--bundle", str(bundle), *args, "--output", str(tmp_path / "x"))
    assert_clean_failure(result, message)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_pack_unpack_and_use_the_pack_without_the_registry(tmp_path, bundle, smollm2):
    archive = tmp_path / "pack.tar"
    result = pudding("pack", "--bundle", str(bundle), "--output", str(archive))
    assert result.returncode == 0, result.stderr
    unpacked = tmp_path / "unpacked"
    assert pudding("unpack", str(archive), "--output", str(unpacked)).returncode == 0
    card = (unpacked / "README.md").read_text()
    assert "11,20" in card and smollm2.fingerprint in card
    assert (unpacked / "model" / "config.json").exists()
    # the pack brings its own model: no registry lookup (an empty models directory and no site-packages model)
    result = pudding("eval", "--bundle", str(unpacked), "--set", "1", "--tasks", "piqa", "--limit", "4",
                     "--output", str(tmp_path / "e.json"), env={"PUDDING_MODELS_DIR": str(tmp_path / "empty")})
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "e.json").read_text())["model"]["fingerprint"] == smollm2.fingerprint
    assert_clean_failure(pudding("unpack", str(tmp_path / "e.json"), "--output", str(tmp_path / "u2")), "not a")


@pytest.mark.slow
def test_a_bundle_whose_router_loses_deploys_its_static_set_and_the_choice_survives_a_pack(tmp_path, smollm2):
    """Held-out prompts on which one candidate set is always right and the others always wrong: no router can beat
    it, so the bundle deploys it; pack and unpack keep that choice, and `eval --bundle` uses it by default."""
    from conftest import SETS as FOUR_SETS
    from conftest import synthetic_table

    from pudding.labels import heldout_split
    from pudding.router import RouterSettings
    from pudding.router_training import save_router, train_router

    path = tmp_path / "bundle"
    opened = Bundle.create_or_open(path, smollm2.info(), 2, {"pipeline": {}})
    opened.write_candidates([CandidateSet(s, [{"task": "piqa", "loss": "tl"}]) for s in FOUR_SETS], {})
    table = synthetic_table(40)
    table.save(opened.labels_path)
    opened.track(opened.labels_path)
    settings = RouterSettings(epochs=1, warmup_steps=1, batch_size=8, max_length=24, val_fraction=0.25)
    router, tokenizer, history, meta = train_router(table, settings)
    save_router(opened.router_dir(), router, tokenizer, settings, FOUR_SETS, history, meta, opened.model)
    opened.track(opened.router_dir())
    held = heldout_split(len(table), settings.val_fraction, settings.seed)[1]
    winner = 3
    opened.write_json("heldout.json", {"settings": {}, "tasks": {"piqa": {
        "metric": "acc", "indices": [int(i) for i in held], "prompts": [table.prompts[i] for i in held],
        "correct": ["1" * len(held) if s == winner else "0" * len(held) for s in range(len(FOUR_SETS))],
        "tl": [[1.0] * len(held) for _ in FOUR_SETS]}}})
    result = pudding("pipeline", "--small", "--output", str(path), "--blocks", "2", "--stages", "select",
                     "--tasks", "piqa", "--limit", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    policy = json.loads((path / "policy.json").read_text())
    assert policy["deployed"] == {"static": winner} and policy["fair_static"] == winner
    packed = tmp_path / "pack.tar"
    assert pudding("pack", "--bundle", str(path), "--output", str(packed)).returncode == 0
    unpacked = tmp_path / "unpacked"
    assert pudding("unpack", str(packed), "--output", str(unpacked)).returncode == 0
    assert json.loads((unpacked / "policy.json").read_text())["deployed"] == {"static": winner}
    assert f"**set{winner}**" in (unpacked / "README.md").read_text()
    out = tmp_path / "e.json"
    result = pudding("eval", "--bundle", str(unpacked), "--tasks", "piqa", "--limit", "4", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["omission"] == {"kind": "deployed", "blocks": FOUR_SETS[winner], "label": "3,20"}
    raw = pudding("eval", "--bundle", str(unpacked), "--router", "--tasks", "piqa", "--limit", "4", "--output", str(out))
    assert raw.returncode == 0 and json.loads(out.read_text())["omission"]["kind"] == "pudding"


# ------------------------------------------------------------------------------------------------------------------
# Pruned GGUF files


def _gguf_reader(path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _smollm2_gguf():
    from pudding.models import gguf_source, resolve_model

    [path] = gguf_source(resolve_model("smollm2-135m"))
    return path


@pytest.mark.slow
def test_gguf_export_copies_the_kept_blocks_byte_for_byte(tmp_path, bundle):
    import numpy as np

    from conftest import cli

    out = tmp_path / "all"
    result = cli("export", "--bundle", str(bundle), "--all", "--format", "gguf", "--output", str(out))
    assert result.returncode == 0, result.stderr
    source = _gguf_reader(_smollm2_gguf())
    by_name = {t.name: t for t in source.tensors}
    for i, omitted in enumerate(SETS):
        pruned = _gguf_reader(out / f"set{i}.gguf")
        kept = [b for b in range(30) if b not in omitted]
        assert pruned.get_field("llama.block_count").contents() == 28
        assert pruned.get_field("pudding.omitted_blocks").contents() == omitted
        expected = [t.name for t in source.tensors if not t.name.startswith("blk.")]
        expected += [f"blk.{kept.index(int(t.name.split('.')[1]))}.{t.name.split('.', 2)[2]}" for t in source.tensors
                     if t.name.startswith("blk.") and int(t.name.split(".")[1]) in kept]
        assert sorted(t.name for t in pruned.tensors) == sorted(expected)
        for tensor in pruned.tensors:
            name = tensor.name
            if name.startswith("blk."):
                _, new, rest = name.split(".", 2)
                name = f"blk.{kept[int(new)]}.{rest}"
            original = by_name[name]
            assert tensor.tensor_type == original.tensor_type and tensor.shape.tolist() == original.shape.tolist()
            assert np.array_equal(tensor.data, original.data), tensor.name  # the same bytes: no re-quantization
        for field in source.fields.values():
            if not field.name.startswith("GGUF.") and field.name != "llama.block_count":
                assert pruned.get_field(field.name).contents() == field.contents(), field.name


@pytest.mark.slow
def test_exported_gguf_loads_in_transformers_with_the_logits_of_the_omission_set(tmp_path, smollm2):
    from conftest import cli

    result = cli("export", "--model", "smollm2-135m", "--omit", "0,17,29", "--format", "gguf",
                 "--output", str(tmp_path / "pruned.gguf"))
    assert result.returncode == 0, result.stderr
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="pruned.gguf", dtype=torch.float32)
    assert plain.config.num_hidden_layers == 27
    with torch.no_grad():  # pudding's copy of a GGUF model holds its dequantized weights in bfloat16
        for parameter in plain.parameters():
            parameter.copy_(parameter.bfloat16().float())
    ids = smollm2.tokenizer("The capital of France is Paris, and the capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = plain(ids).logits.float()
    ours = smollm2.decoder.full_logits(ids, OmissionSet([0, 17, 29], 30))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def _export_quantized_gguf(tmp_path, omitted, scheme):
    from gguf import GGMLQuantizationType

    from conftest import cli

    out = tmp_path / f"pruned-{scheme}.gguf"
    result = cli("export", "--model", "smollm2-135m", "--omit", ",".join(map(str, omitted)), "--format", "gguf",
                 "--quantize", scheme, "--output", str(out))
    assert result.returncode == 0, result.stderr
    pruned, source = _gguf_reader(out), {t.name: t for t in _gguf_reader(_smollm2_gguf()).tensors}
    assert pruned.get_field("pudding.quantize").contents() == scheme
    expected_type = GGMLQuantizationType.Q8_0 if scheme == "int8" else GGMLQuantizationType.Q4_0
    for tensor in pruned.tensors:  # block matrices re-quantized, everything else the source's bytes
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            assert tensor.tensor_type == expected_type, tensor.name
        elif not tensor.name.startswith("blk."):
            assert tensor.tensor_type == source[tensor.name].tensor_type and (tensor.data == source[tensor.name].data).all()
    return out, pruned, source


def _quantize_reference(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    from pudding.quantize import dequantize, quantize_weight

    codes, scales = quantize_weight(weight.bfloat16(), scheme)
    return dequantize(codes, scales, torch.float32)


@pytest.mark.slow
def test_int4_gguf_loads_in_transformers_with_the_weights_of_quantize(tmp_path, smollm2):
    omitted = [0, 17, 29]
    out, _, _ = _export_quantized_gguf(tmp_path, omitted, "int4")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    kept = [b for b in range(30) if b not in omitted]
    theirs, ours = plain.model.layers, smollm2.model.model.layers
    assert len(theirs) == len(kept)
    for new, old in enumerate(kept):  # the weights llama.cpp runs are the weights `--quantize int4` runs, to the bit
        for name, module in ours[old].named_modules():
            if isinstance(module, torch.nn.Linear):
                assert torch.equal(theirs[new].get_submodule(name).weight, _quantize_reference(module.weight, "int4"))


def _matrices_gguf(path, cols: int, blocks: int = 3):
    import gguf
    import numpy as np

    generator = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(blocks)
    for b in range(blocks):
        weight = generator.standard_normal((16, cols)).astype(np.float32)
        weight[3] *= 40  # one row far larger than the others: per-row and per-group scales differ
        writer.add_tensor(f"blk.{b}.ffn_down.weight", weight)
        writer.add_tensor(f"blk.{b}.attn_norm.weight", np.full(cols, b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_gguf_holds_the_codes_and_scales_of_quantize(tmp_path, scheme):
    from gguf.quants import dequantize

    from pudding.export import export_gguf

    source = _matrices_gguf(tmp_path / "source.gguf", cols=96)
    out = export_gguf([source], OmissionSet([1], 3), tmp_path / "out.gguf", {}, scheme)
    pruned, original = _gguf_reader(out), {t.name: t for t in _gguf_reader(source).tensors}
    assert len(pruned.tensors) == 4 and pruned.get_field("pudding.quantize").contents() == scheme
    for tensor, old in zip(sorted(pruned.tensors, key=lambda t: t.name), ["blk.0.attn_norm.weight",
                           "blk.0.ffn_down.weight", "blk.2.attn_norm.weight", "blk.2.ffn_down.weight"]):
        if tensor.name.endswith("attn_norm.weight"):  # not a matrix: copied as it is
            assert (tensor.data == original[old].data).all()
            continue
        weight = torch.from_numpy(original[old].data.copy())
        assert torch.equal(torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()),
                           _quantize_reference(weight, scheme)), tensor.name


def test_quantized_gguf_needs_rows_of_whole_blocks_and_leaves_nothing(tmp_path):
    from pudding.errors import PuddingError
    from pudding.export import export_gguf

    source = _matrices_gguf(tmp_path / "source.gguf", cols=48)
    with pytest.raises(PuddingError, match="multiple of 32"):
        export_gguf([source], OmissionSet([1], 3), tmp_path / "out.gguf", {}, "int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.gguf"]


def _tiny_gguf(path, arch: str, blocks: int):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(blocks)
    writer.add_array(f"{arch}.attention.head_count", [4] * blocks)
    for b in range(blocks):
        writer.add_tensor(f"blk.{b}.attn_norm.weight", np.full(8, b, dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_export_slices_per_block_metadata_and_refuses_positional_families(tmp_path):
    from pudding.errors import PuddingError
    from pudding.export import export_gguf

    source = _tiny_gguf(tmp_path / "tiny.gguf", "qwen2", 4)
    out = export_gguf([source], OmissionSet([1, 2], 4), tmp_path / "out.gguf", {"source_model": "tiny"})
    pruned = _gguf_reader(out)
    assert pruned.get_field("qwen2.block_count").contents() == 2
    assert pruned.get_field("qwen2.attention.head_count").contents() == [4, 4]
    assert [(t.name, float(t.data[0])) for t in pruned.tensors if t.name.startswith("blk.")] == [
        ("blk.0.attn_norm.weight", 0.0), ("blk.1.attn_norm.weight", 3.0)]
    with pytest.raises(PuddingError, match="has 4 blocks"):
        export_gguf([source], OmissionSet([1], 6), tmp_path / "wrong.gguf", {})
    gemma = _tiny_gguf(tmp_path / "gemma.gguf", "gemma3", 4)
    with pytest.raises(PuddingError, match="sliding-window"):
        export_gguf([gemma], OmissionSet([1], 4), tmp_path / "g.gguf", {})
    assert not (tmp_path / "wrong.gguf").exists() and not (tmp_path / "g.gguf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_gguf_export_needs_a_gguf_model(tmp_path, tiny_model_dir):
    result = pudding("export", "--model", str(tiny_model_dir), "--omit", "1", "--format", "gguf",
                     "--output", str(tmp_path / "x.gguf"))
    assert_clean_failure(result, "not a GGUF model")
    assert_clean_failure(pudding("export", "--omit", "1", "--format", "gguf", "--dtype", "float32",
                                 "--output", str(tmp_path / "x.gguf")), "--dtype is for --format hf")
    assert_clean_failure(pudding("export", "--omit", "1", "--quantize", "int8", "--output", str(tmp_path / "hf")),
                         "--quantize is for --format gguf")
    assert_clean_failure(pudding("export", "--omit", "1", "--format", "gguf", "--quantize", "int2",
                                 "--output", str(tmp_path / "x.gguf")), "unknown --quantize 'int2'")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "hf").exists()


@pytest.fixture
def tiny_model_dir(tmp_path):
    directory = tmp_path / "tiny-llama"
    build_tiny("llama").save_pretrained(directory)
    return directory
