"""The research code's way of scoring an answer, the baseline the speed benchmarks compare against: the pruned model
recomputed from the first block for each (prompt, answer) pair, batch 1, logits over the whole vocabulary at every
position."""

from __future__ import annotations

import torch


def answer_logprob(decoder, request, omit, device) -> float:
    """Sum of the log-probabilities of the answer's tokens after its context, under `omit`."""
    full = request.context + request.continuation
    with torch.inference_mode():
        logprobs = decoder.full_logits(torch.tensor([full[:-1]], device=device), omit).float()[0].log_softmax(-1)
    span = torch.arange(len(request.context) - 1, len(full) - 1, device=device)
    target = torch.tensor(full[len(request.context):], device=device)
    return float(logprobs[span, target].sum())
