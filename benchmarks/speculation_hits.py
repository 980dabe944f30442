"""How often would speculation guess right? Ahead of each routed choice the engine pre-fills the stack the previous
routed prompt got (`Engine.start`); a right guess hides the router's time behind those blocks, a wrong one resumes
from the leading blocks the two stacks share. From a routed evaluation's record of the sets it used per task
(`sets_used` of `pudding eval --output`), taking consecutive choices as independent draws: the chance that a prompt
gets the previous prompt's set, for an evaluation sent task by task (per task, then weighted by documents) and for a
mixed stream (all tasks' documents shuffled together), and the leading stack positions two different sets share
(where a wrong guess resumes), against the blocks every set used keeps; and, for comparison, how often guessing the
set used most would be right.

Usage: PYTHONPATH=src python benchmarks/speculation_hits.py --eval results/smollm2-h100/evals/pudding.json \
           --output results/speculation-hits.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from provenance import provenance, save
from pudding.engine import common_start
from pudding.omission import OmissionSet
from pudding.policy import shared_blocks
from pudding.storage import read_json


def omission_of(label: str, num_blocks: int) -> OmissionSet:
    """An evaluation's set label ('3,14,16' or 'dense', `OmissionSet.label`) as the set."""
    return OmissionSet.parse("" if label == "dense" else label, num_blocks)


def guesses(counts: Counter, num_blocks: int) -> dict:
    """For choices drawn independently from these counts (set label -> documents): the chance two in a row are the
    same set, and the mean leading stack positions two different ones share."""
    total = sum(counts.values())
    shares = {label: n / total for label, n in counts.items()}
    stacks = {label: omission_of(label, num_blocks).kept() for label in shares}
    pairs = [(shares[a] * shares[b], common_start(stacks[a], stacks[b])) for a in shares for b in shares if a != b]
    weight = sum(p for p, _ in pairs)
    return {"documents": total, "sets": len(shares), "right": sum(p * p for p in shares.values()),
            "right_guessing_the_most_used": max(shares.values()),
            "resumed_at_when_wrong": sum(p * s for p, s in pairs) / weight if weight else None}


def report_of(path: Path) -> dict:
    record = read_json(path, "evaluation")
    num_blocks = record["model"]["num_blocks"]
    per_task = {name: guesses(Counter(task["sets_used"]), num_blocks) for name, task in record["tasks"].items()}
    documents = sum(t["documents"] for t in per_task.values())
    everything = sum((Counter(task["sets_used"]) for task in record["tasks"].values()), Counter())
    return {"evaluation": str(path), "model": record["model"]["name"], "policy": record["omission"].get("label"),
            "blocks_every_set_keeps": shared_blocks([omission_of(label, num_blocks) for label in everything]),
            "task_by_task": {key: sum(t[key] * t["documents"] for t in per_task.values()) / documents
                             for key in ("right", "right_guessing_the_most_used")},
            "mixed": guesses(everything, num_blocks), "per_task": per_task}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", type=Path, nargs="+", required=True, help="routed evaluations (JSON)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    save({**provenance(args), "evaluations": [report_of(path) for path in args.eval]}, args.output)


if __name__ == "__main__":
    main()
