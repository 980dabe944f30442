"""Choosing the deployed policy on held-out prompts: the rules (gate, nearest neighbours), the guard that keeps the
static set unless a routed policy clearly beats it, and searches cut to a smaller k."""

from __future__ import annotations

import numpy as np
import pytest

from pudding.policy import apply_rule, gate_choices, neighbour_predictions
from pudding.selection import Candidate, HeldOut, choose_deployed, fair_best_static, routed_candidates, static_candidates


def test_the_gate_leaves_the_default_set_only_for_a_large_enough_predicted_gain():
    predicted = np.array([[1.0, 0.9, 2.0], [1.0, 0.2, 2.0], [0.5, 0.9, 2.0]])
    assert gate_choices(predicted, default=0, margin=0.5).tolist() == [0, 1, 0]
    assert gate_choices(predicted, default=0, margin=0.0).tolist() == [1, 1, 0]
    assert apply_rule({}, predicted).tolist() == [1, 1, 0]
    assert apply_rule({"gate": {"default": 2, "margin": 10.0}}, predicted).tolist() == [2, 2, 2]


def test_nearest_neighbours_average_the_labels_of_the_closest_prompts():
    keys = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    labels = np.array([[0.0, 1.0], [0.2, 1.0], [1.0, 0.0], [1.0, 0.4]])
    queries = np.array([[1.0, 0.05], [0.05, 1.0]])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    predicted = neighbour_predictions(queries, keys, labels, k=2)
    np.testing.assert_allclose(predicted, [[0.1, 1.0], [1.0, 0.2]])
    assert predicted.argmin(1).tolist() == [0, 1]
    assert neighbour_predictions(queries, keys, labels, k=100).shape == (2, 2)  # k larger than the table


def _heldout(correct: list[str], tasks: list[str] | None = None) -> HeldOut:
    n = len(correct[0])
    tasks = tasks or ["a"] * n
    data = {}
    for task in dict.fromkeys(tasks):
        columns = [i for i, t in enumerate(tasks) if t == task]
        data[task] = {"metric": "acc", "indices": columns, "prompts": [f"{task} prompt {i}" for i in columns],
                      "correct": ["".join(row[i] for i in columns) for row in correct],
                      "tl": [[float(row[i] == "0") for i in columns] for row in correct]}
    return HeldOut.from_json(data)


def test_held_out_accuracy_averages_tasks_and_pairs_differences():
    heldout = _heldout(["1100", "0011"], tasks=["a", "a", "b", "b"])
    assert heldout.accuracy(np.array([0, 0, 0, 0])) == 0.5
    assert heldout.accuracy(np.array([0, 0, 1, 1])) == 1.0
    diff, se = heldout.paired(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0]))
    assert diff == 0.5 and se == 0.0
    assert heldout.picks_best(np.array([0, 0, 1, 1])) == 1.0
    assert fair_best_static(_heldout(["1000", "1110", "0110"])) == 1


def test_a_routed_policy_must_beat_the_fair_static_set_clearly_to_be_deployed():
    heldout = _heldout(["1" * 30 + "0" * 10, "0" * 30 + "1" * 10])
    fair = fair_best_static(heldout)
    assert fair == 0
    # a router that is right everywhere: deployed
    perfect = Candidate("router", {"router": "router"}, np.array([0] * 30 + [1] * 10))
    record = choose_deployed(heldout, static_candidates(heldout) + [perfect], fair)
    assert record["deployed"] == {"router": "router"} and record["name"] == "router"
    # one that wins a few documents: within the noise, the static set stays
    lucky = Candidate("router", {"router": "router"}, np.array([0] * 37 + [1] * 3))
    record = choose_deployed(heldout, static_candidates(heldout) + [lucky], fair)
    assert record["deployed"] == {"static": 0} and "no routed policy" in record["reason"]
    # one that loses: the static set stays
    bad = Candidate("router", {"router": "router"}, np.ones(40, dtype=int))
    assert choose_deployed(heldout, static_candidates(heldout) + [bad], fair)["deployed"] == {"static": 0}


def test_the_gate_margin_is_tuned_on_held_out_prompts():
    heldout = _heldout(["1" * 30 + "0" * 10, "0" * 30 + "1" * 10])
    # the router is confident (large predicted gain) exactly where set 1 is right, unsure elsewhere
    predicted = np.zeros((40, 2))
    predicted[:30, 1] = -0.1  # wrongly prefers set 1 by a little
    predicted[30:, 1] = -5.0  # rightly prefers set 1 by a lot
    candidates = routed_candidates("router", predicted, 0, heldout)
    raw, gated = candidates
    assert heldout.accuracy(raw.choices) == 0.25
    assert heldout.accuracy(gated.choices) == 1.0 and 0.1 <= gated.spec["gate"]["margin"] < 5.0


@pytest.fixture(scope="module")
def scorer(smollm2):
    from pudding.scoring import Scorer

    return Scorer(smollm2.decoder, smollm2.tokenizer, max_batch_tokens=1024)


@pytest.mark.parametrize("method, task, loss", [pytest.param("greedy", "piqa", "tl", marks=pytest.mark.slow), ("shortgpt", None, "tl"),
                                                pytest.param("shortened-ppl", None, "tl", marks=pytest.mark.slow)])
def test_a_search_for_more_blocks_holds_the_search_for_fewer(scorer, smollm2, method, task, loss):
    """The sweep searches once, at the largest k: the first k removals must be the k-block search itself."""
    from pudding.search import SearchSpec, run_search

    def search(k):
        spec = SearchSpec(method, task, loss, k, samples=2, seqlen=64)
        return run_search(spec, scorer, smollm2.info())

    longer, shorter = search(3), search(2)
    cut = longer.prefix(2)
    assert cut.blocks == shorter.blocks and cut.removal_order == shorter.removal_order
    assert cut.same_search(shorter.settings, smollm2.fingerprint) and longer.same_search(shorter.settings, smollm2.fingerprint)
    assert not shorter.same_search(longer.settings, smollm2.fingerprint)  # a shorter search cannot serve a longer one
    np.testing.assert_allclose(cut.loss_after_step, shorter.loss_after_step, rtol=1e-6)
