"""Labelling speed: the tl of each training prompt's right answer under every candidate set (PuDDing eq. 11).

Three ways to compute the same label table, timed on the same prompts:
  one pass      pudding's labelling (`label_docs`, which `pudding label` runs per chunk): all sets in one pass over
                the data, sharing the blocks they agree on (a prefix tree over the sets), batched by length, logits
                only at answer positions;
  set by set    the same batched scorer, each set scored on its own (what one `pudding eval --set i` per set costs);
  naive         the paper's loop: per prompt and per set, a batch-1 forward of the pruned model with logits over
                the whole vocabulary at every position. Timed on the first prompts and extrapolated (its cost per
                prompt and set does not depend on which ones).
The script checks that the three agree on the labels they computed.

    python benchmarks/label_speed.py --candidates results/smollm2-h100/candidates.json --per-task 64 \
        --output results/label-speed-cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from naive import answer_logprob
from provenance import provenance, save

from pudding.labels import label_docs, training_docs
from pudding.models import load_decoder
from pudding.omission import OmissionSet
from pudding.tasks import CALIBRATION_TASKS
from pudding.scoring import Scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--candidates", type=Path, default=Path("results/smollm2-h100/candidates.json"),
                        help="a bundle's candidates.json: the sets to label under")
    parser.add_argument("--per-task", type=int, default=64, help="training prompts per calibration task")
    parser.add_argument("--naive-prompts", type=int, default=4, help="prompts timed for the naive loop (x every set)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    loaded = load_decoder(args.model, device=args.device)
    scorer = Scorer(loaded.decoder, loaded.tokenizer)
    num_blocks = loaded.decoder.num_blocks
    sets = [OmissionSet(s["blocks"], num_blocks) for s in json.loads(args.candidates.read_text())["sets"]]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    docs = [d for task in CALIBRATION_TASKS for d in training_docs(task, args.per_task, 0, None)]
    def timed(fn):  # best of two runs: the first one also pays for kernel selection on new shapes
        times = []
        for _ in range(2):
            sync()
            start = time.perf_counter()
            value = fn()
            sync()
            times.append(time.perf_counter() - start)
        return value, min(times)

    def one_set_at_a_time():
        prepared = scorer.prepare(scorer.encoder.groups([[d.requests[d.gold]] for d in docs]))
        return np.stack([scorer.score(prepared, s).task_likelihood() for s in sets], axis=1)

    labels, one_pass = timed(lambda: label_docs(scorer, sets, docs))
    per_set, set_by_set = timed(one_set_at_a_time)

    requests = [scorer.encoder.pair(*d.requests[d.gold]) for d in docs[: args.naive_prompts]]
    sync()
    start = time.perf_counter()
    naive = np.array([[-answer_logprob(loaded.decoder, r, s, args.device) / len(r.continuation) for s in sets]
                      for r in requests])  # tl: mean NLL of the answer tokens
    sync()
    naive_per_label = (time.perf_counter() - start) / naive.size
    naive_total = naive_per_label * len(docs) * len(sets)

    agreement = {"set_by_set": float(np.abs(per_set - labels).max()),
                 "naive": float(np.abs(naive - labels[: len(requests)]).max())}
    report = {
        "benchmark": "router labels: tl of the right answer under every candidate set",
        **provenance(args),
        "model": {"name": loaded.name, "fingerprint": loaded.fingerprint, "dtype": str(loaded.decoder.dtype)},
        "prompts": len(docs), "sets": len(sets), "labels": len(docs) * len(sets),
        "one_pass_seconds": round(one_pass, 2),
        "set_by_set_seconds": round(set_by_set, 2),
        "naive_seconds_per_label": round(naive_per_label, 4),
        "naive_seconds_extrapolated": round(naive_total, 1),
        "naive_labels_timed": int(naive.size),
        "speedup_vs_set_by_set": round(set_by_set / one_pass, 2),
        "speedup_vs_naive": round(naive_total / one_pass, 1),
        "labels_per_second": round(len(docs) * len(sets) / one_pass, 1),
        "max_abs_label_difference": agreement,
    }
    save(report, args.output)
    print(f"\none pass {one_pass:.1f} s | set by set {set_by_set:.1f} s ({report['speedup_vs_set_by_set']}x) | "
          f"naive ≈ {naive_total:.0f} s ({report['speedup_vs_naive']}x) | label agreement {agreement}")


if __name__ == "__main__":
    main()
