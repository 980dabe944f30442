"""Every routed policy of an accuracy sweep as one ablation table: for each model, rate and router variant, its
average on the evaluated documents with paired differences against PuDDing and against the fair best static set
(from the sweep's summary.json), beside the held-out evidence the deployed policy was chosen on (policy.json: the
paired difference against the fair best static set, and how often it picks the lowest-tl set). No model compute.

    python benchmarks/sweep_ablations.py results/accuracy-sweep --output results/accuracy-sweep/ablations.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pudding.storage import atomic_write_text

HEADER = ("| model, k | policy | average | vs PuDDing | vs fair best static | held out: vs fair static "
          "| held out: picks lowest-tl |\n|---|---|---|---|---|---|---|")


def points(pair) -> str:
    return "-" if pair is None else f"{100 * pair[0]:+.2f} ± {100 * pair[1]:.2f}"


def rate_rows(sweep: Path, model: dict, rate: dict) -> list[str]:
    policy = json.loads((sweep / f"k{rate['k']}" / "policy.json").read_text())
    held = {c["name"]: c for c in policy["candidates"]}
    policies = {"router": rate["methods"]["pudding"], **rate["variants"]}
    lines = []
    for name in sorted(policies, key=lambda n: (n != "router", n)):
        row, evidence = policies[name], held.get(name)
        heldout = (f"{100 * evidence['vs_fair_static']:+.2f} ± {100 * evidence['vs_fair_static_se']:.2f}"
                   if evidence else "-")
        picks = f"{100 * evidence['picks_best']:.1f}%" if evidence else "-"
        label = "router (PuDDing)" if name == "router" else name
        if policy["name"] == name:
            label += " **(deployed)**"
        lines.append(f"| {model['model']['name']}, {rate['k']} | {label} | {100 * row['average']:.2f} | "
                     f"{points(row.get('vs_pudding'))} | {points(row.get('vs_fair_static'))} | {heldout} | {picks} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder of sweeps (one sub-folder per model, each with summary.json)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    lines = ["# Every routed policy of the accuracy sweep (ablation rows)", "",
             f"`python benchmarks/sweep_ablations.py {args.root} --output {args.output}`: averages over the six Table 2 "
             "tasks (%, first 1000 documents each) with paired differences ± s.e.; the held-out columns are what the "
             "deployed policy was chosen on (policy.json: the held-out tenth of the labelled training prompts).", "",
             "Runs: one NVIDIA H200 (torch 2.11, transformers 5.17), 2026-12-02 (the first lease) and 2026-12-03 (the margin, "
             "mpnet and no-cap variants); README.md beside this file has each model's command.", "", HEADER]
    for summary in sorted(args.root.glob("*/summary.json")):
        model = json.loads(summary.read_text())
        for rate in model["rates"]:
            if isinstance(rate["k"], int) and (summary.parent / f"k{rate['k']}" / "policy.json").exists():
                lines += rate_rows(summary.parent, model, rate)
    atomic_write_text(args.output, "\n".join(lines) + "\n")
    print(f"{len(lines) - 7} rows: {args.output}")


if __name__ == "__main__":
    main()
