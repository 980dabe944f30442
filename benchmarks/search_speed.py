"""Search speed: one greedy (task, loss) search, pudding's engine against the naive loop of the paper's code.

The naive loop (SLEB/PuDDing research code) recomputes the whole model for every candidate block and every
sample, one sequence at a time (batch 1), each answer on its own, with logits over the whole vocabulary at every
position. It is far too slow to run a whole search with, so the script times it on the first few candidates of the
first step and extrapolates linearly (its cost per candidate is the same at every step: a full forward per answer);
it also checks that those candidates' losses equal pudding's. pudding's search is timed whole.

    python benchmarks/search_speed.py --task arc_easy --loss tld --samples 128 --blocks 6 --output results/…json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from naive import answer_logprob
from provenance import provenance, save

from pudding.models import load_decoder
from pudding.omission import OmissionSet
from pudding.scoring import Scorer
from pudding.search import SearchSpec, loss_function, run_search


def naive_candidate_loss(decoder, omit, calibration, device) -> float:
    """Delete-and-recompute, batch 1, full logits: the loss of one candidate set."""
    from pudding.scoring import Scores

    requests = [request for group in calibration.groups for request in group]
    logprob = np.array([answer_logprob(decoder, r, omit, device) for r in requests])
    tokens = np.array([len(r.continuation) for r in requests])
    return loss_function(calibration)(Scores(logprob, tokens, np.ones(len(tokens), bool)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--loss", default="tld")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--naive-candidates", type=int, default=3, help="candidates timed for the naive loop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    loaded = load_decoder(args.model, device=args.device)
    scorer = Scorer(loaded.decoder, loaded.tokenizer)
    spec = SearchSpec("greedy", args.task, args.loss, args.blocks, args.samples)
    calibration = spec.calibration(scorer)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    run_search(SearchSpec("greedy", args.task, args.loss, 1, min(4, args.samples)), scorer, loaded.info())  # warm-up
    sync()
    start = time.perf_counter()
    result = run_search(spec, scorer, loaded.info())
    sync()
    ours = time.perf_counter() - start

    num_blocks = loaded.decoder.num_blocks
    candidates_total = sum(num_blocks - s for s in range(args.blocks))
    naive_losses, sync_start = {}, None
    sync()
    sync_start = time.perf_counter()
    for block in range(args.naive_candidates):
        naive_losses[block] = naive_candidate_loss(loaded.decoder, OmissionSet([block], num_blocks), calibration, args.device)
    sync()
    per_candidate = (time.perf_counter() - sync_start) / args.naive_candidates
    naive_total = per_candidate * candidates_total
    first_step = {int(b): v for b, v in result.candidate_losses[0].items()}
    worst = max(abs(naive_losses[b] - first_step[b]) for b in naive_losses)

    report = {
        "benchmark": "greedy omission-set search, one (task, loss)",
        **provenance(args),
        "model": {"name": loaded.name, "fingerprint": loaded.fingerprint, "dtype": str(loaded.decoder.dtype)},
        "search": {"task": args.task, "loss": args.loss, "samples": args.samples, "k": args.blocks,
                   "candidates_scored": candidates_total, "blocks": result.blocks},
        "pudding_seconds": round(ours, 2),
        "naive_seconds_per_candidate": round(per_candidate, 3),
        "naive_seconds_extrapolated": round(naive_total, 1),
        "naive_candidates_timed": args.naive_candidates,
        "speedup": round(naive_total / ours, 1),
        "max_abs_loss_difference_on_timed_candidates": worst,
    }
    save(report, args.output)
    print(f"\npudding {ours:.1f} s | naive ≈ {naive_total:.0f} s ({per_candidate:.2f} s/candidate x {candidates_total}) | "
          f"speedup {report['speedup']}x | loss agreement {worst:.1e}")


if __name__ == "__main__":
    main()
