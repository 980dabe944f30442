"""The packed scoring engine gives exactly what scoring each request alone gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pudding.decoder import PrunableDecoder
from pudding.scoring import Encoder, Request, Scorer, perplexity, perplexity_requests, tld
from pudding.tasks import get_task


def _alone(decoder: PrunableDecoder, request: Request, omit) -> tuple[float, bool]:
    """The plain way: one sequence, full logits, then pick the continuation's log-probabilities."""
    full = request.context + request.continuation
    logits = decoder.full_logits(torch.tensor([full[:-1]], device=decoder.device), omit)[0]
    logprobs = logits.log_softmax(-1)
    span = range(len(request.context) - 1, len(full) - 1)
    total = sum(float(logprobs[j, full[j + 1]]) for j in span)
    greedy = all(int(logits[j].argmax()) == full[j + 1] for j in span)
    return total, greedy


@pytest.mark.parametrize("task, omit", [
    pytest.param("arc_easy", (), marks=pytest.mark.slow), ("winogrande", (3, 9)),
    pytest.param("pubmedqa", (0, 29), marks=pytest.mark.slow), ("hellaswag", (11, 17, 20)),
])
def test_packed_scores_equal_scoring_alone(smollm2, task, omit):
    scorer = Scorer(smollm2.decoder, smollm2.tokenizer, max_batch_tokens=1024)
    docs = get_task(task).docs().docs[:6]
    groups = [scorer.encoder.pairs(d.requests) for d in docs]
    omit = smollm2.decoder.omission(omit)
    scores = scorer.loglikelihoods(groups, omit)
    flat = [r for g in groups for r in g]
    expected = [_alone(smollm2.decoder, r, omit) for r in flat]
    np.testing.assert_allclose(scores.logprob, [e[0] for e in expected], rtol=1e-4, atol=2e-3)
    assert list(scores.greedy) == [e[1] for e in expected]
    assert list(scores.tokens) == [len(r.continuation) for r in flat]


def test_requests_sharing_answer_prefixes(tiny_model):
    """Answers that share their first tokens, or where one answer is a prefix of another, still score right."""
    decoder = PrunableDecoder(tiny_model)
    scorer = Scorer(decoder, tokenizer=_FakeTokenizer(), max_batch_tokens=64)
    context = (5, 6, 7, 8)
    group = [Request(context, (9, 10, 11)), Request(context, (9, 10)), Request(context, (9, 12, 13, 14)), Request((5, 6), (20,))]
    scores = scorer.loglikelihoods([group, group[:1]], decoder.omission([1]))
    expected = [_alone(decoder, r, decoder.omission([1]))[0] for r in group + group[:1]]
    np.testing.assert_allclose(scores.logprob, expected, rtol=1e-4, atol=1e-4)


def test_batches_respect_the_token_budget(smollm2):
    scorer = Scorer(smollm2.decoder, smollm2.tokenizer, max_batch_tokens=256)
    docs = get_task("piqa").docs().docs[:40]
    prepared = scorer.prepare_texts([d.requests for d in docs])
    assert len(prepared.batches) > 1
    for batch in prepared.batches:
        rows, length = batch.input_ids.shape
        assert rows == 1 or rows * length <= 256
    # every request is scored, each continuation token exactly once
    assert sum(len(b.score_request) for b in prepared.batches) == sum(
        len(r.continuation) for d in docs for r in scorer.encoder.pairs(d.requests)
    )


class _FakeTokenizer:
    bos_token_id = 1
    eos_token_id = 2


def test_encoder_follows_the_harness(smollm2):
    encoder = Encoder(smollm2.tokenizer)
    tok = smollm2.tokenizer
    # trailing spaces of the context move into the continuation
    moved = encoder.pair("Answer: ", "yes")
    assert moved == encoder.pair("Answer:", " yes")
    # continuation tokens are those of the whole string after the context's tokens
    request = encoder.pair("Question: why?\nAnswer:", " Because it rains.")
    whole = tok("Question: why?\nAnswer: Because it rains.", add_special_tokens=False)["input_ids"]
    assert request.context + request.continuation == tuple(whole)
    # an empty context predicts from end-of-text (SmolLM2 has no BOS in its encodings)
    empty = encoder.pair("", "Hello")
    assert len(empty.context) == 1


def test_bos_is_prepended_when_the_family_needs_it(smollm2):
    encoder = Encoder(smollm2.tokenizer, add_bos=True)
    request = encoder.pair("Question: x\nAnswer:", " y")
    assert request.context[0] == smollm2.tokenizer.bos_token_id


def test_task_likelihood_losses():
    from pudding.scoring import Scores

    scores = Scores(np.array([-2.0, -9.0]), np.array([2, 3]), np.array([True, False]))
    np.testing.assert_allclose(scores.task_likelihood(), [1.0, 3.0])
    wrong = [np.array([3.0, 5.0]), np.array([2.0])]
    np.testing.assert_allclose(tld(np.array([1.0, 3.0]), wrong), [-3.0, 1.0])
    np.testing.assert_allclose(tld(np.array([1.0, 3.0]), wrong, "min"), [-2.0, 1.0])


def test_perplexity_of_packaged_model_on_wikitext(smollm2):
    scorer = Scorer(smollm2.decoder, smollm2.tokenizer)
    text = get_task("wikitext2").text()
    ids = scorer.encoder.encode(text[:20000])
    groups = perplexity_requests(ids, 256, limit=4)
    assert len(groups) == 4 and all(len(g[0].continuation) == 255 for g in groups)
    dense = perplexity(scorer.loglikelihoods(groups, smollm2.decoder.omission()))
    pruned = perplexity(scorer.loglikelihoods(groups, smollm2.decoder.omission(range(10, 18))))
    assert 5 < dense < 60  # MODELS.md: ~13.5 on short English text
    assert pruned > dense * 1.5
