"""Choosing the policy a bundle deploys, on held-out training prompts — never on evaluated documents.

The router trains on the label table minus a held-out tenth (the rows its training curve is validated on). For the
held-out prompts every answer is scored under every candidate set once (`heldout.json`), so the held-out accuracy
of any policy is a lookup: each candidate set alone (the best of them is the *fair best static* set), the router,
the router gated by a margin, a nearest-neighbour router, the bundle's other routers. The deployed policy is the
best of them on held-out prompts, with one guard: a routed policy is deployed only if it beats the fair best static
set there beyond the noise (by more than twice the paired standard error, the convention of every comparison in
pudding's reports); otherwise the bundle deploys that static set. A bundle is then
never worse than the static set it was built from, up to the noise of a held-out sample.

The same lookup gives any routed variant's accuracy on the evaluation documents from the static evaluation of the
candidate sets (`lookup_results`), so ablations of the router cost no model compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .omission import OmissionSet
from .policy import apply_rule, neighbour_predictions
from .scoring import Scorer
from .tasks import get_task

GATE_QUANTILES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
NEIGHBOURS = (5, 20, 50, 200)
GUARD = 2.0  # a routed policy is deployed only if it beats the fair best static set by this many paired s.e.


# ------------------------------------------------------------------------------------------------------------------
# Held-out prompts, every answer scored under every set


def score_heldout(scorer: Scorer, sets: Sequence[OmissionSet], table, rows: np.ndarray, data_dir) -> dict:
    """For the held-out rows of a label table: per task, each document's correctness under every set (the task's
    primary metric) and the tl of its right answer under every set."""
    from .evaluate import correctness, score_docs_under_sets

    out = {}
    for task_name in dict.fromkeys(table.tasks[i] for i in rows):
        task = get_task(task_name)
        wanted = sorted(int(table.indices[i]) for i in rows if table.tasks[i] == task_name)
        by_index = {d.index: d for d in task.docs(task.require_calibration_split(), data_dir).docs}
        docs = [by_index[i] for i in wanted]
        scored = score_docs_under_sets(scorer, docs, sets, f"held-out {task_name}")
        out[task_name] = {
            "metric": task.primary,
            "indices": wanted,
            "prompts": [d.prompt for d in docs],
            "correct": ["".join("1" if x else "0" for x in correctness(s)[task.primary]) for s in scored],
            "tl": [np.round(s.gold_task_likelihood(), 5).tolist() for s in scored],
        }
    return out


@dataclass
class HeldOut:
    """Held-out documents of every calibration task, in one order: what policies are compared on."""

    tasks: list[str]  # per document
    prompts: list[str]
    correct: np.ndarray  # sets x documents, 0/1 under the task's primary metric
    tl: np.ndarray  # sets x documents

    @classmethod
    def from_json(cls, data: dict) -> HeldOut:
        tasks, prompts, correct, tl = [], [], [], []
        for name, entry in data.items():
            tasks += [name] * len(entry["prompts"])
            prompts += entry["prompts"]
            correct.append(np.array([[c == "1" for c in row] for row in entry["correct"]], dtype=np.float64))
            tl.append(np.array(entry["tl"], dtype=np.float64))
        return cls(tasks, prompts, np.concatenate(correct, 1), np.concatenate(tl, 1))

    def __len__(self) -> int:
        return len(self.prompts)

    def _by_task(self, values: np.ndarray) -> list[np.ndarray]:
        names = np.array(self.tasks)
        return [values[names == t] for t in dict.fromkeys(self.tasks)]

    def right(self, choices: np.ndarray) -> np.ndarray:
        """Per document, 1 if the set chosen for it answers it right."""
        return self.correct[choices, np.arange(len(self))]

    def accuracy(self, choices: np.ndarray) -> float:
        """Mean over tasks of each task's accuracy (as the paper averages the evaluation tasks)."""
        return float(np.mean([part.mean() for part in self._by_task(self.right(choices))]))

    def paired(self, choices: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
        """Task-averaged accuracy difference from a reference policy and its paired standard error."""
        means, variances = [], []
        for diff in self._by_task(self.right(choices) - self.right(reference)):
            means.append(diff.mean())
            variances.append(diff.var(ddof=1) / len(diff) if len(diff) > 1 else 0.0)
        return float(np.mean(means)), float(math.sqrt(sum(variances)) / len(means))

    def picks_best(self, choices: np.ndarray) -> float:
        """Share of documents for which the choice is the set with the lowest tl of the right answer."""
        return float((choices == self.tl.argmin(0)).mean())


# ------------------------------------------------------------------------------------------------------------------
# Candidate policies and the choice


@dataclass
class Candidate:
    name: str
    spec: dict  # how to build it (see `deployed_policy`)
    choices: np.ndarray  # per held-out document

    def record(self, heldout: HeldOut, reference: np.ndarray) -> dict:
        diff, se = heldout.paired(self.choices, reference)
        return {"name": self.name, "spec": self.spec, "heldout_accuracy": heldout.accuracy(self.choices),
                "vs_fair_static": diff, "vs_fair_static_se": se, "picks_best": heldout.picks_best(self.choices)}


def static_candidates(heldout: HeldOut) -> list[Candidate]:
    return [Candidate(f"set{i}", {"static": i}, np.full(len(heldout), i)) for i in range(heldout.correct.shape[0])]


def fair_best_static(heldout: HeldOut) -> int:
    """The candidate set with the best held-out accuracy (ties: the lower mean tl of the right answer)."""
    scores = [(heldout.accuracy(np.full(len(heldout), i)), -heldout.tl[i].mean()) for i in range(heldout.correct.shape[0])]
    return max(range(len(scores)), key=lambda i: scores[i])


def routed_candidates(name: str, predicted: np.ndarray, default: int, heldout: HeldOut, knn: dict | None = None) -> list[Candidate]:
    """A router's own choice, and gated by a margin tuned on held-out prompts (the best of a grid of quantiles of
    its predicted gains); with `knn` ({"k": predictions}), the same for nearest-neighbour predictions."""
    predictors = {name: (predicted, {"router": name})}
    for k, knn_predicted in (knn or {}).items():
        predictors[f"{name}-knn{k}"] = (knn_predicted, {"router": name, "knn": k})
    out = []
    for label, (values, spec) in predictors.items():
        out.append(Candidate(label, spec, apply_rule(spec, values)))
        gains = values[:, default] - values.min(1)
        margins = sorted({float(np.quantile(gains, q)) for q in GATE_QUANTILES})
        gated = [{**spec, "gate": {"default": default, "margin": m}} for m in margins]
        scores = [heldout.accuracy(apply_rule(g, values)) for g in gated]
        best = max(i for i, a in enumerate(scores) if a == max(scores))  # ties: the larger margin, the more cautious gate
        out.append(Candidate(f"{label}-gated", gated[best], apply_rule(gated[best], values)))
    return out


def choose_deployed(heldout: HeldOut, candidates: list[Candidate], fair: int) -> dict:
    """The deployed policy and the held-out evidence for it (what policy.json records)."""
    reference = np.full(len(heldout), fair)
    records = [c.record(heldout, reference) for c in candidates]
    routed = [r for r in records if "static" not in r["spec"]]
    best = max(routed, key=lambda r: r["heldout_accuracy"], default=None)
    if best is not None and best["vs_fair_static"] > GUARD * best["vs_fair_static_se"] and best["vs_fair_static"] > 0:
        deployed, reason = best, (f"{best['name']} beats the fair best static set (set{fair}) on held-out prompts by "
                                  f"{100 * best['vs_fair_static']:.2f} points, more than twice the paired s.e. "
                                  f"({100 * best['vs_fair_static_se']:.2f})")
    else:
        deployed = next(r for r in records if r["spec"] == {"static": fair})
        reason = (f"no routed policy beats the fair best static set (set{fair}) on held-out prompts by more than twice the "
                  "paired s.e." + (f" (best: {best['name']}, {100 * best['vs_fair_static']:+.2f} ± "
                            f"{100 * best['vs_fair_static_se']:.2f} points)" if best else ""))
    return {"deployed": deployed["spec"], "name": deployed["name"], "reason": reason, "fair_static": fair,
            "heldout_documents": len(heldout), "candidates": records}


def neighbour_candidates(router, train_prompts: list[str], train_labels: np.ndarray, heldout: HeldOut) -> tuple[dict, np.ndarray]:
    """Nearest-neighbour predictions on the held-out prompts for each k of the grid, and the training keys."""
    keys, _ = router.embed(train_prompts)
    queries, _ = router.embed(heldout.prompts)
    return {k: neighbour_predictions(queries, keys, train_labels, k) for k in NEIGHBOURS}, keys


# ------------------------------------------------------------------------------------------------------------------
# Routed accuracy on evaluation documents, looked up from the static evaluations of the candidate sets


def lookup_results(set_evals: list[dict], choices: dict[str, np.ndarray], sets: Sequence[OmissionSet]) -> list:
    """TaskResults of a policy that sent document d of task t to set choices[t][d], from each set's per-document
    correctness on the same documents (`evals/setI.json`)."""
    from .evaluate import task_result
    from .tasks import get_task

    results = []
    for task_name, picked in choices.items():
        task = get_task(task_name)
        entries = [e["tasks"][task_name] for e in set_evals]
        per_doc = {}
        for metric in entries[0]["per_doc"]:
            table = np.array([[c == "1" for c in e["per_doc"][metric]] for e in entries], dtype=np.float64)
            per_doc[metric] = table[picked, np.arange(len(picked))]
        results.append(task_result(task, entries[0]["split"], per_doc, [sets[i] for i in picked], entries[0]["skipped_rows"]))
    return results
