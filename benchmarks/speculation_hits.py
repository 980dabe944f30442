"""How often would speculation guess right? Ahead of each routed choice the engine pre-fills the stack the previous
routed prompt got (`Engine.start`); a right guess hides the router's time behind those blocks, a wrong one resumes
from the leading blocks the two stacks share. A bundle's held-out prompts are routed by its deployed policy (or
`--router`), then read in two orders: as an evaluation sends them (task by task, the stored order) and as a mixed
stream (shuffled, `--shuffles` seeds). Reported per order: the share of prompts that get the previous prompt's set,
what that share would be if choices were independent (the sum of squared set shares), and, on a wrong guess, how many
leading stack positions the two stacks share, next to the blocks every candidate set keeps (the least it can be).

Usage: PYTHONPATH=src python benchmarks/speculation_hits.py --bundle runs/demo --output results/speculation-hits-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from provenance import provenance, save
from pudding.bundle import Bundle
from pudding.engine import common_start
from pudding.policy import PolicySpec, shared_blocks
from pudding.selection import HeldOut
from pudding.storage import read_json


def guesses(stacks: list[tuple[int, ...]], order: np.ndarray) -> dict:
    """Right guesses (the previous prompt's stack) and where a wrong one resumes, over prompts in this order."""
    sequence = [stacks[i] for i in order]
    pairs = list(zip(sequence, sequence[1:]))
    wrong = [common_start(previous, current) for previous, current in pairs if previous != current]
    return {"right": sum(a == b for a, b in pairs) / len(pairs),
            "resumed_at_when_wrong": {"mean": float(np.mean(wrong)) if wrong else None,
                                      "min": min(wrong) if wrong else None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--router", default=None, help="a router of the bundle by name (default: its deployed policy)")
    parser.add_argument("--shuffles", type=int, default=20)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    heldout = HeldOut.from_json(read_json(bundle.path / "heldout.json", "held-out scores")["tasks"])
    policy = PolicySpec(router=args.router).build(bundle.model_ref().num_blocks, bundle, "cpu")
    stacks = [tuple(choice.omit.kept()) for choice in policy.choose(heldout.prompts)]
    usage = Counter(stacks)
    shares = np.array(list(usage.values())) / len(stacks)
    mixed = [guesses(stacks, np.random.default_rng(seed).permutation(len(stacks))) for seed in range(args.shuffles)]
    tasks = np.array(heldout.tasks)
    report = {**provenance(args), "model": bundle.model["name"], "policy": policy.describe(), "prompts": len(stacks),
              "sets_chosen": len(usage), "largest_set_share": float(shares.max()),
              "right_if_independent": float((shares ** 2).sum()),
              "blocks_every_set_keeps": shared_blocks(policy.sets) if policy.sets else None,
              "task_by_task": guesses(stacks, np.arange(len(stacks))),
              "per_task": {t: guesses(stacks, np.flatnonzero(tasks == t)) for t in dict.fromkeys(heldout.tasks)},
              "mixed": {"right": float(np.mean([m["right"] for m in mixed])),
                        "resumed_at_when_wrong": float(np.mean([m["resumed_at_when_wrong"]["mean"] for m in mixed
                                                                if m["resumed_at_when_wrong"]["mean"] is not None]))}}
    save(report, args.output)


if __name__ == "__main__":
    main()
