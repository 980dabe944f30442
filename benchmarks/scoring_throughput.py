"""Scoring throughput: pudding's packed engine against the plain approach of the paper's code.

The plain approach scores every (question, answer) pair on its own: one sequence per forward pass through the
transformers model, logits over the whole vocabulary at every position, then the answer's log-probability is read
off. pudding packs the answers of a question behind one copy of the question, batches by length, and projects to the
vocabulary only where an answer token is predicted. Both must give the same log-likelihoods; the script checks it.

    python benchmarks/scoring_throughput.py --docs 300 --output results/scoring-throughput-cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from provenance import provenance, save

from pudding.models import load_decoder
from pudding.scoring import Scorer
from pudding.tasks import get_task


def plain_scores(model, requests, device) -> list[float]:
    """The paper code's way: batch 1, full logits, per (context, continuation) pair."""
    totals = []
    with torch.inference_mode():
        for request in requests:
            full = request.context + request.continuation
            logits = model(torch.tensor([full[:-1]], device=device)).logits[0].float()
            logprobs = logits.log_softmax(-1)
            span = torch.arange(len(request.context) - 1, len(full) - 1, device=device)
            targets = torch.tensor(full[len(request.context):], device=device)
            totals.append(float(logprobs[span, targets].sum()))
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--docs", type=int, default=300, help="first N documents of the evaluation split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    loaded = load_decoder(args.model, device=args.device)
    docs = get_task(args.task).docs().docs[: args.docs]
    scorer = Scorer(loaded.decoder, loaded.tokenizer, max_batch_tokens=args.batch_tokens)
    num_answers = sum(len(d.requests) for d in docs)

    # warm-up (allocator, kernels) on a few documents, for both methods
    scorer.score(scorer.prepare_texts([d.requests for d in docs[:4]]), loaded.decoder.omission())
    plain_scores(loaded.model, scorer.encoder.pairs(docs[0].requests), args.device)

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    prepared = scorer.prepare_texts([d.requests for d in docs])  # tokenization and packing count too
    packed = scorer.score(prepared, loaded.decoder.omission())
    sync()
    packed_seconds = time.perf_counter() - start

    requests = [r for d in docs for r in scorer.encoder.pairs(d.requests)]
    sync()
    start = time.perf_counter()
    plain = plain_scores(loaded.model, requests, args.device)
    sync()
    plain_seconds = time.perf_counter() - start

    difference = float(np.max(np.abs(np.array(plain) - packed.logprob)))
    offsets = np.cumsum([0] + [len(d.requests) for d in docs])
    agree = sum(
        int(np.argmax(packed.logprob[a:b]) == np.argmax(plain[a:b])) for a, b in zip(offsets[:-1], offsets[1:])
    )
    plain_tokens = sum(len(r.context) + len(r.continuation) - 1 for r in requests)
    result = {
        "benchmark": "scoring throughput (scored answers per second)",
        **provenance(args),
        "model": {"name": loaded.name, "fingerprint": loaded.fingerprint, "dtype": str(loaded.decoder.dtype)},
        "task": args.task, "documents": len(docs), "answers": num_answers,
        "pudding": {"seconds": round(packed_seconds, 2), "answers_per_second": round(num_answers / packed_seconds, 2),
                    "forward_tokens": prepared.num_tokens, "forward_passes": len(prepared.batches)},
        "plain": {"seconds": round(plain_seconds, 2), "answers_per_second": round(num_answers / plain_seconds, 2),
                  "forward_tokens": plain_tokens, "forward_passes": len(requests)},
        "speedup": round(plain_seconds / packed_seconds, 2),
        "max_abs_loglikelihood_difference": difference,
        "same_prediction": f"{agree}/{len(docs)}",
    }
    save(result, args.output)
    print(f"\n{'method':10s} {'answers/s':>10s} {'seconds':>8s} {'tokens':>8s}")
    for name in ("plain", "pudding"):
        r = result[name]
        print(f"{name:10s} {r['answers_per_second']:10.1f} {r['seconds']:8.1f} {r['forward_tokens']:8d}")
    print(f"speedup {result['speedup']}x, max |Δ loglik| {difference:.2e}, same prediction {agree}/{len(docs)}")


if __name__ == "__main__":
    main()
