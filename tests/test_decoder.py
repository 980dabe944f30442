"""Depth-pruned execution: skipping blocks is the same model as deleting them, for every family."""

from __future__ import annotations

import pytest
import torch

from pudding.decoder import PrunableDecoder
from pudding.errors import PuddingError
from pudding.export import delete_blocks
from pudding.omission import OmissionSet

OMISSIONS = [(), (0,), (2, 3), (0, 5), (1, 2, 4)]


def _ids(vocab: int, length: int = 16, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


@pytest.mark.parametrize("omit", OMISSIONS, ids=lambda o: "dense" if not o else "omit" + "-".join(map(str, o)))
def test_skipping_equals_deleting(tiny_model, omit):
    decoder = PrunableDecoder(tiny_model)
    ids = _ids(tiny_model.config.vocab_size)
    ours = decoder.full_logits(ids, decoder.omission(omit))
    reference = delete_blocks(tiny_model, omit)(ids).logits
    assert reference.shape[1] == ids.shape[1]
    torch.testing.assert_close(ours, reference.float(), rtol=1e-4, atol=1e-4)


def test_deleted_checkpoint_config_is_sliced(tiny_model):
    pruned = delete_blocks(tiny_model, (0, 5))
    assert pruned.config.num_hidden_layers == 4
    layer_types = getattr(pruned.config, "layer_types", None)
    if layer_types is not None:
        original = tiny_model.config.layer_types
        assert layer_types == [original[i] for i in (1, 2, 3, 4)]


@pytest.mark.parametrize("omit", [(), (0,), (1, 4)])
def test_cached_generation_equals_uncached(tiny_model, omit):
    decoder = PrunableDecoder(tiny_model)
    prompt = _ids(tiny_model.config.vocab_size, length=7, batch=1)[0].tolist()
    cached = decoder.generate_greedy(prompt, decoder.omission(omit), max_new_tokens=12)
    uncached = decoder.generate_greedy(prompt, decoder.omission(omit), max_new_tokens=12, use_cache=False)
    assert cached == uncached
    # and plain transformers, generating with its own cache on the deleted model, agrees
    pruned = delete_blocks(tiny_model, omit)
    hf = pruned.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert cached == hf[0, len(prompt):].tolist()


def test_gemma3_blocks_keep_their_own_attention_type():
    from conftest import build_tiny

    model = build_tiny("gemma3")
    decoder = PrunableDecoder(model)
    assert decoder.windows == {"sliding_attention": 4, "full_attention": None}
    ids = _ids(model.config.vocab_size, length=16)
    omit = decoder.omission((0, 2))  # the kept blocks are full, sliding, sliding, full: positions must not shift types
    ours = decoder.full_logits(ids, omit)
    torch.testing.assert_close(ours, delete_blocks(model, omit)(ids).logits.float(), rtol=1e-4, atol=1e-4)
    # the window matters at this length: treating every block as full attention gives other logits
    decoder.windows = {"sliding_attention": None, "full_attention": None}
    assert not torch.allclose(decoder.full_logits(ids, omit), ours, atol=1e-3)


def test_real_model_matches_transformers(smollm2):
    decoder = smollm2.decoder
    ids = torch.tensor([smollm2.tokenizer("The capital of France is Paris. The capital of Italy is")["input_ids"]])
    torch.testing.assert_close(decoder.full_logits(ids, decoder.omission()), smollm2.model(ids).logits.float(), rtol=1e-4, atol=1e-3)
    omit = decoder.omission((0, 11, 17, 20))
    reference = delete_blocks(smollm2.model, omit)(ids).logits.float()
    torch.testing.assert_close(decoder.full_logits(ids, omit), reference, rtol=1e-4, atol=1e-3)


def test_real_model_cached_generation_with_block_zero_omitted(smollm2):
    prompt = smollm2.tokenizer("Once upon a time")["input_ids"]
    for omit in [smollm2.decoder.omission(), smollm2.decoder.omission((0, 11))]:
        cached = smollm2.decoder.generate_greedy(prompt, omit, max_new_tokens=8)
        assert cached == smollm2.decoder.generate_greedy(prompt, omit, max_new_tokens=8, use_cache=False)


@pytest.mark.parametrize(
    "text, message",
    [
        ("30", "out of range"),
        ("-1", "out of range"),
        ("3,3", "more than once"),
        ("a,b", "comma-separated list of integers"),
        (",".join(map(str, range(30))), "at least one must remain"),
    ],
)
def test_bad_omission_sets_are_rejected(text, message):
    with pytest.raises(PuddingError, match=message):
        OmissionSet.parse(text, 30)


def test_omission_set_is_sorted_and_labelled():
    omit = OmissionSet.parse(" 20, 11,17 ", 30)
    assert tuple(omit) == (11, 17, 20)
    assert omit.label() == "11,17,20"
    assert OmissionSet.parse("", 30).label() == "dense"
    assert len(omit.kept()) == 27
