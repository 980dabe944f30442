"""LoRA per omission set: an adapter applied by pudding (unmerged, on the full model under its set) computes what peft's
own forward of the pruned model computes; merged weights compute the same; training lowers the loss, is saved in the
bundle in peft's format, and eval --lora scores each set with its adapter."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CONFIGS, assert_clean_failure, build_tiny, cli, pudding

from pudding.bundle import Bundle, CandidateSet
from pudding.decoder import PrunableDecoder
from pudding.errors import PuddingError
from pudding.export import delete_blocks
from pudding.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, AdapterStore, LoraRecipe, applied, merge_adapter,
                          peft_config, save_adapter, target_modules)
from pudding.omission import OmissionSet

OMIT = (1, 4)


def random_adapter(model, omit, directory, rank: int = 4, seed: int = 0):
    """A peft adapter of the pruned model with nonzero A and B (peft starts B at zero), saved as pudding saves one."""
    from peft import get_peft_model

    peft_model = get_peft_model(delete_blocks(model, omit), peft_config(model, LoraRecipe(rank=rank, alpha=2 * rank, dropout=0.0)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    peft_model.eval()
    save_adapter(directory, peft_model, {"set": list(omit)})
    return peft_model


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_adapter_applied_equals_peft_forward(family, tmp_path):
    model = build_tiny(family, init=0.2)
    omit = OmissionSet(OMIT, 6)
    peft_model = random_adapter(model, omit, tmp_path / "a")
    assert (tmp_path / "a" / ADAPTER_WEIGHTS).is_file() and (tmp_path / "a" / ADAPTER_CONFIG).is_file()
    ids = torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = peft_model(input_ids=ids).logits.float()
    decoder = PrunableDecoder(model)
    adapter = Adapter.load(tmp_path / "a", model)
    assert sorted(adapter.weights) == omit.kept()
    plain = decoder.full_logits(ids, omit)
    with applied(decoder.blocks, adapter):
        adapted = decoder.full_logits(ids, omit)
    torch.testing.assert_close(adapted, reference, rtol=1e-4, atol=1e-4)
    assert (adapted - plain).abs().max() > 1e-2, "the adapter must change the logits"
    torch.testing.assert_close(decoder.full_logits(ids, omit), plain)  # hooks removed on leaving
    merged = delete_blocks(model, omit)
    merge_adapter(merged, adapter)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits.float(), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoder.full_logits(ids, omit), plain)  # merging left the source model alone


def test_peft_loads_the_saved_adapter_on_the_exported_model(tmp_path):
    from peft import PeftModel

    model = build_tiny("llama", init=0.2)
    omit = OmissionSet(OMIT, 6)
    peft_model = random_adapter(model, omit, tmp_path / "a")
    reloaded = PeftModel.from_pretrained(delete_blocks(model, omit), str(tmp_path / "a")).eval()
    ids = torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_targets_are_every_linear_layer_of_a_block():
    assert target_modules(build_tiny("llama")) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_recipe_rejects_bad_settings():
    for bad in (dict(rank=0), dict(dropout=1.0), dict(lr=0.0), dict(micro_batch=0)):
        with pytest.raises(PuddingError, match="LoRA"):
            LoraRecipe(**bad).validate()


def test_recipe_takes_settings_by_their_option_names():
    """`pipeline --lora-option NAME=VALUE`: `pudding lora`'s option names (hyphens or underscores), typed values,
    per-task=all for whole train splits; the micro-batch never exceeds the step."""
    recipe = LoraRecipe(per_task=100).with_options(["micro-batch=64", "lr=2e-4", "per_task=all", " epochs = 1"])
    assert (recipe.micro_batch, recipe.lr, recipe.per_task, recipe.epochs) == (64, 2e-4, None, 1)
    assert LoraRecipe().with_options(["batch-size=8", "micro-batch=32"]).micro_batch == 8
    assert LoraRecipe().with_options([]) == LoraRecipe()


def _bundle(path, smollm2, sets):
    bundle = Bundle.create_or_open(path, smollm2.info(), len(sets[0]), {})
    bundle.write_candidates([CandidateSet(s, [{"task": "hand-picked"}]) for s in sets], {})
    return bundle


@pytest.mark.slow
def test_lora_trains_per_set_and_eval_applies_it(smollm2, tmp_path):
    """`pudding lora` on two sets of the real model: loss falls, adapters land checksummed in the bundle, and
    `eval --lora` scores a set with its adapter (its accuracy differs from the set's without one on some documents)."""
    sets = [[3, 9, 11, 17], [4, 14, 18, 24]]
    bundle = _bundle(tmp_path / "b", smollm2, sets)
    small = ["--per-task", "4", "--text-windows", "4", "--batch-size", "4", "--micro-batch", "4", "--max-length", "32",
             "--epochs", "2", "--lr", "1e-3"]
    result = cli("lora", "--bundle", str(bundle.path), *small)
    assert result.returncode == 0, result.stderr
    store = AdapterStore(bundle.path, smollm2.model)
    for blocks in sets:
        omit = OmissionSet(blocks, 30)
        info = json.loads((store.directory(omit) / "pudding.json").read_text())
        losses = info["history"]["epochs"]
        assert len(losses) == 2 and losses[1]["train_loss"] < losses[0]["train_loss"]
        assert info["data"]["per_source"] == {t: 4 for t in ["arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande"]} | {"wikitext2": 4}
        assert store.get(omit).omit == omit
    Bundle.open(bundle.path).verify()
    checksummed = json.loads((bundle.path / "checksums.json").read_text())["files"]
    assert any(name.startswith("adapters/omit-3-9-11-17/") and name.endswith(ADAPTER_WEIGHTS) for name in checksummed)
    again = cli("lora", "--bundle", str(bundle.path), *small)  # nothing left to train
    assert again.returncode == 0 and "LoRA training data" not in again.stderr

    documents = {}
    for flag in ([], ["--lora"]):
        out = tmp_path / f"eval{len(flag)}.json"
        ran = cli("eval", "--bundle", str(bundle.path), "--set", "0", "--tasks", "arc_easy", "--limit", "40", *flag, "--output", str(out))
        assert ran.returncode == 0, ran.stderr
        documents[bool(flag)] = json.loads(out.read_text())
    assert documents[True]["settings"]["lora"] is True
    assert documents[True]["tasks"]["arc_easy"]["per_doc"] != documents[False]["tasks"]["arc_easy"]["per_doc"]

    # the lm-eval model scores with the same adapter (its loglikelihoods = pudding's scorer with the adapter applied),
    # and generation (the engine, unmerged update) runs the set's adapter too
    from pudding.harness.model import PuddingLM

    lm = PuddingLM(bundle=str(bundle.path), set=0, device="cpu", lora="true")
    assert lm.get_model_info()["pudding"]["lora"] is True
    omit = OmissionSet(sets[0], 30)
    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris")]
    with_adapter = lm.scorer.loglikelihoods(lm.scorer.encoder.groups([pairs]), omit).logprob
    lm.scorer.use_adapters(None)
    without = lm.scorer.loglikelihoods(lm.scorer.encoder.groups([pairs]), omit).logprob
    assert abs(float(with_adapter[0]) - float(without[0])) > 1e-4
    generated = cli("generate", "--bundle", str(bundle.path), "--omit", "3,9,11,17", "--lora", "--max-new-tokens", "4",
                    "The capital of France is")
    assert generated.returncode == 0 and "omit 3,9,11,17" in generated.stderr, generated.stderr

    # export --lora: a plain checkpoint with the adapter merged computes what pudding computes with it applied
    from transformers import AutoModelForCausalLM

    exported = cli("export", "--bundle", str(bundle.path), "--set", "0", "--lora", "--dtype", "float32", "--output", str(tmp_path / "x"))
    assert exported.returncode == 0, exported.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "x").eval()
    assert json.loads((tmp_path / "x" / "pudding.json").read_text())["lora"]["merged"] is True
    ids = torch.tensor([lm.loaded.tokenizer("The capital of France is Paris, and")["input_ids"]])
    with applied(lm.loaded.decoder.blocks, store.get(omit)):
        want = lm.loaded.decoder.full_logits(ids, omit)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits.float(), want, rtol=1e-3, atol=1e-3)


def test_eval_lora_refuses_a_bundle_without_adapters(smollm2, tmp_path):
    bundle = _bundle(tmp_path / "b", smollm2, [[3, 9, 11, 17]])
    assert_clean_failure(pudding("eval", "--bundle", str(bundle.path), "--set", "0", "--tasks", "piqa", "--limit", "2", "--lora"),
                         "has no LoRA adapter for the set omitting 3,9,11,17")
    assert_clean_failure(pudding("eval", "--tasks", "piqa", "--limit", "2", "--lora"), "--lora needs --bundle")
    assert_clean_failure(pudding("lora", "--bundle", str(bundle.path), "--sets", "sleb"), "has no sleb set yet")
    assert_clean_failure(pudding("lora", "--bundle", str(bundle.path), "--sets", "magic"), "unknown set group 'magic'")


ENGINE_FAMILIES = ["gemma3", "llama", "phi3", "qwen2"]


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
@pytest.mark.parametrize("budget", [None, 5])
def test_engine_runs_each_set_with_its_adapter(family, budget, tmp_path):
    """The engine's unmerged update (fused QKV and gate/up) = the scorer's hooks on the full model, for two sets that
    share blocks, switched back and forth (with a memory budget, the blocks swap and their updates follow the set)."""
    from pudding.engine import Engine

    model = build_tiny(family, init=0.2)
    sets = [OmissionSet((1, 4), 6), OmissionSet((0, 4), 6)]
    adapters = {}
    for i, omit in enumerate(sets):
        random_adapter(model, omit, tmp_path / str(i), seed=i)
        adapters[omit] = Adapter.load(tmp_path / str(i), model)
    engine = Engine.from_model(model, max_len=64, budget=budget, lora_rank=4)
    engine.set_adapters(adapters)
    decoder = PrunableDecoder(model)
    ids = torch.randint(3, 250, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    for omit in [sets[0], sets[1], OmissionSet((1, 2), 6), sets[0]]:  # the third has no adapter: zero update
        engine.use(omit)
        got = engine.prefill(ids).clone().reshape(-1)
        with applied(decoder.blocks, adapters.get(omit)):
            want = decoder.full_logits(torch.tensor([ids]), omit)[0, -1].reshape(-1)
            tokens = decoder.generate_greedy(ids, omit, max_new_tokens=5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert engine.generate(ids, omit, max_new_tokens=5, stop_ids=[]).tokens == tokens


def test_engine_refuses_an_adapter_of_another_rank(tmp_path):
    from pudding.engine import Engine

    model = build_tiny("llama")
    omit = OmissionSet(OMIT, 6)
    random_adapter(model, omit, tmp_path / "a", rank=4)
    engine = Engine.from_model(model, max_len=32, lora_rank=2)
    with pytest.raises(PuddingError, match="has rank 4, the engine 2"):
        engine.set_adapters({omit: Adapter.load(tmp_path / "a", model)})
    with pytest.raises(PuddingError, match="built without LoRA slots"):
        Engine.from_model(model, max_len=32).set_adapters({})


def test_a_merged_adapter_runs_what_the_unmerged_one_runs(tmp_path):
    """`generate --lora` with one fixed set merges its adapter into the blocks (no cost per token): same tokens and
    logits as the engine's unmerged update."""
    from pudding.engine import Engine

    omit = OmissionSet(OMIT, 6)
    model = build_tiny("qwen2", init=0.2)
    random_adapter(model, omit, tmp_path / "a")
    adapter = Adapter.load(tmp_path / "a", model)
    unmerged = Engine.from_model(model, max_len=64, lora_rank=4)
    unmerged.set_adapters({omit: adapter})
    merged_model = build_tiny("qwen2", init=0.2)
    merge_adapter(merged_model, adapter)
    merged = Engine.from_model(merged_model, max_len=64)
    ids = torch.randint(3, 250, (11,), generator=torch.Generator().manual_seed(4)).tolist()
    runs = [e.generate(ids, omit, max_new_tokens=6, stop_ids=[]).tokens for e in (unmerged, merged)]
    assert runs[0] == runs[1]
    for engine in (unmerged, merged):
        engine.use(omit)
    torch.testing.assert_close(merged.prefill(ids).clone(), unmerged.prefill(ids).clone(), rtol=1e-4, atol=1e-4)
    with pytest.raises(PuddingError, match="must have 1 to 64 tokens"):
        merged.prefill(list(range(65)))


@pytest.mark.slow
def test_pipeline_lora_stage_trains_and_evaluates_table4_rows(smollm2, tmp_path):
    """`pipeline --lora`: adapters for the pool and the SLEB and Shortened LLaMA sets, and their rows evaluated with
    the adapters applied; without --lora the stage does nothing."""
    bundle = _bundle(tmp_path / "b", smollm2, [[3, 9, 11, 17, 20, 25]])  # one pool set: its adapter, SLEB's and Shortened LLaMA's
    common = ["pipeline", "--output", str(bundle.path), "--small", "--tasks", "arc_easy", "--limit", "6", "--label-limit", "4",
              "--baseline-samples", "1"]
    plain = cli(*common, "--stages", "baselines,lora")
    assert plain.returncode == 0, plain.stderr
    assert not (bundle.path / "adapters").exists()
    ran = cli(*common, "--stages", "lora", "--lora", "--lora-option", "rank=4", "--lora-option", "micro-batch=64")
    assert ran.returncode == 0, ran.stderr
    made = {p.name for p in (bundle.path / "adapters").iterdir() if not p.name.endswith(".partial")}
    store = AdapterStore(bundle.path, smollm2.model)
    b = Bundle.open(bundle.path)
    for omit in [*b.omission_sets(), b.baseline("sleb").omission(), b.baseline("shortened-ppl").omission()]:
        assert store.directory(omit).name in made
    for row in ("sleb-lora", "shortened-ppl-lora"):
        document = json.loads((bundle.path / "evals" / f"{row}.json").read_text())
        recipe = document["settings"]["pipeline"]["lora"]
        assert recipe["rank"] == 4 and recipe["micro_batch"] == recipe["batch_size"] == 8  # a pass holds at most a step
        assert document["tasks"]["arc_easy"]["n"] == 6


def test_report_shows_the_lora_rows(smollm2, tmp_path):
    """Evaluations the lora stage writes appear in report.md as the paper's Table 4."""
    from pudding.pipeline import PipelineConfig
    from pudding.report import write_report

    bundle = Bundle.create_or_open(tmp_path / "b", smollm2.info(), 4, {})
    bundle.write_candidates([CandidateSet([3, 9, 11, 17], [{"task": "piqa", "loss": "tl"}])], {})
    row = {"omission": {"label": "3,9,11,17"}, "tasks": {"piqa": {"primary": "acc", "metrics": {"acc": 0.5},
           "stderr": {"acc": 0.1}, "per_doc": {"acc": "0110"}, "n": 4}}}
    for name in ("dense", "sleb-lora", "pudding-lora"):
        bundle.write_json(f"evals/{name}.json", row)
    report = write_report(bundle, PipelineConfig(eval_tasks=["piqa"])).read_text()
    table = report.split("## With LoRA per omission set (Table 4)")[1]
    assert "| SLEB + LoRA |" in table and "| PuDDing + LoRA |" in table and "| dense |" in table


def test_quantized_blocks_take_an_adapter_too(tmp_path):
    """int8 blocks with an unmerged adapter: the engine computes what the scorer's quantized modules plus hooks do."""
    from pudding.engine import Engine
    from pudding.quantize import quantize_blocks

    omit = OmissionSet(OMIT, 6)
    model = build_tiny("llama", init=0.2)
    random_adapter(model, omit, tmp_path / "a")
    adapter = Adapter.load(tmp_path / "a", model)
    quantize_blocks(model, "int8")
    engine = Engine.from_model(model, max_len=64, lora_rank=4)
    engine.set_adapters({omit: adapter})
    decoder = PrunableDecoder(model)
    ids = torch.randint(3, 250, (9,), generator=torch.Generator().manual_seed(6)).tolist()
    engine.use(omit)
    got = engine.prefill(ids).clone().reshape(-1)
    with applied(decoder.blocks, adapter):
        want = decoder.full_logits(torch.tensor([ids]), omit)[0, -1].reshape(-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
