"""Training the router (PuDDing §5.2): fine-tune encoder + linear head on the soft labels (the tl of each training
prompt under every candidate set), resumable at every epoch end, and save it as safetensors + JSON."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import PuddingError
from .labels import LabelTable, heldout_split
from .omission import OmissionSet
from .progress import progress_bar
from .router import (
    DECODER_EMBEDDINGS, Router, RouterSettings, TokenTableRouter, batches, objective_loss, predicted_losses, read_tokens,
)


@dataclass
class TrainingHistory:
    epochs: list[dict] = field(default_factory=list)  # per epoch: train loss, validation loss and routing quality
    steps: list[float] = field(default_factory=list)  # per optimisation step: training loss


def _routing_quality(predicted: np.ndarray, labels: np.ndarray) -> dict:
    choice = predicted.argmin(1)
    best = labels.argmin(1)
    regret = labels[np.arange(len(labels)), choice] - labels[np.arange(len(labels)), best]
    return {"picks_best_set": float((choice == best).mean()), "mean_regret_tl": float(regret.mean())}


def regression_targets(labels: np.ndarray, objective: str) -> np.ndarray:
    """What the router regresses. For MSE: each prompt's losses minus their mean, in units of their spread over the
    table. Which set is best is unchanged, but the router no longer spends itself on predicting how hard a prompt is
    (the row mean, most of the variance), which made it pick one set for every prompt."""
    if objective != "mse":
        return labels
    centered = labels - labels.mean(1, keepdims=True)
    return centered / max(float(centered.std()), 1e-6)


def train_router(table: LabelTable, settings: RouterSettings, device: str = "cpu", log=None,
                 checkpoint: Path | None = None, val_rows=None):
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
    train_rows, val_rows = split_rows(table, settings, val_rows)
    labels = torch.tensor(regression_targets(table.labels, settings.objective), dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(router.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, min(settings.warmup_steps, total // 2), total)
    val_batches = batches(encoded, np.sort(val_rows), 128, device)
    history = TrainingHistory()
    shuffle = np.random.default_rng(settings.seed + 1)
    identity = {"settings": asdict(settings), "labels": table.digest(), "encoder": ref.fingerprint, "device": str(device),
                "held_out": hashlib.sha256(np.sort(val_rows).tobytes()).hexdigest()[:16]}
    store = TrainingCheckpoint(checkpoint, identity)
    first_epoch, spent = store.restore(router, optimizer, scheduler, history, shuffle)
    if first_epoch and log:
        log(f"  resuming after epoch {first_epoch} from {checkpoint}")
    started = time.perf_counter() - spent
    with progress_bar("train router", total=total, unit="step") as advance:
        advance(first_epoch * steps_per_epoch)
        for epoch in range(first_epoch, settings.epochs):
            router.train()
            losses = []
            for ids, mask, chunk in batches(encoded, shuffle.permutation(train_rows), settings.batch_size, device):
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
                store.save(epoch + 1, router, optimizer, scheduler, history, time.perf_counter() - started, shuffle)
    router.eval()
    meta = {"seconds": round(time.perf_counter() - started, 1), "train_rows": len(train_rows), "val_rows": len(val_rows),
            "encoder_fingerprint": ref.fingerprint, "labels": table.kind}
    return router, tokenizer, history, meta


def split_rows(table: LabelTable, settings: RouterSettings, val_rows=None) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows): the table's own held-out split, or the rows held out elsewhere (the main
    label table's held-out prompts, for a router trained on other labels)."""
    if val_rows is None:
        return heldout_split(len(table), settings.val_fraction, settings.seed)
    val_rows = np.asarray(val_rows, dtype=np.int64)
    return np.setdiff1d(np.arange(len(table)), val_rows), val_rows


RIDGE_STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the number of prompts, on standardized features


def train_embeddings_router(table: LabelTable, settings: RouterSettings, tokenizer, embeddings: torch.Tensor,
                            num_blocks: int, log=None, val_rows=None) -> tuple[TokenTableRouter, TrainingHistory, dict]:
    """The router on the decoder's input embeddings (`TokenTableRouter`): a ridge regression, in closed form, from each
    prompt's mean-pooled input embeddings (of the tokens the router reads) onto its regression targets. The ridge
    strength is the one whose routing is best (lowest mean label of the chosen sets) on the last fifth of the training
    rows when fitted on the rest; the head is then fitted on all training rows and folded into the token table."""
    settings.validate()
    if len(table) < 2:
        raise PuddingError("router training needs at least two labelled prompts")
    started = time.perf_counter()
    train_rows, val_rows = split_rows(table, settings, val_rows)
    ids, _ = read_tokens(tokenizer, table.prompts, settings.max_length, special_tokens=False)
    weight = embeddings.detach().cpu()
    features = torch.stack([weight[torch.tensor(row)].float().mean(0) for row in ids]).double().numpy()
    targets = regression_targets(table.labels, settings.objective).astype(np.float64)
    strength, scores = _ridge_strength(features, targets, table.labels, train_rows)
    head = ridge(features[train_rows], targets[train_rows], strength)
    mean, scale, weights, bias = head
    folded = torch.from_numpy(weights / scale[:, None]).float()
    token_table = torch.cat([chunk.float() @ folded for chunk in weight.split(16384)]).numpy()
    router = TokenTableRouter(token_table, (bias - (mean / scale) @ weights).astype(np.float32), tokenizer, settings,
                              [OmissionSet(s, num_blocks) for s in table.sets])
    loss = lambda rows: float(np.mean((ridge_predict(head, features[rows]) - targets[rows]) ** 2))
    record = {"epoch": 1, "train_loss": loss(train_rows)}
    if len(val_rows):
        record.update(val_loss=loss(val_rows), **_routing_quality(ridge_predict(head, features[val_rows]), table.labels[val_rows]))
    history = TrainingHistory(epochs=[record], steps=[record["train_loss"]])
    if log:
        extra = f", val {record['val_loss']:.4f}, picks best {100 * record['picks_best_set']:.1f}%" if len(val_rows) else ""
        log(f"  ridge strength {strength:g}: train {record['train_loss']:.4f}{extra}")
    meta = {"seconds": round(time.perf_counter() - started, 1), "train_rows": len(train_rows), "val_rows": len(val_rows),
            "encoder_fingerprint": None, "labels": table.kind, "ridge_strength": strength, "ridge_scores": scores}
    return router, history, meta


def _ridge_strength(features: np.ndarray, targets: np.ndarray, labels: np.ndarray, train_rows: np.ndarray) -> tuple[float, dict]:
    """The strength of RIDGE_STRENGTHS whose head, fitted on the first four fifths of the training rows, routes the
    last fifth best (lowest mean label of the chosen sets; ties: the stronger), and each strength's score."""
    inner = int(0.8 * len(train_rows))
    fit_rows, pick_rows = train_rows[:inner], train_rows[inner:]
    if inner < 2 or not len(pick_rows):
        return 0.1, {}
    scores = {}
    for strength in RIDGE_STRENGTHS:
        chosen = ridge_predict(ridge(features[fit_rows], targets[fit_rows], strength), features[pick_rows]).argmin(1)
        scores[f"{strength:g}"] = float(labels[pick_rows, chosen].mean())
    best = min(RIDGE_STRENGTHS, key=lambda s: (scores[f"{s:g}"], -s))
    return best, scores


def ridge(x: np.ndarray, y: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mean, scale, weights, bias) of a ridge regression of y on x standardized per feature."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    weights = np.linalg.solve(z.T @ z + strength * len(z) * np.eye(z.shape[1]), z.T @ (y - y.mean(0)))
    return mean, scale, weights, y.mean(0)


def ridge_predict(head, x: np.ndarray) -> np.ndarray:
    mean, scale, weights, bias = head
    return ((x - mean) / scale) @ weights + bias


def train_bundle_router(bundle, table: LabelTable, settings: RouterSettings, device: str = "cpu", log=None,
                        name: str = "router", val_rows=None, decoder=None) -> Path:
    """Train a router on a label table and save it in the bundle (router/, or router-NAME/). Resumable: the training
    state is checkpointed beside it at every epoch end until the router is recorded. A router on the decoder's
    embeddings needs `decoder`: (its tokenizer, its input embedding matrix); it trains in seconds, in one step."""
    from .storage import partial_path

    directory = bundle.router_dir(name)
    if settings.encoder == DECODER_EMBEDDINGS:
        if decoder is None:
            raise PuddingError("a router on the decoder's embeddings needs the bundle's model loaded")
        tokenizer = None  # the table router holds the decoder's
        router, history, meta = train_embeddings_router(table, settings, *decoder, bundle.model["num_blocks"], log,
                                                       val_rows)
    else:
        router, tokenizer, history, meta = train_router(table, settings, device, log, partial_path(directory), val_rows)
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

    def save(self, epochs_done: int, router: Router, optimizer, scheduler, history: TrainingHistory, seconds: float,
             shuffle: np.random.Generator | None = None) -> None:
        """`shuffle`: the generator that orders the training rows, when the order is drawn as training goes."""
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
                "shuffle": shuffle.bit_generator.state if shuffle is not None else None,
            })

    def restore(self, router: Router, optimizer, scheduler, history: TrainingHistory,
                shuffle: np.random.Generator | None = None) -> tuple[int, float]:
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
        if shuffle is not None:
            shuffle.bit_generator.state = state["shuffle"]
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        history.epochs[:] = state["history"]["epochs"]
        history.steps[:] = state["history"]["steps"]
        return int(state["epochs_done"]), float(state["seconds"])


@torch.inference_mode()
def _validate(router: Router, val_batches, labels: torch.Tensor, label_array: np.ndarray, objective: str) -> dict:
    router.eval()
    total, count, predicted, rows = 0.0, 0, [], []
    for ids, mask, chunk in val_batches:
        output = router(ids, mask)
        target = labels[torch.as_tensor(chunk, device=labels.device)]
        total += objective_loss(output, target, objective).item() * len(chunk)
        count += len(chunk)
        predicted.append(predicted_losses(output, objective).float().cpu().numpy())
        rows.extend(chunk)
    router.train()
    return {"val_loss": total / count, **_routing_quality(np.concatenate(predicted), label_array[rows])}


# ------------------------------------------------------------------------------------------------------------------
# Saving


def save_router(directory: Path, router: Router | TokenTableRouter, tokenizer, settings: RouterSettings,
                sets: list[list[int]], history: TrainingHistory, meta: dict, model: dict) -> None:
    """A trained router as one directory, written atomically: its weights (an encoder with its tokenizer and head,
    or a token table with the decoder's tokenizer), router.json and the training curve."""
    from safetensors.torch import save_file

    from .storage import atomic_directory, atomic_write_json

    with atomic_directory(directory) as tmp:
        if isinstance(router, TokenTableRouter):
            router.save(tmp)
        else:
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
