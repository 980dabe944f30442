"""LoRA per omission set (paper §6.3, Table 4): after pruning, a low-rank update of the kept blocks recovers accuracy.

One adapter is trained per set, on the pruned model (blocks deleted and renumbered, as `export` writes it), with peft
and the recipe Shortened LLaMA uses (rank 8, alpha 16, dropout 0.05, every linear layer of the blocks, lr 1e-4, two
epochs, 64 examples per step). It is saved as peft writes it (adapter_model.safetensors + adapter_config.json, so
`PeftModel.from_pretrained` on the exported pruned model loads it) under the bundle's adapters/ folder, keyed by the
set's blocks, so a set that several methods found (a candidate that SLEB also found) has one adapter.

pudding applies an adapter to the full model, unmerged: each kept block's linear layers add scale * B(A(x)) to their
output while its set is in use, so documents routed to different sets are scored with their own adapters and the base
weights are never changed. `merge_adapter` folds it into a pruned model's weights for export.

The paper trains on Alpaca; no model hub is reachable here and no package on the index ships an instruction set, so
the training data are the calibration tasks' train splits (each question with its right answer) plus WikiText-2
train windows: reports say so.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from .architectures import architecture_for, resolve
from .errors import PuddingError
from .omission import OmissionSet
from .progress import progress_bar
from .storage import read_json

ADAPTERS = "adapters"
ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_INFO = "adapter_model.safetensors", "adapter_config.json", "pudding.json"
TEXT_CORPUS = "wikitext2"


@dataclass
class LoraRecipe:
    """Shortened LLaMA's LoRA settings (its repository's defaults), plus how much data to take."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 1e-4
    epochs: int = 2
    batch_size: int = 64  # examples per optimiser step
    micro_batch: int = 4  # examples per forward pass (gradients accumulate up to batch_size)
    max_length: int = 256  # tokens per example
    warmup_steps: int = 100
    per_task: int | None = None  # training questions per calibration task (None: the whole train split)
    text_windows: int = 1000  # WikiText-2 train windows of max_length tokens
    seed: int = 0
    save_every: int = 20  # optimiser steps between checkpoints

    @classmethod
    def small(cls, per_task: int | None) -> LoraRecipe:
        """Toy sizes for `pipeline --small` (the README's demo): a few steps on a CPU."""
        return cls(epochs=1, batch_size=8, micro_batch=4, max_length=32, per_task=per_task, text_windows=4, warmup_steps=2)

    def with_options(self, options: Sequence[str]) -> LoraRecipe:
        """This recipe with NAME=VALUE settings, named as `pudding lora`'s options (micro-batch=64, per-task=500,
        rank=16, lr=2e-4; per-task=all for whole train splits), validated."""
        known = [f.name for f in fields(self)]  # declaration order: the message reads the same on every run
        names = ", ".join(n.replace("_", "-") for n in known)
        changes = {}
        for option in options:
            name, equals, value = option.partition("=")
            key = name.strip().replace("-", "_")
            if not equals or key not in known:
                raise PuddingError(f"--lora-option '{option}' is not NAME=VALUE with NAME one of {names}")
            if key == "per_task" and value.strip().lower() == "all":
                changes[key] = None
                continue
            kind = float if key in ("lr", "dropout") else int
            try:
                changes[key] = kind(value)
            except ValueError:
                raise PuddingError(f"--lora-option {name.strip()}: '{value}' is not {'a number' if kind is float else 'an integer'}") from None
        recipe = replace(self, **changes)
        recipe.micro_batch = min(recipe.micro_batch, recipe.batch_size)  # a pass never holds more than a step
        recipe.validate()
        return recipe

    def validate(self) -> None:
        for name in ("rank", "alpha", "epochs", "batch_size", "micro_batch", "max_length", "save_every"):
            if getattr(self, name) < 1:
                raise PuddingError(f"LoRA {name.replace('_', ' ')} must be at least 1")
        if self.per_task is not None and self.per_task < 1:
            raise PuddingError("LoRA per task must be at least 1 (or all)")
        if self.text_windows < 0 or self.warmup_steps < 0:
            raise PuddingError("LoRA text windows and warm-up steps must be at least 0")
        if not 0 <= self.dropout < 1:
            raise PuddingError("LoRA dropout must be in [0, 1)")
        if not self.lr > 0 or self.lr == float("inf"):
            raise PuddingError("LoRA learning rate (--lr) must be positive and finite")

    def identity(self) -> dict:
        """What changes the adapter (not how often it is checkpointed)."""
        return {k: v for k, v in asdict(self).items() if k != "save_every"}


def target_modules(model) -> list[str]:
    """Names of the linear layers inside a block (q_proj, ..., down_proj in LLaMA-like families): LoRA's targets."""
    arch = architecture_for(model.config.model_type)
    block = getattr(resolve(model, arch.stack), arch.blocks)[0]
    return sorted({name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)})


def set_key(omit: OmissionSet) -> str:
    """The adapter folder of a set: omit-3-7-12."""
    return "omit-" + "-".join(map(str, omit)) if len(omit) else "dense"


# -- training data ---------------------------------------------------------------------------------------------------


def training_examples(tokenizer, recipe: LoraRecipe, tasks: Sequence[str], data_dir) -> tuple[list[list[int]], dict]:
    """Token ids of the training examples: every calibration task's train questions with their right answers, then
    WikiText-2 train windows. Returns (examples, a description of the data for the report)."""
    from .labels import training_docs
    from .tasks import get_task

    examples, counts = [], {}
    for name in tasks:
        docs = training_docs(name, recipe.per_task, recipe.seed, data_dir)
        for doc in docs:
            context, answer = doc.requests[doc.gold]
            examples.append(tokenizer(context + answer)["input_ids"][: recipe.max_length])
        counts[name] = len(docs)
    if recipe.text_windows:
        corpus = get_task(TEXT_CORPUS)
        ids = tokenizer(corpus.text(corpus.require_calibration_split(), data_dir))["input_ids"]
        windows = [ids[i : i + recipe.max_length] for i in range(0, len(ids) - recipe.max_length + 1, recipe.max_length)]
        chosen = np.random.default_rng(recipe.seed).permutation(len(windows))[: recipe.text_windows]
        examples += [windows[i] for i in sorted(chosen)]
        counts[TEXT_CORPUS] = len(chosen)
    examples = [e for e in examples if len(e) >= 2]
    if not examples:
        raise PuddingError("no LoRA training examples: the calibration tasks' train splits are empty")
    return examples, {"examples": len(examples), "per_source": counts, "max_length": recipe.max_length}


def _micro_batches(examples: list[list[int]], rows: np.ndarray, size: int, pad: int, device):
    for start in range(0, len(rows), size):
        chunk = [examples[i] for i in rows[start : start + size]]
        length = max(map(len, chunk))
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        yield ids.to(device), mask.to(device)


# -- training --------------------------------------------------------------------------------------------------------


class _AdapterState:
    """What a training checkpoint keeps of a peft model: its LoRA tensors only (`TrainingCheckpoint` takes any object
    with state_dict / load_state_dict)."""

    def __init__(self, peft_model) -> None:
        self.peft_model = peft_model

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.peft_model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft_model, state)


def peft_config(model, recipe: LoraRecipe):
    from peft import LoraConfig

    return LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                      target_modules=target_modules(model), bias="none", task_type="CAUSAL_LM")


def train_adapter(model, tokenizer, omit: OmissionSet, examples: list[list[int]], recipe: LoraRecipe, identity: dict,
                  checkpoint: Path | None = None, log=None):
    """Train one adapter for `omit` on the pruned model; returns (peft model, history, seconds). With `checkpoint`
    (a directory) the training state is saved every `recipe.save_every` steps and a rerun resumes from it."""
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    from .export import delete_blocks
    from .router_training import TrainingCheckpoint, TrainingHistory

    recipe.validate()
    torch.manual_seed(recipe.seed)
    device = next(model.parameters()).device
    peft_model = get_peft_model(delete_blocks(model, omit), peft_config(model, recipe))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, min(recipe.warmup_steps, total // 10), total)
    orders = [np.random.default_rng(recipe.seed + 1 + e).permutation(len(examples)) for e in range(recipe.epochs)]
    history = TrainingHistory()
    store = TrainingCheckpoint(checkpoint, {**identity, "set": list(omit), "recipe": recipe.identity()})
    done, spent = store.restore(_AdapterState(peft_model), optimizer, scheduler, history)  # orders: drawn up front
    if done and log:
        log(f"  resuming after step {done} of {total} from {checkpoint}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    started = time.perf_counter() - spent
    peft_model.train()
    with progress_bar(f"LoRA {omit.label()}", total=total, unit="step") as advance:
        advance(done)
        for step in range(done, total):
            epoch, index = divmod(step, steps_per_epoch)
            rows = orders[epoch][index * recipe.batch_size : (index + 1) * recipe.batch_size]
            history.steps.append(_optimiser_step(peft_model, examples, rows, recipe.micro_batch, pad, device, optimizer))
            scheduler.step()
            advance(1)
            if (step + 1) % steps_per_epoch == 0:
                history.epochs.append({"epoch": epoch + 1, "train_loss": float(np.mean(history.steps[-steps_per_epoch:]))})
                if log:
                    log(f"  epoch {epoch + 1}: train loss {history.epochs[-1]['train_loss']:.4f}")
            if (step + 1) % recipe.save_every == 0 and step + 1 < total:
                store.save(step + 1, _AdapterState(peft_model), optimizer, scheduler, history, time.perf_counter() - started)
    peft_model.eval()
    return peft_model, history, time.perf_counter() - started


def _optimiser_step(peft_model, examples, rows, micro_batch: int, pad: int, device, optimizer) -> float:
    """One step over `rows`: the mean next-token loss over all their tokens, accumulated micro-batch by micro-batch."""
    tokens = sum(len(examples[i]) - 1 for i in rows)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for ids, mask in _micro_batches(examples, rows, micro_batch, pad, device):
        logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100, reduction="sum") / tokens
        loss.backward()
        total += loss.item()
    optimizer.step()
    return total


# -- adapters in a bundle ----------------------------------------------------------------------------------------------


def save_adapter(directory: Path, peft_model, info: dict) -> None:
    """peft's own files (loadable with PeftModel.from_pretrained on the exported pruned model) and pudding.json."""
    from .storage import atomic_directory, atomic_write_json

    with atomic_directory(directory) as tmp:
        peft_model.save_pretrained(str(tmp))
        atomic_write_json(tmp / ADAPTER_INFO, info)


@dataclass
class Adapter:
    """A set's LoRA update, in the full model's block numbering: per kept block, per linear layer, (A, scale * B)."""

    omit: OmissionSet
    weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # block -> module path -> (A, scaled B)
    info: dict

    @classmethod
    def load(cls, directory: Path, model) -> Adapter:
        from safetensors.torch import load_file

        arch = architecture_for(model.config.model_type)
        num_blocks = len(getattr(resolve(model, arch.stack), arch.blocks))
        info = read_json(directory / ADAPTER_INFO, "adapter description")
        config = read_json(directory / ADAPTER_CONFIG, "peft adapter config")
        omit = OmissionSet(info["set"], num_blocks)
        rank, alpha = config["r"], config["lora_alpha"]
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        kept = omit.kept()
        prefix = re.escape(f"base_model.model.{arch.stack}.{arch.blocks}.")
        pattern = re.compile(prefix + r"(\d+)\.(.+)\.lora_([AB])\.weight$")
        found: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for key, value in load_file(str(directory / ADAPTER_WEIGHTS)).items():
            match = pattern.match(key)
            if match is None or int(match.group(1)) >= len(kept):
                raise PuddingError(f"{directory / ADAPTER_WEIGHTS} has a tensor pudding does not know: {key}")
            found.setdefault(kept[int(match.group(1))], {}).setdefault(match.group(2), {})[match.group(3)] = value
        weights = {block: {path: (ab["A"], ab["B"] * scale) for path, ab in modules.items()} for block, modules in found.items()}
        return cls(omit, weights, info)

    @property
    def rank(self) -> int:
        return next(a.shape[0] for modules in self.weights.values() for a, _ in modules.values())

    def to(self, device, dtype) -> Adapter:
        moved = {b: {p: (a.to(device, dtype), bb.to(device, dtype)) for p, (a, bb) in m.items()} for b, m in self.weights.items()}
        return Adapter(self.omit, moved, self.info)

    def delta(self, block: int, path: str) -> torch.Tensor:
        """scale * B @ A: what merging adds to that layer's weight."""
        a, b = self.weights[block][path]
        return b.float() @ a.float()


@contextlib.contextmanager
def applied(blocks: torch.nn.ModuleList, adapter: Adapter | None) -> Iterator[None]:
    """While in the block, each adapted linear layer of the full model's `blocks` returns W x + scale * B A x."""
    if adapter is None:
        yield
        return
    handles = []
    for block, modules in adapter.weights.items():
        for path, (a, b) in modules.items():
            def add_update(module, inputs, output, a=a, b=b):
                x = inputs[0]
                return output + torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b).to(output.dtype)

            handles.append(blocks[block].get_submodule(path).register_forward_hook(add_update))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class AdapterStore:
    """The adapters of a bundle, loaded on first use and kept on the model's device."""

    def __init__(self, bundle_path: Path, model) -> None:
        self.root = Path(bundle_path) / ADAPTERS
        self.model = model
        self._loaded: dict[OmissionSet, Adapter] = {}

    def directory(self, omit: OmissionSet) -> Path:
        return self.root / set_key(omit)

    def has(self, omit: OmissionSet) -> bool:
        return (self.directory(omit) / ADAPTER_WEIGHTS).is_file()

    def get(self, omit: OmissionSet) -> Adapter | None:
        """The set's adapter (None for the dense model, which is not adapted); refused if the bundle lacks it."""
        if not len(omit):
            return None
        if omit not in self._loaded:
            if not self.has(omit):
                raise PuddingError(f"bundle {self.root.parent} has no LoRA adapter for the set omitting {omit.label()}: "
                                   "make them with `pudding lora --bundle ...`")
            param = next(self.model.parameters())
            self._loaded[omit] = Adapter.load(self.directory(omit), self.model).to(param.device, param.dtype)
        return self._loaded[omit]

    def for_sets(self, sets) -> dict[OmissionSet, Adapter]:
        """The adapters of these sets (the dense model has none), all of them required."""
        return {omit: self.get(omit) for omit in dict.fromkeys(sets) if len(omit)}

    def applied(self, blocks: torch.nn.ModuleList, omit: OmissionSet):
        return applied(blocks, self.get(omit))


def merge_adapter(model, adapter: Adapter) -> None:
    """Fold an adapter into a model's weights, in place: a pruned model (its blocks renumbered 0..n-1 over the set's
    kept blocks, as `export` writes it) or the full model (only the set's kept blocks change, so the model then
    computes the adapted set when run under that set)."""
    arch = architecture_for(model.config.model_type)
    blocks = getattr(resolve(model, arch.stack), arch.blocks)
    kept = adapter.omit.kept()
    if len(blocks) == adapter.omit.num_blocks:
        position = {b: b for b in kept}
    elif len(blocks) == len(kept):
        position = {b: i for i, b in enumerate(kept)}
    else:
        raise PuddingError("the adapter was trained for another omission set than this pruned model's")
    for block in kept:
        for path in adapter.weights.get(block, {}):
            layer = blocks[position[block]].get_submodule(path)
            merged = layer.weight.detach().float() + adapter.delta(block, path).to(layer.weight.device)
            # a new tensor, not an in-place add: a pruned model shares its weights with the model it was cut from
            layer.weight = torch.nn.Parameter(merged.to(layer.weight.dtype), requires_grad=False)


# -- a bundle's adapters -----------------------------------------------------------------------------------------------

SET_GROUPS = ("candidates", "sleb", "shortened-ppl", "shortgpt")  # what `pudding lora --sets` names
TABLE4_GROUPS = ("candidates", "sleb", "shortened-ppl")  # the paper's Table 4 rows (what the pipeline's lora stage trains)


def bundle_sets(bundle, groups: Sequence[str]) -> dict[str, OmissionSet]:
    """Name -> set for the groups asked for: the candidate pool (set0, set1, ...) and the static baselines the bundle
    holds (Table 4's SLEB + LoRA and Shortened LLaMA + LoRA rows)."""
    sets: dict[str, OmissionSet] = {}
    for group in groups:
        if group not in SET_GROUPS:
            raise PuddingError(f"unknown set group '{group}' (use {', '.join(SET_GROUPS)})")
        if group == "candidates":
            sets.update({f"set{i}": omit for i, omit in enumerate(bundle.omission_sets())})
            continue
        found = bundle.baseline(group)
        if found is None:
            raise PuddingError(f"bundle {bundle.path} has no {group} set yet: make it with "
                               f"`pudding eval --bundle {bundle.path} --method {group}` (or the pipeline)")
        sets[group] = found.omission()
    return sets


def train_bundle_adapters(bundle, model, tokenizer, sets: dict[str, OmissionSet], recipe: LoraRecipe,
                          tasks: Sequence[str], data_dir, log=print) -> dict[str, Path]:
    """An adapter for every set that lacks one, each recorded in the bundle (checksummed) as soon as it is trained;
    a crash loses at most `recipe.save_every` steps of the set in training."""
    import hashlib

    from .storage import partial_path
    from .tasks import data_versions

    recipe.validate()
    store = AdapterStore(bundle.path, model)
    names_of: dict[OmissionSet, list[str]] = {}
    for name, omit in sets.items():
        names_of.setdefault(omit, []).append(name)
    todo = [omit for omit in names_of if len(omit) and not store.has(omit)]
    if todo:
        examples, data = training_examples(tokenizer, recipe, tasks, data_dir)
        digest = hashlib.sha256(repr(examples).encode()).hexdigest()[:16]
        identity = {"model": bundle.model["fingerprint"], "data": digest, "dtype": str(next(model.parameters()).dtype)}
        log(f"LoRA training data: {data['examples']} examples ({data['per_source']}), up to {recipe.max_length} tokens")
    for omit in todo:
        directory = store.directory(omit)
        peft_model, history, seconds = train_adapter(model, tokenizer, omit, examples, recipe, identity,
                                                     partial_path(directory), log)
        info = {"set": list(omit), "names": names_of[omit], "model": bundle.model, "recipe": asdict(recipe),
                "data": {**data, "digest": digest, "versions": data_versions([*tasks, TEXT_CORPUS], data_dir)},
                "history": asdict(history), "seconds": round(seconds, 1),
                "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad)}
        with bundle.writing(directory):
            save_adapter(directory, peft_model, info)
        log(f"adapter for {', '.join(names_of[omit])} (omit {omit.label()}) → {directory}")
    return {name: store.directory(omit) for name, omit in sets.items() if len(omit)}
