"""The lm-evaluation-harness plugin: lm-eval's own evaluator and command line driving the real SmolLM2-135M on the
real task data, checked against `pudding eval`'s evaluator on the same documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pudding.errors import PuddingError
from pudding.omission import OmissionSet

from conftest import SETS

OMIT = OmissionSet([11, 17, 20], 30)


@pytest.fixture(scope="module")
def harness_lm():
    from pudding.harness import PuddingLM

    return PuddingLM(model="smollm2-135m", omit="11;17;20", device="cpu")


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    from pudding.harness import TASKS_DIR

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture(scope="module")
def routed_bundle(tmp_path_factory):
    """A bundle whose router has an untrained head: it sends prompts to varied sets, which is all routing needs."""
    from pudding.bundle import Bundle, CandidateSet
    from pudding.models import resolve_model
    from pudding.router import LoadedRouter
    from pudding.router_training import TrainingHistory, save_router

    ref = resolve_model("smollm2-135m")
    path = tmp_path_factory.mktemp("harness") / "bundle"
    bundle = Bundle.create_or_open(path, {"name": ref.name, "fingerprint": ref.fingerprint, "num_blocks": 30}, 2, {})
    bundle.write_candidates([CandidateSet(s, []) for s in SETS], {})
    router = LoadedRouter.untrained("minilm-l6", [OmissionSet(s, 30) for s in SETS])
    save_router(bundle.router_dir(), router.router, router.tokenizer, router.settings, SETS, TrainingHistory(), {}, bundle.model)
    return path


def _pudding_eval(scorer, names: list[str], policy, limit: int):
    """What `pudding eval --limit N` computes: the first N documents of each task's evaluation split."""
    from pudding.evaluate import correctness, score_docs, task_result
    from pudding.tasks import get_task

    out = {}
    for name in names:
        task = get_task(name)
        docs = task.docs().docs[:limit]
        scored = score_docs(scorer, docs, policy, name)
        out[name] = (task_result(task, docs[0].split, correctness(scored), scored.sets), scored)
    return out


@pytest.mark.slow
def test_simple_evaluate_matches_pudding_eval(harness_lm, task_manager):
    import lm_eval

    from pudding.policy import FixedPolicy

    names, limit = ["arc_easy", "piqa", "winogrande"], 8
    harness = lm_eval.simple_evaluate(model=harness_lm, tasks=names, limit=limit, task_manager=task_manager, log_samples=True)
    reference = _pudding_eval(harness_lm.scorer, names, FixedPolicy(OMIT), limit)
    for name in names:
        expected, scored = reference[name]
        got = harness["results"][name]
        for metric, value in expected.metrics.items():
            assert got[f"{metric},none"] == pytest.approx(value, abs=1e-12), (name, metric)
        samples = sorted(harness["samples"][name], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(limit))
        for sample, lls in zip(samples, scored.loglikelihoods):  # the same requests, scored alike
            np.testing.assert_allclose([float(ll) for ll, _ in sample["filtered_resps"]], lls, rtol=1e-4)
        assert "".join(str(int(s["acc"])) for s in samples) == expected.per_doc["acc"]
    assert harness["config"]["pudding"]["omission"] == "11,17,20"
    assert harness["config"]["pudding"]["sets_used"] == {"11,17,20": 3 * limit}  # one route decision per document


def _run_harness_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pudding.harness", *args], check=False, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_cli_routes_once_per_document_like_pudding_eval(harness_lm, routed_bundle, tmp_path):
    """`python -m pudding.harness` (lm-eval's command line) with a bundle: each document routed once, and the
    accuracy and the sets used are those of `pudding eval --bundle` on the same documents."""
    from pudding.bundle import Bundle
    from pudding.policy import RoutedPolicy

    names, limit = ["arc_easy", "winogrande"], 6
    result = _run_harness_cli("--model", "pudding", "--model_args", f"bundle={routed_bundle}", "--device", "cpu",
                              "--tasks", ",".join(names), "--limit", str(limit), "--output_path", str(tmp_path),
                              "--log_samples")
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = list(tmp_path.rglob("results_*.json"))
    document = json.loads(results_file.read_text())
    reference = _pudding_eval(harness_lm.scorer, names, RoutedPolicy(Bundle.open(routed_bundle).router()), limit)
    expected_sets: dict[str, int] = {}
    for name in names:
        expected, _ = reference[name]
        for metric, value in expected.metrics.items():
            assert document["results"][name][f"{metric},none"] == pytest.approx(value, abs=1e-12), (name, metric)
        for label, count in expected.sets_used.items():
            expected_sets[label] = expected_sets.get(label, 0) + count
    info = document["config"]["pudding"]
    assert info["omission"] == "routed" and info["routing"]["prompts"] == len(names) * limit
    assert info["sets_used"] == expected_sets and len(expected_sets) > 1


def _lm_eval_over_http(url: str, names: list[str], limit: int, task_manager) -> dict:
    """Stock lm-eval's `local-completions` model (echo + logprobs requests, one per answer) against a server."""
    import lm_eval

    from pudding.models import resolve_model

    args = (f"model=smollm2-135m,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={resolve_model('smollm2-135m').directory},max_retries=1")
    return lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=names, limit=limit,
                                   task_manager=task_manager, log_samples=True)


@pytest.mark.slow
def test_stock_lm_eval_over_http_with_a_fixed_set_equals_pudding_eval(harness_lm, task_manager, tmp_path):
    from conftest import ServerProcess
    from pudding.policy import FixedPolicy

    names, limit = ["arc_easy", "piqa"], 6
    server = ServerProcess(["--model", "smollm2-135m", "--omit", "11,17,20", "--max-len", "512", "--device", "cpu"],
                           tmp_path / "serve.log")
    try:
        harness = _lm_eval_over_http(server.url, names, limit, task_manager)
    finally:
        server.stop()
    reference = _pudding_eval(harness_lm.scorer, names, FixedPolicy(OMIT), limit)
    for name in names:
        expected, scored = reference[name]
        for metric, value in expected.metrics.items():
            assert harness["results"][name][f"{metric},none"] == pytest.approx(value, abs=1e-12), (name, metric)
        samples = sorted(harness["samples"][name], key=lambda s: s["doc_id"])
        for sample, lls in zip(samples, scored.loglikelihoods):
            np.testing.assert_allclose([float(ll) for ll, _ in sample["filtered_resps"]], lls, rtol=1e-3, atol=1e-3)
        assert "".join(str(int(s["acc"])) for s in samples) == expected.per_doc["acc"]


@pytest.mark.slow
def test_stock_lm_eval_over_http_routes_every_request(harness_lm, task_manager, routed_bundle, tmp_path):
    """Routed over HTTP, the server routes each request on its own text: the context with one answer. So each
    answer's log-likelihood is the plain decoder's under the set the router picks for that text (one document's
    answers may be scored under different sets: per-document routing, as the paper, needs `--model pudding`)."""
    import torch

    from conftest import ServerProcess
    from pudding.bundle import Bundle
    from pudding.policy import RoutedPolicy

    names, limit = ["arc_easy", "piqa"], 4
    server = ServerProcess(["--bundle", str(routed_bundle), "--max-len", "512", "--device", "cpu"], tmp_path / "serve.log")
    try:
        assert server.health()["routed"]
        harness = _lm_eval_over_http(server.url, names, limit, task_manager)
    finally:
        server.stop()
    policy = RoutedPolicy(Bundle.open(routed_bundle).router())
    tokenizer, decoder = harness_lm.loaded.tokenizer, harness_lm.loaded.decoder
    sets_seen = set()
    for name in names:
        for sample in harness["samples"][name]:
            for (context, answer), (ll, _) in zip(sample["arguments"], sample["filtered_resps"]):
                whole = tokenizer(context + answer, add_special_tokens=False)["input_ids"]
                start = len(tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"])  # as lm-eval splits
                chosen = policy.choose_one(tokenizer.decode(whole)).omit
                sets_seen.add(chosen)
                with torch.inference_mode():
                    logprobs = decoder.full_logits(torch.tensor([whole]), chosen)[0, :-1].log_softmax(-1)
                expected = logprobs[start - 1 :].gather(1, torch.tensor(whole[start:])[:, None]).sum()
                assert float(ll) == pytest.approx(float(expected), abs=1e-3), (name, sample["doc_id"], answer)
    assert len(sets_seen) > 1


def test_generate_until_is_greedy_and_stops_at_the_stop_string(harness_lm):
    from lm_eval.api.instance import Instance

    prompt = "Question: What is the capital of France?\nAnswer:"

    def request(gen_kwargs):
        return Instance("generate_until", {}, (prompt, gen_kwargs), 0, ("qa", 0, 1))

    [free] = harness_lm.generate_until([request({"until": ["<never>"], "max_gen_toks": 10})])
    tokenizer = harness_lm.loaded.tokenizer
    ids = harness_lm.scorer.encoder.text(prompt)  # with BOS where the family wants one
    reference = harness_lm.loaded.decoder.generate_greedy(ids, OMIT, max_new_tokens=10, stop_ids=[tokenizer.eos_token_id])
    assert free == tokenizer.decode(reference, skip_special_tokens=True)
    stop = free.strip()[:3]  # a stop string that occurs in the greedy output
    [cut] = harness_lm.generate_until([request({"until": [stop], "max_gen_toks": 10})])
    assert cut == free[: free.index(stop)]
    with pytest.raises(PuddingError, match="greedily"):
        harness_lm.generate_until([request({"until": ["\n"], "do_sample": True, "temperature": 0.7})])


def test_loglikelihood_rolling_is_the_whole_text_log_likelihood(harness_lm):
    import torch
    from lm_eval.api.instance import Instance

    text = "The quick brown fox jumps over the lazy dog. It was not amused, and said so at length."
    [total] = harness_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0, ("ppl", 0, 1))])
    encoder = harness_lm.scorer.encoder
    ids = [encoder.empty_context[-1], *encoder.encode(text)]  # the first token is predicted from BOS or end-of-text
    logprobs = harness_lm.loaded.decoder.full_logits(torch.tensor([ids]), OMIT)[0, :-1].log_softmax(-1)
    expected = logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert total == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("model_args, fragment", [
    ({"omit": "11;99"}, "block index 99 is out of range"),
    ({"set": 1}, "set= needs bundle=DIR"),
    ({"omit": 3, "set": 1}, "give only one of omit=, set="),
    ({"bundel": "x"}, "unknown model_args bundel"),
    ({"batch_tokens": 8}, "batch_tokens"),
])
def test_bad_model_args_are_refused_before_loading(model_args, fragment):
    from pudding.harness import PuddingLM

    with pytest.raises(PuddingError, match=fragment):
        PuddingLM(model="smollm2-135m", **model_args)


def test_a_bundle_without_router_is_refused(tmp_path):
    from pudding.bundle import Bundle
    from pudding.harness import PuddingLM
    from pudding.models import resolve_model

    ref = resolve_model("smollm2-135m")
    Bundle.create_or_open(tmp_path / "b", {"name": ref.name, "fingerprint": ref.fingerprint, "num_blocks": 30}, 2, {})
    with pytest.raises(PuddingError, match="train-router"):
        PuddingLM(bundle=str(tmp_path / "b"))
