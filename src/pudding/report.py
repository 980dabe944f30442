"""Tables for comparing methods: accuracy with standard errors, and which differences exceed the noise.

Small models sit near chance on several tasks, so a difference between two methods is reported as significant only
when it is larger than twice its standard error. Methods are compared on the same documents, so the paired standard
error is used: the spread of the per-document difference in correctness, which is much smaller than the two
accuracies' standard errors combined when the methods mostly agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

HEATMAP, SET_USAGE = "omission-heatmap.png", "set-usage.png"
FIGURES = (HEATMAP, SET_USAGE)  # the figures the report draws into the bundle


def per_doc(document: dict, task: str, metric: str) -> np.ndarray | None:
    result = document["tasks"].get(task)
    if result is None or metric not in result.get("per_doc", {}):
        return None
    return np.frombuffer(result["per_doc"][metric].encode(), dtype=np.uint8) - ord("0")


def primary_metric(document: dict, task: str) -> str:
    return document["tasks"][task]["primary"]


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of a - b and its standard error (sample standard deviation of the differences over sqrt(n)); NaN when
    the two were not scored on the same documents (e.g. evaluations made with different --limit)."""
    if a is None or b is None or a.shape != b.shape:
        return float("nan"), float("nan")
    diff = a.astype(float) - b.astype(float)
    if len(diff) < 2:
        return float(diff.mean()), float("nan")
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def average_with_stderr(document: dict, tasks: Sequence[str]) -> tuple[float, float]:
    """Mean over tasks of the primary metric; tasks are independent samples, so their variances add."""
    values, variances = [], []
    for task in tasks:
        result = document["tasks"][task]
        metric = result["primary"]
        values.append(result["metrics"][metric])
        variances.append(result["stderr"][metric] ** 2)
    return float(np.mean(values)), float(math.sqrt(sum(variances)) / len(values))


def paired_average_difference(a: dict, b: dict, tasks: Sequence[str]) -> tuple[float, float]:
    means, variances = [], []
    for task in tasks:
        metric = primary_metric(a, task)
        x, y = per_doc(a, task, metric), per_doc(b, task, metric)
        mean, se = paired_difference(x, y)
        means.append(mean)
        variances.append(se**2)
    return float(np.mean(means)), float(math.sqrt(sum(variances)) / len(means))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def method_table(documents: dict[str, dict], tasks: Sequence[str], reference: str | None = None) -> str:
    """A markdown table: one row per method, the primary metric per task (± standard error) and the average.

    With a reference method, each cell also says whether the difference to the reference exceeds twice its paired
    standard error: ▲ significantly higher, ▼ significantly lower, nothing when within the noise.
    """
    tasks = [t for t in tasks if all(t in d["tasks"] for d in documents.values())]
    header = "| method | omitted blocks | " + " | ".join(
        f"{t} ({primary_metric(next(iter(documents.values())), t)})" for t in tasks) + " | average |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    ref = documents.get(reference) if reference else None
    for name, document in documents.items():
        cells = []
        for task in tasks:
            result = document["tasks"][task]
            metric = result["primary"]
            cell = f"{_pct(result['metrics'][metric])} ± {_pct(result['stderr'][metric])}"
            if ref is not None and name != reference:
                cell += _marker(*paired_difference(per_doc(document, task, metric), per_doc(ref, task, metric)))
            cells.append(cell)
        mean, se = average_with_stderr(document, tasks)
        avg = f"{_pct(mean)} ± {_pct(se)}"
        if ref is not None and name != reference:
            avg += _marker(*paired_average_difference(document, ref, tasks))
        lines.append(f"| {name} | {document['omission']['label']} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def _marker(diff: float, se: float) -> str:
    if math.isnan(se) or abs(diff) <= 2 * se:
        return ""
    return " ▲" if diff > 0 else " ▼"


def significant_differences(documents: dict[str, dict], tasks: Sequence[str], reference: str) -> list[str]:
    """Plain sentences: which methods differ from the reference by more than twice the paired standard error."""
    ref = documents[reference]
    sentences = []
    for name, document in documents.items():
        if name == reference:
            continue
        diff, se = paired_average_difference(document, ref, tasks)
        if math.isnan(diff):
            sentences.append(f"{name} vs {reference}: not scored on the same documents, no paired comparison")
            continue
        verdict = "exceeds" if abs(diff) > 2 * se else "is within"
        sentences.append(f"{name} vs {reference}: average {100 * diff:+.2f} points (paired s.e. {100 * se:.2f}), {verdict} the noise")
        for task in tasks:
            metric = primary_metric(document, task)
            d, s = paired_difference(per_doc(document, task, metric), per_doc(ref, task, metric))
            if abs(d) > 2 * s:
                sentences.append(f"  {task}: {100 * d:+.2f} ± {100 * s:.2f}")
    return sentences


# ------------------------------------------------------------------------------------------------------------------
# The bundle report (report.md and its figures)


def _load_evals(bundle_path) -> dict[str, dict]:
    import json

    evals = {}
    for path in sorted((bundle_path / "evals").glob("*.json")):
        evals[path.stem] = json.loads(path.read_text())
    return evals


def _set_sources(bundle) -> dict[str, list[dict]]:
    return {f"set{i}": s.sources for i, s in enumerate(bundle.candidates())}


def best_set(evals: dict, sources: dict, tasks, loss: str = "tl") -> str | None:
    """The single candidate set (from `loss` searches) with the best average: chosen on the evaluation data, so it
    flatters static pruning; reported as the strongest static use of the pool."""
    names = [n for n, src in sources.items() if n in evals and any(s["loss"] == loss for s in src)]
    if not names:
        return None
    return max(names, key=lambda n: average_with_stderr(evals[n], tasks)[0])


def task_wise(evals: dict, sources: dict, tasks, loss: str = "tl") -> dict | None:
    """Static task-wise pruning (paper Table 10): each calibration task evaluated with the set searched on it."""
    rows = {}
    for name, src in sources.items():
        for s in src:
            if (s["loss"] == loss and s.get("seed", 0) == 0 and s["task"] in tasks and name in evals
                    and s["task"] in evals[name]["tasks"]):
                result = evals[name]["tasks"][s["task"]]
                rows[s["task"]] = (name, result["metrics"][result["primary"]])
    if not rows:
        return None
    return {"per_task": rows, "average": float(np.mean([v for _, v in rows.values()]))}


def omission_heatmap(document: dict, tasks, num_blocks: int, path) -> None:
    """Figure 4: per task, how often the routed set omits each block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = np.zeros((len(tasks), num_blocks))
    for r, task in enumerate(tasks):
        used = document["tasks"][task]["sets_used"]
        total = sum(used.values())
        for label, count in used.items():
            for block in (int(b) for b in label.split(",") if label != "dense"):
                rates[r, block] += count / total
    fig, ax = plt.subplots(figsize=(max(6, num_blocks * 0.32), 0.45 * len(tasks) + 1.4))
    image = ax.imshow(rates, cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(num_blocks), [str(b) for b in range(num_blocks)], fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlabel("block (0-based)")
    ax.set_title("How often the routed set omits each block (red: usually omitted)")
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def set_usage_chart(document: dict, tasks, set_labels: list[str], path) -> None:
    """How often the router picks each candidate set, stacked by task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(set_labels) + 2), 3.6))
    bottom = np.zeros(len(set_labels))
    for task in tasks:
        used = document["tasks"][task]["sets_used"]
        counts = np.array([used.get(label, 0) for label in set_labels], float)
        ax.bar(range(len(set_labels)), counts, bottom=bottom, label=task)
        bottom += counts
    ax.set_xticks(range(len(set_labels)), [f"set{i}" for i in range(len(set_labels))], fontsize=8)
    ax.set_ylabel("questions routed")
    ax.set_title("Candidate sets chosen by the router")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _subset(document: dict, n: int) -> dict:
    """The same evaluation restricted to the first n documents of each task (for comparisons on a subset)."""
    import copy

    out = copy.deepcopy(document)
    for task, result in out["tasks"].items():
        for metric, digits in result.get("per_doc", {}).items():
            values = np.frombuffer(digits[:n].encode(), dtype=np.uint8) - ord("0")
            result["per_doc"][metric] = digits[:n]
            result["metrics"][metric] = float(values.mean())
            result["stderr"][metric] = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
        result["n"] = min(result["n"], n)
    return out


def write_report(bundle, config):
    from pathlib import Path

    from .storage import atomic_write_text
    from .tasks import PAPER_TASKS, UNSEEN_TASKS

    path: Path = bundle.path / "report.md"
    evals = _load_evals(bundle.path)
    sources = _set_sources(bundle)
    model = bundle.model
    main_tasks = [t for t in PAPER_TASKS if t in config.eval_tasks]
    unseen = [t for t in UNSEEN_TASKS if t in config.eval_tasks]
    best = best_set(evals, sources, main_tasks)
    policy = _policy_record(bundle)
    fair = f"set{policy['fair_static']}" if policy else None
    order = ["dense", "sleb", "shortened-ppl", "shortgpt"] + ([fair] if fair else []) + ([best] if best else []) + [
        "pudding", "deployed", "oracle-tl", "oracle"]
    labels = {fair: f"fair best static ({fair})", best: f"best tl set ({best})"}
    if best == fair:
        labels[best] = f"fair best static ({fair}), also the best tl set here"
    shown = {labels.get(n, n): evals[n] for n in dict.fromkeys(order) if n in evals}
    reference = "pudding" if "pudding" in shown else None
    lines = [
        f"# PuDDing report: {model['name']} ({model['num_blocks']} blocks), k = {bundle.k}",
        "",
        f"Model fingerprint `{model['fingerprint']}`. Evaluation: "
        + (f"first {config.limit} documents of each task" if config.limit else "full evaluation splits")
        + ". Accuracy in %, ± standard error; the average uses acc_norm for ARC-Challenge and HellaSwag and acc "
        "for the others, as the paper. ▲/▼: higher/lower than PuDDing by more than twice the paired standard error "
        "(same documents); no mark: within the noise.",
        "",
        "Methods: `dense` (no block removed); `sleb`, `shortened-ppl`, `shortgpt` (static depth pruning calibrated on "
        "WikiText-2); `fair best static` (the candidate set with the best accuracy on held-out training prompts, never "
        "on these documents); `best tl set` (the single tl candidate set with the best average, picked on these very "
        "documents, so it flatters static pruning: an upper reference); `pudding` (routed per question by the paper's "
        "router); `deployed` (the policy the bundle deploys, chosen on held-out prompts: see below); `oracle-tl` (each "
        "question routed to the set "
        "with the lowest tl of its right answer: a router that predicts its labels perfectly); `oracle` (a question "
        "counts as right if any set in the pool answers it: the pool's upper bound).",
        "",
    ]
    if main_tasks and shown:
        lines += ["## Commonsense tasks (Table 2)", "", method_table(shown, main_tasks, reference), ""]
        if reference:
            lines += ["Differences from PuDDing (average over these tasks):", ""]
            lines += [f"- {s}" for s in significant_differences(shown, main_tasks, reference) if not s.startswith("  ")]
            lines += [""]
    if unseen and shown:
        lines += ["## Unseen tasks (Table 5)", "", method_table(shown, unseen, reference), ""]
    wise = task_wise(evals, sources, config.calibration_tasks)
    if wise:
        cells = ", ".join(f"{t} {100 * v:.2f} ({n})" for t, (n, v) in wise["per_task"].items())
        lines += ["## Static task-wise pruning (Table 10)", "",
                  f"Each calibration task evaluated with the tl set searched on it: average {100 * wise['average']:.2f} ({cells}).", ""]
        if "pudding" in evals:
            tasks = list(wise["per_task"])
            lines += [f"PuDDing on the same tasks: {100 * average_with_stderr(evals['pudding'], tasks)[0]:.2f}.", ""]
    if "sleb-per-prompt" in evals:
        per_prompt = evals["sleb-per-prompt"]
        n = min(r["n"] for r in per_prompt["tasks"].values())
        tasks = list(per_prompt["tasks"])
        subset = {"sleb-per-prompt": per_prompt}
        for name in ("dense", "sleb", "pudding"):
            if name in evals:
                subset[name] = _subset(evals[name], n)
        lines += [f"## SLEB per prompt (first {n} documents of each task)", "",
                  method_table(subset, tasks, "pudding" if "pudding" in subset else None), ""]
    lines += _lora_lines(evals, main_tasks)
    if "pudding" in evals:
        document = evals["pudding"]
        all_tasks = [t for t in config.eval_tasks if t in document["tasks"]]
        omission_heatmap(document, all_tasks, model["num_blocks"], bundle.path / HEATMAP)
        labels = [",".join(map(str, s.blocks)) for s in bundle.candidates()]
        set_usage_chart(document, all_tasks, labels, bundle.path / SET_USAGE)
        routing = document.get("routing", {})
        if routing.get("prompts"):
            lines += [f"Routing: {routing['prompts']} questions in {routing['seconds']:.2f} s "
                      f"({1000 * routing['seconds'] / routing['prompts']:.2f} ms each, batched); "
                      f"{routing['truncated']} prompts longer than the router reads were truncated.", ""]
        lines += ["## Which blocks the routed sets omit (Figure 4)", "", "![omission heatmap](omission-heatmap.png)", "",
                  "![set usage](set-usage.png)", ""]
    if policy:
        lines += _policy_lines(policy)
    router = _router_config(bundle.path / "router")
    if router is not None:
        from .router import router_summary

        last = router["history"]["epochs"][-1]
        quality = (f"; on held-out prompts it picks the lowest-tl set {100 * last['picks_best_set']:.1f}% of the time "
                   f"(mean regret {last['mean_regret_tl']:.4f} tl)") if "picks_best_set" in last else ""
        lines += ["## Router", "",
                  f"{router_summary(router)}, on {router['training']['train_rows']} prompts "
                  f"({router['training']['val_rows']} held out), {router['training']['seconds']:.0f} s{quality}.", "",
                  "![router training](router/training.png)", ""]
    lines += ["## Candidate sets", "", "| set | omitted blocks | found by |", "|---|---|---|"]
    for i, s in enumerate(bundle.candidates()):
        found = ", ".join(f"{x['task']}/{x['loss']}" + (f"/seed{x['seed']}" if x.get("seed") else "") for x in s.sources)
        lines.append(f"| set{i} | {','.join(map(str, s.blocks))} | {found} |")
    lines.append("")
    lines += _ablation_lines(bundle, main_tasks)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


LORA_ROWS = {"sleb-lora": "SLEB + LoRA", "shortened-ppl-lora": "Shortened LLaMA + LoRA", "pudding-lora": "PuDDing + LoRA",
             "deployed-lora": "deployed + LoRA"}


def _lora_lines(evals: dict, tasks) -> list[str]:
    """Table 4: each method with the LoRA adapter of its set (the pipeline's lora stage), beside dense."""
    rows = {label: evals[name] for name, label in LORA_ROWS.items() if name in evals}
    if not rows or not tasks:
        return []
    shown = {**({"dense": evals["dense"]} if "dense" in evals else {}), **rows}
    reference = "PuDDing + LoRA" if "PuDDing + LoRA" in shown else None
    return ["## With LoRA per omission set (Table 4)", "",
            "Each set's adapter is trained on the pruned model (`pudding lora`; data and recipe in adapters/*/pudding.json). "
            "▲/▼ here are against PuDDing + LoRA.", "", method_table(shown, tasks, reference), ""]


def _policy_record(bundle) -> dict | None:
    import json

    return json.loads(bundle.policy_path.read_text()) if bundle.policy_path.exists() else None


def _policy_lines(policy: dict) -> list[str]:
    """Which policy the bundle deploys, and the held-out evidence: every candidate's held-out accuracy."""
    lines = ["## Deployed policy", "",
             f"**{policy['name']}**: {policy['reason']}. Chosen on {policy['heldout_documents']} held-out training "
             "prompts (every answer scored under every set); `pudding eval/generate/serve --bundle` use it unless "
             "`--router` asks for the router itself.", "",
             "| candidate | held-out accuracy | vs fair best static | picks best |", "|---|---|---|---|"]
    ranked = sorted(policy["candidates"], key=lambda c: -c["heldout_accuracy"])
    for c in ranked[:12]:
        lines.append(f"| {c['name']} | {100 * c['heldout_accuracy']:.2f} | {100 * c['vs_fair_static']:+.2f} ± "
                     f"{100 * c['vs_fair_static_se']:.2f} | {100 * c['picks_best']:.1f}% |")
    if len(ranked) > 12:
        lines.append(f"| ({len(ranked) - 12} more in policy.json) | | | |")
    return lines + [""]


def _router_config(router_dir) -> dict | None:
    """A trained router's router.json (settings, training history), or None if there is none."""
    import json

    path = router_dir / "router.json"
    return json.loads(path.read_text()) if path.exists() else None


def _picks_best(router_dir) -> str:
    """The router's held-out share of prompts for which it picks the lowest-tl set (last epoch), as a cell."""
    router = _router_config(router_dir)
    last = router["history"]["epochs"][-1] if router else {}
    return f"{100 * last['picks_best_set']:.1f}%" if "picks_best_set" in last else "-"


def _ablation_lines(bundle, tasks) -> list[str]:
    root = bundle.path / "ablations"
    main = _load_evals(bundle.path)
    rows = []  # (title, routed evaluation, router directory)
    if "pudding" in main:
        rows.append(("10-set pool (main)", main["pudding"], bundle.path / "router"))
    for name, title in (("sets-5", "5 sets (tl only)"), ("sets-30", "30 sets (3 calibration draws)"),
                        ("ppl-candidates", "5 sets from perplexity searches")):
        evals = _load_evals(root / name) if (root / name).exists() else {}
        if "pudding" in evals:
            rows.append((title, evals["pudding"], root / name / "router"))
    for objective in ("ce-soft", "ce-onehot"):
        if f"pudding-{objective}" in main:
            rows.append((f"router trained with {objective}", main[f"pudding-{objective}"], bundle.path / f"router-{objective}"))
    if "pudding-embeddings" in main:
        rows.append(("router on the decoder's input embeddings", main["pudding-embeddings"], bundle.path / "router-embeddings"))
    if len(rows) < 2:
        return []
    reference = rows[0][1]
    tasks = [t for t in tasks if all(t in doc["tasks"] for _, doc, _ in rows)]
    lines = ["## Ablations (Tables 9, 11, 12; and routers beyond the paper)", "",
             "Each variant's routed accuracy; `vs main`: paired difference of the average from the main PuDDing on the "
             "same documents (▲/▼ beyond twice its standard error); `picks best`: how often its router picks the "
             "lowest-tl set of its own pool on held-out training prompts.", "",
             "| variant | " + " | ".join(tasks) + " | average | vs main | picks best |", "|" + "---|" * (len(tasks) + 4)]
    for title, doc, router_dir in rows:
        cells = [f"{100 * doc['tasks'][t]['metrics'][doc['tasks'][t]['primary']]:.2f}" for t in tasks]
        mean, se = average_with_stderr(doc, tasks)
        if doc is reference:
            versus = "-"
        else:
            diff, diff_se = paired_average_difference(doc, reference, tasks)
            versus = "other documents" if math.isnan(diff) else f"{100 * diff:+.2f} ± {100 * diff_se:.2f}{_marker(diff, diff_se)}"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {100 * mean:.2f} ± {100 * se:.2f} | {versus} | "
                     f"{_picks_best(router_dir)} |")
    lines.append("")
    return lines
