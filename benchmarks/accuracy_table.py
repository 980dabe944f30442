"""Accuracy tables of PuDDing variants in the paper's layouts, each row one `pudding eval` run on the Table 2 tasks,
with paired differences against the table's reference row:

* `--table quantized` (Table 14): dense, SLEB, the deployed set, and the deployed set with int8 and int4 blocks
  (and with the output head quantized too: int8+head, int4+head); reference: the unquantized deployed set.
* `--table lora` (Table 4): dense, SLEB, Shortened LLaMA and PuDDing (the bundle's router), each with and without the
  LoRA adapter of its set (`pudding lora`), and the deployed policy with LoRA; reference: PuDDing + LoRA.

    python benchmarks/accuracy_table.py --table quantized --bundle results/accuracy-sweep/smollm2-135m/k8 \
        --limit 300 --output results/quantized-accuracy-smollm2-cpu.json

Resumable: a row whose JSON exists (in the folder named after --output) is not run again.
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


def rows(table: str, bundle: Path) -> tuple[dict[str, list[str]], str]:
    """`pudding eval` options per row (--bundle alone runs the bundle's deployed policy), and the reference row."""
    b = ["--bundle", str(bundle)]
    if table == "quantized":
        return {"dense": [], "SLEB": [*b, "--method", "sleb"], "deployed": b,
                "deployed + int8": [*b, "--quantize", "int8"], "deployed + int4": [*b, "--quantize", "int4"],
                "dense + int8": ["--quantize", "int8"], "dense + int4": ["--quantize", "int4"],
                "deployed + int8+head": [*b, "--quantize", "int8+head"],
                "deployed + int4+head": [*b, "--quantize", "int4+head"]}, "deployed"
    plain = {"SLEB": [*b, "--method", "sleb"], "Shortened LLaMA": [*b, "--method", "shortened-ppl"], "PuDDing": [*b, "--router"]}
    return {"dense": [], **plain, **{f"{name} + LoRA": [*opts, "--lora"] for name, opts in plain.items()},
            "deployed + LoRA": [*b, "--lora"]}, "PuDDing + LoRA"


def evaluate(name: str, options: list[str], model: str, limit: int, device: str, folder: Path) -> dict:
    out = folder / (name.lower().replace(" + ", "-").replace(" ", "-") + ".json")
    if not out.exists():
        command = [sys.executable, "-m", "pudding.cli", "eval", *options, "--tasks", ",".join(PAPER_TASKS),
                   "--limit", str(limit), "--device", device, "--output", str(out)]
        if "--bundle" not in options:
            command += ["--model", model]
        print(" ".join(command[2:]), file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    return json.loads(out.read_text())


TITLES = {"quantized": "Quantized PuDDing accuracy", "lora": "PuDDing with LoRA per omission set"}


def markdown(report: dict) -> str:
    reference = report["reference"]
    lines = [f"# {TITLES[report['table']]} ({report['model']}, {report['machine']['gpu'] or 'cpu'}, {report['date']})", "",
             f"Command: `{report['command']}`", "",
             f"Average over {', '.join(report['tasks'])} (first {report['limit']} documents each; acc_norm for ARC-C "
             "and HellaSwag), ± s.e.; differences paired on the same documents.", "",
             "Small models answer BoolQ by a yes/no bias that any change of weights can flip (always \"yes\" scores about "
             "62%), so the average without BoolQ is given too.", "",
             f"| row | omitted blocks | weights | average | vs {reference} | without BoolQ | vs {reference} |",
             "|---|---|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        cells = []
        for key in ("", "_without_boolq"):
            diff = row[f"vs_reference{key}"]
            cells += [f"{100 * row['average' + key]:.2f} ± {100 * row['se' + key]:.2f}",
                      "-" if diff is None else f"{100 * diff[0]:+.2f} ± {100 * diff[1]:.2f}"]
        weights = (row["quantize"] or report["dtype"]) + (" + LoRA" if row["lora"] else "")
        lines.append(f"| {name} | {row['omit'] or 'none'} | {weights} | {' | '.join(cells)} |")
    if report.get("lora_data"):
        lines += ["", f"LoRA training data (paper: Alpaca; none is reachable here): {report['lora_data']}."]
    return "\n".join(lines) + "\n"


def lora_data(bundle: Path) -> str:
    """What the bundle's adapters were trained on, from the first adapter's record."""
    from pudding.lora import ADAPTER_INFO, ADAPTERS

    infos = sorted((bundle / ADAPTERS).glob(f"*/{ADAPTER_INFO}"))
    if not infos:
        return ""
    info = json.loads(infos[0].read_text())
    recipe = info["recipe"]
    return (f"{info['data']['examples']} examples ({', '.join(f'{k} {v}' for k, v in info['data']['per_source'].items())}), "
            f"up to {recipe['max_length']} tokens; rank {recipe['rank']}, alpha {recipe['alpha']}, lr {recipe['lr']}, "
            f"{recipe['epochs']} epochs of {recipe['batch_size']} examples per step; {len(infos)} adapters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=["quantized", "lora"], required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    model = bundle.model_ref().name
    folder = args.output.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    table, reference = rows(args.table, args.bundle)
    documents = {name: evaluate(name, opts, model, args.limit, args.device, folder) for name, opts in table.items()}
    report = provenance(args)
    tasks = list(PAPER_TASKS)
    report.update(table=args.table, reference=reference, model=model, limit=args.limit, tasks=tasks,
                  dtype=documents["dense"]["model"]["dtype"], rows={})
    if args.table == "lora":
        report["lora_data"] = lora_data(args.bundle)
    for name, doc in documents.items():
        blocks = doc["omission"].get("blocks")
        row = report["rows"][name] = {"omit": ",".join(map(str, blocks)) if blocks else doc["omission"].get("label"),
                                      "quantize": doc["model"].get("quantize"), "lora": bool(doc["settings"].get("lora"))}
        for key, among in (("", tasks), ("_without_boolq", [t for t in tasks if t != "boolq"])):
            row["average" + key], row["se" + key] = average_with_stderr(doc, among)
            row["vs_reference" + key] = None if name == reference else paired_average_difference(doc, documents[reference], among)
    save(report, args.output)
    atomic_write_text(args.output.with_suffix(".md"), markdown(report))


if __name__ == "__main__":
    main()
