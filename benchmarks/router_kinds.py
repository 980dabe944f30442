"""The routers of one pipeline bundle side by side: for each (the paper's encoder router, the router on the decoder's
input embeddings, any other variant; each alone and behind the margin gate the select stage tuned), its held-out
evidence (policy.json: accuracy against the fair best static set, paired, and how often it picks the lowest-tl set)
and its accuracy on the evaluated documents, looked up from the static evaluations of the candidate sets (no model
compute beyond routing), with paired differences against the fair best static set and against the paper's router,
and its routing time on this machine (batch 1, the held-out prompts, `bench.router_timing`).

    python benchmarks/router_kinds.py --bundle DIR [--output results/....json]
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pudding.bench.timing import router_timing
from pudding.bundle import MAIN_ROUTER, Bundle
from pudding.evaluate import results_document
from pudding.policy import RoutedPolicy
from pudding.report import average_with_stderr, paired_average_difference
from pudding.selection import lookup_results
from pudding.storage import atomic_write_json, atomic_write_text, environment, read_json
from pudding.tasks import parse_task_list, resolve_data_dir


def evaluated_documents(bundle: Bundle, data_dir) -> dict[str, list]:
    """The documents the bundle's static evaluations cover, per task (the pipeline's eval tasks and limit)."""
    config = bundle.manifest["settings"]["pipeline"]
    tasks = [t for t in parse_task_list(",".join(config["eval_tasks"])) if t.kind == "multiple_choice"]
    return {t.name: t.docs(data_dir=data_dir).docs[: config["limit"]] for t in tasks}


def routed_document(bundle: Bundle, router, documents: dict[str, list], set_evals: list[dict]) -> dict:
    policy = RoutedPolicy(router)
    choices = {task: np.array([c.index for c in policy.choose([d.prompt for d in docs])]) for task, docs in documents.items()}
    return results_document(bundle.model, policy.describe(), lookup_results(set_evals, choices, bundle.omission_sets()), {}, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    policy = read_json(bundle.policy_path, "policy choice")
    held = {c["name"]: c for c in policy["candidates"]}
    fair = policy["fair_static"]
    sets = bundle.omission_sets()
    set_evals = [read_json(bundle.path / "evals" / f"set{i}.json", "evaluation") for i in range(len(sets))]
    documents = evaluated_documents(bundle, resolve_data_dir(args.data_dir))
    tasks = list(documents)
    heldout_prompts = [p for entry in read_json(bundle.path / "heldout.json", "held-out scores")["tasks"].values()
                       for p in entry["prompts"]]
    routed = {}
    for name in bundle.routers():
        router = bundle.router(name)
        entry = {"encoder": router.settings.encoder, "ms": router_timing(RoutedPolicy(router), heldout_prompts, repeats=1)}
        routed[name] = {"document": routed_document(bundle, router, documents, set_evals), **entry}
        gated = bundle.path / "evals" / f"pudding-{name}-gated.json"  # the select stage's lookup of the gated router
        if gated.exists():
            routed[f"{name}-gated"] = {"document": read_json(gated, "evaluation"), **entry}
    rows = {}
    for name, entry in routed.items():
        doc = entry["document"]
        evidence = held.get(name, {})
        rows[name] = {"encoder": entry["encoder"], "route_ms_batch1": entry["ms"],
                      "average": average_with_stderr(doc, tasks),
                      "vs_fair_static": paired_average_difference(doc, set_evals[fair], tasks),
                      "vs_paper_router": (paired_average_difference(doc, routed[MAIN_ROUTER]["document"], tasks)
                                          if MAIN_ROUTER in routed and name != MAIN_ROUTER else None),
                      "heldout_vs_fair_static": [evidence.get("vs_fair_static"), evidence.get("vs_fair_static_se")],
                      "heldout_picks_best": evidence.get("picks_best")}
    fair_avg = average_with_stderr(set_evals[fair], tasks)
    run = {"command": "python " + " ".join(sys.argv), "device": platform.processor() or "cpu",
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": environment()}
    summary = (f"Bundle `{args.bundle}`: {len(sets)} candidate sets, fair best static set{fair} ({100 * fair_avg[0]:.2f} "
               f"± {100 * fair_avg[1]:.2f} on {sum(map(len, documents.values()))} evaluated documents of {len(tasks)} "
               f"tasks); deployed: {policy['name']}.")
    header = ("| router | encoder | held out: vs fair static | held out: picks lowest-tl | evaluated: average "
              "| vs fair static | vs the paper's router | routing, batch 1 |")
    lines = [f"`{run['command']}` ({run['device']}, {run['date']})", "", summary, "", header, "|---" * 8 + "|"]
    pts = lambda pair: "-" if pair is None or pair[0] is None else f"{100 * pair[0]:+.2f} ± {100 * pair[1]:.2f}"
    for name, r in rows.items():
        picks = "-" if r["heldout_picks_best"] is None else f"{100 * r['heldout_picks_best']:.1f}%"
        lines.append(f"| {name} | {r['encoder']} | {pts(r['heldout_vs_fair_static'])} | {picks} | "
                     f"{100 * r['average'][0]:.2f} ± {100 * r['average'][1]:.2f} | {pts(r['vs_fair_static'])} | "
                     f"{pts(r['vs_paper_router'])} | {r['route_ms_batch1']:.2f} ms |")
    print("\n".join(lines))
    if args.output:
        atomic_write_json(args.output, {**run, "bundle": str(args.bundle), "fair_static": fair, "deployed": policy["name"],
                                        "tasks": tasks, "rows": rows})
        atomic_write_text(args.output.with_suffix(".table.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
