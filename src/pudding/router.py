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
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.lr < math.inf or self.max_length < 8:
            raise PuddingError("router settings must be positive (epochs, batch size, learning rate, max length >= 8)")
        if not 0 <= self.weight_decay < math.inf:
            raise PuddingError("--weight-decay must be a finite number >= 0")
        if not 0 <= self.val_fraction < 1:
            raise PuddingError("--val-fraction must be in [0, 1)")


class Router(nn.Module):
    def __init__(self, encoder: nn.Module, num_sets: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_sets)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted per-set scores; without a mask every position is a real token (one unpadded prompt)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            return self.head(hidden.mean(1))
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


def labels_digest(table: LabelTable) -> str:
    """Identity of a label table's content (prompts and labels), for checkpoints."""
    import hashlib

    digest = hashlib.sha256(json.dumps([table.prompts, table.sets]).encode())
    digest.update(np.ascontiguousarray(table.labels, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def regression_targets(labels: np.ndarray, objective: str) -> np.ndarray:
    """What the router regresses. For MSE: each prompt's losses minus their mean, in units of their spread over the
    table. Which set is best is unchanged, but the router no longer spends itself on predicting how hard a prompt is
    (the row mean, most of the variance), which made it pick one set for every prompt."""
    if objective != "mse":
        return labels
    centered = labels - labels.mean(1, keepdims=True)
    return centered / max(float(centered.std()), 1e-6)


def train_router(table: LabelTable, settings: RouterSettings, device: str = "cpu", log=None,
                 checkpoint: Path | None = None):
    """Fine-tune encoder + head on the label table; returns (router, tokenizer, history, split).

    With `checkpoint` (a directory), the whole training state is saved at every epoch end and a rerun resumes
    from it; the result is bit-identical to an uninterrupted run on the same machine."""
    from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

    from .models import resolve_model

    settings.validate()
    if len(table) < 2:
        raise PuddingError("router training needs at least two labelled prompts")
    ref = resolve_model(settings.encoder, kind="encoder")
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(ref.directory)
    encoder = AutoModel.from_pretrained(ref.directory, dtype=torch.float32)
    router = Router(encoder, table.labels.shape[1]).to(device)
    encoded = tokenizer(table.prompts, truncation=True, max_length=settings.max_length)
    order = np.random.default_rng(settings.seed).permutation(len(table))
    n_val = int(round(settings.val_fraction * len(table))) if settings.val_fraction else 0
    val_rows, train_rows = order[:n_val], order[n_val:]
    labels = torch.tensor(regression_targets(table.labels, settings.objective), dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(router.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, min(settings.warmup_steps, total // 2), total)
    val_batches = _batches(encoded, np.sort(val_rows), 128, device)
    history = TrainingHistory()
    shuffle = np.random.default_rng(settings.seed + 1)
    identity = {"settings": asdict(settings), "labels": labels_digest(table), "encoder": ref.fingerprint, "device": str(device)}
    store = TrainingCheckpoint(checkpoint, identity)
    first_epoch, spent = store.restore(router, optimizer, scheduler, shuffle, history)
    if first_epoch and log:
        log(f"  resuming after epoch {first_epoch} from {checkpoint}")
    started = time.perf_counter() - spent
    with progress_bar("train router", total=total, unit="step") as advance:
        advance(first_epoch * steps_per_epoch)
        for epoch in range(first_epoch, settings.epochs):
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
            if epoch + 1 < settings.epochs:  # the last epoch's state is the router itself, saved by the caller
                store.save(epoch + 1, router, optimizer, scheduler, shuffle, history, time.perf_counter() - started)
    router.eval()
    meta = {"seconds": round(time.perf_counter() - started, 1), "train_rows": len(train_rows), "val_rows": len(val_rows),
            "encoder_fingerprint": ref.fingerprint}
    return router, tokenizer, history, meta


def train_bundle_router(bundle, table: LabelTable, settings: RouterSettings, device: str = "cpu", log=None) -> Path:
    """Train a router on a bundle's label table and save it in the bundle (router/, or router-OBJECTIVE/ for the
    ablations). Resumable: the training state is checkpointed beside it at every epoch end until the router is
    recorded."""
    from .bundle import router_path
    from .storage import partial_path

    directory = router_path(bundle, settings.objective)
    router, tokenizer, history, meta = train_router(table, settings, device, log, partial_path(directory))
    with bundle.writing(directory):  # drops the checkpoint once the router is recorded
        save_router(directory, router, tokenizer, settings, table.sets, history, meta, bundle.model)
    return directory


class TrainingCheckpoint:
    """Router training state at an epoch end, as safetensors (weights, optimizer moments, torch RNG) and JSON
    (optimizer settings, scheduler, shuffling generator, history), never pickle. Written as one directory that
    replaces the previous one atomically."""

    TENSORS, STATE = "state.safetensors", "state.json"

    def __init__(self, directory: Path | None, identity: dict) -> None:
        self.directory = directory
        self.identity = identity

    def save(self, epochs_done: int, router: Router, optimizer, scheduler, shuffle: np.random.Generator,
             history: TrainingHistory, seconds: float) -> None:
        from safetensors.torch import save_file

        from .storage import atomic_directory, atomic_write_json

        if self.directory is None:
            return
        tensors = {f"model.{k}": v for k, v in router.state_dict().items()}
        optim = optimizer.state_dict()
        for index, state in optim["state"].items():
            tensors.update({f"optim.{index}.{k}": v for k, v in state.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        with atomic_directory(self.directory) as tmp:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp / self.TENSORS))
            atomic_write_json(tmp / self.STATE, {
                "identity": self.identity, "epochs_done": epochs_done, "seconds": seconds, "history": asdict(history),
                "param_groups": optim["param_groups"], "scheduler": scheduler.state_dict(),
                "shuffle": shuffle.bit_generator.state,
            })

    def restore(self, router: Router, optimizer, scheduler, shuffle: np.random.Generator,
                history: TrainingHistory) -> tuple[int, float]:
        """Load a saved state into the given objects; returns (epochs done, seconds spent), (0, 0.0) if none."""
        if self.directory is None or not (self.directory / self.STATE).exists():
            return 0, 0.0
        from safetensors.torch import load_file

        try:
            state = json.loads((self.directory / self.STATE).read_text(encoding="utf-8"))
            tensors = load_file(str(self.directory / self.TENSORS))
        except Exception:
            raise PuddingError(f"checkpoint {self.directory} is corrupted: delete it to train from the start") from None
        if state.get("identity") != self.identity:
            raise PuddingError(f"checkpoint {self.directory} belongs to a different training (other labels, encoder or "
                               "settings): delete it to train from the start")
        router.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        moments: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                moments.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
        scheduler.load_state_dict(state["scheduler"])
        shuffle.bit_generator.state = state["shuffle"]
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        history.epochs[:] = state["history"]["epochs"]
        history.steps[:] = state["history"]["steps"]
        return int(state["epochs_done"]), float(state["seconds"])


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
        from safetensors import SafetensorError
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
            encoder = AutoModel.from_pretrained(directory / "encoder", dtype=torch.float32)
            head = load_file(str(directory / "head.safetensors"))
            router = Router(encoder, len(config["sets"]))
            router.head.load_state_dict(head)
            settings = RouterSettings(**config["settings"])
        except (OSError, ValueError, SafetensorError, RuntimeError, KeyError, TypeError) as err:
            raise PuddingError(f"router in {directory} is damaged ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): retrain it") from None
        self._setup(router, tokenizer, settings, config["sets"], device)
        self.config = config

    @classmethod
    def untrained(cls, encoder: str, sets: list[list[int]], device: str = "cpu") -> LoadedRouter:
        """An encoder with a fresh head: routes like a trained router takes time to (for speed measurements)."""
        from transformers import AutoModel, AutoTokenizer

        from .models import resolve_model

        ref = resolve_model(encoder, kind="encoder")
        torch.manual_seed(0)
        router = Router(AutoModel.from_pretrained(ref.directory, dtype=torch.float32), len(sets))
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
        self._graphs = _GraphedRouter(self.router, settings.objective) if str(device).startswith("cuda") else None

    def _tokenize(self, prompts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """One tokenizer pass. An over-long prompt keeps its first max_length - 1 tokens and its closing special
        token, exactly what the tokenizer's own truncation (used in training) gives."""
        limit = self.settings.max_length
        encoded = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        return [ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:] for ids in encoded], [len(ids) > limit for ids in encoded]

    def warm_up(self, lengths=range(1, 129)) -> None:
        """Capture the batch-1 graphs ahead for prompts of these token lengths, so no request pays for it."""
        if self._graphs is not None:
            for length in lengths:
                if length <= self.settings.max_length:
                    self._graphs.scores([self.tokenizer.cls_token_id or 0] * length)

    @torch.inference_mode()
    def route(self, prompts: list[str], batch_size: int = 64) -> RouteResult:
        if any(not p.strip() for p in prompts):
            raise PuddingError("cannot route an empty prompt")
        sync = torch.cuda.synchronize if str(self.device).startswith("cuda") else (lambda: None)
        sync()
        started = time.perf_counter()
        ids, truncated = self._tokenize(prompts)
        scores = self._graphs.scores(ids[0])[None] if len(ids) == 1 and self._graphs is not None else None
        if scores is None:
            predicted = []
            for batch, mask, _ in _batches({"input_ids": ids}, np.arange(len(prompts)), batch_size, self.device):
                predicted.append(predicted_losses(self.router(batch, mask), self.settings.objective).float().cpu().numpy())
            scores = np.concatenate(predicted)
        sync()
        return RouteResult(scores.argmin(1).tolist(), scores, truncated, time.perf_counter() - started)


class _GraphedRouter:
    """Batch-1 routing on a GPU as one CUDA-graph replay per prompt length. An encoder run eagerly at batch 1 is
    bound by kernel launches (about 4 ms for MiniLM-L6 on an H100); the replay launches them all at once. One prompt
    needs no padding, so no mask: the graph holds only the token ids."""

    def __init__(self, router: Router, objective: str) -> None:
        self.router = router
        self.objective = objective
        self.graphs: dict[int, tuple] = {}
        self.pool = None  # one memory pool for all lengths: graphs replay one at a time
        self.broken = False  # an encoder whose forward cannot be captured falls back to eager routing

    @torch.inference_mode()
    def scores(self, ids: list[int]) -> np.ndarray | None:
        if self.broken:
            return None
        if len(ids) not in self.graphs:
            try:
                self.graphs[len(ids)] = self._capture(len(ids))
            except RuntimeError:
                self.broken = True
                return None
        static_ids, out, graph = self.graphs[len(ids)]
        static_ids.copy_(torch.tensor(ids).view(1, -1))
        graph.replay()
        return out.float().cpu().numpy()[0]

    def _capture(self, length: int) -> tuple:
        device = next(self.router.parameters()).device
        static_ids = torch.zeros(1, length, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture: lazy initialisation, allocator
                self.router(static_ids)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = predicted_losses(self.router(static_ids), self.objective)
        return static_ids, out, graph


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
