"""The router (PuDDing §5.2): a pretrained text encoder with one linear layer on top, fine-tuned to predict, from the
prompt alone, the loss of every candidate omission set; a prompt goes to the set with the lowest prediction.

Objectives (paper Table 12):
* `mse`        - regress the label vector of tl values (default, the paper's choice);
* `ce-soft`    - cross-entropy against softmax(-tl), i.e. the sets' likelihoods as soft targets;
* `ce-onehot`  - cross-entropy against the single best set.
For the cross-entropy routers the predicted loss of a set is its negative log-probability, so every router answers
the same question ("lower is better") and is used the same way.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import PuddingError
from .labels import LabelTable
from .progress import progress_bar

OBJECTIVES = ("mse", "ce-soft", "ce-onehot")


@dataclass
class RouterSettings:
    encoder: str = "minilm-l6"
    objective: str = "mse"
    lr: float = 1e-5  # the paper's AdamW settings
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: int = 10
    warmup_steps: int = 500
    max_length: int = 256  # prompt tokens the encoder reads; longer prompts are truncated (and say so)
    val_fraction: float = 0.1  # held out for the convergence curve
    seed: int = 0

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PuddingError(f"unknown router objective '{self.objective}' (use {', '.join(OBJECTIVES)})")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.max_length < 8:
            raise PuddingError("router settings must be positive (epochs, batch size, learning rate, max length >= 8)")
        if not 0 <= self.val_fraction < 1:
            raise PuddingError("--val-fraction must be in [0, 1)")


class Router(nn.Module):
    def __init__(self, encoder: nn.Module, num_sets: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_sets)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean pooling, as these encoders were trained
        return self.head(pooled)


def predicted_losses(output: torch.Tensor, objective: str) -> torch.Tensor:
    """What each set is predicted to cost (lower is better), whatever the objective."""
    return output if objective == "mse" else -torch.log_softmax(output.float(), dim=-1)


def objective_loss(output: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    if objective == "mse":
        return nn.functional.mse_loss(output.float(), labels)
    if objective == "ce-soft":
        return nn.functional.cross_entropy(output.float(), torch.softmax(-labels, dim=-1))
    return nn.functional.cross_entropy(output.float(), labels.argmin(dim=-1))


# ------------------------------------------------------------------------------------------------------------------
# Training


def _batches(encoded: dict, rows: np.ndarray, size: int, device) -> list[tuple]:
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = max(len(encoded["input_ids"][i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            seq = encoded["input_ids"][i]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        out.append((ids.to(device), mask.to(device), chunk))
    return out


@dataclass
class TrainingHistory:
    epochs: list[dict] = field(default_factory=list)  # per epoch: train loss, validation loss and routing quality
    steps: list[float] = field(default_factory=list)  # per optimisation step: training loss


def _routing_quality(predicted: np.ndarray, labels: np.ndarray) -> dict:
    choice = predicted.argmin(1)
    best = labels.argmin(1)
    regret = labels[np.arange(len(labels)), choice] - labels[np.arange(len(labels)), best]
    return {"picks_best_set": float((choice == best).mean()), "mean_regret_tl": float(regret.mean())}


def train_router(table: LabelTable, settings: RouterSettings, device: str = "cpu", log=None):
    """Fine-tune encoder + head on the label table; returns (router, tokenizer, history, split)."""
    from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

    from .models import resolve_model

    settings.validate()
    if len(table) < 2:
        raise PuddingError("router training needs at least two labelled prompts")
    ref = resolve_model(settings.encoder, kind="encoder")
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(ref.directory)
    encoder = AutoModel.from_pretrained(ref.directory)
    router = Router(encoder, table.labels.shape[1]).to(device)
    encoded = tokenizer(table.prompts, truncation=True, max_length=settings.max_length)
    order = np.random.default_rng(settings.seed).permutation(len(table))
    n_val = int(round(settings.val_fraction * len(table))) if settings.val_fraction else 0
    val_rows, train_rows = order[:n_val], order[n_val:]
    labels = torch.tensor(table.labels, dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(router.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, min(settings.warmup_steps, total // 2), total)
    val_batches = _batches(encoded, np.sort(val_rows), 128, device)
    history = TrainingHistory()
    shuffle = np.random.default_rng(settings.seed + 1)
    started = time.perf_counter()
    with progress_bar("train router", total=total, unit="step") as advance:
        for epoch in range(settings.epochs):
            router.train()
            losses = []
            for ids, mask, chunk in _batches(encoded, shuffle.permutation(train_rows), settings.batch_size, device):
                loss = objective_loss(router(ids, mask), labels[torch.as_tensor(chunk, device=device)], settings.objective)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                history.steps.append(loss.item())
                advance(1)
            record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
            if val_batches:
                record.update(_validate(router, val_batches, labels, table.labels, settings.objective))
            history.epochs.append(record)
            if log:
                extra = f", val {record['val_loss']:.4f}, picks best {100 * record['picks_best_set']:.1f}%" if val_batches else ""
                log(f"  epoch {epoch + 1:2d}: train {record['train_loss']:.4f}{extra}")
    router.eval()
    meta = {"seconds": round(time.perf_counter() - started, 1), "train_rows": len(train_rows), "val_rows": len(val_rows),
            "encoder_fingerprint": ref.fingerprint}
    return router, tokenizer, history, meta


@torch.inference_mode()
def _validate(router: Router, batches, labels: torch.Tensor, label_array: np.ndarray, objective: str) -> dict:
    router.eval()
    total, count, predicted, rows = 0.0, 0, [], []
    for ids, mask, chunk in batches:
        output = router(ids, mask)
        target = labels[torch.as_tensor(chunk, device=labels.device)]
        total += objective_loss(output, target, objective).item() * len(chunk)
        count += len(chunk)
        predicted.append(predicted_losses(output, objective).float().cpu().numpy())
        rows.extend(chunk)
    router.train()
    return {"val_loss": total / count, **_routing_quality(np.concatenate(predicted), label_array[rows])}


# ------------------------------------------------------------------------------------------------------------------
# Saving, loading, routing


def save_router(directory: Path, router: Router, tokenizer, settings: RouterSettings, sets: list[list[int]],
                history: TrainingHistory, meta: dict, model: dict) -> None:
    from safetensors.torch import save_file

    from .storage import atomic_directory, atomic_write_json

    with atomic_directory(directory) as tmp:
        router.encoder.save_pretrained(tmp / "encoder", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "encoder")
        save_file({k: v.contiguous().cpu() for k, v in router.head.state_dict().items()}, str(tmp / "head.safetensors"))
        atomic_write_json(tmp / "router.json", {
            "settings": asdict(settings), "sets": sets, "model": model, "training": meta,
            "history": asdict(history),
        })
        plot_training(history, tmp / "training.png", settings)


def plot_training(history: TrainingHistory, path: Path, settings: RouterSettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = [e["epoch"] for e in history.epochs]
    ax.plot(epochs, [e["train_loss"] for e in history.epochs], marker="o", label="train")
    if history.epochs and "val_loss" in history.epochs[0]:
        ax.plot(epochs, [e["val_loss"] for e in history.epochs], marker="o", label="validation (held out)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{settings.objective} loss")
    ax.set_title(f"Router training ({settings.encoder}, {settings.objective})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class RouteResult:
    choices: list[int]  # index of the chosen set per prompt
    predicted: np.ndarray  # prompts x sets: predicted loss (lower is better)
    truncated: list[bool]  # prompt longer than the encoder reads
    seconds: float


class LoadedRouter:
    """A trained router ready to route prompts (on the CPU or next to the model on its GPU)."""

    def __init__(self, directory: Path, device: str = "cpu") -> None:
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        from .storage import read_json

        directory = Path(directory)
        config_path = directory / "router.json"
        if not config_path.exists():
            raise PuddingError(f"no router in {directory.parent}: train one with `pudding train-router --bundle {directory.parent}`")
        config = read_json(config_path, "router config")
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory / "encoder")
            encoder = AutoModel.from_pretrained(directory / "encoder")
            head = load_file(str(directory / "head.safetensors"))
        except (OSError, ValueError) as err:
            raise PuddingError(f"router in {directory} is damaged ({str(err).splitlines()[0]}): retrain it") from None
        router = Router(encoder, len(config["sets"]))
        router.head.load_state_dict(head)
        self._setup(router, tokenizer, RouterSettings(**config["settings"]), config["sets"], device)
        self.config = config

    @classmethod
    def untrained(cls, encoder: str, sets: list[list[int]], device: str = "cpu") -> LoadedRouter:
        """An encoder with a fresh head: routes like a trained router takes time to (for speed measurements)."""
        from transformers import AutoModel, AutoTokenizer

        from .models import resolve_model

        ref = resolve_model(encoder, kind="encoder")
        torch.manual_seed(0)
        router = Router(AutoModel.from_pretrained(ref.directory), len(sets))
        self = cls.__new__(cls)
        self._setup(router, AutoTokenizer.from_pretrained(ref.directory), RouterSettings(encoder=encoder), sets, device)
        self.config = {"settings": asdict(self.settings), "sets": sets}
        return self

    def _setup(self, router: Router, tokenizer, settings: RouterSettings, sets, device) -> None:
        self.router = router.to(device).eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.sets = sets
        self.device = device

    @torch.inference_mode()
    def route(self, prompts: list[str], batch_size: int = 64) -> RouteResult:
        if any(not p.strip() for p in prompts):
            raise PuddingError("cannot route an empty prompt")
        sync = torch.cuda.synchronize if str(self.device).startswith("cuda") else (lambda: None)
        sync()
        started = time.perf_counter()
        full_lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]
        encoded = self.tokenizer(prompts, truncation=True, max_length=self.settings.max_length)
        predicted = []
        for ids, mask, _ in _batches(encoded, np.arange(len(prompts)), batch_size, self.device):
            predicted.append(predicted_losses(self.router(ids, mask), self.settings.objective).float().cpu().numpy())
        sync()
        scores = np.concatenate(predicted)
        return RouteResult(scores.argmin(1).tolist(), scores, [n > self.settings.max_length for n in full_lengths],
                           time.perf_counter() - started)


def router_history(directory: Path) -> dict:
    return json.loads((Path(directory) / "router.json").read_text())["history"]


def routed_policy(router: LoadedRouter, sets, on_route=None):
    """PuDDing: route each question once (its prompt as a user would send it) and score every answer under the
    chosen set."""

    def policy(docs):
        result = router.route([d.prompt for d in docs])
        if on_route is not None:
            on_route(docs, result)
        return [sets[c] for c in result.choices]

    return policy
