"""Property-based tests (hypothesis) of what users feed in: block lists, arbitrary unicode to score, arbitrary
prompts to route. Few examples each, on the real packaged models, so that the file stays quick."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pudding.errors import PuddingError
from pudding.omission import OmissionSet

quick = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NUM_BLOCKS = 30


@quick
@given(st.text(alphabet="0123456789,- x.\t", max_size=24))
def test_block_lists_parse_or_fail_cleanly(text):
    try:
        omission = OmissionSet.parse(text, NUM_BLOCKS)
    except PuddingError as problem:
        assert str(problem) and "\n" not in str(problem)
        return
    assert list(omission) == sorted(set(omission)) and all(0 <= b < NUM_BLOCKS for b in omission)
    assert len(omission) < NUM_BLOCKS
    assert OmissionSet.parse(",".join(map(str, omission)), NUM_BLOCKS) == omission  # its label reads back


@quick
@given(st.lists(st.integers(-3, NUM_BLOCKS + 3), max_size=NUM_BLOCKS + 2))
def test_any_integer_list_is_a_valid_set_or_refused(blocks):
    valid = all(0 <= b < NUM_BLOCKS for b in blocks) and len(set(blocks)) == len(blocks) and len(blocks) < NUM_BLOCKS
    try:
        omission = OmissionSet(blocks, NUM_BLOCKS)
    except PuddingError:
        assert not valid
        return
    assert valid and sorted(blocks) == list(omission)
    assert sorted(omission.kept() + list(omission)) == list(range(NUM_BLOCKS))


@pytest.fixture(scope="module")
def scorer(smollm2):
    from pudding.scoring import Scorer

    return Scorer(smollm2.decoder, smollm2.tokenizer, max_batch_tokens=512)


unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@pytest.mark.slow
@quick
@given(pairs=st.lists(st.tuples(unicode_text, unicode_text.filter(lambda t: t.strip())), min_size=1, max_size=4),
       omit=st.sets(st.integers(0, NUM_BLOCKS - 1), max_size=6))
def test_scores_are_finite_and_batching_does_not_change_them(scorer, pairs, omit):
    requests = scorer.encoder.pairs(pairs)
    omit = scorer.decoder.omission(omit)
    together = scorer.loglikelihoods([[r] for r in requests], omit)
    for i, request in enumerate(requests):
        alone = scorer.loglikelihoods([[request]], omit)
        assert math.isfinite(together.logprob[i]) and together.logprob[i] <= 1e-6
        assert together.tokens[i] == len(request.continuation)  # 0 for text the tokenizer drops
        np.testing.assert_allclose(together.logprob[i], alone.logprob[0], rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def router():
    from pudding.omission import OmissionSet
    from pudding.router import LoadedRouter

    return LoadedRouter.untrained("minilm-l6", [OmissionSet(s, 30) for s in ([1, 2], [3, 4], [5, 6])], "cpu")


@quick
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=300), min_size=1, max_size=5))
def test_router_returns_a_valid_set_for_any_prompt(router, prompts):
    if any(not p.strip() for p in prompts):
        with pytest.raises(PuddingError, match="empty prompt"):
            router.route(prompts)
        return
    result = router.route(prompts)
    assert len(result.choices) == len(prompts) and all(0 <= c < 3 for c in result.choices)
    assert np.isfinite(result.predicted).all() and result.predicted.shape == (len(prompts), 3)
    alone = np.stack([router.route([p]).predicted[0] for p in prompts])
    np.testing.assert_allclose(result.predicted, alone, rtol=1e-4, atol=1e-4)  # padding in a batch changes nothing
    ranked = np.sort(alone, axis=1)
    clear = ranked[:, 1] - ranked[:, 0] > 1e-3  # no near-tie between the two best sets
    assert (alone.argmin(1) == np.array(result.choices))[clear].all()


@quick
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_streamed_text_is_the_decoded_text(smollm2, text):
    """Streaming emits, token by token, exactly the text a full decode gives (multi-byte characters held back until
    they are complete, never emitted twice or broken)."""
    from hypothesis import assume

    from pudding.engine import TextStream

    ids = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    assume(smollm2.tokenizer.decode(ids) == text)  # characters the tokenizer cannot spell are another matter
    stream = TextStream(smollm2.tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text == stream.full_text()
    assert not any("\ufffd" in piece for piece in pieces) or "\ufffd" in text


@quick
@given(st.lists(st.integers(0, 49151), min_size=1, max_size=40))
def test_streamed_text_of_any_token_ids_is_a_prefix_of_the_decoded_text(smollm2, ids):
    from pudding.engine import TextStream

    stream = TextStream(smollm2.tokenizer)
    streamed = "".join(stream.push(i) for i in ids)
    assert stream.full_text().startswith(streamed)
