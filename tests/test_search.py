"""Candidate omission sets: the greedy search and the static baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pudding.errors import PuddingError
from pudding.omission import OmissionSet
from pudding.scoring import Scorer
from pudding.search import (
    SearchSpec, block_influence, calibration_set, candidate_scores, greedy_search, loss_function, run_search,
)
from conftest import assert_clean_failure, pudding


@pytest.fixture(scope="module")
def scorer(smollm2):
    return Scorer(smollm2.decoder, smollm2.tokenizer, max_batch_tokens=1024)


def test_prefix_reuse_equals_full_recompute(scorer):
    calibration = calibration_set(scorer, "arc_easy", "tld", samples=3, seed=1)
    prepared = scorer.prepare(calibration.groups)
    base = OmissionSet([4, 20], 30)
    candidates = [0, 7, 13, 29]
    fast = candidate_scores(scorer, prepared, base, candidates)
    for c in candidates:
        full = scorer.score(prepared, base.with_block(c))
        np.testing.assert_allclose(fast[c].logprob, full.logprob, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_greedy_search_takes_the_best_block_each_step(scorer, smollm2):
    calibration = calibration_set(scorer, "piqa", "tl", samples=4, seed=0)
    result = greedy_search(scorer, calibration, 2, smollm2.info())
    loss_of = loss_function(calibration)
    prepared = scorer.prepare(calibration.groups)
    base = OmissionSet([], 30)
    for step, removed in enumerate(result.removal_order):
        losses = {c: loss_of(scorer.score(prepared, base.with_block(c))) for c in base.kept()}
        assert removed == min(losses, key=lambda c: (losses[c], c))
        assert result.loss_after_step[step] == pytest.approx(losses[removed], rel=1e-4)
        base = base.with_block(removed)
    assert result.blocks == sorted(result.removal_order)
    assert result.calibration["indices"] and len(result.calibration["indices"]) == 4


@pytest.mark.slow
def test_search_resumes_from_its_checkpoint(scorer, smollm2, tmp_path):
    calibration = calibration_set(scorer, "winogrande", "tl", samples=3, seed=2)
    prepared = scorer.prepare(calibration.groups)
    calls = []

    def crashing(base, candidates, advance):
        if len(calls) == 1:
            raise KeyboardInterrupt  # the process dies after step 1 was written
        calls.append(len(base))
        return candidate_scores(scorer, prepared, base, candidates)

    checkpoint = tmp_path / "search.partial"
    with pytest.raises(KeyboardInterrupt):
        greedy_search(scorer, calibration, 2, smollm2.info(), checkpoint=checkpoint, evaluator=crashing)
    assert len(json.loads(checkpoint.read_text())["steps"]) == 1

    resumed_calls = []

    def counting(base, candidates, advance):
        resumed_calls.append(len(base))
        return candidate_scores(scorer, prepared, base, candidates)

    resumed = greedy_search(scorer, calibration, 2, smollm2.info(), checkpoint=checkpoint, evaluator=counting)
    assert resumed_calls == [1]  # only the second step was computed again
    uninterrupted = greedy_search(scorer, calibration, 2, smollm2.info())
    assert resumed.removal_order == uninterrupted.removal_order
    np.testing.assert_allclose(resumed.loss_after_step, uninterrupted.loss_after_step)


def test_corrupted_or_foreign_checkpoint_is_refused(scorer, smollm2, tmp_path):
    calibration = calibration_set(scorer, "piqa", "tl", samples=2, seed=0)
    checkpoint = tmp_path / "x.partial"
    checkpoint.write_text("{not json")
    with pytest.raises(PuddingError, match="corrupted"):
        greedy_search(scorer, calibration, 1, smollm2.info(), checkpoint=checkpoint)
    checkpoint.write_text(json.dumps({"identity": {"other": 1}, "steps": []}))
    with pytest.raises(PuddingError, match="different search"):
        greedy_search(scorer, calibration, 1, smollm2.info(), checkpoint=checkpoint)


def test_shortgpt_uses_raw_hidden_states(tiny_model):
    """Block influence of the last block must compare its raw output, not the normalised last hidden state."""
    from pudding.decoder import PrunableDecoder
    from pudding.scoring import Request

    decoder = PrunableDecoder(tiny_model)
    with torch.no_grad():  # a trained final norm has uneven per-channel weights, which change directions
        decoder.final_norm.weight.uniform_(0.2, 2.0)

    class Tok:
        bos_token_id, eos_token_id = 1, 2

    scorer = Scorer(decoder, Tok())
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    prepared = scorer.prepare([[Request(tuple(ids[0, :1].tolist()), tuple(ids[0, 1:].tolist()))]])
    ours = block_influence(scorer, prepared)
    states = tiny_model(ids[:, :-1], output_hidden_states=True).hidden_states
    if tiny_model.config.model_type == "opt" and getattr(tiny_model.model.decoder, "project_in", None) is not None:
        pytest.skip("OPT-350m-style input projection: HF reports the pre-projection embedding")
    expected = [1 - torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1).mean().item() for i in range(5)]
    np.testing.assert_allclose(ours[:5], expected, rtol=1e-3, atol=1e-5)
    # transformers' last "hidden state" is after the final norm: using it would misjudge the last block
    naive_last = 1 - torch.nn.functional.cosine_similarity(states[5], states[6], dim=-1).mean().item()
    assert abs(ours[5] - naive_last) > 1e-3


@pytest.mark.slow
def test_one_shot_baselines(scorer, smollm2):
    spec = SearchSpec("shortened-ppl", k=3, samples=2, seqlen=64)
    result = run_search(spec, scorer, smollm2.info())
    single = {int(b): v for b, v in result.candidate_losses[0].items()}
    assert result.blocks == sorted(sorted(single, key=lambda b: (single[b], b))[:3])
    gpt = run_search(SearchSpec("shortgpt", k=3, samples=2, seqlen=64), scorer, smollm2.info())
    assert len(gpt.blocks) == 3 and gpt.calibration["task"] == "wikitext2"


@pytest.mark.slow
def test_ray_backend_gives_the_local_result(scorer, smollm2):
    ray = pytest.importorskip("ray")
    from pudding.distributed import RayEvaluator

    spec = SearchSpec("greedy", "arc_challenge", "tld", k=2, samples=2, seed=5)
    local = run_search(spec, scorer, smollm2.info())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        factory = lambda calibration: RayEvaluator("smollm2-135m", calibration, workers=2, device="cpu", batch_tokens=1024)
        distributed = run_search(spec, scorer, smollm2.info(), evaluator_factory=factory)
    finally:
        ray.shutdown()
    assert distributed.removal_order == local.removal_order
    np.testing.assert_allclose(distributed.loss_after_step, local.loss_after_step, rtol=1e-4)


@pytest.mark.slow
def test_candidates_pool_in_a_bundle(tmp_path, smollm2):
    bundle = tmp_path / "bundle"
    args = ["candidates", "--tasks", "piqa,arc_easy", "--losses", "tl,tld", "--blocks", "1", "--samples", "2",
            "--output", str(bundle)]
    first = pudding(*args)
    assert first.returncode == 0, first.stderr
    pool = json.loads((bundle / "candidates.json").read_text())
    sources = [src for s in pool["sets"] for src in s["sources"]]
    assert len(sources) == 4 and len(pool["sets"]) == len({tuple(s["blocks"]) for s in pool["sets"]})
    assert all((bundle / s["search"]).exists() for s in sources)
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["model"]["fingerprint"] == smollm2.fingerprint and manifest["k"] == 1
    # a rerun finds every search done and only rewrites the pool
    again = pudding(*args)
    assert again.returncode == 0 and json.loads((bundle / "candidates.json").read_text())["sets"] == pool["sets"]
    # and any set evaluates through the core evaluator
    ev = pudding("eval", "--bundle", str(bundle), "--set", "0", "--tasks", "piqa", "--limit", "4")
    assert ev.returncode == 0, ev.stderr
    assert ",".join(map(str, pool["sets"][0]["blocks"])) in ev.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["search", "--blocks", "30", "--output", "x.json"], "cannot remove 30 blocks"),
        (["search", "--blocks", "0", "--output", "x.json"], "at least 1"),
        (["search", "--task", "pubmedqa", "--samples", "600", "--output", "x.json"], "fewer than the 600"),
        (["search", "--loss", "mse", "--output", "x.json"], "unknown loss 'mse'"),
        (["search", "--method", "magic", "--output", "x.json"], "unknown method 'magic'"),
        (["search", "--task", "wikitext2", "--loss", "tl", "--output", "x.json"], "needs a question-answering task"),
        (["candidates", "--losses", "tl,bogus", "--output", "b"], "unknown loss 'bogus'"),
        (["eval", "--set", "0"], "--set needs --bundle"),
        (["eval", "--bundle", "/nonexistent"], "bundle directory not found"),
    ],
)
def test_bad_search_input(args, fragment, tmp_path, smollm2, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean_failure(pudding(*args), fragment)


@pytest.mark.slow
def test_corrupted_checkpoint_through_the_cli(tmp_path, smollm2):
    (tmp_path / "s.json.partial").write_text("garbage")
    result = pudding("search", "--samples", "2", "--blocks", "1", "--output", str(tmp_path / "s.json"))
    assert_clean_failure(result, "corrupted")
    assert not (tmp_path / "s.json").exists()
