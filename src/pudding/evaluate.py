"""Zero-shot evaluation: multiple-choice accuracy (acc, acc_norm) and perplexity, under any policy (`policy.py`).

A policy assigns an omission set to every document: one fixed set for dense and static pruning, the router's
choice for PuDDing, a per-prompt search for "SLEB per prompt". Each document is routed once, on its prompt, and all
its answers are scored under the chosen set; documents that share a set are scored together.
Many static sets are evaluated in one pass (`evaluate_sets`), which also yields two oracles: the accuracy if every
question were answered by whichever set in the pool gets it right (an upper bound), and the accuracy if every
question went to the set with the lowest tl of its right answer (what a router that predicted its labels perfectly
would pick).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import PuddingError
from .omission import OmissionSet
from .policy import Policy
from .progress import progress_bar
from .scoring import Scorer, Scores, perplexity, perplexity_requests
from .storage import atomic_write_json, environment
from .tasks import Doc, Task


def mean_stderr(values: np.ndarray) -> float:
    """Standard error of a mean (sample standard deviation over sqrt(n)), as lm-evaluation-harness reports it."""
    if len(values) < 2:
        return float("nan")
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


@dataclass
class TaskResult:
    task: str
    split: str
    n: int
    primary: str
    metrics: dict[str, float]  # acc, acc_norm, perplexity ...
    stderr: dict[str, float]
    skipped_rows: int = 0
    sets_used: dict[str, int] = field(default_factory=dict)  # omission set label -> documents scored under it
    notes: str = ""
    per_doc: dict[str, str] = field(default_factory=dict)  # metric -> "0110…", one digit per document (paired tests)

    @property
    def score(self) -> float:
        return self.metrics[self.primary]


@dataclass
class DocScores:
    """Per document: summed log-likelihood and token count of every answer, and the set it was scored under."""

    docs: list[Doc]
    loglikelihoods: list[np.ndarray]
    tokens: list[np.ndarray]
    sets: list[OmissionSet]

    def gold_task_likelihood(self) -> np.ndarray:
        """tl of the right answer per document (lower is better)."""
        return np.array([-ll[d.gold] / n[d.gold] for d, ll, n in zip(self.docs, self.loglikelihoods, self.tokens)])


def _split_by_doc(docs: Sequence[Doc], scores: Scores, members: Sequence[int], lls: list, tokens: list) -> None:
    offset = 0
    for i in members:
        width = len(docs[i].requests)
        lls[i] = scores.logprob[offset : offset + width]
        tokens[i] = scores.tokens[offset : offset + width]
        offset += width


def score_docs(scorer: Scorer, docs: Sequence[Doc], policy: Policy, label: str = "scoring") -> DocScores:
    sets = [choice.omit for choice in policy.choose([d.prompt for d in docs])]
    by_set: dict[OmissionSet, list[int]] = defaultdict(list)
    for i, omit in enumerate(sets):
        by_set[omit].append(i)
    prepared = {omit: scorer.prepare_texts([docs[i].requests for i in members]) for omit, members in by_set.items()}
    lls: list = [None] * len(docs)
    tokens: list = [None] * len(docs)
    with progress_bar(label, total=sum(p.num_tokens for p in prepared.values())) as advance:
        for omit, members in by_set.items():
            _split_by_doc(docs, scorer.score(prepared[omit], omit, advance), members, lls, tokens)
    return DocScores(list(docs), lls, tokens, sets)


def score_docs_under_sets(scorer: Scorer, docs: Sequence[Doc], sets: Sequence[OmissionSet], label: str) -> list[DocScores]:
    """Every document under every set, in one pass that shares the blocks the sets agree on."""
    prepared = scorer.prepare_texts([d.requests for d in docs])
    with progress_bar(f"{label} x{len(sets)} sets", total=prepared.num_tokens) as advance:
        all_scores = scorer.score_sets(prepared, sets, advance)
    out = []
    everyone = range(len(docs))
    for omit, scores in zip(sets, all_scores):
        lls: list = [None] * len(docs)
        tokens: list = [None] * len(docs)
        _split_by_doc(docs, scores, everyone, lls, tokens)
        out.append(DocScores(list(docs), lls, tokens, [omit] * len(docs)))
    return out


def answer_scores(scored: DocScores, metric: str) -> list[np.ndarray]:
    """Per document, what the metric compares across answers: acc the log-likelihood, acc_norm the log-likelihood
    per character of the answer (as lm-evaluation-harness)."""
    if metric == "acc":
        return list(scored.loglikelihoods)
    if metric == "acc_norm":
        return [ll / np.array([max(len(t), 1) for t in d.choice_texts], float)
                for d, ll in zip(scored.docs, scored.loglikelihoods)]
    raise ValueError(f"no per-answer scores for metric '{metric}'")


def correctness(scored: DocScores) -> dict[str, np.ndarray]:
    """Per document, 1 if the metric's pick (the answer with the highest score) is the right answer."""
    return {metric: np.array([np.argmax(s) == d.gold for d, s in zip(scored.docs, answer_scores(scored, metric))], float)
            for metric in ("acc", "acc_norm")}


def decision_margin(scored: DocScores, metric: str) -> np.ndarray:
    """Per document, the best wrong answer's score minus the right answer's under the metric: below zero exactly
    when the metric picks the right answer, and how far from flipping either way (lower is better)."""
    margins = []
    for d, s in zip(scored.docs, answer_scores(scored, metric)):
        wrong = np.delete(s, d.gold)
        margins.append(float(wrong.max() - s[d.gold]) if len(wrong) else float(-s[d.gold]))
    return np.array(margins)


def task_result(task: Task, split: str, per_doc: dict[str, np.ndarray], sets: Sequence[OmissionSet],
                skipped: int = 0) -> TaskResult:
    """A task's metrics from per-document correctness (one array per metric, in document order)."""
    keep = [m for m in task.metrics if m in per_doc]
    counts: dict[str, int] = defaultdict(int)
    for omit in sets:
        counts[omit.label()] += 1
    return TaskResult(
        task.name,
        split,
        len(per_doc[keep[0]]) if keep else 0,
        task.primary,
        {m: float(per_doc[m].mean()) for m in keep},
        {m: mean_stderr(per_doc[m]) for m in keep},
        skipped,
        dict(counts),
        task.notes,
        {m: "".join("1" if x else "0" for x in per_doc[m]) for m in keep},
    )


def _split_of(task: Task, docs: Sequence[Doc]) -> str:
    return docs[0].split if docs else task.eval_split


def evaluate_multiple_choice(scorer: Scorer, task: Task, docs: Sequence[Doc], policy: Policy, skipped: int = 0) -> TaskResult:
    scored = score_docs(scorer, docs, policy, task.name)
    return task_result(task, _split_of(task, docs), correctness(scored), scored.sets, skipped)


def evaluate_perplexity(scorer: Scorer, task: Task, omit: OmissionSet, limit: int | None, data_dir, window: int = 2048) -> TaskResult:
    text = task.text(data_dir=data_dir)
    ids = scorer.encoder.encode(text)
    window = min(window, scorer.max_length)
    groups = perplexity_requests(ids, window, limit)
    prepared = scorer.prepare(groups)
    with progress_bar(task.name, total=prepared.num_tokens) as advance:
        scores = scorer.score(prepared, omit, advance)
    value = perplexity(scores)
    return TaskResult(
        task.name, task.eval_split, len(groups), "perplexity", {"perplexity": value}, {"perplexity": float("nan")},
        0, {omit.label(): len(groups)}, f"{window}-token windows; " + task.notes,
    )


def evaluate_tasks(scorer: Scorer, tasks: Sequence[Task], doc_sets: dict, policy: Policy, limit: int | None,
                   data_dir) -> list[TaskResult]:
    """Every task in turn: multiple-choice tasks under the policy, perplexity tasks under its set (a fixed policy)."""
    results = []
    for task in tasks:
        if task.kind == "perplexity":
            if policy.fixed is None:
                raise PuddingError("perplexity tasks (wikitext2) can only be evaluated under one fixed omission set")
            results.append(evaluate_perplexity(scorer, task, policy.fixed, limit, data_dir))
            continue
        doc_set = doc_sets[task.name]
        docs = doc_set.docs[:limit] if limit else doc_set.docs
        results.append(evaluate_multiple_choice(scorer, task, docs, policy, doc_set.skipped))
    return results


ORACLES = ("oracle", "oracle-tl")


def oracle_description(name: str) -> dict:
    """How an oracle chose its sets, in the shape `Policy.describe` gives (it knows every set's answer, so it is a
    bound, not a policy)."""
    return {"kind": name, "blocks": None, "label": "per question"}


def evaluate_sets(scorer: Scorer, tasks: Sequence[Task], doc_sets: dict, sets: dict[str, OmissionSet],
                  limit: int | None) -> dict[str, list[TaskResult]]:
    """Several static sets on multiple-choice tasks in one pass each, plus the two oracles over the sets named
    `set…` (the candidate pool): "oracle" counts a question right if any set in the pool gets it right;
    "oracle-tl" answers each question with the set that gives its right answer the lowest tl."""
    names = list(sets)
    pool = [i for i, n in enumerate(names) if n.startswith("set")]
    results: dict[str, list[TaskResult]] = {n: [] for n in names + (list(ORACLES) if pool else [])}
    for task in tasks:
        doc_set = doc_sets[task.name]
        docs = doc_set.docs[:limit] if limit else doc_set.docs
        scored = score_docs_under_sets(scorer, docs, [sets[n] for n in names], task.name)
        split = _split_of(task, docs)
        per_set = [correctness(s) for s in scored]
        for name, s, c in zip(names, scored, per_set):
            results[name].append(task_result(task, split, c, s.sets, doc_set.skipped))
        if pool:
            any_right = {m: np.max([per_set[i][m] for i in pool], axis=0) for m in per_set[0]}
            results["oracle"].append(task_result(task, split, any_right, [], doc_set.skipped))
            tl = np.stack([scored[i].gold_task_likelihood() for i in pool])  # sets x docs
            pick = [pool[j] for j in np.argmin(tl, axis=0)]
            by_label = {m: np.array([per_set[p][m][d] for d, p in enumerate(pick)]) for m in per_set[0]}
            results["oracle-tl"].append(task_result(task, split, by_label, [sets[names[p]] for p in pick], doc_set.skipped))
    return results


def average(results: Sequence[TaskResult], metric: str | None = None) -> float | None:
    """Mean over accuracy tasks of their primary metric (the paper's convention) or of one named metric."""
    values = [r.metrics[metric or r.primary] for r in results if r.primary != "perplexity" and (metric or r.primary) in r.metrics]
    return float(np.mean(values)) if values else None


def results_document(
    model_info: dict, omission: dict, results: Sequence[TaskResult], settings: dict, seconds: float
) -> dict:
    return {
        "model": model_info,
        "omission": omission,
        "tasks": {r.task: asdict(r) for r in results},
        "average": {"paper": average(results), "acc": average(results, "acc")},
        "settings": settings,
        "versions": environment(),
        "seconds": round(seconds, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def write_results(path: Path, document: dict) -> None:
    atomic_write_json(path, document)
