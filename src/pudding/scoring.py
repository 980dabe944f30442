"""The scoring engine: log-likelihoods of (context, continuation) pairs under a model and an omission set.

Three things make it fast, and all three are about not doing work:

* **shared contexts once** - the answers of a multiple-choice question share their context. A group of requests is
  packed into one row: the tokens they have in common, then each request's own tail. Tails see the shared part and
  themselves, never each other (see `decoder.TokenLayout`), so every log-probability equals the one from scoring the
  request alone, while the context is computed once instead of once per answer.
* **batched by length** - rows are sorted by length and cut into batches under a token budget, so there is little
  padding and few forward passes.
* **logits only where scored** - the final norm and the vocabulary projection run only at positions that predict a
  continuation token, not at every position.

On top of it: task likelihood (tl, eq. 9), its difference form (tld, eq. 10), perplexity.
"""

from __future__ import annotations

import contextlib

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .decoder import BlockContext, PrunableDecoder, TokenLayout
from .omission import OmissionSet


@dataclass(frozen=True)
class Request:
    """One tokenized (context, continuation) pair: score log p(continuation | context)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class Scores:
    """Per request: summed log-probability of the continuation, its token count, whether greedy decoding gives it."""

    logprob: np.ndarray
    tokens: np.ndarray
    greedy: np.ndarray

    def task_likelihood(self) -> np.ndarray:
        """tl: mean negative log-likelihood of the continuation tokens (eq. 9). Lower is better."""
        return -self.logprob / self.tokens


# ------------------------------------------------------------------------------------------------------------------
# Tokenization (the rules of lm-evaluation-harness, so that accuracies are comparable)


class Encoder:
    """Turns strings into `Request`s the way the harness does, memoising repeated strings."""

    def __init__(self, tokenizer, add_bos: bool = False) -> None:
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        self.prefix: tuple[int, ...] = (bos,) if add_bos and bos is not None else ()
        # An empty context still needs one token to predict from: BOS, else end-of-text.
        fallback = bos if bos is not None else tokenizer.eos_token_id
        self.empty_context: tuple[int, ...] = self.prefix or (fallback,)
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> tuple[int, ...]:
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._cache[text] = ids
        return ids

    def encode_many(self, texts) -> None:
        """Tokenize many strings in one call (the fast tokenizers batch in Rust), filling the cache."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for start in range(0, len(missing), 4096):
            chunk = missing[start : start + 4096]
            for text, ids in zip(chunk, self.tokenizer(chunk, add_special_tokens=False)["input_ids"]):
                self._cache[text] = tuple(ids)

    def text(self, text: str) -> tuple[int, ...]:
        """A whole text as the model should see it (with BOS where the family needs one)."""
        return self.prefix + self.encode(text)

    def pair(self, context: str, continuation: str) -> Request:
        # Trailing spaces of the context belong to the continuation (the harness moves them there).
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.encode(context) if context else ()
        if not context_ids:  # no context, or one the tokenizer drops entirely: predict from BOS / end-of-text
            return Request(self.empty_context, self.encode(continuation))
        whole = self.encode(context + continuation)
        return Request(self.prefix + context_ids, whole[len(context_ids) :])

    def pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Request]:
        return [self.pair(c, x) for c, x in pairs]

    def groups(self, groups: Sequence[Sequence[tuple[str, str]]]) -> list[list[Request]]:
        """Many groups of pairs, tokenized in batches first."""
        texts = []
        for group in groups:
            for context, continuation in group:
                spaces = len(context) - len(context.rstrip())
                if spaces:
                    context, continuation = context[:-spaces], context[-spaces:] + continuation
                texts += [context, context + continuation] if context else [continuation]
        self.encode_many(texts)
        return [self.pairs(g) for g in groups]


# ------------------------------------------------------------------------------------------------------------------
# Packing


@dataclass
class PackedBatch:
    """Rows of packed groups, plus where each scored token sits and what it should be."""

    input_ids: torch.Tensor  # (rows, length)
    layout: TokenLayout
    score_row: torch.Tensor  # (scored tokens,) row of the position whose logits predict the token
    score_col: torch.Tensor  # ... and its column
    score_target: torch.Tensor  # the token to score
    score_request: torch.Tensor  # index of its request in the prepared list
    row_group: torch.Tensor  # (rows,) index of the group each row holds
    num_tokens: int  # non-padding tokens, for throughput figures
    _context: BlockContext | None = field(default=None, repr=False)


@dataclass
class Prepared:
    """Requests tokenized, grouped, packed and batched; reusable across omission sets."""

    batches: list[PackedBatch]
    num_requests: int
    group_of: list[int]  # request -> group index

    @property
    def num_tokens(self) -> int:
        return sum(b.num_tokens for b in self.batches)


def _common_prefix(sequences: list[tuple[int, ...]]) -> int:
    if len(sequences) == 1:
        return len(sequences[0])
    return len(os.path.commonprefix(sequences))


@dataclass
class _PackedGroup:
    index: int
    tokens: list[int]
    branch: list[int]
    position: list[int]
    scored: list[tuple[int, int, int]]  # (column, target token, request index)


def _truncate(request: Request, max_length: int) -> Request:
    """Keep the last max_length + 1 tokens of context + continuation, as the harness does."""
    overflow = len(request.context) + len(request.continuation) - 1 - max_length
    if overflow <= 0:
        return request
    if overflow >= len(request.context):
        raise ValueError("continuation longer than the model's context window")
    return Request(request.context[overflow:], request.continuation)


def _pack_group(requests: list[Request], first_index: int, group_index: int) -> _PackedGroup:
    # The last token of a sequence is only ever a target, never an input.
    inputs = [r.context + r.continuation[:-1] for r in requests]
    shared = _common_prefix(inputs)
    tokens, branch, position = list(inputs[0][:shared]), [0] * shared, list(range(shared))
    scored = []
    for offset, (request, seq) in enumerate(zip(requests, inputs)):
        tail_start = len(tokens)
        tail = seq[shared:]
        tokens.extend(tail)
        branch.extend([offset + 1] * len(tail))
        position.extend(range(shared, len(seq)))
        full = request.context + request.continuation
        for j in range(len(request.context) - 1, len(full) - 1):  # position j predicts token j + 1
            column = j if j < shared else tail_start + (j - shared)
            scored.append((column, full[j + 1], first_index + offset))
    return _PackedGroup(group_index, tokens, branch, position, scored)


def _batch_groups(groups: list[_PackedGroup], max_batch_tokens: int, device) -> list[PackedBatch]:
    order = sorted(range(len(groups)), key=lambda g: -len(groups[g].tokens))
    batches, start = [], 0
    while start < len(order):
        length = len(groups[order[start]].tokens)
        rows = max(1, max_batch_tokens // max(length, 1))
        chosen = [groups[g] for g in order[start : start + rows]]
        batches.append(_make_batch(chosen, length, device))
        start += rows
    return batches


def _make_batch(chosen: list[_PackedGroup], length: int, device) -> PackedBatch:
    ids, group, branch, position, score = [], [], [], [], []
    for r, packed in enumerate(chosen):
        pad = length - len(packed.tokens)
        ids += packed.tokens + [0] * pad
        group += [0] * len(packed.tokens) + [-1] * pad
        branch += packed.branch + [0] * pad
        position += packed.position + [0] * pad
        score += [(r, col, target, req) for col, target, req in packed.scored]
    shape = (len(chosen), length)
    s = torch.tensor(score, dtype=torch.long).reshape(-1, 4).to(device)
    group_tensor = torch.tensor(group).view(shape)
    return PackedBatch(
        torch.tensor(ids).view(shape).to(device),
        TokenLayout(group_tensor.to(device), torch.tensor(branch).view(shape).to(device), torch.tensor(position).view(shape).to(device)),
        s[:, 0], s[:, 1], s[:, 2], s[:, 3],
        torch.tensor([p.index for p in chosen], device=device),
        int((group_tensor >= 0).sum()),
    )


# ------------------------------------------------------------------------------------------------------------------
# The engine


class Scorer:
    """Scores requests under any omission set of one model."""

    def __init__(self, decoder: PrunableDecoder, tokenizer, max_batch_tokens: int | None = None, max_length: int | None = None):
        self.decoder = decoder
        self.encoder = Encoder(tokenizer, add_bos=decoder.arch.bos)
        on_gpu = decoder.device.type == "cuda"
        self.max_batch_tokens = max_batch_tokens or (16384 if on_gpu else 2048)
        window = getattr(decoder.config, "max_position_embeddings", None) or 4096
        self.max_length = max_length or min(window, 4096)
        self.max_logit_rows = 4096  # scored positions per vocabulary projection, bounds the logits' memory
        self.adapters = None  # a bundle's LoRA adapters (`lora.AdapterStore`): each set is scored with its own

    def use_adapters(self, store, sets=()) -> None:
        """Score each omission set with its LoRA adapter from `store` (a bundle's `lora.AdapterStore`; None: without
        adapters). The sets named must have one: a missing adapter is refused now, not hours into a run."""
        if store is not None:
            store.for_sets(sets)
        self.adapters = store

    @contextlib.contextmanager
    def adapters_applied(self, store, sets=()):
        """`use_adapters` for the duration of a block, then the scorer as it was."""
        previous = self.adapters
        self.use_adapters(store, sets)
        try:
            yield self
        finally:
            self.adapters = previous

    def adapted(self, omit: OmissionSet):
        """While scoring under `omit`: its LoRA adapter applied, if the scorer has adapters."""
        return contextlib.nullcontext() if self.adapters is None else self.adapters.applied(self.decoder.blocks, omit)

    def prepare(self, groups: Sequence[Sequence[Request]]) -> Prepared:
        """Pack groups of requests that share a context (e.g. the answers of one question)."""
        packed, group_of, index = [], [], 0
        for g, group in enumerate(groups):
            requests = [_truncate(r, self.max_length) for r in group]
            packed.append(_pack_group(requests, index, g))
            group_of.extend([g] * len(requests))
            index += len(requests)
        return Prepared(_batch_groups(packed, self.max_batch_tokens, self.decoder.device), index, group_of)

    def prepare_texts(self, groups: Sequence[Sequence[tuple[str, str]]]) -> Prepared:
        return self.prepare(self.encoder.groups(groups))

    # -- pieces used by the search, which resumes from cached hidden states ------------------------------------

    def context(self, batch: PackedBatch, like: torch.Tensor) -> BlockContext:
        if batch._context is None:
            batch._context = self.decoder.context(batch.layout, like)
        return batch._context

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.decoder.embed(batch.input_ids, batch.layout)

    @torch.inference_mode()
    def run(self, batch: PackedBatch, hidden: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
        return self.decoder.run_blocks(hidden, blocks, self.context(batch, hidden))

    @torch.inference_mode()
    def read_out(self, batch: PackedBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability and greedy hit of every scored token, from the last hidden states."""
        picked = hidden[batch.score_row, batch.score_col]
        if picked.shape[0] == 0:  # continuations that tokenize to nothing (e.g. a lone control character)
            return picked.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=picked.device)
        logprobs, greedy = [], []
        for start in range(0, picked.shape[0], self.max_logit_rows):
            logits = self.decoder.logits(picked[start : start + self.max_logit_rows])
            target = batch.score_target[start : start + self.max_logit_rows, None]
            logprobs.append(logits.log_softmax(-1).gather(1, target).squeeze(1))
            greedy.append(logits.argmax(-1) == target.squeeze(1))
        return torch.cat(logprobs), torch.cat(greedy)

    # -- whole scoring ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, prepared: Prepared, omit: OmissionSet, progress=None) -> Scores:
        kept = omit.kept()
        totals = Accumulator(prepared.num_requests, self.decoder.device)
        with self.adapted(omit):
            for batch in prepared.batches:
                hidden = self.run(batch, self.embed(batch), kept)
                totals.add(batch, *self.read_out(batch, hidden))
                if progress is not None:
                    progress(batch.num_tokens)
        return totals.result()

    @torch.inference_mode()
    def score_sets(self, prepared: Prepared, sets: Sequence[OmissionSet], progress=None) -> list[Scores]:
        """Scores under several omission sets in one pass over the data.

        The sets form a prefix tree over the blocks: wherever sets agree about a block (kept or skipped) they share
        its computation, and they fork only where they differ. Identical sets cost nothing extra.
        """
        if self.adapters is not None:  # each set adapts the blocks differently: nothing is shared
            scores = [self.score(prepared, omit) for omit in sets]
            if progress is not None:
                progress(prepared.num_tokens)
            return scores
        keep = [[b not in omit for b in range(self.decoder.num_blocks)] for omit in sets]
        totals = [Accumulator(prepared.num_requests, self.decoder.device) for _ in sets]
        for batch in prepared.batches:
            self._descend(batch, self.embed(batch), 0, list(range(len(sets))), keep, totals)
            if progress is not None:
                progress(batch.num_tokens)
        return [t.result() for t in totals]

    def _descend(self, batch: PackedBatch, hidden: torch.Tensor, block: int, members: list[int], keep, totals) -> None:
        num_blocks = self.decoder.num_blocks
        while block < num_blocks and len({keep[m][block] for m in members}) == 1:
            if keep[members[0]][block]:
                hidden = self.run(batch, hidden, [block])
            block += 1
        if block == num_blocks:
            logprob, greedy = self.read_out(batch, hidden)
            for m in members:
                totals[m].add(batch, logprob, greedy)
            return
        keepers = [m for m in members if keep[m][block]]
        skippers = [m for m in members if not keep[m][block]]
        self._descend(batch, self.run(batch, hidden, [block]), block + 1, keepers, keep, totals)
        self._descend(batch, hidden, block + 1, skippers, keep, totals)

    def loglikelihoods(self, groups: Sequence[Sequence[Request]], omit: OmissionSet) -> Scores:
        return self.score(self.prepare(groups), omit)


class Accumulator:
    """Sums per-token results into per-request totals."""

    def __init__(self, num_requests: int, device) -> None:
        self.logprob = torch.zeros(num_requests, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(num_requests, dtype=torch.long, device=device)
        self.misses = torch.zeros(num_requests, dtype=torch.long, device=device)

    def add(self, batch: PackedBatch, logprob: torch.Tensor, greedy: torch.Tensor) -> None:
        self.logprob.index_add_(0, batch.score_request, logprob.double())
        self.tokens.index_add_(0, batch.score_request, torch.ones_like(batch.score_request))
        self.misses.index_add_(0, batch.score_request, (~greedy).long())

    def result(self) -> Scores:
        return Scores(self.logprob.cpu().numpy(), self.tokens.cpu().numpy(), (self.misses == 0).cpu().numpy())


# ------------------------------------------------------------------------------------------------------------------
# Losses built on the engine


def tld(correct_tl: np.ndarray, wrong_tl: list[np.ndarray], reduce: str = "mean") -> np.ndarray:
    """Task likelihood difference (eq. 10): tl of the right answer minus tl of the wrong ones.

    With several wrong answers, "mean" subtracts their mean tl (default: every wrong answer counts) and "min"
    subtracts the smallest one (the most tempting wrong answer: a margin loss).
    """
    reducer = {"mean": np.mean, "min": np.min}[reduce]
    return np.array([c - reducer(w) for c, w in zip(correct_tl, wrong_tl)])


def perplexity_requests(token_ids: Sequence[int], window: int, limit: int | None = None) -> list[list[Request]]:
    """Non-overlapping windows of `window` tokens; within each, every token after the first is predicted."""
    groups = []
    for start in range(0, len(token_ids) - window + 1, window):
        chunk = tuple(token_ids[start : start + window])
        groups.append([Request(chunk[:1], chunk[1:])])
        if limit is not None and len(groups) >= limit:
            break
    return groups


def perplexity(scores: Scores) -> float:
    return float(np.exp(-scores.logprob.sum() / scores.tokens.sum()))
