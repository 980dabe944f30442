"""Accuracy of quantized PuDDing (the paper's Table 14 layout): dense, SLEB, the deployed set, and the deployed set
with int8 and int4 blocks, on the Table 2 tasks, with paired differences against the unquantized deployed set.

    python benchmarks/quantized_accuracy.py --bundle results/accuracy-sweep/smollm2-135m/k8 --limit 250 \
        --output results/quantized-accuracy-smollm2-cpu.json

Each row is one `pudding eval` run (resumable: a row whose JSON exists is not run again): the bundle's deployed policy
(what `--bundle` runs by default) and its SLEB baseline, with and without `--quantize`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from provenance import provenance, save
from pudding.bundle import Bundle
from pudding.report import average_with_stderr, paired_average_difference
from pudding.storage import atomic_write_text
from pudding.tasks import PAPER_TASKS


def rows(bundle: Path) -> dict[str, list[str]]:
    """`pudding eval` options per row: the bundle's SLEB set and its deployed policy (the default of --bundle)."""
    deployed = ["--bundle", str(bundle)]
    return {"dense": [], "SLEB": [*deployed, "--method", "sleb"], "deployed": deployed,
            "deployed + int8": [*deployed, "--quantize", "int8"], "deployed + int4": [*deployed, "--quantize", "int4"],
            "dense + int8": ["--quantize", "int8"], "dense + int4": ["--quantize", "int4"]}


def evaluate(name: str, options: list[str], model: str, limit: int, device: str, folder: Path) -> dict:
    out = folder / (name.replace(" + ", "-") + ".json")
    if not out.exists():
        command = [sys.executable, "-m", "pudding.cli", "eval", *options, "--tasks", ",".join(PAPER_TASKS),
                   "--limit", str(limit), "--device", device, "--output", str(out)]
        if "--bundle" not in options:
            command += ["--model", model]
        print(" ".join(command[2:]), file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    return json.loads(out.read_text())


def markdown(report: dict) -> str:
    lines = [f"# Quantized PuDDing accuracy ({report['model']}, {report['machine']['gpu'] or 'cpu'}, {report['date']})", "",
             f"Command: `{report['command']}`", "",
             f"Average over {', '.join(report['tasks'])} (first {report['limit']} documents each; acc_norm for ARC-C "
             "and HellaSwag), ± s.e.; differences paired on the same documents.", "",
             "Small models answer BoolQ by a yes/no bias that any change of weights can flip (always \"yes\" scores about "
             "62%), so the average without BoolQ is given too.", "",
             "| row | omitted blocks | weights | average | vs deployed (unquantized) | without BoolQ | vs deployed |",
             "|---|---|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        cells = []
        for key in ("", "_without_boolq"):
            diff = row[f"vs_deployed{key}"]
            cells += [f"{100 * row['average' + key]:.2f} ± {100 * row['se' + key]:.2f}",
                      "-" if diff is None else f"{100 * diff[0]:+.2f} ± {100 * diff[1]:.2f}"]
        lines.append(f"| {name} | {row['omit'] or 'none'} | {row['quantize'] or report['dtype']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    model = bundle.model_ref().name
    folder = args.output.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    documents = {name: evaluate(name, opts, model, args.limit, args.device, folder) for name, opts in rows(args.bundle).items()}
    report = provenance(args)
    tasks = list(PAPER_TASKS)
    report.update(model=model, limit=args.limit, tasks=tasks, dtype=documents["dense"]["model"]["dtype"], rows={})
    for name, doc in documents.items():
        row = report["rows"][name] = {"omit": ",".join(map(str, doc["omission"].get("blocks", []))) or None,
                                      "quantize": doc["model"].get("quantize")}
        for key, among in (("", tasks), ("_without_boolq", [t for t in tasks if t != "boolq"])):
            row["average" + key], row["se" + key] = average_with_stderr(doc, among)
            row["vs_deployed" + key] = None if name == "deployed" else paired_average_difference(doc, documents["deployed"], among)
    save(report, args.output)
    atomic_write_text(args.output.with_suffix(".md"), markdown(report))


if __name__ == "__main__":
    main()
