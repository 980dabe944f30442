"""Accuracy against the pruning rate: one model, several numbers of removed blocks, one bundle per rate.

The greedy search for the largest k already holds the smaller k's sets (its first k removals), and so do SLEB
(greedy) and the one-shot baselines (their k least important blocks). So the bundle of the largest k is made first,
and every other rate copies its searches, baselines and dense evaluation and cuts them to its k
(`SearchResult.prefix`). Each rate is then a whole pipeline bundle (static evaluations, labels, held-out selection,
routers, routed and deployed evaluations), so a sweep resumes across machines as a pipeline does; `summarize` writes
`summary.json`, `sweep.md` and `accuracy-vs-rate.png` beside the rate bundles.

    ROOT/k11/   the bundle of the largest k: searches and baselines are made here
    ROOT/k8/    copies of k11's searches/, baselines/, evals/dense.json, cut to k = 8
    ROOT/summary.json, sweep.md, accuracy-vs-rate.png
"""

from __future__ import annotations

import copy
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import PuddingError
from .pipeline import PipelineConfig
from .report import average_with_stderr, paired_average_difference
from .storage import atomic_write_json, atomic_write_text, read_json
from .tasks import PAPER_TASKS, UNSEEN_TASKS

SHARED = ("searches", "baselines")  # made once, for the largest k
FIGURE = "accuracy-vs-rate.png"


def rate_dir(root: Path, k: int | str) -> Path:
    return Path(root) / (k if isinstance(k, str) else f"k{k}")


def parse_blocks_list(text: str, num_blocks: int) -> list[int]:
    """'5,8,11' → [5, 8, 11], each a valid number of blocks to remove."""
    from .search import check_k

    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise PuddingError(f"--blocks '{text}' is not a comma-separated list of integers") from None
    if not ks:
        raise PuddingError("--blocks is empty: give the numbers of blocks to remove, e.g. 5,8,11")
    for k in ks:
        check_k(k, num_blocks)
    return ks


def seed_from_largest(root: Path, k: int | str, k_max: int) -> None:
    """Give the bundle of rate k the finished searches, baselines and dense evaluation of the largest rate's bundle
    (files a resumed run already has are left alone; checkpoints of unfinished searches are not copied)."""
    source, target = rate_dir(root, k_max), Bundle.open(rate_dir(root, k))
    copied = []
    for folder in SHARED:
        for path in sorted((source / folder).glob("*.json")) if (source / folder).is_dir() else []:
            destination = target.path / folder / path.name
            if not destination.exists():
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)
                copied.append(destination)
    dense = source / "evals" / "dense.json"
    if dense.exists() and not (target.path / "evals" / "dense.json").exists():
        (target.path / "evals").mkdir(exist_ok=True)
        shutil.copy2(dense, target.path / "evals" / "dense.json")
        copied.append(target.path / "evals" / "dense.json")
    if copied:
        target.track(*copied)


# ------------------------------------------------------------------------------------------------------------------
# The plan and the run

# Paper Table 13: MathQA, PubMedQA and SciQ added to the calibration data, ARC-Easy and WinoGrande kept
MULTIDOMAIN_CALIBRATION = ["arc_easy", "winogrande", "mathqa", "pubmedqa", "sciq"]
MULTIDOMAIN_EVAL = PAPER_TASKS + ["mathqa", "pubmedqa", "sciq"]
MULTIDOMAIN_HELDOUT = {"mathqa": 1000}  # MathQA's calibration split is its first 1000 test documents: not compared


@dataclass
class SweepPlan:
    root: Path
    ks: list[int]
    configs: dict[str, PipelineConfig]  # bundle directory name -> its pipeline settings
    order: list[str]  # the bundles to run now, the largest rate's first
    multidomain_at: int | None = None

    @classmethod
    def make(cls, root: Path, blocks: str, num_blocks: int, config: PipelineConfig, unseen_at: int | None,
             variants_at: int | None, multidomain_at: int | None, only: str | None) -> SweepPlan:
        ks = parse_blocks_list(blocks, num_blocks)
        middle = ks[len(ks) // 2]
        for option, value in (("--unseen-at", unseen_at), ("--variants-at", variants_at), ("--multidomain-at", multidomain_at)):
            if value is not None and value not in ks:
                raise PuddingError(f"{option} {value} is not one of the rates (--blocks {blocks})")
        unseen_at, variants_at = unseen_at or middle, variants_at or middle
        configs = {}
        for k in ks:
            configs[f"k{k}"] = replace(config, k=k, eval_tasks=PAPER_TASKS + (UNSEEN_TASKS if k == unseen_at else []),
                                       variants=list(config.variants) if k == variants_at else [])
        if multidomain_at is not None:
            configs[f"k{multidomain_at}-multidomain"] = replace(
                config, k=multidomain_at, calibration_tasks=list(MULTIDOMAIN_CALIBRATION),
                eval_tasks=list(MULTIDOMAIN_EVAL), variants=[])
        order = [f"k{k}" for k in sorted(ks, reverse=True)] + [n for n in configs if n.endswith("multidomain")]
        if only is not None:
            name = f"k{multidomain_at}-multidomain" if only == "multidomain" else f"k{only}"
            if name not in configs:
                raise PuddingError(f"--only {only}: not a rate of this sweep (rates: {', '.join(map(str, ks))}"
                                   + (", multidomain" if multidomain_at else "") + ")")
            if name != f"k{ks[-1]}" and not (rate_dir(root, ks[-1]) / "candidates.json").exists():
                raise PuddingError(f"run the largest rate first (--only {ks[-1]} --stages candidates,baselines): the "
                                   "other rates take their sets from its searches")
            order = [name]
        return cls(Path(root), ks, configs, order, multidomain_at)

    def directories(self) -> list[Path]:
        return [self.root / name for name in self.order]


def run_sweep(plan: SweepPlan, scorer, model_info: dict, data_dir, stages, log, device: str) -> dict:
    from .pipeline import Pipeline

    largest = max(plan.ks)
    for name in plan.order:
        config = plan.configs[name]
        pipeline = Pipeline(plan.root / name, scorer, model_info, config, data_dir,
                            lambda m, n=name: log(f"[{n}] {m}"), device)
        if name != f"k{largest}":
            seed_from_largest(plan.root, name, largest)
        pipeline.run(stages)
    return summarize(plan.root, plan.ks, PAPER_TASKS, model_info, plan.multidomain_at)


# ------------------------------------------------------------------------------------------------------------------
# Summary

# Rows of the sweep table, in order: (name in summary.json, label)
ROWS = (
    ("dense", "dense"),
    ("sleb", "SLEB"),
    ("shortened-ppl", "Shortened LLaMA (PPL)"),
    ("shortgpt", "ShortGPT"),
    ("fair-static", "fair best static (chosen on held-out prompts)"),
    ("task-wise", "static task-wise (Table 10)"),
    ("pudding", "PuDDing (router)"),
    ("deployed", "deployed policy"),
    ("oracle-tl", "oracle-tl"),
    ("best-on-eval", "best set picked on these documents (upper reference)"),
)


def _task_wise_document(evals: dict, sources: dict, tasks: list[str], fallback: str) -> dict | None:
    """Static task-wise pruning as one document: each calibration task under the tl set searched on it, the other
    tasks (BoolQ) under the fair best static set."""
    chosen = {}
    for name, found in sources.items():
        for s in found:
            if s["loss"] == "tl" and s.get("seed", 0) == 0 and s["task"] in tasks and name in evals:
                chosen.setdefault(s["task"], name)
    if not chosen:
        return None
    return {"tasks": {t: evals[chosen.get(t, fallback)]["tasks"][t] for t in tasks},
            "omission": {"label": "per task: " + ", ".join(f"{t} {n}" for t, n in chosen.items())}}


def rate_rows(bundle_dir: Path, tasks: list[str]) -> dict:
    """The sweep rows of one rate's bundle: documents per method, as `evals/*.json` hold them."""
    from .report import _load_evals, best_set

    bundle = Bundle.open(bundle_dir)
    evals = _load_evals(bundle.path)
    sources = {f"set{i}": s.sources for i, s in enumerate(bundle.candidates())} if bundle.has_candidates() else {}
    policy = read_json(bundle.path / "policy.json", "policy choice") if (bundle.path / "policy.json").exists() else None
    rows = {n: evals[n] for n in ("dense", "sleb", "shortened-ppl", "shortgpt", "pudding", "deployed", "oracle-tl") if n in evals}
    if policy is not None and f"set{policy['fair_static']}" in evals:
        rows["fair-static"] = evals[f"set{policy['fair_static']}"]
        wise = _task_wise_document(evals, sources, tasks, f"set{policy['fair_static']}")
        if wise is not None:
            rows["task-wise"] = wise
    best = best_set(evals, sources, tasks)
    if best is not None:
        rows["best-on-eval"] = evals[best]
    variants = {n[len("pudding-"):]: d for n, d in evals.items() if n.startswith("pudding-")}
    return {"bundle": bundle, "rows": rows, "variants": variants, "policy": policy}


def _comparison(document: dict, reference: dict | None, tasks: list[str]) -> list[float] | None:
    if reference is None or document is reference:
        return None
    diff, se = paired_average_difference(document, reference, tasks)
    return None if math.isnan(diff) else [diff, se]


def _without_calibration_documents(document: dict) -> dict:
    """The same evaluation with the documents a multi-domain calibration drew from left out (MathQA's first 1000)."""
    out = copy.deepcopy(document)
    for task, start in MULTIDOMAIN_HELDOUT.items():
        result = out["tasks"].get(task)
        if result is None:
            continue
        if result["n"] <= start:  # every evaluated document was calibration data (an evaluation --limit'ed to them)
            del out["tasks"][task]
            continue
        for metric, digits in result.get("per_doc", {}).items():
            values = np.frombuffer(digits[start:].encode(), dtype=np.uint8) - ord("0")
            result["per_doc"][metric] = digits[start:]
            result["metrics"][metric] = float(values.mean())
            result["stderr"][metric] = float(values.std(ddof=1) / math.sqrt(len(values)))
        result["n"] = len(result["per_doc"][result["primary"]])
    return out


def multidomain_summary(root: Path, k: int) -> dict | None:
    """Paper Table 13: the commonsense-calibrated bundle against the multi-domain one, at the same k, on the Table 2
    tasks and MathQA (its documents after the first 1000), PubMedQA and SciQ."""
    from .report import _load_evals

    main, multi = _load_evals(rate_dir(root, k)), _load_evals(rate_dir(root, f"k{k}-multidomain"))
    documents = {"dense": main.get("dense"), "PuDDing": main.get("pudding"), "PuDDing deployed": main.get("deployed"),
                 "PuDDing-MultiDomain": multi.get("pudding"), "PuDDing-MultiDomain deployed": multi.get("deployed")}
    documents = {n: _without_calibration_documents(d) for n, d in documents.items() if d is not None}
    if "PuDDing" not in documents or "PuDDing-MultiDomain" not in documents:
        return None
    tasks = [t for t in MULTIDOMAIN_EVAL if all(t in d["tasks"] for d in documents.values())]
    rows = {}
    for name, document in documents.items():
        mean, se = average_with_stderr(document, tasks)
        rows[name] = {"average": mean, "se": se,
                      "tasks": {t: document["tasks"][t]["metrics"][document["tasks"][t]["primary"]] for t in tasks},
                      "vs_pudding": _comparison(document, documents["PuDDing"], tasks)}
    left_out = [t for t in MULTIDOMAIN_HELDOUT if t in MULTIDOMAIN_EVAL and t not in tasks]
    note = ("MathQA is scored on its documents 1000 and on (the first 1000 are the multi-domain calibration data)"
            if not left_out else f"{', '.join(left_out)} left out: every evaluated document was calibration data")
    return {"k": k, "tasks": tasks, "calibration": MULTIDOMAIN_CALIBRATION, "rows": rows, "note": note}


def summarize(root: Path, ks: list[int], tasks: list[str], model: dict, multidomain_at: int | None = None) -> dict:
    """summary.json, sweep.md and the figure, from whatever rates exist (a partial sweep gives a partial summary)."""
    root = Path(root)
    rates = []
    for k in ks:
        if not (rate_dir(root, k) / "bundle.json").exists():
            continue
        found = rate_rows(rate_dir(root, k), tasks)
        rows = found["rows"]
        shown = [t for t in tasks if all(t in d["tasks"] for d in rows.values())]
        if not rows or not shown:
            continue
        entry = {"k": k, "rate": k / model["num_blocks"], "tasks": shown, "methods": {}, "variants": {}}
        for name, document in rows.items():
            mean, se = average_with_stderr(document, shown)
            entry["methods"][name] = {"average": mean, "se": se, "blocks": document.get("omission", {}).get("label"),
                                      "vs_pudding": _comparison(document, rows.get("pudding"), shown),
                                      "vs_fair_static": _comparison(document, rows.get("fair-static"), shown)}
        for name, document in found["variants"].items():
            if not all(t in document["tasks"] for t in shown):
                continue
            mean, se = average_with_stderr(document, shown)
            entry["variants"][name] = {"average": mean, "se": se,
                                       "vs_pudding": _comparison(document, rows.get("pudding"), shown),
                                       "vs_fair_static": _comparison(document, rows.get("fair-static"), shown),
                                       "picks_best": _variant_picks_best(found["policy"], name)}
        if found["policy"] is not None:
            entry["deployed_policy"] = {"name": found["policy"]["name"], "reason": found["policy"]["reason"]}
        methods = entry["methods"]
        if "dense" in methods and "fair-static" in methods:
            entry["pruning_cost"] = methods["dense"]["average"] - methods["fair-static"]["average"]
        if {"oracle-tl", "fair-static", "pudding"} <= set(methods):
            gap = methods["oracle-tl"]["average"] - methods["fair-static"]["average"]
            entry["gap_closed_by_pudding"] = (methods["pudding"]["average"] - methods["fair-static"]["average"]) / gap if gap > 0 else None
        rates.append(entry)
    summary = {"model": model, "tasks": tasks, "rates": rates}
    if multidomain_at is not None and (rate_dir(root, f"k{multidomain_at}-multidomain") / "bundle.json").exists():
        summary["multidomain"] = multidomain_summary(root, multidomain_at)
    atomic_write_json(root / "summary.json", summary)
    atomic_write_text(root / "sweep.md", sweep_markdown(summary))
    if rates:
        plot_sweep(summary, root / FIGURE)
    return summary


def _variant_picks_best(policy: dict | None, name: str) -> float | None:
    for candidate in (policy or {}).get("candidates", []):
        if candidate["name"] == name:
            return candidate["picks_best"]
    return None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _diff(pair: list[float] | None) -> str:
    if pair is None:
        return "-"
    mark = " ▲" if pair[0] > 2 * pair[1] else " ▼" if pair[0] < -2 * pair[1] else ""
    return f"{100 * pair[0]:+.2f} ± {100 * pair[1]:.2f}{mark}"


def sweep_markdown(summary: dict) -> str:
    model = summary["model"]
    lines = [f"# Accuracy against pruning rate: {model['name']} ({model['num_blocks']} blocks)", "",
             "Average accuracy (%) over the tasks named per rate (acc_norm for ARC-Challenge and HellaSwag, acc for the "
             "others) ± standard error; differences are paired (same documents) ± their standard error, ▲/▼ beyond "
             "twice it. The fair best static set is chosen on held-out training prompts; the deployed policy is chosen "
             "there too (policy.json). \"best set picked on these documents\" is an upper reference, not a fair "
             "baseline.", ""]
    for entry in summary["rates"]:
        lines += [f"## k = {entry['k']} of {model['num_blocks']} blocks ({100 * entry['rate']:.0f}%)", "",
                  f"Tasks: {', '.join(entry['tasks'])}."
                  + (f" Pruning cost (dense − fair best static): {100 * entry['pruning_cost']:.2f} points." if "pruning_cost" in entry else "")
                  + (f" Deployed: **{entry['deployed_policy']['name']}** ({entry['deployed_policy']['reason']})." if "deployed_policy" in entry else ""),
                  "", "| method | omitted blocks | average | vs PuDDing | vs fair best static |", "|---|---|---|---|---|"]
        for name, label in ROWS:
            if name in entry["methods"]:
                m = entry["methods"][name]
                lines.append(f"| {label} | {m['blocks'] or '-'} | {_pct(m['average'])} ± {_pct(m['se'])} | "
                             f"{_diff(m['vs_pudding'])} | {_diff(m['vs_fair_static'])} |")
        if entry["variants"]:
            lines += ["", "Router variants (accuracy looked up from the static evaluations of the candidate sets; "
                      "`picks best`: how often the variant picks the lowest-tl set on held-out prompts):", "",
                      "| variant | average | vs PuDDing | vs fair best static | picks best |", "|---|---|---|---|---|"]
            for name, v in sorted(entry["variants"].items()):
                picks = "-" if v["picks_best"] is None else f"{100 * v['picks_best']:.1f}%"
                lines.append(f"| {name} | {_pct(v['average'])} ± {_pct(v['se'])} | {_diff(v['vs_pudding'])} | "
                             f"{_diff(v['vs_fair_static'])} | {picks} |")
        lines.append("")
    multi = summary.get("multidomain")
    if multi:
        tasks = multi["tasks"]
        lines += [f"## Multi-domain calibration (paper Table 13), k = {multi['k']}", "",
                  f"Calibration tasks: {', '.join(multi['calibration'])}. {multi['note']}.", "",
                  "| method | " + " | ".join(tasks) + " | average | vs PuDDing |", "|" + "---|" * (len(tasks) + 3)]
        for name, row in multi["rows"].items():
            lines.append(f"| {name} | " + " | ".join(_pct(row["tasks"][t]) for t in tasks)
                         + f" | {_pct(row['average'])} ± {_pct(row['se'])} | {_diff(row['vs_pudding'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.4))
    for name, label in ROWS:
        points = [(100 * e["rate"], 100 * e["methods"][name]["average"], 100 * e["methods"][name]["se"])
                  for e in summary["rates"] if name in e["methods"]]
        if not points:
            continue
        x, y, err = (np.array(v) for v in zip(*points))
        style = "--" if name in ("oracle-tl", "best-on-eval", "dense") else "-"
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, linestyle=style, label=label)
    ax.set_xlabel("blocks removed (% of the model's blocks)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(f"{summary['model']['name']}: accuracy against pruning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
