"""Which prompt features can route, and what would routing cost? A linear probe (ridge regression onto each prompt's
label vector, the set with the lowest prediction chosen, as the router's head does) trained on a bundle's labelled
prompts and scored on held-out ones (`labels.heldout_split`, the split the router and the deployed policy use), from:

* `embeddings`: the decoder's own input embeddings of the prompt, mean-pooled: free at inference, since pre-fill
  looks them up anyway (no encoder, no second tokenizer);
* `prefix`: the decoder's hidden state after the blocks every candidate set keeps (the part of pre-fill that runs
  before a choice is needed), mean-pooled; absent when the sets share no first block;
* `dense-last`: the dense decoder's last hidden state, mean-pooled (a whole dense pre-fill: a reference, not a router);
* `encoder`: the router's encoder (MiniLM-L6) frozen, mean-pooled (what a trained router starts from).

Against: the best single set (lowest mean label on the training prompts), the per-task best set (an oracle told the
task) and the per-prompt best set (the labels' floor). Ridge strength per feature is chosen on a split of the training
prompts. Labels come from `pudding label --bundle DIR`.

    python benchmarks/router_features.py --bundle DIR [--model smollm2-135m] [--output results/....json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pudding.labels import LabelTable, heldout_split
from pudding.models import load_decoder, resolve_model
from pudding.router import mean_pooled
from pudding.router_training import ridge, ridge_predict

MAX_TOKENS = 256  # what the router reads


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return mean_pooled(hidden.float(), mask).numpy()


@torch.inference_mode()
def decoder_features(prompts: list[str], model_name: str, prefix: int, batch: int = 16) -> dict[str, np.ndarray]:
    loaded = load_decoder(model_name, "cpu", "float32")
    tokenizer, model = loaded.tokenizer, loaded.model
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out: dict[str, list] = {"embeddings": [], "dense-last": [], **({"prefix": []} if prefix else {})}
    for start in range(0, len(prompts), batch):
        enc = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True, truncation=True,
                        max_length=MAX_TOKENS)
        hidden = model(**enc, output_hidden_states=True).hidden_states  # [embeddings, after block 1, ...]
        out["embeddings"].append(pooled(hidden[0], enc["attention_mask"]))
        out["dense-last"].append(pooled(hidden[-1], enc["attention_mask"]))
        if prefix:
            out["prefix"].append(pooled(hidden[prefix], enc["attention_mask"]))
    return {name: np.concatenate(rows) for name, rows in out.items()}


@torch.inference_mode()
def encoder_features(prompts: list[str], encoder: str = "minilm-l6", batch: int = 64) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    ref = resolve_model(encoder, kind="encoder")
    tokenizer, model = AutoTokenizer.from_pretrained(ref.directory), AutoModel.from_pretrained(ref.directory).eval()
    rows = []
    for start in range(0, len(prompts), batch):
        enc = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True, truncation=True,
                        max_length=MAX_TOKENS)
        rows.append(pooled(model(**enc).last_hidden_state, enc["attention_mask"]))
    return np.concatenate(rows)


def chosen_loss(choice: np.ndarray, labels: np.ndarray) -> float:
    """Mean label of the chosen sets."""
    return float(labels[np.arange(len(labels)), choice].mean())


def probe(x: np.ndarray, labels: np.ndarray, train: np.ndarray, held: np.ndarray) -> dict:
    inner_train, inner_val = train[: int(0.8 * len(train))], train[int(0.8 * len(train)) :]
    strengths = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    scores = {s: chosen_loss(ridge_predict(ridge(x[inner_train], labels[inner_train], s), x[inner_val]).argmin(1),
                             labels[inner_val]) for s in strengths}
    strength = min(scores, key=scores.get)
    choice = ridge_predict(ridge(x[train], labels[train], strength), x[held]).argmin(1)
    return {"chosen": labels[held][np.arange(len(held)), choice], "picks_best": float((choice == labels[held].argmin(1)).mean()),
            "sets_used": len(set(choice.tolist())), "ridge_strength": strength}


def split_result(features: dict, labels: np.ndarray, tasks: np.ndarray, fraction: float, seed: int) -> dict:
    """References and probes on one held-out split; regrets against the per-prompt best set."""
    train, held = heldout_split(len(labels), fraction, seed)
    floor = labels[held].min(1)
    best_single = int(labels[train].mean(0).argmin())
    per_task = {t: int(labels[train][tasks[train] == t].mean(0).argmin()) for t in set(tasks.tolist())}
    chosen = {"best single set": labels[held][:, best_single],
              "per-task best set (told the task)": labels[held][np.arange(len(held)), [per_task[t] for t in tasks[held]]]}
    probes = {name: probe(x, labels, train, held) for name, x in features.items()}
    chosen.update({f"probe: {name}": p["chosen"] for name, p in probes.items()})
    out = {name: {"regret": float((c - floor).mean())} for name, c in chosen.items()}
    for name, p in probes.items():
        out[f"probe: {name}"].update(picks_best=p["picks_best"], sets_used=p["sets_used"], ridge_strength=p["ridge_strength"])
    if "encoder" in features:  # each probe against the encoder's, paired on the same prompts
        for name in features:
            difference = chosen[f"probe: {name}"] - chosen["probe: encoder"]
            out[f"probe: {name}"]["vs_encoder"] = [float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(len(held)))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--heldout", type=float, default=0.2)
    parser.add_argument("--splits", type=int, default=5, help="held-out splits (seeds 0..N-1; 0 is the product's)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    table = LabelTable.load(args.bundle / "labels.parquet")
    labels, tasks = table.labels.astype(np.float64), np.array(table.tasks)
    prefix = min(min(s) for s in table.sets)  # blocks 0 .. prefix - 1 are kept by every set
    started = time.perf_counter()
    features = decoder_features(table.prompts, args.model, prefix)
    features["encoder"] = encoder_features(table.prompts)
    seconds = time.perf_counter() - started
    splits = [split_result(features, labels, tasks, args.heldout, seed) for seed in range(args.splits)]
    names = list(splits[0])
    summary = {name: {"regret_mean": float(np.mean([s[name]["regret"] for s in splits])),
                      "regret_sd": float(np.std([s[name]["regret"] for s in splits], ddof=1)) if len(splits) > 1 else 0.0,
                      **({"picks_best_mean": float(np.mean([s[name]["picks_best"] for s in splits]))}
                         if "picks_best" in splits[0][name] else {}),
                      **({"vs_encoder_mean": float(np.mean([s[name]["vs_encoder"][0] for s in splits]))}
                         if "vs_encoder" in splits[0][name] else {})} for name in names}
    held = splits[0]
    print(f"{len(table)} prompts, {args.heldout:.0%} held out, label {table.kind}; sets share blocks 0..{prefix - 1}; "
          f"features {seconds:.0f} s on {args.model}")
    print(f"| routing from | regret, split 0 (the product's) | vs frozen encoder, paired, split 0 | regret, mean of "
          f"{args.splits} splits (sd) | picks the best set, mean |")
    print("|---|---|---|---|---|")
    for name in names:
        vs = held[name].get("vs_encoder")
        picks = summary[name].get("picks_best_mean")
        print(f"| {name} | {held[name]['regret']:.4f} | {f'{vs[0]:+.4f} ± {vs[1]:.4f}' if vs else ''} | "
              f"{summary[name]['regret_mean']:.4f} ({summary[name]['regret_sd']:.4f}) | "
              f"{f'{100 * picks:.1f}%' if picks is not None else ''} |")
    if args.output:
        result = {"bundle": str(args.bundle), "model": args.model, "prompts": len(table), "heldout_fraction": args.heldout,
                  "label": table.kind, "shared_prefix_blocks": prefix, "feature_seconds": seconds,
                  "dims": {name: int(x.shape[1]) for name, x in features.items()}, "splits": splits, "summary": summary}
        args.output.write_text(json.dumps(result, indent=1))

if __name__ == "__main__":
    main()
