"""The inference engine gives the tokens plain transformers gives, in both residency modes."""

from __future__ import annotations

import pytest
import torch

from pudding.errors import PuddingError
from pudding.export import delete_blocks
from pudding.engine import Engine
from pudding.omission import OmissionSet

ENGINE_FAMILIES = ["llama", "mistral", "qwen2", "phi3", "gemma3"]


def _hf_greedy(model, prompt: list[int], omit: OmissionSet, new: int) -> list[int]:
    pruned = delete_blocks(model, omit)
    out = pruned.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
@pytest.mark.parametrize("omit", [(), (0, 3), (1, 2, 5)])
def test_engine_matches_transformers(family, omit):
    from conftest import build_tiny

    model = build_tiny(family, init=0.2)
    engine = Engine.from_model(model, max_len=64)
    prompt = torch.randint(3, 200, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    omit = engine.omission(omit)
    ours = engine.generate(prompt, omit, max_new_tokens=10, stop_ids=[])
    assert ours.tokens == _hf_greedy(model, prompt, omit, 10)
    assert ours.blocks == list(omit)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_memory_budget_mode_matches_and_reuses_resident_blocks(family):
    from conftest import build_tiny

    model = build_tiny(family, init=0.2)
    engine = Engine.from_model(model, max_len=64, budget=4)
    prompt = torch.randint(3, 200, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    first = engine.generate(prompt, engine.omission((0, 3)), max_new_tokens=6, stop_ids=[])
    assert first.timings.swap["copied"] == 4  # nothing resident yet
    assert first.tokens == _hf_greedy(model, prompt, engine.omission((0, 3)), 6)
    second = engine.generate(prompt, engine.omission((1, 3)), max_new_tokens=6, stop_ids=[])
    assert second.timings.swap["copied"] == 1  # block 0 comes in; 2, 4, 5 are already on the device
    assert second.tokens == _hf_greedy(model, prompt, engine.omission((1, 3)), 6)
    third = engine.generate(prompt, engine.omission((0, 5)), max_new_tokens=6, stop_ids=[])
    assert third.tokens == _hf_greedy(model, prompt, engine.omission((0, 5)), 6)
    again = engine.generate(prompt, engine.omission((0, 5)), max_new_tokens=6, stop_ids=[])
    assert again.timings.swap["copied"] == 0 and again.timings.swap["moved"] == 0
    with pytest.raises(PuddingError, match="memory budget holds 4"):
        engine.generate(prompt, engine.omission((0,)), max_new_tokens=2)


def test_real_model_engine_matches_generate(smollm2):
    engine = Engine.from_model(smollm2.model, smollm2.tokenizer, max_len=256)
    prompt = "The three primary colours are"
    ids = smollm2.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for omit in [engine.omission(()), engine.omission((4, 11, 17, 20, 25, 29))]:
        result = engine.generate(prompt, omit, max_new_tokens=12, stop_ids=[])
        assert result.tokens == _hf_greedy(smollm2.model, ids, omit, 12)
        assert result.text == smollm2.tokenizer.decode(result.tokens, skip_special_tokens=True)
        assert result.timings.ttft_ms > 0 and result.timings.tokens_per_second > 0


def test_streaming_yields_the_text_in_pieces(smollm2):
    engine = Engine.from_model(smollm2.model, smollm2.tokenizer, max_len=128)
    pieces = [piece for piece, _ in engine.stream("Hello, my name is", engine.omission(), max_new_tokens=8, stop_ids=[])]
    final = engine.generate("Hello, my name is", engine.omission(), max_new_tokens=8, stop_ids=[])
    assert "".join(pieces) == final.text and len(pieces) == 8


def test_context_limit_is_enforced(smollm2):
    engine = Engine.from_model(smollm2.model, smollm2.tokenizer, max_len=32)
    with pytest.raises(PuddingError, match="exceed the engine's context of 32"):
        engine.generate("word " * 30, engine.omission(), max_new_tokens=8)
    with pytest.raises(PuddingError, match="omission set of this model's 30 blocks"):
        engine.generate("hello", (11, 17))


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_bucketed_prefill_equals_the_exact_length_prefill(family):
    """Pre-fill pads the prompt to a length bucket (one captured graph per bucket on GPUs): the padding comes after
    the prompt, so logits and the tokens generated after it are those of the exact-length pre-fill, dense and
    pruned, sliding windows included (these tiny models' windows are 4 tokens)."""
    from conftest import build_tiny

    model = build_tiny(family, init=0.2)
    exact, padded = Engine.from_model(model, max_len=64, buckets=False), Engine.from_model(model, max_len=64, buckets=True)
    assert padded.bucket(11) == 16 and padded.bucket(17) == 32 and padded.bucket(64) == 64
    for omit in [(), (0, 3)]:
        for length in (3, 11, 16, 17, 40):
            ids = torch.randint(3, 200, (length,), generator=torch.Generator().manual_seed(length)).tolist()
            for engine in (exact, padded):
                engine.use(engine.omission(omit))
            torch.testing.assert_close(padded.prefill(ids).clone(), exact.prefill(ids).clone(), rtol=1e-5, atol=1e-5)
            # the input buffer: the prompt, zeros to the bucket's end (a longer earlier prompt is gone), its last position
            bucket = padded.bucket(length)
            assert padded._prompt[0, :bucket].tolist() == ids + [0] * (bucket - length) and padded._last.item() == length - 1
            tokens = [e.generate(ids, e.omission(omit), max_new_tokens=6, stop_ids=[]).tokens for e in (exact, padded)]
            assert tokens[0] == tokens[1]


def test_decode_over_a_context_bucket_equals_decode_over_the_whole_context():
    """A bucketed engine's decode step attends over the cache only up to the context bucket holding its position
    (256, then the whole 300-position context here): the logits of every step, across the bucket's edge, are those
    of attending over the whole context, dense and pruned, sliding windows included."""
    from conftest import build_tiny
    from pudding.engine import DECODE_BUCKETS

    model = build_tiny("gemma3", init=0.2)
    whole, bucketed = (Engine.from_model(model, max_len=300, buckets=b) for b in (False, True))
    assert DECODE_BUCKETS[0] == 256
    assert [bucketed.decode_keys(p) for p in (0, 255, 256, 299)] == [256, 256, 300, 300]
    assert whole.decode_keys(0) == 300
    ids = torch.randint(3, 200, (250,), generator=torch.Generator().manual_seed(3)).tolist()
    for omit in [(), (1, 4)]:
        for engine in (whole, bucketed):
            engine.use(engine.omission(omit))
            engine.prefill(ids)
        token = torch.tensor([7])
        for position in range(250, 262):
            expected = whole.decode_step(token, position).clone()
            torch.testing.assert_close(bucketed.decode_step(token, position).clone(), expected, rtol=1e-5, atol=1e-5)
            token = expected.argmax(-1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_blocks_prefilled_ahead_of_the_choice_give_the_plain_prefill(family):
    """A pending choice (`Policy.pending`) lets the blocks every candidate keeps pre-fill before the set is known
    (on GPUs, beside the router): the logits and the tokens generated after them are exactly those of choosing first,
    for a set that keeps the shared blocks, and for a forced set that does not (pre-filled from the start), sliding
    windows included (gemma3's window is 4 tokens)."""
    from conftest import build_tiny
    from pudding.policy import Choice, Pending

    engine = Engine.from_model(build_tiny(family, init=0.2), max_len=64)
    ids = torch.randint(3, 200, (13,), generator=torch.Generator().manual_seed(5)).tolist()
    asked = []

    def pending(omit, shared):
        return Pending(shared, lambda: asked.append(omit) or Choice(engine.omission(omit), routed=True, ms=0.5))

    for omit, shared in [((3, 5), 3), ((2, 4), 2), ((0, 4), 2), ((), 6)]:
        engine.use(engine.omission(omit))
        expected = engine.prefill(ids).clone()
        engine.use(engine.omission((1,)))  # another stack in between: the choice must set it again
        choice, swap, logits = engine.start(ids, pending(omit, shared))
        assert choice.omit == engine.omission(omit) and asked[-1] == omit and engine._ahead is None
        assert torch.equal(logits, expected), (omit, shared)
        plain = engine.generate(ids, engine.omission(omit), max_new_tokens=6, stop_ids=[])
        ahead = engine.generate(ids, pending(omit, shared), max_new_tokens=6, stop_ids=[])
        assert ahead.tokens == plain.tokens and ahead.routed and ahead.timings.route_ms == 0.5
    with pytest.raises(PuddingError, match="nothing was pre-filled ahead"):
        engine.prefill_rest()
    for blocks in [(), (2, 1), (0, 6)]:
        with pytest.raises(PuddingError, match="must be increasing block numbers of the model's 6"):
            engine.prefill_ahead(ids, blocks)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="captured graphs of the guessed stack need an NVIDIA GPU"))])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_guessed_stack_prefilled_ahead_resumes_where_the_chosen_stack_parts_from_it(family, device):
    """Speculation: the stack most recent routed prompts got pre-fills ahead of the next choice, as many blocks as
    the routing time covers (`Engine._pace`). Whatever is chosen, the logits and the tokens generated after them are
    exactly those of choosing first: a right guess, one that parts after 2 blocks, one that parts at block 0 (resumed
    from the start), the dense stack; cache positions past the shared blocks are written again. On a GPU the same
    with compiled blocks, bucketed prompts and a captured graph per part."""
    from conftest import build_tiny
    from pudding.engine import common_start
    from pudding.policy import Choice, Pending

    engine = Engine.from_model(build_tiny(family, init=0.2), device=device, max_len=64)
    # on by default only on GPUs, where the router and the blocks run side by side
    assert engine.speculate == engine.use_graphs == (device == "cuda")
    engine.speculate = True
    ids = torch.randint(3, 200, (13,), generator=torch.Generator().manual_seed(7)).tolist()
    expected = {}
    for omit in [(3, 5), (2, 4), (0, 4), ()]:
        engine.use(engine.omission(omit))
        expected[omit] = (engine.prefill(ids).clone(),
                          engine.generate(ids, engine.omission(omit), max_new_tokens=6, stop_ids=[]).tokens)
    def paced(guess, routing_ms):  # as if measured: a block pre-fills in 0.25 ms, so 4 blocks in a 1 ms choice
        padded = engine._padded(len(ids))
        engine._pace._open.clear()
        engine._pace.block_ms[padded], engine._pace.routing_ms[padded] = 0.25, routing_ms
        engine.expected = tuple(engine.omission(guess).kept())

    for guess, omit, routing_ms, ahead in [((3, 5), (3, 5), 1.0, 4), ((3, 5), (2, 4), 1.0, 4), ((2, 4), (2, 4), 0.5, 2),
                                           ((0, 4), (2, 4), 1.0, 4), ((2, 4), (), 1.0, 4), ((), (3, 5), 4.0, 6)]:
        paced(guess, routing_ms)
        _, _, logits = engine.start(ids, Pending(0, lambda: Choice(engine.omission(omit), routed=True, ms=routing_ms)))
        resumed = min(ahead, common_start(engine.omission(guess).kept(), engine.omission(omit).kept()))
        assert engine.last_ahead == ahead and engine.last_resumed == resumed
        assert engine._recent[-1] == tuple(engine.omission(omit).kept())
        assert torch.equal(logits, expected[omit][0]), (guess, omit, (logits - expected[omit][0]).abs().max().item())
        paced(guess, routing_ms)
        pending = Pending(0, lambda: Choice(engine.omission(omit), routed=True, ms=routing_ms))
        assert engine.generate(ids, pending, max_new_tokens=6, stop_ids=[]).tokens == expected[omit][1], (guess, omit)
    # kept outputs: only the last by default, so a stack parting earlier pre-fills from the start, exactly
    for keep_from, omit in [(None, (3, 5)), (None, (2, 4)), (3, (2, 4)), (2, (2, 4))]:
        engine.prefill_ahead(ids, (0, 1, 2, 3), keep_from=keep_from)
        engine.use(engine.omission(omit))
        assert torch.equal(engine.prefill_rest(), expected[omit][0]), (keep_from, omit)
        assert engine.last_resumed == (2 if keep_from == 2 else 0)
    # the guess: the stack most of the recent routed prompts got (ties: the latest)
    engine._recent.clear()
    stacks = {omit: tuple(engine.omission(omit).kept()) for omit in [(3, 5), (2, 4)]}
    for omit, guess in [((3, 5), (3, 5)), ((3, 5), (3, 5)), ((2, 4), (3, 5)), ((2, 4), (2, 4)), ((2, 4), (2, 4))]:
        engine.start(ids, Pending(0, lambda: Choice(engine.omission(omit), routed=True, ms=1.0)))
        assert engine.expected == stacks[guess], omit
    engine.start(ids, Pending(0, lambda: Choice(engine.omission((3, 5)))))  # not routed (fixed, forced): not counted
    assert engine.expected == stacks[(2, 4)] and len(engine._recent) == 5
    # no guess yet, or a guess that drops a block every candidate keeps: the shared blocks only
    paced((), 1.0)
    engine.expected = None
    engine.start(ids, Pending(2, lambda: Choice(engine.omission((3, 5)), routed=True, ms=1.0)))
    assert engine.last_ahead == 2
    paced((0, 4), 1.0)
    engine.start(ids, Pending(2, lambda: Choice(engine.omission((3, 5)), routed=True, ms=1.0)))
    assert engine.last_ahead == 2
    paced((3, 5), 1.0)
    engine.speculate = False
    engine.start(ids, Pending(1, lambda: Choice(engine.omission((3, 5)), routed=True, ms=1.0)))
    assert engine.last_ahead == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pre-fill graphs are captured only on an NVIDIA GPU")
@pytest.mark.parametrize("mode", ["routed", "fixed", "budget"])
def test_cuda_server_warm_up_captures_every_prefill_graph_a_prompt_runs(mode):
    """`warm_up(sets, prefill_up_to=...)` (what `pudding serve` does) captures, per length bucket, the graphs a prompt
    runs: the shared blocks' and each set's rest (a routed policy's pending choice), the whole stack's per set (a
    fixed policy), the stack of the resident blocks (memory budget). Prompts of any length up to the context then
    capture nothing, and give the logits of an engine that captured them on first use."""
    from conftest import build_tiny
    from pudding.policy import Choice, Pending

    model = build_tiny("llama", init=0.2)
    budget = 5 if mode == "budget" else None
    engine = Engine.from_model(model, device="cuda", max_len=64, budget=budget)
    lazy = Engine.from_model(model, device="cuda", max_len=64, budget=budget)
    engine.speculate = lazy.speculate = False  # a guess of its own would capture graphs of its own
    sets = [engine.omission(s) for s in ((3, 5), (2, 4))] if mode != "fixed" else [engine.omission((1,))]
    ahead = 2 if mode == "routed" else 0
    for e in (engine, lazy):
        e.warm_up(sets)
    engine.warm_up(sets, prefill_up_to=64, ahead=ahead)
    captured = set(engine._graphs)
    assert {key[1] for key in captured if key[0] in ("prefill", "rest")} == {16, 32, 64}
    for length in (5, 16, 20, 40, 64):
        ids = torch.randint(3, 200, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        for omit in sets:
            logits = [e.start(ids, Pending(ahead, lambda omit=omit: Choice(omit, routed=True)))[2].clone()
                      for e in (engine, lazy)]
            if mode == "budget":  # the first pre-fill after a swap waits for its copies eagerly; the next one replays
                logits = [e.start(ids, Choice(omit))[2].clone() for e in (engine, lazy)]
            assert torch.equal(*logits), (length, omit)
    assert set(engine._graphs) == captured and set(lazy._graphs) <= captured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graph captures happen only on an NVIDIA GPU")
def test_cuda_a_server_speculates_only_with_graphs_it_has_captured():
    """With `defer_captures` (a server's), a guess whose graph is missing pre-fills only the shared blocks, and a
    resume point whose graph is missing resumes from the latest captured one: no request captures a graph. The
    graphs it went without are captured by `capture_wanted` (between requests), and later requests use them. Logits
    are those of choosing first throughout."""
    from conftest import build_tiny
    from pudding.policy import Choice, Pending

    engine = Engine.from_model(build_tiny("llama", init=0.2), device="cuda", max_len=64)
    sets = {omit: engine.omission(omit) for omit in [(3, 5), (2, 4)]}  # both keep blocks 0 and 1
    ids = torch.randint(3, 200, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = {}
    for omit, blocks in sets.items():
        engine.use(blocks)
        expected[omit] = engine.prefill(ids).clone()
    engine.warm_up(list(sets.values()), prefill_up_to=64, ahead=2)
    engine.defer_captures = True
    padded = engine._padded(len(ids))

    def routed(guess, omit):
        engine._pace.block_ms[padded], engine._pace.routing_ms[padded] = 0.01, 1.0  # time for the whole guess
        engine.expected = tuple(sets[guess].kept())
        before = set(engine._graphs)
        _, _, logits = engine.start(ids, Pending(2, lambda: Choice(sets[omit], routed=True, ms=1.0)))
        assert set(engine._graphs) == before and torch.equal(logits, expected[omit]), (guess, omit)
        return engine.last_ahead, engine.last_resumed

    assert routed((3, 5), (3, 5)) == (2, 2)  # the guess's graph is missing: the shared blocks only
    assert engine.capture_wanted(limit=5) == 1  # the guess's four blocks ahead
    assert routed((3, 5), (3, 5)) == (4, 2)  # the guess runs; its rest from 4 is missing: resumed after block 1
    assert routed((3, 5), (2, 4)) == (4, 2)  # a wrong guess parts after the shared blocks anyway
    assert engine.capture_wanted(limit=5) == 1 and not engine._wanted
    assert routed((3, 5), (3, 5)) == (4, 4)  # now all of it is captured: the chosen stack resumes after the guess


def test_the_pace_of_speculation_keeps_the_fastest_times_and_guesses_an_even_number_of_blocks():
    """How many blocks pre-fill ahead of a choice: routing time over one block's time, at each padded length, from
    the fastest of each seen (a router slowed by the blocks beside it must not lengthen the next guess), rounded down
    to an even number; nothing until both were measured."""
    import time as clock

    from pudding.engine import _Pace

    pace = _Pace(cuda=False)
    assert pace.blocks_within(128) == 0
    with pace.timing(128, blocks=4):
        clock.sleep(0.004)
    assert pace.block_ms[128] >= 1.0 and pace.blocks_within(128) == 0  # no routing time yet
    with pace.timing(128, blocks=1):
        pass
    assert pace.block_ms[128] < 1.0  # the fastest seen
    pace.block_ms[128] = 1.2
    pace.routed(128, 5.9)
    pace.routed(128, 9.0)  # slower, beside more blocks: ignored
    assert pace.routing_ms == {128: 5.9} and pace.blocks_within(128) == 4 and pace.blocks_within(256) == 0
    pace.block_ms[128] = 0.5
    assert pace.blocks_within(128) == 10  # 11.8 blocks, rounded down to an even number


def test_a_pending_choice_waits_for_the_choice_where_blocks_cannot_run_ahead():
    """With a memory budget a block's slot is known only once the set is, and with LoRA each set updates its blocks
    differently: there the pending choice is made first, and the result is that of choosing first."""
    from conftest import build_tiny
    from pudding.policy import Choice, Pending

    model = build_tiny("llama", init=0.2)
    ids = torch.randint(3, 200, (9,), generator=torch.Generator().manual_seed(6)).tolist()
    budget = Engine.from_model(model, max_len=64, budget=4)
    assert not budget.can_prefill_ahead() and Engine.from_model(model, max_len=64).can_prefill_ahead()
    omit = budget.omission((4, 5))
    expected = _hf_greedy(model, ids, omit, 6)
    assert budget.generate(ids, Pending(3, lambda: Choice(omit)), max_new_tokens=6, stop_ids=[]).tokens == expected
    with pytest.raises(PuddingError, match="only with every block resident"):
        budget.prefill_ahead(ids, range(3))


def test_routed_generation_overlaps_the_router_with_the_shared_blocks(smollm2):
    """End to end on the packaged model and router encoder: a routed policy's pending choice names the blocks all
    its sets keep, routes when the engine asks (counted in its statistics), and generates what choosing first does."""
    from pudding.policy import FixedPolicy, RoutedPolicy, shared_blocks
    from pudding.router import LoadedRouter

    sets = [OmissionSet(s, 30) for s in ([4, 11, 17], [6, 12, 20], [5, 25])]
    assert shared_blocks(sets) == 4 and shared_blocks([OmissionSet((), 30)]) == 30 and shared_blocks([]) == 0
    policy = RoutedPolicy(LoadedRouter.untrained("minilm-l6", sets))
    assert FixedPolicy(sets[0], sets=sets).pending("a prompt").shared == 0  # nothing to wait for
    engine = Engine.from_model(smollm2.model, smollm2.tokenizer, max_len=128)
    prompt = "Question: What do plants need to make food?\nAnswer:"
    pending = policy.pending(prompt)
    assert pending.shared == 4 and policy.stats.prompts == 0  # nothing routed yet
    ahead = engine.generate(prompt, pending, max_new_tokens=8, stop_ids=[])
    assert policy.stats.prompts == 1 and ahead.routed and ahead.blocks in [list(s) for s in sets]
    first = policy.choose_one(prompt)
    assert engine.generate(prompt, first, max_new_tokens=8, stop_ids=[]).tokens == ahead.tokens
    assert ahead.timings.ttft_ms >= ahead.timings.route_ms > 0


@pytest.mark.parametrize("encoder", ["minilm-l6", "embeddings"])
def test_bench_measures_prefill_with_routing_beside_the_shared_blocks(encoder):
    """`pudding bench` times the pre-fill with routing included as it runs (`routed_prefill`), per number of blocks
    pre-filled ahead, and checks its logits against choosing first (equal on the CPU); the report shows the table.
    The encoder router and the one on the decoder's embeddings (host-side, no device work) run the same way."""
    from conftest import build_tiny
    from pudding.bench.report import _routed_lines, _router_words
    from pudding.bench.timing import routed_prefill
    from pudding.models import load_tokenizer, resolve_model
    from pudding.policy import RoutedPolicy
    from pudding.router import untrained_router

    engine = Engine.from_model(build_tiny("llama", init=0.2), max_len=64)
    sets = [engine.omission(s) for s in ((3, 5), (2, 4))]
    tokenizer = load_tokenizer(resolve_model("smollm2-135m")) if encoder == "embeddings" else None
    policy = RoutedPolicy(untrained_router(encoder, sets, decoder_tokenizer=tokenizer))
    assert ("table lookup" in _router_words({"router_encoder": encoder})) == (encoder == "embeddings")
    dense = engine.omission(())
    measured = routed_prefill(engine, policy, (8, 16), (0, 2), repeats=1, dense=dense)
    speculative = measured["speculative"]
    assert set(speculative) == {"right", "wrong"} and not engine.speculate  # as it was before the measurement
    timed = 0
    for row in speculative.values():
        assert set(row["ttft_ms"]) == set(row["dense_ttft_ms"]) == {8, 16}
        assert all(2 <= ahead <= 4 for ahead in row["blocks_ahead"].values())  # the shared blocks at least
        for length, ms in row["ttft_ms"].items():  # timed only where speculation goes past the shared blocks
            assert (ms is not None and ms > 0) == (row["blocks_ahead"][length] > 2)
            timed += ms is not None
    # per (blocks ahead, length): warm-up, the timed run (each after a dense pre-fill), the host-time run, the check;
    # then per length the choice itself, and per guess (right, wrong) the check and a run, then warm-up and timed run
    assert measured["max_abs_logit_diff"] == 0.0
    assert policy.stats.prompts == 2 * 2 * 4 + 2 * (1 + 2 * 2) + 2 * timed
    assert speculative["wrong"]["resumed_at"] == {8: 2, 16: 2}  # (3, 5) and (2, 4) share blocks 0 and 1
    assert set(measured["ttft_ms"]) == {0, 2} and all(v > 0 for t in measured["ttft_ms"].values() for v in t.values())
    assert set(measured["dense_ttft_ms"]) == {0, 2} and all(set(t) == {8, 16} for t in measured["dense_ttft_ms"].values())
    assert set(measured["issue_ms"]) == {0, 2} and set(measured["prefill_issue_ms"]) == {8, 16}
    lines = _routed_lines({"pool_shared_blocks": 2, **measured}, {"ttft_ms": {8: 1.0, 16: 2.0}}, 0.5, {"prompt_lengths": (8, 16)})
    assert "| (pruned pre-fill + router time, added) | 1.50 ms | 2.50 ms |" in lines
    assert any(line.startswith("| 2 | ") for line in lines) and lines[-1].startswith("| `Engine.start`, 2 blocks ahead | ")
    assert any(line.startswith("| dense, timed in turn with row 2 ") for line in lines)
    assert any(line.startswith("| speculating, the set sharing fewest blocks expected (vs dense in turn; ") for line in lines)
    untimed = {**measured, "speculative": {"right": {"ttft_ms": {8: None, 16: 3.0}, "dense_ttft_ms": {8: None, 16: 4.0},
                                                     "blocks_ahead": {8: 2, 16: 4}, "resumed_at": {8: None, 16: 4}}}}
    lines = _routed_lines({"pool_shared_blocks": 2, **untimed}, {"ttft_ms": {8: 1.0, 16: 2.0}}, 0.5, {"prompt_lengths": (8, 16)})
    assert "| speculating, the set chosen expected (vs dense in turn; blocks ahead, resumed at) | as row 2 (2 ahead) " \
           "| 3.00 ms (1.33x; 4, 4) |" in lines


def test_bench_reads_the_embeddings_routers_tokenizer_from_a_model_or_a_tokenizer_directory(tmp_path):
    """`bench --router-tokenizer`: a model's tokenizer, or a directory of tokenizer files alone (what a GPU lease
    carries instead of a whole model); anything else is refused in one line."""
    from pudding.cli import _tokenizer_of
    from pudding.errors import PuddingError

    model = _tokenizer_of("smollm2-135m")
    model.save_pretrained(tmp_path / "tokenizer")
    carried = _tokenizer_of(str(tmp_path / "tokenizer"))
    assert carried("Question: what does a cow eat?")["input_ids"] == model("Question: what does a cow eat?")["input_ids"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PuddingError, match="no tokenizer in"):
        _tokenizer_of(str(tmp_path / "empty"))


def test_bench_times_the_sets_in_turn():
    """`bench.time_sets`: the sets take turns at every repeat (a machine whose speed drifts then slows them alike),
    each timing is of its own set's stack, and every length and generation is timed for each set."""
    from conftest import build_tiny
    from pudding.bench.timing import time_sets

    engine = Engine.from_model(build_tiny("llama", init=0.2), max_len=64)
    dense, pruned = engine.omission(()), engine.omission((2, 4))
    used = []
    use = engine.use

    def recorded(omit):
        used.append(len(omit))
        return use(omit)

    engine.use = recorded
    timed = time_sets(engine, [(dense, "dense"), (pruned, "pruned")], (4, 8), 4, (3, 5), repeats=3)
    assert [t.label for t in timed] == ["dense", "pruned"] and [t.kept for t in timed] == [6, 4]
    assert all(set(t.ttft_ms) == {4, 8} and set(t.generate_ms) == {3, 5} and t.decode_tok_s > 0 for t in timed)
    # per job (two lengths, two generations): a warm-up of each set, then its samples alternating
    expected = []
    for count in (3, 3, 1, 1):
        expected += [0, 2] + [0, 2] * count
    assert used == expected


def test_bench_times_engines_in_turn():
    """`bench.time_arms`: arms on different engines (full-precision and int8 blocks of one shape) take turns at every
    repeat, each timing runs its own engine, and engines of another vocabulary are refused in one line."""
    from conftest import build_tiny
    from pudding.bench.timing import Arm, time_arms

    config = build_tiny("llama").config
    engines = {scheme: Engine.random(config, "cpu", dtype=torch.float32, quantize=quantize, max_len=64)
               for scheme, quantize in (("fp32", None), ("int8", "int8"))}
    used = []
    for name, engine in engines.items():
        def recorded(omit, engine=engine, name=name, use=engine.use):
            used.append(name)
            return use(omit)
        engine.use = recorded
    pruned = engines["fp32"].omission((2, 4))
    arms = [Arm(engines["fp32"], pruned, "fp32"), Arm(engines["int8"], pruned, "int8")]
    timed = time_arms(arms, (4,), 4, (3,), repeats=2)
    assert [t.label for t in timed] == ["fp32", "int8"] and all(t.kept == 4 and t.decode_tok_s > 0 for t in timed)
    assert used == ["fp32", "int8"] * 5  # pre-fill: a warm-up round and 2 repeats; generation: a warm-up and 1
    config.vocab_size = 300
    other = Engine.random(config, "cpu", dtype=torch.float32, max_len=64)
    with pytest.raises(PuddingError, match="share a vocabulary"):
        time_arms(arms + [Arm(other, other.omission(()), "other")], (4,), 4, (3,), repeats=1)


def test_bench_times_a_bundle_with_the_router_asked_for(smollm2):
    """`bench --bundle B --router-encoder E` times an untrained router of E with B's model and sets instead of B's
    own router (the embeddings router reading with the model's own tokenizer), and the report says which. The
    pre-fill with routing is measured (the bundle's sets keep only block 0 in common: one block ahead), the logits
    equal to choosing first, and the table's routed row and speedup are the measured ones."""
    from pathlib import Path

    from pudding.bench.report import markdown
    from pudding.bench.suites import BenchSettings, benchmark_bundle

    settings = BenchSettings(prompt_lengths=(8,), base_prompt=8, gen_lengths=(4,), repeats=1, max_len=64)
    bundle = Path(__file__).parent.parent / "results" / "smollm2-h100"  # its router.json names MiniLM
    result = benchmark_bundle(bundle, "cpu", settings, log=lambda m: None, router_encoder="embeddings")
    assert result["routing_timed_with"] == "an untrained router of the encoder asked for (embeddings)"
    assert result["router_ms"] > 0 and result["pruned"]["blocks_run"] < result["dense"]["blocks_run"]
    report = markdown({"device": "cpu", "date": "today", "command": "pudding bench", "settings": settings.__dict__,
                       "bundles": [result]})
    assert "(timed with an untrained router of the encoder asked for (embeddings))" in report
    routed = result["routed_prefill"]
    assert routed["pool_shared_blocks"] == 1 and routed["max_abs_logit_diff"] == 0
    measured = routed["ttft_ms"][1][8]
    assert result["comparison"]["prefill"][8]["ttft_with_routing_ms"] == measured
    assert result["comparison"]["prefill"][8]["routing_measured"] and "Pre-fill with routing, measured" in report
    assert f"| set 0 + router ({result['pruned']['blocks_run']} blocks) | {measured:.1f} ms |" in report


def test_the_committed_h100_report_compares_the_routed_pre_fill_with_a_dense_one_timed_in_turn():
    """results/bench-h100.json (a real `pudding bench` run at 6b3fc21): the routed speedup divides the dense
    pre-fill timed in turn with it, the report shows that row, and the memory-budget peak, counted with the new
    small-tensor segments whole, meets its allowance with nothing left in the rest."""
    import json
    from pathlib import Path

    from pudding.bench.report import markdown, shape_goals

    report = json.loads((Path(__file__).parents[1] / "results" / "bench-h100.json").read_text())
    shape = report["shape"]
    routed = shape["routed_prefill"]
    dense_in_turn = routed["dense_ttft_ms"][str(routed["pool_shared_blocks"])]
    for length, row in shape["all_resident"]["comparison"]["prefill"].items():
        assert row["dense_in_turn"] and row["speedup_with_router"] == dense_in_turn[length] / row["ttft_with_routing_ms"]
    goals = shape_goals(shape)
    assert all("dense timed in turn" in g["detail"] for g in goals if "routing included" in g["figure"])
    memory = shape["memory_budget"]
    assert memory["within_allowed"] and "small_segments_gb" in memory["memory"]
    text = markdown(report)
    assert f"| dense, timed in turn with row {routed['pool_shared_blocks']} (the speedup's numerator) |" in text
    assert "| rest (anything unaccounted) | 0.000 |" in text
    assert "| new small-tensor segments beside the engine's tensors (2 MB a stream) | 0.004 |" in text


def test_the_committed_h200_report_renders_with_its_goals():
    """results/bench-h200.json (a real `pudding bench` run) renders as the Markdown the command writes: Table 6, the
    routed pre-fill measured beside the shared blocks, and one goal line per target of the engine issue."""
    import json
    from pathlib import Path

    from pudding.bench.report import markdown, shape_goals

    report = json.loads((Path(__file__).parents[1] / "results" / "bench-h200.json").read_text())
    goals = shape_goals(report["shape"])
    assert len(goals) == 15 and {g["target"] for g in goals} == {"≤ 1.25x", "≥ 97%", "≥ 85%", "≤ 2 ms", "≤ allowance"}
    assert all("routing measured beside pre-fill" in g["detail"] for g in goals if "routing included" in g["figure"])
    text = markdown(report)
    shared = report["shape"]["routed_prefill"]["pool_shared_blocks"]
    assert "| blocks pre-filled ahead |" in text and f"\n| {shared} | " in text
    assert text.count("| **no** |") == sum(not g["met"] for g in goals)
    # the memory-budget peak with its parts (they and the rest add up to it) and the graphs' pool per phase
    memory = report["shape"]["memory_budget"]
    assert "| **peak reserved** |" in text and "The graphs' pool after each phase" in text
    assert memory["allowed_gb"] >= memory["activation_workspace_gb"] > 0 and "Pre-fill profile, dense, 128 tokens" in text
    # a later run counts the cuBLAS workspace the graphs' pool holds once (in the pool) and says so
    later = json.loads((Path(__file__).parents[1] / "results" / "bench-h200-7a44ae1.json").read_text())
    memory = later["shape"]["memory_budget"]["memory"]
    text = markdown(later)
    assert memory["cublas_in_graph_pool_gb"] > 0 and f"includes {memory['cublas_in_graph_pool_gb']:.3f} GB of cuBLAS" in text
    assert "| cuBLAS workspaces | 0.000 |" in text and "held 0.066 GB unused" in text


@pytest.mark.slow
def test_compiled_prefill_compiles_once_per_model_and_keeps_each_geometry():
    """Models of different geometry compiled in one process (as `pudding bench` with two bundles runs them): each
    pre-fills every prompt length through one compiled graph, equal to its eager engine, a sliding window's mask
    included (its key count is the mask's). With automatic dynamic shapes the second model's sizes became symbolic and
    its pre-fill failed to compile (GQA: a symbolic `heads > kv_heads`); the first model compiled twice, static then
    dynamic in the tokens."""
    import transformers
    from torch._dynamo.utils import counters

    # sizes no other test compiles; Mistral's 4-token window masks every pre-fill below
    for family, hidden, heads, kv_heads in [("Llama", 48, 6, 2), ("Llama", 80, 5, 1), ("Mistral", 96, 6, 3)]:
        config = getattr(transformers, f"{family}Config")(
            hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
            intermediate_size=96, vocab_size=256, **({"sliding_window": 4} if family == "Mistral" else {}))
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
        compiled, eager = (Engine.from_model(model, max_len=64, compile=c, buckets=False) for c in (True, False))
        for engine in (compiled, eager):
            engine.use(engine.omission(()))
        graphs = counters["stats"]["unique_graphs"]
        for length in (5, 13, 40):
            ids = list(range(3, 3 + length))
            torch.testing.assert_close(compiled.prefill(ids).clone(), eager.prefill(ids).clone(), rtol=1e-4, atol=1e-4)
        assert counters["stats"]["unique_graphs"] - graphs <= 1, f"{heads}/{kv_heads} heads: a compile per length"


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_compiled_block_step_equals_the_eager_one(scheme):
    """The compiled block (what GPUs run, fused by inductor, bucketed pre-fill) computes what the eager block computes,
    in bf16-style full weights and with int8 / int4 weight-only codes."""
    from conftest import build_tiny
    from pudding.quantize import quantize_blocks

    model = build_tiny("qwen2", init=0.2)
    if scheme:
        quantize_blocks(model, scheme)
    eager = Engine.from_model(model, max_len=64, compile=False, buckets=True)
    compiled = Engine.from_model(model, max_len=64, compile=True, buckets=True)
    ids = torch.randint(3, 200, (13,), generator=torch.Generator().manual_seed(5)).tolist()
    for omit in [(), (1, 4)]:
        results = [e.generate(ids, e.omission(omit), max_new_tokens=5, stop_ids=[]).tokens for e in (eager, compiled)]
        assert results[0] == results[1]
        for engine in (eager, compiled):
            engine.use(engine.omission(omit))
        torch.testing.assert_close(compiled.prefill(ids).clone(), eager.prefill(ids).clone(), rtol=1e-4, atol=1e-4)
    # the compiled stack run in two parts, ahead of a choice and after it, gives the whole stack's logits exactly
    if scheme is None:
        from pudding.policy import Choice, Pending

        omit = compiled.omission((3, 5))
        compiled.use(omit)
        whole = compiled.prefill(ids).clone()
        split = compiled.start(ids, Pending(2, lambda: Choice(omit)))[2]
        torch.testing.assert_close(split, whole, rtol=0, atol=0)


def test_kernel_profiles_count_the_products_and_not_the_kernels_named_after_them():
    """A profile splits a step's GPU time into matrix products and the rest by kernel name. Inductor names a fused
    kernel after the ops in it, so a norm fused beside a low-bit product (`..._gemv_lowbit_mean_...`) is not a product,
    while pudding's own low-bit kernels, cuBLAS's and inductor's reductions holding an `mm` are."""
    from pudding.bench.references import _is_matrix_product

    products = ["_gemv_int8_kernel", "_gemv_int4_kernel", "_mm_lowbit_kernel", "nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT",
                "triton_red_fused__to_copy__unsafe_view_add_mean_mm_mul_pow_rsqrt_t_view_8", "triton_red_fused_mm_t_transpose_view_6"]
    others = ["triton_red_fused__to_copy_add_gemv_lowbit_mean_mul_pow_rsqrt_view_7",
              "triton_red_fused__to_copy_add_mean_mm_lowbit_mul_pow_rsqrt_view_0", "triton_poi_fused_mm_lowbit_mul_silu_split_view_5",
              "triton_per_fused__softmax__to_copy_bitwise_not_masked_fill_mul", "triton_poi_fused__unsafe_view_mul_silu_split_5"]
    assert [_is_matrix_product(k) for k in products] == [True] * len(products)
    assert [_is_matrix_product(k) for k in others] == [False] * len(others)


def test_the_memory_allowance_counts_only_the_small_tensor_segments_that_appeared_since_the_baseline():
    """The allocator serves tensors of 1 MiB or less from 2 MiB segments per stream: the engine's first small tensor
    on a stream costs a segment unless one existed before it was built. Only segments outside the graphs' pools, of
    the small kind, and new since the baseline count, whole, less the blocks the engine's own tensors take in them
    (counted in their own parts); the segment's other tenants (the caller's sampled token) stay in it."""
    import json
    from pathlib import Path

    from pudding.bench.memory import allocator_size, new_small_segment_bytes
    from pudding.bench.report import markdown

    mb = 2 * 1024 * 1024
    engine_token = torch.zeros(1, dtype=torch.long)
    at = engine_token.untyped_storage().data_ptr()
    segments = [{"in_pool": False, "type": "small", "address": at, "total": mb, "used": 1024},  # new: counts
                {"in_pool": False, "type": "small", "address": 2, "total": mb, "used": 0},  # there before the engine
                {"in_pool": True, "type": "small", "address": 3, "total": mb, "used": 0},  # the graphs' pool: counted there
                {"in_pool": False, "type": "large", "address": 4, "total": 20 * mb, "used": mb}]  # not the granularity
    assert new_small_segment_bytes(segments, {2}) == mb
    views = [engine_token, engine_token[:0]]  # one allocation, counted once
    assert new_small_segment_bytes(segments, {2}, views) == mb - allocator_size(8) == mb - 512
    assert new_small_segment_bytes([{**segments[0], "address": at + 512}], set(), views) == mb  # it lies elsewhere
    assert new_small_segment_bytes(segments, {at, 2}, views) == 0
    report = json.loads((Path(__file__).parents[1] / "results" / "bench-h200-embeddings.json").read_text())
    memory = report["shape"]["memory_budget"]["memory"]
    rest_before = "| rest (allocator rounding, anything unaccounted) | 0.006 |"
    assert rest_before in markdown(report)  # that run left the two new 2 MB segments in the rest
    memory["small_segments_slack_gb"] = 0.0042
    text = markdown(report)
    assert "| free space of new small-tensor segments (2 MB a stream) | 0.004 |" in text and rest_before not in text


def test_the_memory_allowance_counts_the_allocators_rounding_of_the_engines_own_tensors():
    """The caching allocator gives a tensor of 10 MiB or more a segment rounded up to 2 MiB and rounds every block to
    512 bytes: the memory-budget peak of the 8B shape on an H100 exceeded its allowance by exactly that (the 26 block
    slots, 11341.824 MB, sat in a segment of 11343.495 MB). The rounding is counted per allocation, once for the
    slots that are views of one tensor."""
    from conftest import build_tiny
    from pudding.bench.memory import allocator_rounding, allocator_size

    assert allocator_size(26 * 436_224_000) == 11_343_495_168  # the H100 run's slots segment
    assert allocator_size(1_050_673_152) == 1_050_673_152  # its embeddings: a multiple of 2 MiB already
    assert allocator_size(100) == 512 and allocator_size(8192) == 8192 and allocator_size(2**20 + 1) == 2**20 + 512
    engine = Engine.random(build_tiny("llama").config, "cpu", dtype=torch.float32, max_len=64, budget=3)
    resident = engine.resident()
    memory = engine.memory()
    assert memory["blocks"] == 4 * memory["block_bytes"]  # the slots' views, not the allocation under them
    slots = resident["blocks"]
    assert len(slots) == 4 and len({t.untyped_storage().data_ptr() for t in slots}) == 1  # 3 kept + a spare, one tensor
    storage = slots[0].untyped_storage().nbytes()
    assert allocator_rounding(slots) == allocator_size(storage) - storage
    everything = [t for ts in resident.values() for t in ts]
    assert 0 < allocator_rounding(everything) < 512 * len(everything) + 2 * 2**20
