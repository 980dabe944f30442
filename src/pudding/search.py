"""Candidate omission sets: the task-likelihood greedy search (PuDDing §5.1) and the static depth-pruning baselines.

Every method returns a `SearchResult` with the same fields, so any of them can be evaluated, stored in a bundle or
compared. The greedy search (SLEB-style) removes one block per step, the one whose removal hurts the loss least:

* `tl`  - task likelihood (eq. 9): mean NLL of the right answer given the prompt;
* `tld` - tl of the right answer minus tl of the wrong ones (eq. 10; with several wrong answers, their mean tl by
          default, or the most tempting one with `tld_reduce="min"`);
* `ppl` - perplexity of plain text (WikiText-2), which makes the search SLEB.

What makes the search cheap: a candidate that additionally removes block c changes nothing before c, so for each
batch the hidden state is carried forward through the current model once, and each candidate runs only the blocks
after it (about half the work of recomputing from the start). Samples are batched and packed (`scoring.py`), logits
are computed only at answer positions, and each step is checkpointed so a crash loses at most one step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .errors import PuddingError
from .omission import OmissionSet
from .progress import progress_bar
from .scoring import Accumulator, Prepared, Request, Scorer, Scores, perplexity_requests
from .storage import Checkpoint, read_json
from .tasks import get_task

LOSSES = ("tl", "tld", "ppl")
METHODS = ("greedy", "sleb", "shortened-ppl", "shortgpt")


# ------------------------------------------------------------------------------------------------------------------
# Calibration data


@dataclass
class Calibration:
    """The samples a loss is computed on, and where they came from."""

    task: str
    split: str
    loss: str
    seed: int
    indices: list[int]  # documents of the split (or windows of the text)
    groups: list[list[Request]] = field(repr=False)  # per sample: the right answer first, then the wrong ones
    tld_reduce: str = "mean"

    def provenance(self) -> dict:
        return {"task": self.task, "split": self.split, "loss": self.loss, "seed": self.seed,
                "samples": len(self.indices), "indices": self.indices,
                **({"tld_reduce": self.tld_reduce} if self.loss == "tld" else {})}


def calibration_set(scorer: Scorer, task_name: str, loss: str, samples: int, seed: int = 0,
                    seqlen: int = 2048, data_dir=None, tld_reduce: str = "mean") -> Calibration:
    if loss not in LOSSES:
        raise PuddingError(f"unknown loss '{loss}' (use {', '.join(LOSSES)})")
    if samples < 1:
        raise PuddingError("need at least one calibration sample")
    task = get_task(task_name)
    split = task.require_calibration_split()
    if loss == "ppl" and task.kind == "perplexity":
        ids = scorer.encoder.encode(task.text(split, data_dir))
        windows = perplexity_requests(ids, seqlen)
        if samples > len(windows):
            raise PuddingError(f"{task_name} has {len(windows)} windows of {seqlen} tokens, fewer than the {samples} asked for")
        picked = sorted(np.random.default_rng(seed).choice(len(windows), samples, replace=False).tolist())
        return Calibration(task_name, split, loss, seed, picked, [windows[i] for i in picked])
    if task.kind != "multiple_choice":
        raise PuddingError(f"the {loss} loss needs a question-answering task, not the text corpus {task_name}")
    docs, indices = task.sample(split, samples, seed, data_dir)
    groups = []
    orders = [[doc.gold] + [i for i in range(len(doc.requests)) if i != doc.gold] for doc in docs]
    tokenized = scorer.encoder.groups([[doc.requests[i] for i in order] for doc, order in zip(docs, orders)])
    for requests in tokenized:
        if loss == "tl":
            requests = requests[:1]
        elif loss == "ppl":  # "batch perplexity" on task data: every token of prompt and right answer
            full = requests[0].context + requests[0].continuation
            requests = [Request(full[:1], full[1:])]
        groups.append(requests)
    if tld_reduce not in ("mean", "min"):
        raise PuddingError(f"unknown tld reduction '{tld_reduce}' (use mean or min)")
    return Calibration(task_name, split, loss, seed, indices, groups, tld_reduce)


def loss_function(calibration: Calibration) -> Callable[[Scores], float]:
    """Maps the scores of every calibration request to the loss being minimised (lower is better)."""
    sizes = [len(g) for g in calibration.groups]
    starts = np.cumsum([0] + sizes[:-1])
    if calibration.loss == "ppl":
        return lambda s: float(-s.logprob.sum() / s.tokens.sum())  # log perplexity: same ranking, no overflow
    if calibration.loss == "tl":
        return lambda s: float(s.task_likelihood().mean())
    reduce = np.mean if calibration.tld_reduce == "mean" else np.min

    def tld(scores: Scores) -> float:
        tl = scores.task_likelihood()
        return float(np.mean([tl[a] - reduce(tl[a + 1 : a + n]) for a, n in zip(starts, sizes)]))

    return tld


# ------------------------------------------------------------------------------------------------------------------
# Candidate evaluation with prefix reuse


def candidate_scores(scorer: Scorer, prepared: Prepared, base: OmissionSet, candidates: Sequence[int], advance=None) -> dict[int, Scores]:
    """Scores of every request under `base` plus one more omitted block, for each candidate block.

    Blocks before the candidate are shared with the current model: one hidden state per batch walks forward through
    the current model, and each candidate forks from it, skips its block and runs the rest.
    """
    totals = {c: Accumulator(prepared.num_requests, scorer.decoder.device) for c in candidates}
    kept = base.kept()
    for batch in prepared.batches:
        with torch.inference_mode():
            hidden = scorer.embed(batch)
            position = 0  # hidden is the input of kept[position]
            for block in sorted(candidates):
                while kept[position] < block:
                    hidden = scorer.run(batch, hidden, [kept[position]])
                    position += 1
                final = scorer.run(batch, hidden, kept[position + 1 :])
                totals[block].add(batch, *scorer.read_out(batch, final))
                if advance:
                    advance(batch.num_tokens)
    return {c: acc.result() for c, acc in totals.items()}


# ------------------------------------------------------------------------------------------------------------------
# Results and checkpoints


@dataclass
class SearchResult:
    method: str
    blocks: list[int]  # the omission set, sorted
    removal_order: list[int]  # in the order the search removed them (one-shot methods: by importance)
    loss_after_step: list[float]  # greedy: the loss once each block is gone; one-shot: each block's own score
    calibration: dict
    model: dict
    k: int
    seconds: float = 0.0
    candidate_losses: list[dict[str, float]] = field(default_factory=list)  # per step: block -> loss
    settings: dict = field(default_factory=dict)

    def omission(self) -> OmissionSet:
        return OmissionSet(self.blocks, self.model["num_blocks"])

    def prefix(self, k: int) -> SearchResult:
        """The same search stopped at k blocks. A greedy search for fewer blocks is the first steps of one for more
        (same calibration data, same deterministic choices), and a one-shot ranking keeps its k least important
        blocks: so one search at the largest k serves every smaller k."""
        if k > self.k:
            raise PuddingError(f"a search that removed {self.k} blocks cannot give a set of {k}")
        if k == self.k:
            return self
        order = self.removal_order[:k]
        greedy = self.method in ("greedy", "sleb")
        return replace(self, blocks=sorted(order), removal_order=order, loss_after_step=self.loss_after_step[:k], k=k,
                       candidate_losses=self.candidate_losses[:k] if greedy else self.candidate_losses,
                       settings={**self.settings, "k": k} if self.settings else self.settings)

    def same_search(self, spec_settings: dict, fingerprint: str) -> bool:
        """Whether this result is the search `spec_settings` asks for, or a longer run of it (same everything but a
        larger k), on the same model."""
        if self.model.get("fingerprint") != fingerprint or not self.settings:
            return False
        mine = {n: v for n, v in self.settings.items() if n != "k"}
        wanted = {n: v for n, v in spec_settings.items() if n != "k"}
        return mine == wanted and self.k >= spec_settings["k"]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SearchResult:
        return cls(**data)


def load_search(path: Path) -> SearchResult:
    data = read_json(path, "search result")
    try:
        return SearchResult.from_json(data)
    except TypeError:
        raise PuddingError(f"{path} is not a pudding search result") from None


# ------------------------------------------------------------------------------------------------------------------
# Methods


def default_k(num_blocks: int) -> int:
    """20% of the blocks, rounded: the paper's 7 of 32; 6 of 30 for SmolLM2-135M, 5 of 24 for Qwen2.5-0.5B."""
    return max(1, round(0.2 * num_blocks))


def check_k(k: int, num_blocks: int) -> None:
    if k < 1:
        raise PuddingError("the number of blocks to remove must be at least 1")
    if k >= num_blocks:
        raise PuddingError(f"cannot remove {k} blocks: this model has {num_blocks}, and at least one must remain")


def greedy_search(scorer: Scorer, calibration: Calibration, k: int, model_info: dict, method: str = "greedy",
                  checkpoint: Path | None = None, evaluator=None, log=None) -> SearchResult:
    """Remove k blocks one at a time, each time the one whose removal gives the lowest loss."""
    num_blocks = scorer.decoder.num_blocks
    check_k(k, num_blocks)
    loss_of = loss_function(calibration)
    prepared = scorer.prepare(calibration.groups)
    identity = {"method": method, "k": k, "model": model_info["fingerprint"], "calibration": calibration.provenance()}
    store = Checkpoint(checkpoint, identity)
    state = store.load()
    steps: list[dict] = state["steps"] if state else []
    if steps and log:
        log(f"resuming from {checkpoint}: {len(steps)} of {k} steps done")
    started = time.perf_counter() - sum(s.get("seconds", 0.0) for s in steps)
    evaluate = evaluator or (lambda base, cands, advance: candidate_scores(scorer, prepared, base, cands, advance))
    omit = OmissionSet([s["removed"] for s in steps], num_blocks)
    work = sum(num_blocks - len(omit) - i for i in range(len(steps), k)) * prepared.num_tokens
    with progress_bar(f"search {calibration.task}/{calibration.loss}", total=work) as advance:
        for _ in range(len(steps), k):
            step_start = time.perf_counter()
            candidates = omit.kept()
            scores = evaluate(omit, candidates, advance)
            losses = {c: loss_of(s) for c, s in scores.items()}
            best = min(candidates, key=lambda c: (losses[c], c))  # ties: the lower block, deterministically
            omit = omit.with_block(best)
            steps.append({"removed": best, "loss": losses[best], "candidates": {str(c): losses[c] for c in candidates},
                          "seconds": time.perf_counter() - step_start})
            store.save(steps)
            if log:
                log(f"  step {len(steps)}: removed block {best} (loss {losses[best]:.4f})")
    result = SearchResult(
        method=method,
        blocks=sorted(s["removed"] for s in steps),
        removal_order=[s["removed"] for s in steps],
        loss_after_step=[s["loss"] for s in steps],
        calibration=calibration.provenance(),
        model=model_info,
        k=k,
        seconds=round(time.perf_counter() - started, 2),
        candidate_losses=[s["candidates"] for s in steps],
    )
    return result


def one_shot_ppl(scorer: Scorer, calibration: Calibration, k: int, model_info: dict, evaluator=None) -> SearchResult:
    """Shortened LLaMA (PPL criterion, no LoRA): score every block removed alone, drop the k least important."""
    num_blocks = scorer.decoder.num_blocks
    check_k(k, num_blocks)
    loss_of = loss_function(calibration)
    prepared = scorer.prepare(calibration.groups)
    started = time.perf_counter()
    dense = OmissionSet.dense(num_blocks)
    evaluate = evaluator or (lambda base, cands, advance: candidate_scores(scorer, prepared, base, cands, advance))
    with progress_bar("shortened-ppl", total=num_blocks * prepared.num_tokens) as advance:
        losses = {c: loss_of(s) for c, s in evaluate(dense, list(range(num_blocks)), advance).items()}
    order = sorted(range(num_blocks), key=lambda c: (losses[c], c))[:k]
    return SearchResult("shortened-ppl", sorted(order), order, [losses[c] for c in order], calibration.provenance(),
                        model_info, k, round(time.perf_counter() - started, 2), [{str(c): v for c, v in losses.items()}])


def block_influence(scorer: Scorer, prepared: Prepared) -> np.ndarray:
    """ShortGPT's block influence per block: 1 - mean cosine similarity between a block's input and output hidden
    states, over all real tokens. Both are the raw residual stream: the output of the last block is taken before
    the final norm (the last hidden state transformers returns is already normalised)."""
    decoder = scorer.decoder
    sums = torch.zeros(decoder.num_blocks, dtype=torch.float64)
    count = 0
    with torch.inference_mode():
        for batch in prepared.batches:
            real = batch.layout.group >= 0
            hidden = scorer.embed(batch)
            for b in range(decoder.num_blocks):
                out = scorer.run(batch, hidden, [b])
                cos = torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1)
                sums[b] += cos[real].double().sum().cpu()
                hidden = out
            count += int(real.sum())
    return 1.0 - (sums / count).numpy()


def shortgpt(scorer: Scorer, calibration: Calibration, k: int, model_info: dict) -> SearchResult:
    num_blocks = scorer.decoder.num_blocks
    check_k(k, num_blocks)
    started = time.perf_counter()
    influence = block_influence(scorer, scorer.prepare(calibration.groups))
    order = sorted(range(num_blocks), key=lambda b: (influence[b], b))[:k]
    return SearchResult("shortgpt", sorted(order), order, [float(influence[b]) for b in order], calibration.provenance(),
                        model_info, k, round(time.perf_counter() - started, 2),
                        [{str(b): float(v) for b, v in enumerate(influence)}])


# ------------------------------------------------------------------------------------------------------------------
# One entry point for every method

BASELINE_CORPUS = "wikitext2"  # SLEB, Shortened LLaMA (BookCorpus in its paper) and ShortGPT calibrate on plain text


@dataclass
class SearchSpec:
    method: str = "greedy"
    task: str | None = None  # greedy: the task to calibrate on; baselines: a text corpus (default wikitext2)
    loss: str = "tl"  # greedy only; baselines use perplexity
    k: int = 6
    samples: int = 128
    seed: int = 0
    seqlen: int = 2048  # tokens per text window (baselines)
    tld_reduce: str = "mean"

    def validate(self, num_blocks: int) -> None:
        if self.method not in METHODS:
            raise PuddingError(f"unknown method '{self.method}' (use {', '.join(METHODS)})")
        if self.loss not in LOSSES:
            raise PuddingError(f"unknown loss '{self.loss}' (use {', '.join(LOSSES)})")
        check_k(self.k, num_blocks)
        if self.samples < 1:
            raise PuddingError("--samples must be at least 1")
        if self.seqlen < 2:
            raise PuddingError("--seqlen must be at least 2")
        if self.tld_reduce not in ("mean", "min"):
            raise PuddingError(f"unknown tld reduction '{self.tld_reduce}' (use mean or min)")
        if self.method == "greedy" and self.task is None:
            raise PuddingError("the greedy search needs a --task to calibrate on")

    def calibration(self, scorer: Scorer, data_dir=None) -> Calibration:
        if self.method == "greedy":
            return calibration_set(scorer, self.task, self.loss, self.samples, self.seed, self.seqlen, data_dir, self.tld_reduce)
        return calibration_set(scorer, self.task or BASELINE_CORPUS, "ppl", self.samples, self.seed, self.seqlen, data_dir)


def run_search(spec: SearchSpec, scorer: Scorer, model_info: dict, data_dir=None, checkpoint: Path | None = None,
               evaluator_factory=None, log=None) -> SearchResult:
    """Run any method. `evaluator_factory(calibration)` may supply a distributed candidate evaluator (Ray)."""
    spec.validate(scorer.decoder.num_blocks)
    calibration = spec.calibration(scorer, data_dir)
    evaluator = evaluator_factory(calibration) if evaluator_factory else None
    if spec.method in ("greedy", "sleb"):
        result = greedy_search(scorer, calibration, spec.k, model_info, spec.method, checkpoint, evaluator, log)
    elif spec.method == "shortened-ppl":
        result = one_shot_ppl(scorer, calibration, spec.k, model_info, evaluator)
    else:
        result = shortgpt(scorer, calibration, spec.k, model_info)
    result.settings = asdict(spec)
    return result


# ------------------------------------------------------------------------------------------------------------------
# SLEB per prompt


def per_prompt_search(scorer: Scorer, prompts: Sequence[Sequence[int]], k: int, prompts_per_pass: int = 64,
                      advance=None) -> list[OmissionSet]:
    """The paper's "SLEB per prompt": for each prompt alone, the greedy search with that prompt's perplexity as
    the loss. Searches of different prompts are independent, so they share forward passes: every (prompt,
    candidate) pair is one row that runs under its own omission set (`PrunableDecoder.run_blocks_per_row`)."""
    decoder = scorer.decoder
    num_blocks = decoder.num_blocks
    check_k(k, num_blocks)
    chosen: list[OmissionSet] = []
    for start in range(0, len(prompts), prompts_per_pass):
        chunk = [tuple(p) for p in prompts[start : start + prompts_per_pass]]
        if any(len(p) < 2 for p in chunk):
            raise PuddingError("SLEB per prompt needs prompts of at least two tokens")
        sets = [OmissionSet.dense(num_blocks) for _ in chunk]
        for _ in range(k):
            rows = [(i, c) for i, omit in enumerate(sets) for c in omit.kept()]
            prepared = scorer.prepare([[Request(chunk[i][:1], chunk[i][1:])] for i, _ in rows])
            keep = torch.ones(len(rows), num_blocks, dtype=torch.bool)
            for r, (i, c) in enumerate(rows):
                keep[r, [*sets[i], c]] = False
            keep = keep.to(decoder.device)
            totals = Accumulator(len(rows), decoder.device)
            with torch.inference_mode():
                for batch in prepared.batches:
                    hidden = scorer.embed(batch)
                    hidden = decoder.run_blocks_per_row(hidden, keep[batch.row_group], scorer.context(batch, hidden))
                    totals.add(batch, *scorer.read_out(batch, hidden))
                    if advance:
                        advance(batch.num_tokens)
            nll = totals.result().task_likelihood()
            best: dict[int, tuple[float, int]] = {}
            for r, (i, c) in enumerate(rows):
                if i not in best or (nll[r], c) < best[i]:
                    best[i] = (nll[r], c)
            sets = [omit.with_block(best[i][1]) for i, omit in enumerate(sets)]
        chosen.extend(sets)
    return chosen
